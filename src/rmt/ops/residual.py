"""A block's residual branch, ``x + drop_path(layer_scale(branch))``, as one pass over the activations.

In eager PyTorch that is up to three element-wise passes (the layer-scale product, the drop-path
product, the sum) and four launches (with the mask and its scaling). :func:`add_branch` folds the
per-sample drop-path factor and the per-channel ``gamma`` into one small ``(b, 1, ..., c)`` factor of
a single ``torch.addcmul``; the mask is drawn exactly as timm's ``DropPath`` draws it (same shape,
dtype and order of random numbers), so training runs see the same masks as with the modules.
The fused block (:mod:`rmt.ops.block`) computes the same addition, and its gradient
``grad * scale``, with :func:`scaled_add`, one Triton pass.
"""
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale

from .triton_support import HAS_TRITON, cdiv, eager_launch, triton_runs_on

if HAS_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _scaled_add_kernel(X, Y, S, OUT, PER_IMAGE, C, s_b, s_c, HAS_X: tl.constexpr,
                           PER_CHANNEL: tl.constexpr, BLOCK: tl.constexpr):
        """Grid ``(cdiv(PER_IMAGE, BLOCK), b)``: ``OUT = [X +] Y * S[b, c]`` over contiguous
        ``(b, h, w, c)`` tensors of ``PER_IMAGE`` elements per image, ``S`` read through the strides
        ``s_b`` and ``s_c`` (``PER_CHANNEL``: ``s_c`` is not zero)."""
        b = tl.program_id(1).to(tl.int64)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < PER_IMAGE
        if PER_CHANNEL:
            s = tl.load(S + b * s_b + (offs % C) * s_c, mask=mask, other=0.0).to(tl.float32)
        else:
            s = tl.load(S + b * s_b).to(tl.float32)
        base = b * PER_IMAGE + offs
        acc = tl.load(Y + base, mask=mask, other=0.0).to(tl.float32) * s
        if HAS_X:
            acc += tl.load(X + base, mask=mask, other=0.0).to(tl.float32)
        tl.store(OUT + base, acc.to(OUT.dtype.element_ty), mask=mask)


def scaled_add(x: Optional[torch.Tensor], y: torch.Tensor, scale: torch.Tensor,
               out: Optional[torch.Tensor] = None, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x + y * scale`` (``torch.addcmul(x, y, scale)``), or ``y * scale`` without ``x``, for ``(b, h, w, c)``
    tensors and a ``scale`` broadcastable to ``(b, 1, 1, c)`` (a drop-path mask and/or layer scale),
    in ``dtype`` (default: the promoted dtype of the inputs, as PyTorch's) or into ``out``.

    One Triton pass where it runs (contiguous inputs): PyTorch's kernel for a broadcast factor is
    not vectorised and took 1.5 ms of an RMT-S step at batch 128 on an H200 for the 58 residual
    additions of the blocks."""
    if dtype is None:
        dtype = torch.promote_types(y.dtype, scale.dtype)
        if x is not None:
            dtype = torch.promote_types(dtype, x.dtype)
    usable = (y.dim() == 4 and y.is_contiguous() and triton_runs_on(y)
              and scale.dim() <= 4 and scale.device == y.device
              and (x is None or (x.shape == y.shape and x.is_contiguous() and x.device == y.device))
              and (out is None or (out.shape == y.shape and out.is_contiguous() and out.dtype == dtype)))
    if usable:
        b, h, w, c = y.shape
        try:
            expanded = scale.expand(b, 1, 1, c)
        except RuntimeError:
            usable = False
    if not usable:
        result = (y * scale if x is None else torch.addcmul(x, y, scale)).to(dtype)
        return result if out is None else out.copy_(result)
    if out is None:
        out = torch.empty(y.shape, dtype=dtype, device=y.device)
    per_image, block = h * w * c, 2048
    eager_launch(_scaled_add_kernel)[(cdiv(per_image, block), b)](
        x if x is not None else y, y, expanded, out, per_image, c, expanded.stride(0), expanded.stride(3),
        HAS_X=x is not None, PER_CHANNEL=expanded.stride(3) != 0, BLOCK=block, num_warps=4)
    return out


def hook_free(module: nn.Module) -> bool:
    """Whether ``module`` has no forward hooks (so calling its parameters directly changes nothing)."""
    return not (module._forward_hooks or module._forward_pre_hooks)


def plain_residual(layer_scale: nn.Module, drop_path: nn.Module) -> bool:
    """Whether ``layer_scale`` is ``nn.Identity`` or a non-in-place timm ``LayerScale`` and ``drop_path``
    ``nn.Identity`` or a timm ``DropPath`` that scales by the keep probability, both without hooks."""
    plain_scale = (type(layer_scale) is nn.Identity
                   or (type(layer_scale) is LayerScale and not layer_scale.inplace))
    plain_drop = type(drop_path) is nn.Identity or (type(drop_path) is DropPath and drop_path.scale_by_keep)
    return plain_scale and plain_drop and hook_free(layer_scale) and hook_free(drop_path)


def layer_scale_gamma(layer_scale: nn.Module) -> Optional[torch.Tensor]:
    """The ``(c,)`` factor of a timm ``LayerScale``; ``None`` for ``nn.Identity``."""
    return layer_scale.gamma if type(layer_scale) is LayerScale else None


def drop_path_active(drop_path: nn.Module) -> bool:
    """Whether ``drop_path`` (``nn.Identity`` or timm's ``DropPath``) would drop samples now."""
    return type(drop_path) is DropPath and drop_path.training and drop_path.drop_prob > 0.0


def drop_path_mask(branch: torch.Tensor, drop_path: nn.Module) -> Optional[torch.Tensor]:
    """The ``(b, 1, ..., 1)`` per-sample factor (0 or ``1 / keep``) that timm's ``DropPath`` would
    apply to ``branch`` now, drawn as it draws it; ``None`` when nothing is dropped (evaluation,
    ``drop_prob == 0`` or ``nn.Identity``)."""
    if not drop_path_active(drop_path):
        return None
    keep = 1.0 - drop_path.drop_prob
    mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep)
    if keep > 0.0:
        mask.div_(keep)
    return mask


def branch_scale(branch: torch.Tensor, layer_scale: nn.Module, drop_path: nn.Module) -> Optional[torch.Tensor]:
    """The factor of ``branch`` in ``x + drop_path(layer_scale(branch))`` for plain modules (see
    :func:`plain_residual`): the drop-path mask (drawn now) times ``gamma``, either alone, or ``None``."""
    scale = layer_scale_gamma(layer_scale)
    mask = drop_path_mask(branch, drop_path)
    if mask is not None:
        scale = mask if scale is None else mask * scale
    return scale


def add_branch(x: torch.Tensor, branch: torch.Tensor, layer_scale: nn.Module,
               drop_path: nn.Module) -> torch.Tensor:
    """``x + drop_path(layer_scale(branch))`` for channels-last ``x`` and ``branch`` ``(b, ..., c)``.

    ``layer_scale`` is ``nn.Identity`` or timm's ``LayerScale``, ``drop_path`` ``nn.Identity`` or timm's
    ``DropPath``; anything else (a subclass, a hooked module, in-place layer scale) runs as the
    plain composition of the modules.
    """
    if not plain_residual(layer_scale, drop_path):
        return x + drop_path(layer_scale(branch))
    scale = branch_scale(branch, layer_scale, drop_path)
    return x + branch if scale is None else torch.addcmul(x, branch, scale)
