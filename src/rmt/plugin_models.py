"""MaSA dropped into two classic vision transformers: the paper's RMT-DeiT-S and RMT-Swin-T ablations.

Both are timm's own models with their attention replaced by :class:`rmt.layers.MaSALayer`, and both
are registered with timm (``import rmt`` suffices), so ``timm.create_model`` and ``rmt train`` take
them with the usual keyword arguments (``num_classes``, ``drop_path_rate``, ``drop_rate``,
``img_size``, ``features_only`` ...). Neither has released weights.

``rmt_deit_small`` (RMT-DeiT-S): DeiT-S (patch 16, width 384, 12 blocks of 6 heads) with every
block's attention replaced by full-form MaSA on the 14x14 token grid (at 224x224). Design choices:

* no class token: MaSA's rotation and decay are defined on a 2-D grid and a class token has no
  place on it, so the classifier reads the global average of the tokens (timm's ``global_pool='avg'``
  with the final norm after the pooling), as in DeiT variants without a class token;
* no absolute position embedding (``pos_embed='none'``): MaSA's rotation, decay and LePE carry the
  position; pass ``pos_embed='learn'`` to keep DeiT's learned table;
* the tokens stay an NHWC grid ``(b, h, w, c)`` between the blocks (timm's block, norm and MLP
  work per token), so any image size whose sides are multiples of 16 works; ``forward_features``
  returns that grid (``output_fmt = "NHWC"``, as timm's Swin does), not a ViT's ``(b, N, c)``;
* decay ``init_value=2, heads_range=6``: the values of RMT's own stride-16 stage, which sees the
  same 14x14 grid at 224x224.

``rmt_swin_tiny`` (RMT-Swin-T): Swin-T (patch 4, widths 96..768, depths 2/2/6/2, heads 3/6/12/24)
with each block's shifted-window attention replaced by MaSA over the whole feature map of the stage.
Windows, cyclic shifts, attention masks and the relative position bias tables are gone: they exist
to give windowed attention locality and cross-window flow, which MaSA's distance decay gives a
global attention directly. As in RMT-T, stages 0-1 (56x56, 28x28 grids) use the decomposed form,
stages 2-3 (14x14, 7x7) the full form, with ``heads_ranges=(4, 4, 6, 6)``; patch merging, norms,
MLPs and the head are Swin's. Any input size works (patch merging pads odd sizes).

Every MaSA option is a keyword argument: ``masa_form(s)``, ``masa_decay``, ``masa_rotation``,
``masa_lepe``, ``masa_init_value``, ``masa_heads_range(s)``.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.swin_transformer import SwinTransformer
from timm.models.vision_transformer import VisionTransformer

from .layers import MaSALayer

__all__ = ["MaSAVisionTransformer", "MaSASwinTransformer", "MaSASwinBlock", "BlockMaSA"]


class BlockMaSA(MaSALayer):
    """:class:`MaSALayer` on NHWC tokens with the call signature of timm's ViT attention."""

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("MaSA has no attention mask or causal mode: it attends over the whole token grid")
        return super().forward(x)


# ------------------------------------------------------------------------------------------------
# RMT-DeiT-S
# ------------------------------------------------------------------------------------------------

class MaSAVisionTransformer(VisionTransformer):
    """timm's VisionTransformer with MaSA attention over an NHWC token grid; see the module doc."""

    def __init__(self, masa_form: str = "full", masa_decay: bool = True, masa_rotation: bool = True,
                 masa_lepe: bool = True, masa_init_value: float = 2.0, masa_heads_range: float = 6.0,
                 class_token: bool = False, reg_tokens: int = 0, global_pool: str = "avg",
                 pos_embed: str = "none", dynamic_img_size: bool = True, patch_drop_rate: float = 0.0,
                 **kwargs: Any):
        if class_token or reg_tokens:
            raise ValueError("RMT-DeiT has no class or register tokens: MaSA needs a pure 2-D token grid")
        if global_pool not in ("avg", "max", "avgmax", ""):
            raise ValueError(f"global_pool {global_pool!r} needs prefix tokens or attention pooling; "
                             "use 'avg', 'max', 'avgmax' or ''")
        if patch_drop_rate:
            raise ValueError("patch_drop_rate would remove tokens from MaSA's 2-D grid; leave it at 0")
        super().__init__(class_token=False, reg_tokens=0, global_pool=global_pool, pos_embed=pos_embed,
                         dynamic_img_size=dynamic_img_size, **kwargs)
        self.output_fmt = "NHWC"
        dd = dict(device=kwargs.get("device"), dtype=kwargs.get("dtype"))
        for blk in self.blocks:
            old = blk.attn
            blk.attn = BlockMaSA(
                self.embed_dim, old.num_heads, form=masa_form, decay=masa_decay, rotation=masa_rotation,
                lepe=masa_lepe, init_value=masa_init_value, heads_range=masa_heads_range,
                qkv_bias=old.qkv.bias is not None, proj_drop=kwargs.get("proj_drop_rate", 0.0),
                data_format="NHWC", **dd)

    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding ``(b, h, w, c)`` (or ``(b, h*w, c)`` at a fixed size) -> ``(b, h, w, c)``."""
        if self.dynamic_img_size:   # the patch embedding's output is NHWC (read from the module: torch.fx)
            b, h, w, c = x.shape
        else:
            (h, w), b, c = self.patch_embed.grid_size, x.shape[0], x.shape[-1]
        return super()._pos_embed(x).reshape(b, h, w, c)

    def forward_features(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                         is_causal: bool = False) -> torch.Tensor:
        """``(b, 3, H, W) -> (b, H/16, W/16, c)`` normalised tokens (NHWC, ``output_fmt``, as timm's Swin)."""
        return super().forward_features(x, attn_mask, is_causal)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """NHWC tokens ``(b, h, w, c)`` (or ``(b, N, c)``) -> logits, or pooled features with ``pre_logits``;
        without global pooling (``global_pool=''``) the tokens keep their layout."""
        return super().forward_head(x.flatten(1, -2) if self.global_pool else x, pre_logits)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, **kwargs: Any):
        """timm's ``forward_intermediates``; the final output is NHWC as :meth:`forward_features`'s,
        intermediates NCHW or, with ``output_fmt='NLC'``, ``(b, N, c)`` as for a ViT."""
        out = super().forward_intermediates(x, *args, **kwargs)
        if kwargs.get("output_fmt", "NCHW") != "NLC":
            return out

        def nlc(t):
            return t.flatten(1, 2) if torch.is_tensor(t) and t.ndim == 4 else t

        if isinstance(out, dict):
            out["image_intermediates"] = [nlc(t) for t in out["image_intermediates"]]
            return out
        if isinstance(out, tuple):
            final, inter = out
            return final, [nlc(t) for t in inter]
        return [nlc(t) for t in out]


# ------------------------------------------------------------------------------------------------
# RMT-Swin-T
# ------------------------------------------------------------------------------------------------

class MaSASwinBlock(nn.Module):
    """A Swin block whose windowed attention is MaSA over the whole map; ``(b, h, w, c)`` in and out.

    Keeps the norms, MLP and drop paths of the Swin block it replaces (same attribute names).
    """

    def __init__(self, swin_block: nn.Module, attn: MaSALayer):
        super().__init__()
        self.norm1 = swin_block.norm1
        self.attn = attn
        self.drop_path1 = swin_block.drop_path1
        self.norm2 = swin_block.norm2
        self.mlp = swin_block.mlp
        self.drop_path2 = swin_block.drop_path2

    def set_input_size(self, *args: Any, **kwargs: Any) -> None:
        """Nothing depends on the input size (timm's ``set_input_size`` calls this on every block)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path1(self.attn(self.norm1(x)))
        return x + self.drop_path2(self.mlp(self.norm2(x)))


class MaSASwinTransformer(SwinTransformer):
    """timm's SwinTransformer with every block's window attention replaced by MaSA; see the module doc."""

    def __init__(self, masa_forms: Sequence[str] = ("decomposed", "decomposed", "full", "full"),
                 masa_decay: bool = True, masa_rotation: bool = True, masa_lepe: bool = True,
                 masa_init_value: float = 2.0, masa_heads_ranges: Sequence[float] = (4, 4, 6, 6),
                 strict_img_size: bool = False, **kwargs: Any):
        super().__init__(strict_img_size=strict_img_size, **kwargs)
        n = len(self.layers)
        if len(masa_forms) != n or len(masa_heads_ranges) != n:
            raise ValueError(f"masa_forms and masa_heads_ranges need one entry per stage ({n})")
        dd = dict(device=kwargs.get("device"), dtype=kwargs.get("dtype"))
        for stage, form, heads_range in zip(self.layers, masa_forms, masa_heads_ranges):
            stage.blocks = nn.Sequential(*[
                MaSASwinBlock(blk, MaSALayer(
                    blk.dim, blk.attn.num_heads, form=form, decay=masa_decay, rotation=masa_rotation,
                    lepe=masa_lepe, init_value=masa_init_value, heads_range=heads_range,
                    qkv_bias=blk.attn.qkv.bias is not None, proj_drop=kwargs.get("proj_drop_rate", 0.0),
                    data_format="NHWC", **dd))
                for blk in stage.blocks])


# ------------------------------------------------------------------------------------------------
# registrations
# ------------------------------------------------------------------------------------------------

def _cfg(**kwargs: Any) -> Dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD, "license": "apache-2.0",
        "paper_ids": "arXiv:2309.11523", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "rmt_deit_small.untrained": _cfg(first_conv="patch_embed.proj", classifier="head", pool_size=(14, 14)),
    "rmt_swin_tiny.untrained": _cfg(first_conv="patch_embed.proj", classifier="head.fc", pool_size=(7, 7)),
})


@register_model
def rmt_deit_small(pretrained: bool = False, **kwargs: Any) -> MaSAVisionTransformer:
    """RMT-DeiT-S: DeiT-S with full-form MaSA on the 14x14 token grid, average pooling, no class token."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        MaSAVisionTransformer, "rmt_deit_small", pretrained,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"), **dict(args, **kwargs))


@register_model
def rmt_swin_tiny(pretrained: bool = False, **kwargs: Any) -> MaSASwinTransformer:
    """RMT-Swin-T: Swin-T with MaSA over each stage's whole map (decomposed in stages 0-1, full in 2-3)."""
    args = dict(patch_size=4, embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
    args.update(kwargs)
    out_indices = args.pop("out_indices", tuple(range(len(args["depths"]))))
    return build_model_with_cfg(
        MaSASwinTransformer, "rmt_swin_tiny", pretrained,
        feature_cfg=dict(flatten_sequential=True, out_indices=out_indices), **args)
