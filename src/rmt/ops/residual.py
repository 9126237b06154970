"""A block's residual branch, ``x + drop_path(layer_scale(branch))``, as one pass over the activations.

In eager PyTorch that is up to three element-wise passes (the layer-scale product, the drop-path
product, the sum) and four launches (with the mask and its scaling). :func:`add_branch` folds the
per-sample drop-path factor and the per-channel ``gamma`` into one small ``(b, 1, ..., c)`` factor of
a single ``torch.addcmul``; the mask is drawn exactly as timm's ``DropPath`` draws it (same shape,
dtype and order of random numbers), so training runs see the same masks as with the modules.
"""
import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale


def _hook_free(module: nn.Module) -> bool:
    return not (module._forward_hooks or module._forward_pre_hooks)


def add_branch(x: torch.Tensor, branch: torch.Tensor, layer_scale: nn.Module,
               drop_path: nn.Module) -> torch.Tensor:
    """``x + drop_path(layer_scale(branch))`` for channels-last ``x`` and ``branch`` ``(b, ..., c)``.

    ``layer_scale`` is ``nn.Identity`` or timm's ``LayerScale``, ``drop_path`` ``nn.Identity`` or timm's
    ``DropPath``; anything else (a subclass, a hooked module, in-place layer scale) runs as the
    plain composition of the modules.
    """
    plain_scale = (type(layer_scale) is nn.Identity
                   or (type(layer_scale) is LayerScale and not layer_scale.inplace))
    plain_drop = type(drop_path) is nn.Identity or (type(drop_path) is DropPath and drop_path.scale_by_keep)
    if not (plain_scale and plain_drop and _hook_free(layer_scale) and _hook_free(drop_path)):
        return x + drop_path(layer_scale(branch))
    scale = layer_scale.gamma if type(layer_scale) is LayerScale else None
    if type(drop_path) is DropPath and drop_path.training and drop_path.drop_prob > 0.0:
        keep = 1.0 - drop_path.drop_prob
        mask = branch.new_empty((branch.shape[0],) + (1,) * (branch.ndim - 1)).bernoulli_(keep)
        if keep > 0.0:
            mask.div_(keep)
        scale = mask if scale is None else mask * scale
    return x + branch if scale is None else torch.addcmul(x, branch, scale)
