"""The FFN tail of an RMT block, ``fc2(g + dwconv(g) + b)`` with ``g = gelu(a)``, keeping only ``a``.

The FFN's hidden activations are the largest tensors a block keeps for the backward pass (three
times the block width each). Plain autograd keeps two of them here: ``a`` (for GELU's derivative
and the depthwise weight gradient) and the depthwise output ``u`` (for fc2's weight gradient).
:class:`_DWConvLinear` keeps ``a`` alone and recomputes ``u`` in the backward pass (GELU and one fused
depthwise-conv kernel; the GELU output also serves the depthwise weight gradient), which costs two
extra kernels per block and saves about a sixth of the activation memory of a training step.

Used on the fused (Triton) path when gradients are needed, outside ``torch.compile`` (which plans
memory itself); everywhere else :func:`ffn_tail` is the plain composition, which is also the oracle.
:func:`ffn` is the whole FFN; at half-precision inference on CUDA its GELU runs in fc1's GEMM epilogue
(:func:`rmt.ops.linear.linear_gelu`) instead of its own pass.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ..config import fast_path
from . import dwconv
from .dwconv import dwconv_nhwc, triton_dwconv_supported
from .linear import cpu_linear, gelu_epilogue_applies, linear, linear_backward, linear_gelu
from .triton_support import HAS_TRITON, as_dtype, cdiv, eager_launch

if HAS_TRITON:
    import triton
    import triton.language as tl

    from .dwconv import _gelu_grad


if HAS_TRITON:
    @triton.jit
    def _gelu_and_derivative_kernel(A, G, D, N, BLOCK: tl.constexpr):
        """``G = gelu(A)`` and ``D = gelu'(A)`` (exact GELU) over ``N`` contiguous elements."""
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        a = tl.load(A + offs, mask=mask, other=0.0).to(tl.float32)
        cdf = 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))
        tl.store(G + offs, (a * cdf).to(G.dtype.element_ty), mask=mask)
        tl.store(D + offs, _gelu_grad(a).to(D.dtype.element_ty), mask=mask)


def gelu_and_derivative(a: torch.Tensor):
    """``(gelu(a), gelu'(a))`` in the dtype of ``a`` from one pass over it (any shape; Triton)."""
    a = a.contiguous()
    g, d = torch.empty_like(a), torch.empty_like(a)
    block = 1024
    eager_launch(_gelu_and_derivative_kernel)[(cdiv(a.numel(), block),)](a, g, d, a.numel(), BLOCK=block,
                                                                        num_warps=4)
    return g, d


def ffn_tail_forward(a: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
                     w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``linear(g + dwconv(g) + dw_bias, w, bias)``, ``g = gelu(a)``, without autograd; ``w`` in the
    dtype of ``a`` (``(b, h, w, hidden)``, unit channel stride)."""
    u = dwconv._forward(eager_launch, a, dw_weight, dw_bias, True, True)
    return F.linear(u, w, as_dtype(bias, u.dtype))


def ffn_tail_backward(grad: torch.Tensor, a: torch.Tensor, dw_weight: torch.Tensor,
                      dw_bias: Optional[torch.Tensor], w: torch.Tensor, weight_dtype: torch.dtype,
                      bias_dtype: Optional[torch.dtype], need_input: bool = True, need_dw_weight: bool = True,
                      need_dw_bias: bool = True, need_weight: bool = True, need_bias: bool = True):
    """Gradients of :func:`ffn_tail_forward` for its five inputs (``None`` where not needed), the
    depthwise output recomputed from ``a``; the parameters' in their own dtypes."""
    grad = grad.contiguous()
    # GELU recomputed once, for u and for the depthwise weight gradient; with it its derivative
    # (for the input gradient), which is cheaper to write here than to evaluate in that kernel
    g, d = gelu_and_derivative(a) if fast_path.ffn_derivative_with_gelu and need_input else (F.gelu(a), None)
    u = dwconv._forward(eager_launch, g, dw_weight, dw_bias, True, False)
    _, grad_w, grad_b = linear_backward(grad, u, w, weight_dtype, bias_dtype, False,
                                        need_weight, need_bias)
    grad_u = grad.matmul(w)
    grad_a, grad_dw, grad_db = dwconv._backward(
        eager_launch, grad_u, a, dw_weight, True, True, need_input, need_dw_weight,
        dw_bias is not None and need_dw_bias, g, derivative=d)
    grad_db = as_dtype(grad_db, dw_bias.dtype) if dw_bias is not None else None
    return grad_a, as_dtype(grad_dw, dw_weight.dtype), grad_db, grad_w, grad_b


class _DWConvLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, dw_weight, dw_bias, weight, bias):
        w = weight.to(a.dtype)
        ctx.save_for_backward(a, dw_weight, dw_bias, w)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return ffn_tail_forward(a, dw_weight, dw_bias, w, bias)

    @staticmethod
    def backward(ctx, grad):
        a, dw_weight, dw_bias, w = ctx.saved_tensors
        return ffn_tail_backward(grad, a, dw_weight, dw_bias, w, ctx.weight_dtype, ctx.bias_dtype,
                                 *ctx.needs_input_grad)


@torch.jit.ignore
def ffn_tail(a: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
             weight: torch.Tensor, bias: Optional[torch.Tensor], fused: bool,
             cpu_fast: bool = False) -> torch.Tensor:
    """``linear(g + dwconv(g) + dw_bias, weight, bias)`` with ``g = gelu(a)``; ``a`` ``(b, h, w, hidden)``.

    With ``fused`` (see :func:`rmt.ops.dwconv.dwconv_nhwc`) and gradients needed, only ``a`` is
    kept for the backward pass; otherwise this is ``dwconv_nhwc`` followed by ``F.linear`` (with
    ``cpu_fast`` :func:`rmt.ops.linear.cpu_linear`).
    """
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (a, dw_weight, dw_bias, weight, bias))
    if (fused and training and fast_path.dwconv_training_kernels and fast_path.dwconv_kernels
            and not torch.compiler.is_compiling()
            and triton_dwconv_supported(a, dw_weight)):
        if torch.is_autocast_enabled(a.device.type):
            a = a.to(torch.get_autocast_dtype(a.device.type))
        return _DWConvLinear.apply(a, dw_weight, dw_bias, weight, bias)
    u = dwconv_nhwc(a, dw_weight, dw_bias, True, fused, True, cpu_fast)
    return cpu_linear(u, weight, bias) if cpu_fast else F.linear(u, weight, bias)


@torch.jit.ignore
def ffn(x: torch.Tensor, fc1_weight: torch.Tensor, fc1_bias: Optional[torch.Tensor], dw_weight: torch.Tensor,
        dw_bias: Optional[torch.Tensor], fc2_weight: torch.Tensor, fc2_bias: Optional[torch.Tensor], fused: bool,
        cpu_fast: bool = False) -> torch.Tensor:
    """``fc2(g + dwconv(g) + dw_bias)`` with ``g = gelu(fc1(x))``; ``x`` ``(b, h, w, c)`` -> ``(b, h, w, c)``.

    On the fused path where :func:`rmt.ops.linear.gelu_epilogue_applies` (half-precision inference on
    CUDA), ``g`` comes from fc1's GEMM with the GELU in its epilogue; otherwise fc1 is
    :func:`rmt.ops.linear.linear` followed by :func:`ffn_tail`.
    """
    if fused and gelu_epilogue_applies(x, fc1_weight, fc1_bias):
        g = linear_gelu(x, fc1_weight, fc1_bias, True)  # checked just above
        return F.linear(dwconv_nhwc(g, dw_weight, dw_bias, True, fused, False), fc2_weight, fc2_bias)
    return ffn_tail(linear(x, fc1_weight, fc1_bias, fused, cpu_fast), dw_weight, dw_bias, fc2_weight, fc2_bias,
                    fused, cpu_fast)
