"""GPU benchmark: UperNet at 512x512 on RMT-S beside ConvNeXt-T and ResNet-50, one process, one table.

Every backbone gets the same decoder, this package's mmsegmentation-layout UperNet (UPerHead 512
channels + the auxiliary FCN head 256 on the stride-16 feature, :mod:`rmt.segmentation.heads`),
150 classes (ADE20K). ConvNeXt-T and ResNet-50 are timm's ``features_only`` models (strides
4-32), randomly initialised.

Training: batch 16, bf16 autocast, forward + backward (main loss + 0.4 x auxiliary loss) + AdamW
step. Inference: batch 16 (``--infer-batch``), bf16 autocast, forward only, under
torch.inference_mode. Prints a table (images/s, ms per batch, peak memory) and writes JSON.
Without CUDA it prints why and exits 0; ``--smoke`` runs everything on the CPU at a tiny size
(a small RMT, 64x64, small decoder widths) to check the script. About a minute on an H100.

    python benchmarks/segmentation.py                        # rmt_small, convnext_tiny, resnet50
    python benchmarks/segmentation.py --heads upernet fpn --backbones rmt_small rmt_base
    python benchmarks/segmentation.py --smoke                # CPU check, seconds
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout too

from rmt.benchmark import environment, save_rows  # noqa: E402
from rmt.model import MODEL_ARGS  # noqa: E402
from rmt.segmentation.engine import seg_loss  # noqa: E402
from rmt.segmentation.models import EncoderDecoder, build_heads, build_segmenter, describe  # noqa: E402

BACKBONES = ("rmt_small", "convnext_tiny", "resnet50")
SMOKE = dict(size=64, batch=2, infer_batch=2, steps=1, warmup=0, device="cpu",
             backbone_kwargs={"embed_dims": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "num_heads": [2, 2, 4, 8]},
             head_channels={"decode": 32, "aux": 16, "neck": 32})


def build(backbone: str, head: str, num_classes: int, backbone_kwargs: Optional[Dict[str, Any]] = None,
          head_channels: Optional[Dict[str, int]] = None) -> torch.nn.Module:
    """``head`` on an RMT variant, or on a timm model's stride-4..32 features (other backbones)."""
    channels = {k: v for k, v in (head_channels or {}).items() if head == "fpn" or k != "neck"}
    if backbone in MODEL_ARGS:
        return build_segmenter(backbone, head, num_classes, backbone_kwargs=backbone_kwargs, head_channels=channels)
    import timm
    probe = timm.create_model(backbone, features_only=True, pretrained=False)
    indices = [i for i, r in enumerate(probe.feature_info.reduction()) if r in (4, 8, 16, 32)]
    del probe
    features = timm.create_model(backbone, features_only=True, out_indices=indices, pretrained=False)
    in_channels = features.feature_info.channels()
    return EncoderDecoder(features, head=head,
                          **build_heads(head, in_channels, num_classes, head == "upernet", channels))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step, device: torch.device, steps: int, warmup: int) -> Dict[str, float]:
    """Seconds per call of ``step`` after ``warmup`` calls, and peak GPU memory (GiB) while running."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    out = {"seconds": (time.perf_counter() - start) / steps}
    if device.type == "cuda":
        out["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    return out


def bench_one(backbone: str, head: str, device: torch.device, size: int, batch: int, infer_batch: int,
              steps: int, warmup: int, num_classes: int = 150, amp: bool = True,
              backbone_kwargs: Optional[Dict[str, Any]] = None,
              head_channels: Optional[Dict[str, int]] = None) -> Dict[str, Any]:
    """Train and inference throughput of one segmentor; returns a result row."""
    torch.manual_seed(0)
    kwargs = backbone_kwargs if backbone in MODEL_ARGS else None
    model = build(backbone, head, num_classes, kwargs, head_channels).to(device)
    info = describe(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01, fused=device.type == "cuda")
    images = torch.randn(batch, 3, size, size, device=device)
    labels = torch.randint(0, num_classes, (batch, size, size), device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def train_step():
        with autocast:
            logits, aux = model(images, return_aux=True)
        loss = seg_loss(logits, labels) + (0.4 * seg_loss(aux, labels) if aux is not None else 0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    row: Dict[str, Any] = dict(backbone=backbone, head=head, size=size, params_m=round(info["params"] / 1e6, 2),
                               backbone_m=round(info["backbone_params"] / 1e6, 2), train_batch=batch,
                               infer_batch=infer_batch, precision="bf16" if amp else "fp32")
    model.train()
    t = timed(train_step, device, steps, warmup)
    row.update(train_img_s=round(batch / t["seconds"], 2), train_ms=round(t["seconds"] * 1e3, 1))
    if "peak_gib" in t:
        row["train_peak_gib"] = t["peak_gib"]

    del optimizer
    model.zero_grad(set_to_none=True)
    model.eval()
    x = torch.randn(infer_batch, 3, size, size, device=device)

    def infer_step():
        with torch.inference_mode(), autocast:
            model(x)

    t = timed(infer_step, device, steps, warmup)
    row.update(infer_img_s=round(infer_batch / t["seconds"], 2), infer_ms=round(t["seconds"] * 1e3, 1))
    if "peak_gib" in t:
        row["infer_peak_gib"] = t["peak_gib"]
    return row


def format_table(rows: List[Dict[str, Any]]) -> str:
    cols = [("backbone", "backbone"), ("head", "head"), ("params_m", "params(M)"), ("size", "size"),
            ("train_batch", "batch"), ("train_img_s", "train img/s"), ("train_ms", "train ms/it"),
            ("train_peak_gib", "train peak GiB"), ("infer_batch", "inf batch"), ("infer_img_s", "infer img/s"),
            ("infer_peak_gib", "infer peak GiB")]
    table = [[h for _, h in cols]] + [[str(r.get(k, "-")) for k, _ in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbones", nargs="+", default=list(BACKBONES),
                   help="RMT variants or timm model names (default: rmt_small convnext_tiny resnet50)")
    p.add_argument("--heads", nargs="+", default=["upernet"], choices=("upernet", "fpn"))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="training batch (default 16, the paper's total)")
    p.add_argument("--infer-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed iterations")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--backbone-kwargs", default=None, help="JSON of timm.create_model arguments for the RMT")
    p.add_argument("--smoke", action="store_true",
                   help="CPU check at a tiny size: 64x64, batch 2, one step, a small RMT and small decoders")
    p.add_argument("--json", default="benchmarks/results/segmentation.json", help="output JSON path")
    args = p.parse_args(argv)

    head_channels = None
    kwargs = json.loads(args.backbone_kwargs) if args.backbone_kwargs else None
    if args.smoke:
        for key in ("size", "batch", "infer_batch", "steps", "warmup", "device"):
            setattr(args, key, SMOKE[key])
        kwargs = kwargs or SMOKE["backbone_kwargs"]
        head_channels = SMOKE["head_channels"]
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("segmentation benchmark skipped: no CUDA device (it measures GPU throughput; --smoke checks "
              "the script on the CPU)")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    rows = []
    for head in args.heads:
        for backbone in args.backbones:
            try:
                rows.append(bench_one(backbone, head, device, args.size, args.batch, args.infer_batch,
                                      args.steps, args.warmup, amp=not args.fp32, backbone_kwargs=kwargs,
                                      head_channels=head_channels))
            except torch.OutOfMemoryError:
                rows.append(dict(backbone=backbone, head=head, size=args.size, train_batch=args.batch,
                                 train_img_s="OOM"))
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    env = environment(device)
    print()
    print(f"device: {env['device']}, torch {env['torch']}")
    print(format_table(rows))
    save_rows(args.json, env, vars(args), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
