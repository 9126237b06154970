"""A block's residual branch, ``x + drop_path(layer_scale(branch))``, as one pass over the activations.

In eager PyTorch that is up to three element-wise passes (the layer-scale product, the drop-path
product, the sum) and four launches (with the mask and its scaling). :func:`add_branch` folds the
per-sample drop-path factor and the per-channel ``gamma`` into one small ``(b, 1, ..., c)`` factor of
a single ``torch.addcmul``; the mask is drawn exactly as timm's ``DropPath`` draws it (same shape,
dtype and order of random numbers), so training runs see the same masks as with the modules.
"""
from typing import Optional

import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale


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


def drop_path_mask(branch: torch.Tensor, drop_path: nn.Module) -> Optional[torch.Tensor]:
    """The ``(b, 1, ..., 1)`` per-sample factor (0 or ``1 / keep``) that timm's ``DropPath`` would
    apply to ``branch`` now, drawn as it draws it; ``None`` when nothing is dropped (evaluation,
    ``drop_prob == 0`` or ``nn.Identity``)."""
    if not (type(drop_path) is DropPath and drop_path.training and drop_path.drop_prob > 0.0):
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
