"""The block's Linear layers in training, with the bias gradient as a GEMV and float32 gradients.

Autograd's ``addmm`` backward sums the output gradient over its rows for the bias gradient with
``grad.sum(0)``. On the tall, thin gradients of a vision block (hundreds of thousands of tokens by
64-1536 channels) that reduction ran at 0.3-1.3 TB/s on an H200, where a GEMV with a row of ones
(cuBLAS) reads the same tensor at about 3.7 TB/s: 155 against 41 us for stage 1's qkv gradient at
batch 128, about 8% of an RMT-S training step in all. :class:`_Linear` computes the bias gradient
that way and writes the weight and bias gradients in float32 directly (no cast of each gradient
after the fact under autocast).

:func:`column_sum` is that reduction for any 2-D tensor; the depthwise-conv and FFN-tail backward
passes use it too. At float32 inference on the CPU path :func:`cpu_linear` takes oneDNN's matmul.
Everywhere else (inference, ``torch.compile``, hooked layers) the plain ``F.linear`` runs, which is
also the oracle.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..compat import is_exporting
from ..config import fast_path
from .triton_support import as_dtype

_HALF = (torch.bfloat16, torch.float16)
# torch.mm(..., out_dtype=torch.float32) for half-precision inputs (newer PyTorch releases)
_MM_TO_FLOAT32 = "dtype" in torch.ops.aten.mm.overloads()
# (device, dtype) -> a (1, n) row of ones, and (device, dtype, n) -> its (1, n) view, so that a call
# looks a view up instead of slicing (Python indexing costs a training step about 2% of its host time)
_ONES: Dict[Tuple[torch.device, torch.dtype], torch.Tensor] = {}
_ONES_VIEWS: Dict[Tuple[torch.device, torch.dtype, int], torch.Tensor] = {}


def _ones(n: int, dtype: torch.dtype, device: torch.device) -> Optional[torch.Tensor]:
    """A cached ``(1, n)`` row of ones (grown on demand; ``None`` while a CUDA graph is captured and
    the cache would have to grow, since memory allocated then belongs to the graph)."""
    view = _ONES_VIEWS.get((device, dtype, n))
    if view is not None:
        return view
    key = (device, dtype)
    ones = _ONES.get(key)
    if ones is None or ones.shape[1] < n:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        ones = torch.ones(1, max(n, 1024), dtype=dtype, device=device)
        _ONES[key] = ones
        for k in [k for k in _ONES_VIEWS if k[:2] == key]:  # views of the smaller row it replaces
            del _ONES_VIEWS[k]
    view = _ONES_VIEWS[(device, dtype, n)] = ones.narrow(1, 0, n)
    return view


def column_sum(t: torch.Tensor) -> torch.Tensor:
    """``t.sum(0)`` of a 2-D tensor ``(m, n)`` in float32 ``(n,)``; on CUDA a GEMV with a row of ones.

    Float32 inputs take the GEMV only while TF32 matmuls are off (a TF32 product would round them).
    """
    if (t.is_cuda and t.dim() == 2 and t.shape[0] > 0 and not torch.compiler.is_compiling()
            and (t.dtype in _HALF
                 or (t.dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32))):
        ones = _ones(t.shape[0], t.dtype, t.device)
        if ones is not None:
            if t.dtype in _HALF:
                if _MM_TO_FLOAT32:
                    return torch.mm(ones, t, out_dtype=torch.float32).view(-1)
                return torch.mm(ones, t).view(-1).float()
            return torch.mm(ones, t).view(-1)
    return t.sum(0, dtype=torch.float32)


def weight_grad(grad: torch.Tensor, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``grad.T @ x`` for ``grad`` ``(m, n)`` and ``x`` ``(m, k)``, returned in ``dtype``
    (half-precision inputs accumulate into a float32 result directly on CUDA)."""
    if (_MM_TO_FLOAT32 and grad.is_cuda and grad.dtype in _HALF and dtype == torch.float32
            and not torch.compiler.is_compiling()):
        return torch.mm(grad.t(), x, out_dtype=torch.float32)
    return as_dtype(grad.t().mm(x), dtype)


def linear_backward(grad: torch.Tensor, x: torch.Tensor, w: torch.Tensor, weight_dtype: torch.dtype,
                    bias_dtype: Optional[torch.dtype], need_input: bool = True, need_weight: bool = True,
                    need_bias: bool = True
                    ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of ``F.linear(x, w, bias)`` for ``grad`` ``(..., n)``, ``x`` ``(..., k)``, ``w`` ``(n, k)``
    (``w`` in the dtype of ``x``): the input's in that dtype, the weight's in ``weight_dtype`` and the
    bias's (when ``bias_dtype`` is not ``None``) in ``bias_dtype``; ``None`` where not needed."""
    flat = grad.reshape(-1, grad.shape[-1])
    gx = grad.matmul(w) if need_input else None
    gw = weight_grad(flat, x.reshape(-1, x.shape[-1]), weight_dtype) if need_weight else None
    gb = as_dtype(column_sum(flat), bias_dtype) if bias_dtype is not None and need_bias else None
    return gx, gw, gb


class _Linear(torch.autograd.Function):
    """``F.linear`` in the dtype of ``x`` (the autocast dtype), with the backward pass above."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        w = weight.to(x.dtype)
        ctx.save_for_backward(x, w)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return linear_backward(grad, x, w, ctx.weight_dtype, ctx.bias_dtype, *ctx.needs_input_grad)


@torch.jit.ignore
def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], fused: bool,
           cpu_fast: bool = False) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; ``x`` ``(..., k)``, ``weight`` ``(n, k)`` -> ``(..., n)``.

    With ``fused`` (the model's fast path: CUDA, or Triton's interpreter in the tests) and gradients
    needed, through :class:`_Linear` (in the autocast dtype under autocast, as ``F.linear``); with
    ``cpu_fast`` (the CPU path) through :func:`cpu_linear`; otherwise ``F.linear`` itself.
    """
    if (fused and torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad))):
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        elif x.dtype != weight.dtype:
            return F.linear(x, weight, bias)  # let F.linear report the mismatch
        return _Linear.apply(x, weight, bias)
    return cpu_linear(x, weight, bias) if cpu_fast else F.linear(x, weight, bias)


_HAS_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def cpu_linear_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether :func:`cpu_linear` takes oneDNN's matmul: ``fast_path.cpu_onednn_linear`` on, a PyTorch
    built with oneDNN, float32 CPU tensors without gradients to record or autocast, and neither
    ``torch.compile`` nor ``torch.export`` tracing (they keep ``F.linear``)."""
    return (fast_path.cpu_onednn_linear and _HAS_ONEDNN_LINEAR and x.device.type == "cpu"
            and x.dtype == weight.dtype == torch.float32 and (bias is None or bias.dtype == torch.float32)
            and weight.dim() == 2 and weight.is_contiguous() and x.numel() > 0
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and not torch.is_autocast_enabled("cpu") and not torch.compiler.is_compiling() and not is_exporting())


def cpu_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on ``x`` ``(..., k)``, ``weight`` ``(n, k)`` -> ``(..., n)``, through
    oneDNN's matmul where :func:`cpu_linear_applies`: F.linear calls MKL's sgemm, which on a 2-vCPU
    AMD EPYC ran RMT-S's GEMMs at 90-150 GFLOP/s where oneDNN ran the same at 140-190 (the thin
    stage-1 products 1.5x faster; BENCHMARKS.md, CPU section). Same float32 products, other summation
    order (within 1e-6 relative)."""
    if not cpu_linear_applies(x, weight, bias):
        return F.linear(x, weight, bias)
    out = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return out.view(*x.shape[:-1], weight.shape[0])




def _epilogue_dtype(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Optional[torch.dtype]:
    """The half-precision dtype :func:`linear_gelu`'s GEMM epilogue computes in, or ``None`` where it
    does not apply (``fast_path.gelu_epilogue`` off, not CUDA, gradients to record, no bias, float32)."""
    if not (fast_path.gelu_epilogue and x.is_cuda and bias is not None and x.dim() >= 2):
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or bias.requires_grad):
        return None
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    return dtype if dtype in _HALF else None


@torch.jit.ignore
def gelu_epilogue_applies(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether :func:`linear_gelu` takes the GEMM epilogue for these tensors: ``fast_path.gelu_epilogue``
    on, a CUDA input without gradients to record, a half-precision compute dtype and a bias."""
    return _epilogue_dtype(x, weight, bias) is not None


@torch.jit.ignore
def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                checked: bool = False) -> torch.Tensor:
    """``gelu(F.linear(x, weight, bias))``; ``x`` ``(..., k)``, ``weight`` ``(n, k)`` -> ``(..., n)``.

    Where :func:`gelu_epilogue_applies` (``checked``: the caller found so already), one
    ``aten._addmm_activation`` call: cuBLASLt adds the bias and applies GELU in the GEMM's epilogue,
    in float32 before rounding to the half-precision output. That GELU is the tanh approximation,
    within 4.8e-4 of the exact one everywhere (the largest gap, near +-2.7, is a quarter of float16's
    spacing there and a thirtieth of bfloat16's); PyTorch falls back to a GEMM and a separate
    tanh-approximate GELU where cuBLASLt cannot take the shapes. Elsewhere (float32, CPU, training)
    it is the exact ``F.gelu(F.linear(...))``.
    """
    if checked:
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    else:
        dtype = _epilogue_dtype(x, weight, bias)
    if dtype is None:
        return F.gelu(F.linear(x, weight, bias))
    flat = x.reshape(-1, x.shape[-1]).to(dtype)
    out = torch._addmm_activation(bias.to(dtype), flat, weight.to(dtype).t(), use_gelu=True)
    return out.view(*x.shape[:-1], weight.shape[0])
