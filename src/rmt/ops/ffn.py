"""The FFN tail of an RMT block, ``fc2(g + dwconv(g) + b)`` with ``g = gelu(a)``, keeping only ``a``.

The FFN's hidden activations are the largest tensors a block keeps for the backward pass (three
times the block width each). Plain autograd keeps two of them here: ``a`` (for GELU's derivative
and the depthwise weight gradient) and the depthwise output ``u`` (for fc2's weight gradient).
:class:`_DWConvLinear` keeps ``a`` alone and recomputes ``u`` in the backward pass (GELU and one fused
depthwise-conv kernel; the GELU output also serves the depthwise weight gradient), which costs two
extra kernels per block and saves about a sixth of the activation memory of a training step.

Used on the fused (Triton) path when gradients are needed, outside ``torch.compile`` (which plans
memory itself); everywhere else :func:`ffn_tail` is the plain composition, which is also the oracle.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from . import dwconv
from .dwconv import dwconv_nhwc, triton_dwconv_supported
from .linear import column_sum, weight_grad
from .triton_support import eager_launch


class _DWConvLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, dw_weight, dw_bias, weight, bias):
        u = dwconv._forward(eager_launch, a, dw_weight, dw_bias, True, True)
        ctx.save_for_backward(a, dw_weight, dw_bias, weight)
        ctx.has_bias = bias is not None
        return F.linear(u, weight.to(u.dtype), bias.to(u.dtype) if bias is not None else None)

    @staticmethod
    def backward(ctx, grad):
        a, dw_weight, dw_bias, weight = ctx.saved_tensors
        g = F.gelu(a)  # recomputed once, for u and for the depthwise weight gradient
        u = dwconv._forward(eager_launch, g, dw_weight, dw_bias, True, False)
        grad = grad.contiguous()
        flat_grad = grad.reshape(-1, grad.shape[-1])
        grad_w = weight_grad(flat_grad, u.reshape(-1, u.shape[-1]), weight.dtype)
        grad_b = column_sum(flat_grad).to(weight.dtype) if ctx.has_bias else None
        grad_u = grad.matmul(weight.to(grad.dtype))
        grad_a, grad_dw, grad_db = dwconv._backward(
            eager_launch, grad_u, a, dw_weight, True, True, ctx.needs_input_grad[0],
            ctx.needs_input_grad[1], dw_bias is not None and ctx.needs_input_grad[2], g)
        grad_dw = grad_dw.to(dw_weight.dtype) if grad_dw is not None else None
        grad_db = grad_db.to(dw_bias.dtype) if grad_db is not None else None
        return grad_a, grad_dw, grad_db, grad_w, grad_b


@torch.jit.ignore
def ffn_tail(a: torch.Tensor, dw_weight: torch.Tensor, dw_bias: Optional[torch.Tensor],
             weight: torch.Tensor, bias: Optional[torch.Tensor], fused: bool,
             cpu_fast: bool = False) -> torch.Tensor:
    """``linear(g + dwconv(g) + dw_bias, weight, bias)`` with ``g = gelu(a)``; ``a`` ``(b, h, w, hidden)``.

    With ``fused`` (see :func:`rmt.ops.dwconv.dwconv_nhwc`) and gradients needed, only ``a`` is
    kept for the backward pass; otherwise this is ``dwconv_nhwc`` followed by ``F.linear``.
    """
    training = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (a, dw_weight, dw_bias, weight, bias))
    if (fused and training and dwconv.TRAINING_KERNELS and dwconv.FUSED_KERNELS
            and not torch.compiler.is_compiling()
            and triton_dwconv_supported(a, dw_weight)):
        if torch.is_autocast_enabled(a.device.type):
            a = a.to(torch.get_autocast_dtype(a.device.type))
        return _DWConvLinear.apply(a, dw_weight, dw_bias, weight, bias)
    return F.linear(dwconv_nhwc(a, dw_weight, dw_bias, True, fused, True, cpu_fast), weight, bias)
