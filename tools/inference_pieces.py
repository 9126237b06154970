"""GPU time of single inference pieces of RMT-S, the fast version beside what it replaced.

    python tools/inference_pieces.py --batch 256
    TRITON_INTERPRET=1 python tools/inference_pieces.py --device cpu --batch 1 --size 32 --iters 1  # smoke

Parts (``--parts``, comma separated):

* ``epilogue``: fc1 at each stage's shape as ``F.linear``, as ``F.linear`` + ``F.gelu`` (a pass of its
  own), and as ``torch._addmm_activation(..., use_gelu=True)`` (cuBLASLt's GELU epilogue, what
  :func:`rmt.ops.linear.linear_gelu` calls at half-precision inference), with the largest difference
  from the float32 exact GELU; a last row sums them over RMT-S's 29 blocks;
* ``stem``: the stem's first conv, BatchNorm and GELU as modules and as :mod:`rmt.ops.stem_conv`'s
  kernel (``--size`` images).

bf16 under autocast on CUDA (float32 on CPU), timed as in ``kernel_tiles.py`` (calls captured in a
CUDA graph, replays timed).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from rmt.benchmark import environment  # noqa: E402
from rmt.ops import stem_conv  # noqa: E402
from kernel_tiles import STAGES, _seconds  # noqa: E402

DEPTHS = [3, 4, 18, 4]   # RMT-S blocks per stage


def epilogue_rows(batch: int, size: int, device: torch.device, dtype: torch.dtype, iters: int):
    """One row per stage: microseconds of fc1 three ways, and the epilogue's largest difference."""
    totals = [0.0, 0.0, 0.0]
    for (side, c), depth in zip(STAGES, DEPTHS):
        side = max(1, side * size // 224)
        m, k, n = batch * side * side, c, 3 * c
        x = torch.randn(m, k, device=device, dtype=dtype)
        w = torch.randn(n, k, device=device, dtype=dtype) * k ** -0.5
        b = torch.randn(n, device=device, dtype=dtype)
        with torch.inference_mode():
            times = [_seconds(fn, device, iters) * 1e6 for fn in (
                lambda: F.linear(x, w, b), lambda: F.gelu(F.linear(x, w, b)),
                lambda: torch._addmm_activation(b, x, w.t(), use_gelu=True))]
            exact = F.gelu(F.linear(x.float(), w.float(), b.float()))
            diff = (torch._addmm_activation(b, x, w.t(), use_gelu=True).float() - exact).abs().max().item()
        totals = [t + u * depth for t, u in zip(totals, times)]
        yield f"fc1 {m} x {k} -> {n}", times, f"{diff:.4f}"
    yield f"per RMT-S batch ({sum(DEPTHS)} blocks)", totals, ""


def stem_rows(batch: int, size: int, device: torch.device, dtype: torch.dtype, iters: int):
    """The stem's first three layers as modules and as one kernel, and their largest difference."""
    conv, norm, act = nn.Conv2d(3, 32, 3, 2, 1).to(device), nn.BatchNorm2d(32).to(device).eval(), nn.GELU()
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    with torch.inference_mode(), autocast:
        if not stem_conv.fuses(x, conv, norm, act, True):
            raise SystemExit("the stem kernel does not run here (CUDA, or TRITON_INTERPRET=1 on CPU)")
        times = [_seconds(lambda: act(norm(conv(x))), device, iters) * 1e6,
                 _seconds(lambda: stem_conv.conv_bn_gelu(x, conv, norm, True), device, iters) * 1e6]
        fused = stem_conv.conv_bn_gelu(x, conv, norm, True).float()
    with torch.inference_mode():
        diff = (fused - act(norm(conv(x))).float()).abs().max().item()
    yield f"stem conv+bn+gelu {batch}x3x{size}x{size}", times + [float("nan")], f"{diff:.4f}"


PARTS = {"epilogue": (epilogue_rows, ("linear", "linear+gelu", "epilogue")),
         "stem": (stem_rows, ("modules", "kernel", "-"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default="epilogue,stem")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: pass --device cpu (with TRITON_INTERPRET=1 for the stem)")
    unknown = set(args.parts.split(",")) - set(PARTS)
    if unknown:
        raise SystemExit(f"unknown parts {sorted(unknown)}: choose from {sorted(PARTS)}")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(environment(device))
    for part in args.parts.split(","):
        rows, columns = PARTS[part]
        print(f"\n{'piece':42s} " + " ".join(f"{c:>12s}" for c in columns) + "  max diff  (us)")
        for name, times, diff in rows(args.batch, args.size, device, dtype, args.iters):
            print(f"{name:42s} " + " ".join(f"{t:12.1f}" for t in times) + f"  {diff}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
