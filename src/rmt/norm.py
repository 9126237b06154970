"""LayerNorm that keeps the autocast dtype (one pass fewer per norm than plain autocast), with the
multi-row Triton kernels of :mod:`rmt.ops.layernorm` on CUDA."""
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers._fx import register_notrace_function

from .ops.layernorm import layer_norm_triton, triton_layer_norm_supported
from .ops.triton_support import fused_allowed

__all__ = ["LayerNorm", "layer_norm", "layer_norm_autocast"]


@torch.jit.ignore
def layer_norm_autocast(x: torch.Tensor, normalized_shape: List[int], weight: torch.Tensor,
                        bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm that, under autocast, normalises in float32 but returns the autocast dtype.

    Plain autocast runs LayerNorm in float32 and returns float32, which the next Linear casts back
    to bf16/fp16: two extra passes over the activations. Outside autocast it is ``F.layer_norm``.
    """
    device = x.device.type
    if device not in ("cuda", "cpu", "xpu", "mps") or not torch.is_autocast_enabled(device):
        return F.layer_norm(x, normalized_shape, weight, bias, eps)
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return F.layer_norm(x.to(dtype), normalized_shape, weight.to(dtype), bias.to(dtype), eps)


register_notrace_function(layer_norm_autocast)


@torch.jit.ignore
def layer_norm(x: torch.Tensor, normalized_shape: List[int], weight: torch.Tensor, bias: torch.Tensor,
               eps: float, fused: bool) -> torch.Tensor:
    """:func:`layer_norm_autocast` over the last dimension; ``fused`` allows the Triton kernels
    (forward and backward; on CUDA, or on CPU under ``TRITON_INTERPRET=1``) where they apply, in
    eager mode (under ``torch.compile`` Inductor fuses LayerNorm with its neighbours itself)."""
    if (fused and len(normalized_shape) == 1 and not torch.compiler.is_compiling()
            and triton_layer_norm_supported(x, weight, bias)):
        return layer_norm_triton(x, weight, bias, eps)
    return layer_norm_autocast(x, normalized_shape, weight, bias, eps)


register_notrace_function(layer_norm)


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` returning the autocast dtype under autocast (see :func:`layer_norm_autocast`).

    ``impl`` as the model's MaSA implementation: ``"auto"`` uses the Triton kernels on CUDA,
    ``"triton"`` wherever Triton runs, anything else PyTorch's LayerNorm.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, impl: str = "auto", **kwargs):
        super().__init__(normalized_shape, eps=eps, **kwargs)
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm(x, list(self.normalized_shape), self.weight, self.bias, self.eps,
                          fused_allowed(self.impl, x))
