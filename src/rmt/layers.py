"""A stand-alone Manhattan self-attention (MaSA) layer for any network with 2-D feature maps.

:class:`MaSALayer` is the attention of an RMT block made portable: it takes an NCHW map
(``data_format="NCHW"``, for CNN-style code) or an NHWC map (``"NHWC"``, for transformer-style code
that keeps tokens as a grid), computes its own rotation tables and per-head decays from the run-time
grid size, and calls the same operator as the RMT model (:func:`rmt.ops.masa.masa`). Each of the
three ingredients of MaSA can be switched off to build the paper's ablations:

* ``decay=False``: no Manhattan-distance decay bias (plain softmax attention in the full form,
  axial attention in the decomposed form);
* ``rotation=False``: no rotary position encoding of q and k;
* ``lepe=False``: no 5x5 depthwise convolution of v added to the output.

Its parameters have the same names and shapes as the attention of an RMT block (``qkv``, ``lepe``,
``proj``), so ``layer.load_state_dict(model.stages[i].blocks[j].attn.state_dict())`` copies a
trained RMT attention into it.

Example: self-attention on the stride-16 features of a CNN::

    from rmt.layers import MaSALayer
    attn = MaSALayer(dim=256, num_heads=8, form="full")        # NCHW in, NCHW out
    y = feats + attn(feats)                                      # feats (b, 256, h, w)

:mod:`rmt.plugin_models` uses it to build RMT-DeiT-S and RMT-Swin-T.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
from timm.layers import trunc_normal_
from timm.layers._fx import register_notrace_module

from .compat import is_exporting, nchw_for_conv
from .ops.masa import FORMS, IMPLS, head_decays, masa, rotation_tables

__all__ = ["MaSALayer"]

DATA_FORMATS = ("NCHW", "NHWC")


class MaSALayer(nn.Module):
    """Manhattan self-attention on a 2-D map: ``(b, c, h, w)`` (NCHW) or ``(b, h, w, c)`` (NHWC).

    Args:
        dim: channels ``c``; split into ``num_heads`` heads of even width (the rotation pairs channels).
        num_heads: attention heads ``n``.
        form: ``"full"`` (every token attends to every token, cost ~ ``(h*w)**2``) or
            ``"decomposed"`` (along rows, then columns, cost ~ ``h*w*(h+w)``).
        decay: add the per-head Manhattan-distance decay ``lambda_j * (|dr| + |ds|)`` to the logits.
        rotation: rotate q and k by the row-major token index (rotary position encoding).
        lepe: add a depthwise 5x5 convolution of v to the attention output.
        init_value, heads_range: decay of head ``j`` is ``log(1 - 2 ** (-init_value - heads_range * j / n))``
            (RMT uses 2 and 4..6).
        qkv_bias: bias in the q/k/v projection.
        proj_drop: dropout after the output projection.
        data_format: ``"NCHW"`` or ``"NHWC"``, the layout of input and output.
        impl: MaSA implementation (:data:`rmt.ops.masa.IMPLS`): ``"auto"`` takes the fast path of
            the device, ``"reference"`` the plain PyTorch oracle. Exports always use plain ops.
    """

    def __init__(self, dim: int, num_heads: int, form: str = "full", decay: bool = True,
                 rotation: bool = True, lepe: bool = True, init_value: float = 2.0,
                 heads_range: float = 4.0, qkv_bias: bool = True, proj_drop: float = 0.0,
                 data_format: str = "NCHW", impl: str = "auto", device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"MaSALayer: dim {dim} must split into {num_heads} heads of even width "
                             f"(the rotation pairs channels); choose another dim or num_heads")
        if form not in FORMS:
            raise ValueError(f"MaSALayer: form must be one of {FORMS}, got {form!r}")
        if impl not in IMPLS:
            raise ValueError(f"MaSALayer: impl must be one of {IMPLS}, got {impl!r}")
        if data_format not in DATA_FORMATS:
            raise ValueError(f"MaSALayer: data_format must be one of {DATA_FORMATS}, got {data_format!r}")
        self.dim = dim
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.form = form
        self.use_decay = decay
        self.use_rotation = rotation
        self.init_value = float(init_value)
        self.heads_range = float(heads_range)
        self.data_format = data_format
        self.impl = impl
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias, **dd)
        self.lepe = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim, **dd) if lepe else None
        self.proj = nn.Linear(dim, dim, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Linear weights ~ truncated normal (std 0.02), zero biases, as in RMT; LePE keeps PyTorch's init."""
        for lin in (self.qkv, self.proj):
            trunc_normal_(lin.weight, std=0.02)
            if lin.bias is not None:
                nn.init.zeros_(lin.bias)

    def __prepare_scriptable__(self) -> "MaSALayer":
        """``torch.jit.script`` calls this first: refuse with the alternatives (the layer does not script)."""
        raise RuntimeError(
            "MaSALayer, and the plug-in models built on it (rmt_deit_small, rmt_swin_tiny), do not compile "
            "with TorchScript (torch.jit.script). Use torch.compile, torch.export or torch.onnx.export; the "
            "RMT models (rmt_tiny ... rmt_large) do script.")

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, num_heads={self.num_heads}, form={self.form!r}, decay={self.use_decay}, "
                f"rotation={self.use_rotation}, lepe={self.lepe is not None}, data_format={self.data_format!r}")

    def position_tables(self, h: int, w: int, device: torch.device
                        ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rotation tables ``sin, cos`` ``(h, w, head_dim)`` and decays ``(num_heads,)`` for an h x w grid.

        A switched-off rotation gives ``sin = 0, cos = 1`` (identity), a switched-off decay zeros.
        """
        if self.use_rotation:
            sin, cos = rotation_tables(h, w, self.head_dim, device=device)
        else:
            sin = torch.zeros(h, w, self.head_dim, device=device)
            cos = torch.ones(h, w, self.head_dim, device=device)
        if self.use_decay:
            decay = head_decays(self.num_heads, self.init_value, self.heads_range, device=device)
        else:
            decay = torch.zeros(self.num_heads, device=device)
        return sin, cos, decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, c, h, w) -> (b, c, h, w)`` (NCHW) or ``(b, h, w, c) -> (b, h, w, c)`` (NHWC)."""
        if x.ndim != 4:
            raise ValueError(f"MaSALayer expects a 4-D {self.data_format} map, got shape {tuple(x.shape)}")
        if self.data_format == "NCHW":
            x = x.permute(0, 2, 3, 1)
        b, h, w, c = x.shape
        if c != self.dim:
            raise ValueError(f"MaSALayer built for {self.dim} channels got {c} "
                             f"(data_format={self.data_format!r}: is the layout right?)")
        q, k, v = self.qkv(x).split(c, dim=-1)
        sin, cos, decay = self.position_tables(h, w, x.device)
        shape = (b, h, w, self.num_heads, self.head_dim)
        q, k, v_heads = q.reshape(shape), k.reshape(shape), v.reshape(shape)
        impl = "reference" if is_exporting() else self.impl   # plain ops export
        out = masa(q, k, v_heads, sin, cos, decay, self.scale, form=self.form, impl=impl)
        out = out.view(b, h, w, c)
        if self.lepe is not None:
            out = out + self.lepe(nchw_for_conv(v)).permute(0, 2, 3, 1)
        out = self.proj_drop(self.proj(out))
        return out.permute(0, 3, 1, 2) if self.data_format == "NCHW" else out


# shape-dependent; torch.fx graph rewriting keeps it as one leaf call
register_notrace_module(MaSALayer)
