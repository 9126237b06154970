"""Top-1/top-5 accuracy, loss and confusion matrix of a model over validation batches, summed over
ranks, and the confusion-matrix plot.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Dict, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from ..engine.distributed import all_reduce_sum
from ..engine.metrics_log import save_figure


def autocast_context(device: torch.device, amp_dtype: Optional[torch.dtype]):
    """``torch.autocast`` for ``amp_dtype`` (bf16/fp16) on the device type, or a no-op."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable, device: torch.device, num_classes: int,
             amp_dtype: Optional[torch.dtype] = None, channels_last: bool = False,
             confusion: bool = False, lockstep: bool = False, progress: bool = False,
             desc: str = "eval", cuda_graph: bool = False) -> Dict[str, object]:
    """Accuracy over every batch of ``batches`` on this rank, summed over all ranks.

    Returns ``{"top1", "top5", "loss", "count"}`` (percent, mean cross-entropy, images) and, with
    ``confusion``, ``"confusion"``: a ``(classes, classes)`` int64 matrix, rows true, columns
    predicted. ``lockstep`` (FSDP) makes ranks with fewer batches run dummy forwards so that
    every rank calls the model equally often. ``cuda_graph`` replays the forward pass from a CUDA
    graph per batch shape (:class:`rmt.engine.cuda_graph.GraphedInference`; CUDA only).
    """
    if cuda_graph and device.type != "cuda":
        raise ValueError(f"--cuda-graph needs a CUDA device, the evaluation runs on {device.type}")
    was_training = model.training
    model.eval()
    graphed = None
    if cuda_graph:
        from ..engine.cuda_graph import GraphedInference
        graphed = GraphedInference(model, amp_dtype)
    k = min(5, num_classes)
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # top1, topk, loss, count
    matrix = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device) if confusion else None
    n_batches, shape = 0, None
    total = len(batches) if hasattr(batches, "__len__") and len(batches) else None
    for images, labels in tqdm(batches, desc=desc, total=total, disable=not progress, leave=False,
                               dynamic_ncols=True, mininterval=1.0):
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if graphed is not None:
            logits = graphed(images)
        else:
            with autocast_context(device, amp_dtype):
                logits = model(images)
        logits = logits.float()
        top = logits.topk(k, dim=1).indices
        hit = top == labels[:, None]
        sums += torch.stack([hit[:, 0].sum(), hit.any(dim=1).sum(),
                             F.cross_entropy(logits, labels, reduction="sum"),
                             torch.tensor(len(labels), device=device)]).double()
        if matrix is not None:
            matrix += torch.bincount(labels * num_classes + top[:, 0], minlength=num_classes ** 2)
        n_batches, shape = n_batches + 1, images.shape[1:]
    if lockstep and dist.is_available() and dist.is_initialized():
        most = torch.tensor([n_batches], device=device)
        dist.all_reduce(most, op=dist.ReduceOp.MAX)
        dummy = torch.zeros(1, *(shape or (3, 32, 32)), device=device)
        for _ in range(int(most.item()) - n_batches):
            with autocast_context(device, amp_dtype):
                model(dummy)
    if graphed is not None:
        graphed.release()
    sums = all_reduce_sum(sums)
    count = max(sums[3].item(), 1.0)
    out: Dict[str, object] = {"top1": 100.0 * sums[0].item() / count, "top5": 100.0 * sums[1].item() / count,
                              "loss": sums[2].item() / count, "count": int(sums[3].item())}
    if matrix is not None:
        out["confusion"] = all_reduce_sum(matrix).view(num_classes, num_classes).cpu()
    model.train(was_training)
    return out


def plot_confusion(matrix: torch.Tensor, class_names: Sequence[str], path: str | Path,
                   title: str = "confusion matrix") -> Path:
    """Row-normalised confusion matrix as a PNG (counts written in the cells for <= 20 classes)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = matrix.double()
    norm = m / m.sum(dim=1, keepdim=True).clamp_min(1)
    n = len(class_names)
    side = min(max(4.0, 0.45 * n + 2.5), 30.0)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    im = ax.imshow(norm.numpy(), cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    if n <= 40:
        ax.set_xticks(range(n), class_names, rotation=60, ha="right", fontsize=8)
        ax.set_yticks(range(n), class_names, fontsize=8)
    if n <= 20:
        for i in range(n):
            for j in range(n):
                if m[i, j] > 0:
                    ax.text(j, i, f"{int(m[i, j])}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def run_eval(args) -> int:
    """``rmt eval``: evaluate a checkpoint, print top-1/top-5, write the confusion matrix and JSON."""
    import json

    from ..engine import cleanup_distributed, setup_distributed
    from .config import validate
    from .data import build_data
    from .predict import load_classifier
    from .train import amp_dtype_for

    info = setup_distributed(args.device)
    try:
        clf = load_classifier(args.checkpoint, args.model, prefer_ema=not args.no_ema, device=info.device)
        cfg = dict(clf.config)
        spec = clf.spec
        if not clf.trained_by_us:
            cfg.update(dataset="folder", crop_pct=spec.crop_pct, input_size=spec.input_size,
                       mean=spec.mean, std=spec.std)
            if not args.data:
                raise ValueError("a released checkpoint needs --data (an ImageFolder tree with a val/ folder)")
        for key, value in (("dataset", args.dataset), ("data", args.data), ("val_split", args.split),
                           ("val_subset", args.subset), ("workers", args.workers),
                           ("input_size", args.input_size), ("crop_pct", args.crop_pct)):
            if value is not None:
                cfg[key] = value
        cfg.update(batch_size=max(args.batch_size // 2, 1), skip_bad_images=args.skip_bad_images,
                   mixup=0.0, cutmix=0.0)
        if cfg["dataset"] == "wds":
            cfg["val_data"] = args.data or cfg.get("val_data")
        validate(cfg)
        data = build_data(cfg, info, train=False)
        names = spec.class_names
        if clf.trained_by_us and list(data.spec.class_names) != list(names) and cfg["dataset"] != "wds":
            raise ValueError(f"the data set's classes ({len(data.spec.class_names)}: "
                             f"{', '.join(data.spec.class_names[:4])}...) differ from the checkpoint's "
                             f"({len(names)}: {', '.join(names[:4])}...)")
        if len(data.spec.class_names) != len(names):
            raise ValueError(f"the data set has {len(data.spec.class_names)} classes, the model {len(names)}")
        if not clf.trained_by_us:
            names = data.spec.class_names
        num_classes = len(names)
        m = evaluate(clf.model, data.val, info.device, num_classes, amp_dtype_for(args.amp, info.device),
                     confusion=num_classes <= 100, progress=info.is_main, desc="eval",
                     cuda_graph=args.cuda_graph)
        if not info.is_main:
            return 0
        split = cfg["val_split"] or ("test" if cfg["dataset"] == "fashion-mnist" else "val")
        out_dir = Path(args.out) if args.out else Path(args.checkpoint).parent
        out_dir.mkdir(parents=True, exist_ok=True)
        stem = f"eval_{Path(args.checkpoint).stem}_{split}"
        result = {"checkpoint": str(args.checkpoint), "model": clf.variant, "weights": clf.weights,
                  "dataset": cfg["dataset"], "split": split, "images": m["count"], "top1": m["top1"],
                  "top5": m["top5"], "loss": m["loss"]}
        if "confusion" in m:
            png = plot_confusion(m["confusion"], names, out_dir / f"{stem}_confusion.png",
                                 title=f"{clf.variant} ({clf.weights} weights), {split}: top-1 {m['top1']:.2f}%")
            result["confusion_png"] = str(png)
            result["confusion"] = m["confusion"].tolist()
            per_class = m["confusion"].diag().double() / m["confusion"].sum(dim=1).clamp_min(1)
            result["per_class_top1"] = {n: 100.0 * a for n, a in zip(names, per_class.tolist())}
        (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
        if args.json:
            print(json.dumps({k: v for k, v in result.items() if k != "confusion"}, indent=2))
        else:
            print(f"{clf.variant} ({clf.weights} weights) on {cfg['dataset']} {split}: top-1 {m['top1']:.2f}%  "
                  f"top-5 {m['top5']:.2f}%  loss {m['loss']:.4f}  ({m['count']} images)")
            if "confusion_png" in result:
                worst = sorted(result["per_class_top1"].items(), key=lambda kv: kv[1])[:3]
                print("lowest per-class top-1: " + ", ".join(f"{n} {a:.1f}%" for n, a in worst))
                print(f"confusion matrix: {result['confusion_png']}")
        return 0
    finally:
        cleanup_distributed()
