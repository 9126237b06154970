"""RMT feature-pyramid backbones for torchvision detectors.

The body is ``timm.create_model(name, features_only=True)``: NCHW stage outputs taken before each
downsample (strides 4/8/16/32), each through its per-stage LayerNorm (eps 1e-5). On top sits
torchvision's :class:`~torchvision.ops.FeaturePyramidNetwork` with the extra levels the detector
expects:

* Mask R-CNN: stages 0-3 -> P2-P5, plus P6 by max-pooling (``LastLevelMaxPool``);
* RetinaNet / FCOS: stages 1-3 -> P3-P5, plus P6 by a strided conv on the last stage's output and
  P7 by another on P6 (:class:`P6P7`: without a ReLU in between for RetinaNet, as mmdetection's
  ``add_extra_convs='on_input'``; with one for FCOS, as torchvision).

:func:`build_feature_pyramid` builds the same pyramid on any other timm backbone (``convnext_tiny``,
``resnet50`` ...), for comparisons on the same detector.

Options: frozen stages (``requires_grad`` off and kept in eval mode) and frozen BatchNorm (the
BatchNorms of the stem and the downsamples become :class:`torchvision.ops.FrozenBatchNorm2d`).
Weights load from ImageNet checkpoints (ours or released), released detection checkpoints (mmdet
layout, ``backbone.*`` under ``state_dict``) and this package's detection checkpoints.
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import timm
import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork, FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, LastLevelMaxPool, LastLevelP6P7

from ..checkpoint import (CheckpointError, StateDict, filter_state_dict, is_released_layout,
                          read_checkpoint, released_to_ours, unwrap_state_dict)
from ..model import RMT

# MaSA forms for detection-sized inputs: decomposed in stages 0-2, as in the released detection
# configs of every variant (the full form is quadratic in the number of tokens)
DETECTION_FORMS = "TTTF"

# which stages feed the FPN and which extra levels follow, per pyramid style
PYRAMIDS = {
    "p2-p6": dict(out_indices=(0, 1, 2, 3), extra="maxpool"),  # Mask R-CNN
    "p3-p7": dict(out_indices=(1, 2, 3), extra="p6p7"),        # RetinaNet, FCOS
}
_PYRAMID_STRIDES = {"p2-p6": (4, 8, 16, 32), "p3-p7": (8, 16, 32)}

# where the RMT sits inside an RMTFeaturePyramid (``backbone.body.model.*`` in a detector)
_BODY_PREFIX = "body.model."


class P6P7(LastLevelP6P7):
    """P6 = conv3x3/2 of the last backbone stage, P7 = conv3x3/2 of P6 (ReLU before it if ``relu``)."""

    def __init__(self, in_channels: int, out_channels: int, relu: bool = True):
        super().__init__(in_channels, out_channels)
        self.use_P5 = False  # always from the backbone stage (mmdetection's 'on_input')
        self.relu = relu

    def forward(self, p: List[torch.Tensor], c: List[torch.Tensor], names: List[str]):
        p6 = self.p6(c[-1])
        p7 = self.p7(torch.relu(p6) if self.relu else p6)
        return p + [p6, p7], names + ["p6", "p7"]


class RMTFeaturePyramid(nn.Module):
    """RMT body + FPN; ``(b, 3, H, W) -> OrderedDict`` of ``(b, out_channels, ceil(H/s), ceil(W/s))``.

    Level names are ``'0'..'3'`` (or ``'0'..'2'``) followed by the extra levels (``'pool'`` or
    ``'p6', 'p7'``). ``out_channels`` is the attribute torchvision detectors read.
    """

    def __init__(self, body: nn.Module, in_channels: Sequence[int], out_channels: int = 256,
                 extra_blocks: Optional[ExtraFPNBlock] = None):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(list(in_channels), out_channels, extra_blocks=extra_blocks)
        self.out_channels = out_channels
        self._frozen: List[nn.Module] = []

    @property
    def rmt(self) -> RMT:
        """The wrapped :class:`rmt.RMT` (stem, stages and per-stage norms)."""
        if not isinstance(getattr(self.body, "model", None), RMT):
            raise AttributeError("this pyramid's body is not an RMT")
        return self.body.model

    @property
    def strides(self) -> List[int]:
        """Strides of the body's outputs (e.g. ``[4, 8, 16, 32]``)."""
        return list(self.body.feature_info.reduction())

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        feats = self.body(x)
        return self.fpn(OrderedDict((str(i), f) for i, f in enumerate(feats)))

    def freeze_stages(self, frozen_stages: int) -> None:
        """Freeze the stem (``frozen_stages >= 0``) and stages ``0 .. frozen_stages-1`` with their norms.

        Frozen parts stop receiving gradients and stay in eval mode (BatchNorm statistics and
        drop path fixed) whatever ``train()`` is called with. ``-1`` freezes nothing.
        """
        model = self.rmt
        if not -1 <= frozen_stages <= len(model.stages):
            raise ValueError(f"frozen_stages must be between -1 and {len(model.stages)}, got {frozen_stages}")
        modules: List[nn.Module] = [model.stem] if frozen_stages >= 0 else []
        for i in range(max(frozen_stages, 0)):
            modules.append(model.stages[i])
            if model.feature_norms is not None:
                modules.append(model.feature_norms[i])
        for m in modules:
            m.requires_grad_(False)
        self._frozen = modules
        self.train(self.training)

    def train(self, mode: bool = True) -> "RMTFeaturePyramid":
        super().train(mode)
        for m in self._frozen:
            m.eval()
        return self


def freeze_batchnorm(module: nn.Module) -> int:
    """Replace every ``BatchNorm2d`` inside ``module`` by a FrozenBatchNorm2d holding its statistics.

    Returns the number of layers replaced.
    """
    count = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            frozen = FrozenBatchNorm2d(child.num_features, eps=child.eps)
            with torch.no_grad():
                if child.affine:
                    frozen.weight.copy_(child.weight)
                    frozen.bias.copy_(child.bias)
                if child.track_running_stats:
                    frozen.running_mean.copy_(child.running_mean)
                    frozen.running_var.copy_(child.running_var)
            frozen.to(child.weight.device if child.affine else child.running_mean.device)
            setattr(module, name, frozen)
            count += 1
        else:
            count += freeze_batchnorm(child)
    return count


def backbone_state_dict(obj: Dict) -> StateDict:
    """The backbone weights inside any supported checkpoint object, in this package's layout.

    Detection checkpoints (released mmdet files with ``backbone.*`` under ``state_dict``, or this
    package's ``rmt detect train`` checkpoints) give their backbone; classification checkpoints
    give everything (the head is dropped later by :func:`rmt.checkpoint.filter_state_dict`).
    """
    sd = unwrap_state_dict(obj)  # keeps only ``backbone.*`` (prefix dropped) of whole detectors
    if any(k.startswith(_BODY_PREFIX) for k in sd):
        sd = {k[len(_BODY_PREFIX):]: v for k, v in sd.items() if k.startswith(_BODY_PREFIX)}
    return released_to_ours(sd) if is_released_layout(sd) else sd


def load_backbone_weights(model: RMT, path: str | Path) -> None:
    """Load the backbone of any supported checkpoint file strictly into ``model``.

    ImageNet checkpoints have no per-stage norms: those keep their initial values (a warning
    says so). Raises :class:`rmt.CheckpointError` naming the cause when the file does not fit.
    """
    obj, _ = read_checkpoint(path)
    sd = backbone_state_dict(obj)
    own = model.state_dict()
    # FrozenBatchNorm2d has no counter of batches: drop or add counters to fit the model
    sd = {k: v for k, v in sd.items() if not (k.endswith(".num_batches_tracked") and k not in own)}
    sd.update({k: v for k, v in own.items() if k.endswith(".num_batches_tracked") and k not in sd})
    try:
        sd = filter_state_dict(sd, model)
    except CheckpointError as e:
        raise CheckpointError(f"'{path}': {e}") from None
    model.load_state_dict(sd, strict=True)


def build_rmt_fpn(
        model_name: str = "rmt_tiny",
        pyramid: str = "p2-p6",
        out_channels: int = 256,
        pretrained: Optional[str | Path] = None,
        frozen_stages: int = -1,
        frozen_bn: bool = False,
        attn_forms: str = DETECTION_FORMS,
        p7_relu: bool = False,
        **model_kwargs,
) -> RMTFeaturePyramid:
    """Create an RMT + FPN backbone for a torchvision detector.

    Args:
        model_name: ``rmt_tiny``, ``rmt_small``, ``rmt_base`` or ``rmt_large``.
        pyramid: ``"p2-p6"`` (Mask R-CNN) or ``"p3-p7"`` (RetinaNet, FCOS).
        out_channels: FPN width.
        pretrained: checkpoint file for the backbone (ImageNet or detection, ours or released).
        frozen_stages: -1 trains all; 0 freezes the stem; k also freezes stages 0..k-1.
        frozen_bn: replace the BatchNorms of the stem and downsamples by FrozenBatchNorm2d.
        attn_forms: MaSA form per stage (T = decomposed, F = full).
        p7_relu: ReLU between P6 and P7 (``p3-p7`` only; off as in the released RetinaNet).
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``, ``embed_dims``).
    """
    if pyramid not in PYRAMIDS:
        raise ValueError(f"pyramid must be one of {sorted(PYRAMIDS)}, got {pyramid!r}")
    cfg = PYRAMIDS[pyramid]
    body = timm.create_model(model_name, features_only=True, out_indices=cfg["out_indices"],
                             attn_forms=attn_forms, **model_kwargs)
    rmt = body.model
    if pretrained:
        load_backbone_weights(rmt, pretrained)
    # norms of stages that feed no FPN level (stage 0 for P3-P7) would get no gradient under DDP
    for i, norm in enumerate(rmt.feature_norms):
        if i not in cfg["out_indices"]:
            norm.requires_grad_(False)
    if frozen_bn:
        freeze_batchnorm(rmt.stem)
        for stage in rmt.stages:
            freeze_batchnorm(stage.downsample)
    channels: Tuple[int, ...] = tuple(body.feature_info.channels())
    extra = LastLevelMaxPool() if cfg["extra"] == "maxpool" else P6P7(channels[-1], out_channels, p7_relu)
    backbone = RMTFeaturePyramid(body, channels, out_channels, extra)
    backbone.freeze_stages(frozen_stages)
    return backbone


def build_feature_pyramid(model_name: str, pyramid: str = "p2-p6", out_channels: int = 256,
                          p7_relu: bool = False, **kwargs) -> RMTFeaturePyramid:
    """An FPN backbone on ``model_name``: :func:`build_rmt_fpn` for RMT variants, else any timm model
    with ``features_only`` (``convnext_tiny``, ``resnet50`` ...; random weights unless
    ``pretrained=True`` is passed through ``kwargs`` to timm), on the stages of strides 4-32 / 8-32.
    """
    if model_name.startswith("rmt"):
        return build_rmt_fpn(model_name, pyramid, out_channels, p7_relu=p7_relu, **kwargs)
    if pyramid not in PYRAMIDS:
        raise ValueError(f"pyramid must be one of {sorted(PYRAMIDS)}, got {pyramid!r}")
    probe = timm.create_model(model_name, features_only=True, pretrained=False)
    reductions = list(probe.feature_info.reduction())
    wanted = _PYRAMID_STRIDES[pyramid]
    if not set(wanted) <= set(reductions):
        raise ValueError(f"{model_name} has features of strides {reductions}, not all of {list(wanted)}")
    indices = tuple(reductions.index(s) for s in wanted)
    body = timm.create_model(model_name, features_only=True, out_indices=indices, **kwargs)
    channels = tuple(body.feature_info.channels())
    extra = LastLevelMaxPool() if PYRAMIDS[pyramid]["extra"] == "maxpool" else P6P7(channels[-1], out_channels, p7_relu)
    return RMTFeaturePyramid(body, channels, out_channels, extra)
