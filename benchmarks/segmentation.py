"""GPU benchmark: UperNet (and Semantic FPN) on RMT at 512x512, training and inference.

Training: batch 16, bf16 autocast, forward + backward (main and auxiliary loss) + AdamW step.
Inference: batch 16 (``--infer-batch``), bf16 autocast, forward only, under torch.inference_mode.
Prints a table (images/s, ms per batch, peak memory) and writes JSON. Without CUDA it prints why
and exits 0. About a minute on an H100.

    python benchmarks/segmentation.py                       # UperNet rmt_small (the default)
    python benchmarks/segmentation.py --heads upernet fpn --models rmt_small rmt_base
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout too

from rmt.benchmark import environment, save_rows  # noqa: E402
from rmt.segmentation.engine import seg_loss  # noqa: E402
from rmt.segmentation.models import build_segmenter, describe  # noqa: E402


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


def bench_one(model_name: str, head: str, device: torch.device, size: int, batch: int, infer_batch: int,
              steps: int, warmup: int, num_classes: int = 150, amp: bool = True,
              backbone_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Train and inference throughput of one model; returns a result row."""
    torch.manual_seed(0)
    model = build_segmenter(model_name, head, num_classes, backbone_kwargs=backbone_kwargs).to(device)
    info = describe(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=6e-5, weight_decay=0.01,
                                  fused=device.type == "cuda")
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

    row: Dict[str, Any] = dict(model=model_name, head=head, size=size, params_m=round(info["params"] / 1e6, 2),
                               train_batch=batch, infer_batch=infer_batch, precision="bf16" if amp else "fp32")
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
    del model
    return row


def format_table(rows: List[Dict[str, Any]]) -> str:
    cols = [("model", "model"), ("head", "head"), ("params_m", "params(M)"), ("size", "size"),
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
    p.add_argument("--models", nargs="+", default=["rmt_small"])
    p.add_argument("--heads", nargs="+", default=["upernet"], choices=("upernet", "fpn"))
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--batch", type=int, default=16, help="training batch (default 16, the paper's total)")
    p.add_argument("--infer-batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=20, help="timed iterations")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu for a smoke run")
    p.add_argument("--backbone-kwargs", default=None, help="JSON of timm.create_model arguments (smoke runs)")
    p.add_argument("--json", default="benchmarks/results/segmentation.json", help="output JSON path")
    args = p.parse_args(argv)

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("segmentation benchmark skipped: no CUDA device (it measures GPU throughput)")
        return 0
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    kwargs = json.loads(args.backbone_kwargs) if args.backbone_kwargs else None
    rows = []
    for model_name in args.models:
        for head in args.heads:
            try:
                rows.append(bench_one(model_name, head, device, args.size, args.batch, args.infer_batch,
                                      args.steps, args.warmup, amp=not args.fp32, backbone_kwargs=kwargs))
            except torch.OutOfMemoryError:
                rows.append(dict(model=model_name, head=head, size=args.size, train_batch=args.batch,
                                 train_img_s="OOM"))
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
