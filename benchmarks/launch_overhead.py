"""CPU time per call of the eager Triton launches, beside PyTorch's own kernels (CUDA only).

    python benchmarks/launch_overhead.py

An eager training step of RMT-S makes about 800 Triton launches; when the GPU finishes kernels
faster than the CPU issues them, these microseconds set the step time. Each row is the mean CPU
time of one call, issued back to back without synchronising (the GPU runs behind): small
LayerNorm and depthwise-conv inputs, so the GPU never becomes the limit.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rmt.ops import triton_support  # noqa: E402
from rmt.ops.dwconv import dwconv_nhwc_triton  # noqa: E402
from rmt.ops.layernorm import layer_norm_triton  # noqa: E402


def per_call_us(fn, calls: int = 2000) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    elapsed = time.perf_counter() - t
    torch.cuda.synchronize()
    return elapsed / calls * 1e6


def main() -> int:
    if not torch.cuda.is_available():
        print("launch_overhead.py measures CUDA launches; no CUDA device here", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    x = torch.randn(256, 64, device=dev)
    w, b = torch.randn(64, device=dev), torch.randn(64, device=dev)
    xg = x.clone().requires_grad_()
    img = torch.randn(2, 8, 8, 64, device=dev)
    dw_w, dw_b = torch.randn(64, 1, 3, 3, device=dev), torch.randn(64, device=dev)

    def ln_train(ln):
        def step():
            ln(xg).sum().backward()
        return step

    cases = {
        "torch.add (one aten kernel)": lambda: torch.add(x, 1.0),
        "F.layer_norm forward": lambda: F.layer_norm(x, (64,), w, b),
        "Triton LayerNorm forward": lambda: layer_norm_triton(x, w, b, 1e-6),
        "F.layer_norm forward+backward": ln_train(lambda t: F.layer_norm(t, (64,), w, b)),
        "Triton LayerNorm forward+backward": ln_train(lambda t: layer_norm_triton(t, w, b, 1e-6)),
        "Triton dwconv 3x3 + residual forward": lambda: dwconv_nhwc_triton(img, dw_w, dw_b, True),
    }
    print(f"{'call':<40} {'cached launch us':>17} {'Triton dispatch us':>19}")
    for name, fn in cases.items():
        times = []
        for fast in (True, False):
            triton_support.FAST_LAUNCH = fast
            times.append(per_call_us(fn))
        triton_support.FAST_LAUNCH = True
        print(f"{name:<40} {times[0]:>17.1f} {times[1]:>19.1f}")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
