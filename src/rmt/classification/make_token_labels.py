"""``rmt token-labels make``: dense top-k label maps of a training set from a trained classifier of ours.

The teacher sees each training image whole, resized (squashed) to its input size, so that its map
covers exactly the image that the training crops are cut from. Its per-token logits come from the
last stage's tokens ``(b, h, w, c3)``:

* a teacher with the token-label aux head: ``aux_head`` on every token (as the token labeling
  toolbox's label generator does);
* any other RMT classifier: the classifier head applied per token (Linear, BatchNorm with its
  running statistics, Swish, class Linear, without the pooling). The mean of these token logits is
  exactly the teacher's own logits, since pooling and the class Linear commute.

Of every token the top-k logits and their classes are stored (:mod:`.label_maps`): one file per
image for an image folder (``OUT/CLASS/NAME.pt``; files already there are kept unless
``overwrite``, so an interrupted run continues), or one stacked file ``OUT/SPLIT.pt`` for
Fashion-MNIST. ``OUT/token_labels.json`` records the teacher, sizes and its accuracy on the split.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Dict, Optional

import torch
from tqdm import tqdm

from . import fashion_mnist, label_maps
from .data import DataSpec, ImageFolderDataset
from .evaluate import autocast_context


def token_logits(model: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Per-token class logits ``(b, h, w, classes)`` of an RMT classifier (see the module docstring)."""
    features = model.forward_features(images)
    aux = getattr(model, "aux_head", None)
    if aux is not None:
        return aux(features)
    head = model.head
    t = head.proj(features)
    t = head.norm(t.reshape(-1, t.shape[-1])).view(t.shape)
    return head.fc(t * torch.sigmoid(t))


def _folder_loader(root: Path, size: int, spec: DataSpec, batch_size: int, workers: Optional[int]):
    import os
    from timm.data import create_transform
    workers = min(4, os.cpu_count() or 1) if workers is None else workers
    transform = create_transform(size, is_training=False, interpolation=spec.interpolation, mean=tuple(spec.mean),
                                 std=tuple(spec.std), crop_pct=1.0, crop_mode="squash")
    dataset = ImageFolderDataset(root, transform)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, shuffle=False)
    return dataset, loader


def make_token_labels(teacher: str | Path, data: str | Path, out: str | Path, dataset: str = "folder",
                      split: str = "train", input_size: Optional[int] = None, top_k: int = 5, batch_size: int = 128,
                      device: Optional[str] = None, amp: str = "auto", workers: Optional[int] = None, overwrite: bool = False,
                      prefer_ema: bool = True, progress: bool = True) -> Dict[str, Any]:
    """Write the label maps of ``data``'s ``split`` to ``out``; returns the facts written to ``token_labels.json``."""
    from .predict import load_classifier
    from .train import amp_dtype_for
    if dataset not in ("folder", "fashion-mnist"):
        raise ValueError(f"--dataset must be folder or fashion-mnist, got {dataset!r}")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    clf = load_classifier(teacher, prefer_ema=prefer_ema, device=dev)
    model, spec = clf.model, clf.spec
    if not hasattr(model, "forward_features") or not hasattr(model, "head"):
        raise ValueError(f"'{teacher}' is not an RMT classifier")
    size = input_size or spec.input_size
    if size < 32:
        raise ValueError(f"input size must be at least 32, got {size}")
    num_classes = model.num_classes
    k = min(top_k, num_classes)
    amp_dtype = amp_dtype_for(amp, dev)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    correct = seen = written = 0

    def logits_of(images: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), autocast_context(dev, amp_dtype):
            return token_logits(model, images.to(dev, non_blocking=True)).float()

    if dataset == "fashion-mnist":
        from ..engine import DistInfo
        from .tensor_data import TensorBatches
        names = list(fashion_mnist.CLASS_NAMES)
        images, labels = fashion_mnist.load_split(data, split)
        _check_classes(clf, names, teacher)
        spec_at = DataSpec(**dict(spec.to_dict(), input_size=size))
        info = DistInfo(rank=0, world_size=1, local_rank=0, device=dev)
        batches = TensorBatches(images, labels, batch_size, spec_at, info, 0, train=False)
        maps = []
        for x, y in tqdm(batches, desc=f"token labels ({split})", unit="batch", disable=not progress,
                         dynamic_ncols=True, mininterval=1.0):
            logits = logits_of(x)
            correct += int((logits.mean((1, 2)).argmax(1) == y).sum())
            seen += len(y)
            top = logits.topk(k, dim=-1)
            maps.append(torch.stack([top.values, top.indices.float()], 1).permute(0, 1, 4, 2, 3).cpu())
        stacked = torch.cat(maps)
        label_maps.write_packed(out / f"{split}.pt", stacked.half() if num_classes < 2048 else stacked)
        written, grid = len(stacked), tuple(stacked.shape[-2:])
    else:
        root = Path(data) / split
        if not root.is_dir():
            raise FileNotFoundError(f"no '{split}' folder under '{data}' (expected {root}/CLASS/*.jpg)")
        ds, loader = _folder_loader(root, size, spec, batch_size, workers)
        _check_classes(clf, ds.class_names, teacher)
        targets = [label_maps.map_path(out, p, root) for p, _ in ds.samples]
        todo = overwrite or not all(t.is_file() for t in targets)
        grid = None
        for b, (x, y) in enumerate(tqdm(loader if todo else [], desc=f"token labels ({split})", unit="batch",
                                        disable=not progress, dynamic_ncols=True, mininterval=1.0)):
            paths = targets[b * batch_size:b * batch_size + len(y)]
            if not overwrite and all(p.is_file() for p in paths):
                continue
            logits = logits_of(x)
            correct += int((logits.mean((1, 2)).argmax(1).cpu() == y).sum())
            seen += len(y)
            top = logits.topk(k, dim=-1)
            scores, indices = top.values.permute(0, 3, 1, 2).cpu(), top.indices.permute(0, 3, 1, 2).cpu()
            grid = tuple(scores.shape[-2:])
            for path, s, i in zip(paths, scores, indices):
                if overwrite or not path.is_file():
                    label_maps.write_map(path, s, i)
                    written += 1
    facts = dict(teacher=str(teacher), weights=clf.weights, variant=clf.variant, dataset=dataset, data=str(data),
                 split=split, input_size=size, top_k=k, grid=list(grid) if grid else None, images_written=written,
                 classes=num_classes, head="aux_head" if getattr(model, "aux_head", None) is not None
                 else "classifier head per token",
                 teacher_top1_on_split=100.0 * correct / seen if seen else None,
                 seconds=round(time.perf_counter() - start, 1))
    (out / "token_labels.json").write_text(json.dumps(facts, indent=2))
    return facts


def _check_classes(clf, names, teacher) -> None:
    """The teacher must know the data set's classes (released teachers: the count; ours: the names)."""
    if clf.model.num_classes != len(names):
        raise ValueError(f"the teacher '{teacher}' has {clf.model.num_classes} classes, the data set {len(names)}")
    if clf.trained_by_us and list(clf.spec.class_names) != list(names):
        raise ValueError(f"the teacher '{teacher}' was trained on the classes {clf.spec.class_names[:4]}..., the data "
                         f"set has {list(names)[:4]}...: label maps would name the wrong classes")
