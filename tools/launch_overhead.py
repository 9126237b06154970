"""CPU time per call of the eager Triton launches, beside PyTorch's own kernels (CUDA only).

    python tools/launch_overhead.py [--cprofile]

An eager training step of RMT-S makes about 800 Triton launches; when the GPU finishes kernels
faster than the CPU issues them, these microseconds set the step time. Each row is the mean CPU
time of one call, issued back to back without synchronising (the GPU runs behind), on inputs small
enough that the GPU never becomes the limit. "launch only" rows time ``kernel[grid](...)`` with
preallocated outputs through Triton's dispatch, "DirectLauncher" the same through
``rmt.ops.triton_support.eager_launch`` (the compiled kernel called directly); the others the whole
eager op (allocation, autograd, launch).
``--cprofile`` also prints where the Python time of the bare LayerNorm launch goes.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rmt.ops import dwconv, layernorm, linear  # noqa: E402
from rmt.ops.dwconv import dwconv_nhwc_triton  # noqa: E402
from rmt.ops.layernorm import layer_norm_triton  # noqa: E402
from rmt.ops.triton_support import eager_launch  # noqa: E402


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


def step_calls(dev: torch.device) -> dict:
    """The PyTorch calls an eager RMT training step makes most, at small bf16 shapes."""
    bf = torch.bfloat16
    t = torch.randn(512, 64, device=dev, dtype=bf)
    a, wt = torch.randn(512, 64, device=dev, dtype=bf), torch.randn(192, 64, device=dev, dtype=bf)
    bias = torch.randn(192, device=dev, dtype=bf)
    g = torch.randn(512, 192, device=dev, dtype=bf)
    ones = torch.ones(1, 512, device=dev, dtype=bf)
    img = torch.randn(2, 64, 8, 8, device=dev, dtype=bf).contiguous(memory_format=torch.channels_last)
    wdw = torch.randn(64, 1, 3, 3, device=dev, dtype=bf)
    cases = {
        "torch.empty": lambda: torch.empty(512, 64, device=dev, dtype=bf),
        "F.linear with bias (addmm)": lambda: F.linear(a, wt, bias),
        "F.linear without bias (mm)": lambda: F.linear(a, wt),
        "torch.mm": lambda: torch.mm(g.t(), a),
        "torch.mm(out_dtype=float32)": lambda: torch.mm(g.t(), a, out_dtype=torch.float32),
        "bias grad: column_sum (GEMV to float32)": lambda: linear.column_sum(g),
        "bias grad: mm(ones, g)[0].float()": lambda: torch.mm(ones, g)[0].float(),
        "bias grad: g.sum(0, dtype=float32)": lambda: g.sum(0, dtype=torch.float32),
        "drop-path mask (empty, bernoulli_, div_)": lambda: t.new_empty((2, 1, 1, 1)).bernoulli_(0.9).div_(0.9),
        "cuDNN depthwise weight gradient": lambda: torch.ops.aten.convolution_backward(
            img, img, wdw, [64], [1, 1], [1, 1], [1, 1], False, [0, 0], 64, [False, True, False]),
        "torch.cat of three": lambda: torch.cat((t, t, t), dim=-1),
    }
    if "dtype" not in torch.ops.aten.mm.overloads():
        del cases["torch.mm(out_dtype=float32)"]
    return cases


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cprofile", action="store_true")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("launch_overhead.py measures CUDA launches; no CUDA device here", file=sys.stderr)
        return 2
    dev = torch.device("cuda")
    x = torch.randn(256, 64, device=dev)
    w, b = torch.randn(64, device=dev), torch.randn(64, device=dev)
    xg = x.clone().requires_grad_()
    y, mean, rstd = (torch.empty_like(x), torch.empty(256, device=dev), torch.empty(256, device=dev))
    img = torch.randn(2, 8, 8, 64, device=dev)
    out = torch.empty_like(img)
    dw_w, dw_b = torch.randn(64, 1, 3, 3, device=dev), torch.randn(64, device=dev)

    def ln_launch():
        layernorm._ln_fwd_kernel[(4,)](x, w, b, y, mean, rstd, 256, 64, 1e-6, BLOCK_M=64, BLOCK_C=64, num_warps=4)

    def ln_direct():
        eager_launch(layernorm._ln_fwd_kernel)[(4,)](x, w, b, y, mean, rstd, 256, 64, 1e-6, BLOCK_M=64, BLOCK_C=64,
                                                     num_warps=4)

    def dw_launch():
        dwconv._dwconv_nhwc_kernel[(16, 1, 2)](
            img, dw_w, dw_b, img, out, out, 8, 8, 64, *img.stride()[:3], 0, 0, 0, *out.stride()[:3], 9, 3, 1, KS=3,
            TAPS_OUTER=False, FLIP=False, HAS_BIAS=True, RESIDUAL=True, GELU_GRAD=False, GRAD_GIVEN=False,
            ACCUMULATE=False, COLUMN_SUMS=False, ROWS=1, BLOCK_W=8, BLOCK_C=32,
            num_warps=4)

    def dw_direct():
        eager_launch(dwconv._dwconv_nhwc_kernel)[(16, 1, 2)](
            img, dw_w, dw_b, img, out, out, 8, 8, 64, *img.stride()[:3], 0, 0, 0, *out.stride()[:3], 9, 3, 1, KS=3,
            TAPS_OUTER=False, FLIP=False, HAS_BIAS=True, RESIDUAL=True, GELU_GRAD=False, GRAD_GIVEN=False,
            ACCUMULATE=False, COLUMN_SUMS=False, ROWS=1, BLOCK_W=8, BLOCK_C=32,
            num_warps=4)

    class Identity(torch.autograd.Function):
        """No kernels of its own: what a Python autograd Function costs around its launches."""
        @staticmethod
        def forward(ctx, t):
            return t.view_as(t)

        @staticmethod
        def backward(ctx, grad):
            return grad

    grad_y = torch.randn_like(x)
    _, ln_mean, ln_rstd = layernorm._forward(x, w, b, 1e-6, x.dtype)

    def train(ln):
        def step():
            ln(xg).sum().backward()
        return step

    cases = {
        "torch.add (one aten kernel)": lambda: torch.add(x, 1.0),
        "F.layer_norm forward": lambda: F.layer_norm(x, (64,), w, b),
        "LayerNorm kernel, launch only": ln_launch,
        "LayerNorm kernel, DirectLauncher": ln_direct,
        "Triton LayerNorm forward": lambda: layer_norm_triton(x, w, b, 1e-6),
        "F.layer_norm forward+backward": train(lambda t: F.layer_norm(t, (64,), w, b)),
        "Triton LayerNorm forward+backward": train(lambda t: layer_norm_triton(t, w, b, 1e-6)),
        "LayerNorm backward, no autograd": lambda: layernorm._backward(grad_y, x, w, ln_mean, ln_rstd),
        "x * 2 forward+backward": train(lambda t: t * 2),
        "Python autograd.Function fwd+bwd": train(lambda t: Identity.apply(t) * 2),
        "dwconv kernel, launch only": dw_launch,
        "dwconv kernel, DirectLauncher": dw_direct,
        "Triton dwconv 3x3 + residual forward": lambda: dwconv_nhwc_triton(img, dw_w, dw_b, True),
    }
    print(f"{'call':<40} {'CPU us per call':>16}")
    for name, fn in cases.items():
        print(f"{name:<40} {per_call_us(fn):>16.1f}")
    print(f"\n{'PyTorch call of a training step (bf16)':<40} {'CPU us per call':>16}")
    for name, fn in step_calls(dev).items():
        print(f"{name:<40} {per_call_us(fn):>16.1f}")
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}")
    if args.cprofile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(1000):
            ln_launch()
        prof.disable()
        torch.cuda.synchronize()
        print("cProfile of 1000 bare LayerNorm launches (tottime, s):")
        pstats.Stats(prof).sort_stats("tottime").print_stats(14)
    return 0


if __name__ == "__main__":
    sys.exit(main())
