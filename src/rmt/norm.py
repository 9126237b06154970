"""LayerNorm that keeps the autocast dtype (one pass fewer per norm than plain autocast)."""
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers._fx import register_notrace_function

__all__ = ["LayerNorm", "layer_norm_autocast"]


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


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` returning the autocast dtype under autocast (see :func:`layer_norm_autocast`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return layer_norm_autocast(x, list(self.normalized_shape), self.weight, self.bias, self.eps)
