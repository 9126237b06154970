"""Semantic FPN and UperNet on RMT backbones, built from segmentation_models_pytorch.

smp's timm-universal encoders take ``rmt_*`` unchanged: ``smp.UPerNet(encoder_name="tu-rmt_small")``
creates ``timm.create_model("rmt_small", features_only=True, out_indices=(0, 1, 2, 3))``, whose
features are NCHW at strides 4/8/16/32, each through its per-stage LayerNorm (smp treats the
stride-4 start like Swin/ConvNeXt and adds an empty stride-2 placeholder). :class:`Segmenter`
wraps such an smp model with what the paper's heads add on top:

* ``fpn`` (Semantic FPN, 80k recipe): smp's FPN with 256 pyramid and 128 segmentation channels and
  dropout 0.1, as mmsegmentation's FPN neck + FPNHead. Difference: smp merges each top-down level
  straight into its segmentation branch (conv3x3-GroupNorm-ReLU-upsample blocks, as in the Panoptic
  FPN paper), without the FPN neck's extra 3x3 output conv per level and with GroupNorm where
  mmsegmentation uses (Sync)BatchNorm.
* ``upernet`` (160k recipe): smp's UPerNet with 512 channels (PPM 1/2/3/6 + FPN + fusion, BatchNorm),
  plus dropout 0.1 before the classifier and the auxiliary FCN head on the stride-16 feature
  (loss weight 0.4) that the paper's recipe trains with. smp's UPerNet puts its own LayerNorm on
  every feature; the backbone already applies the per-stage LayerNorms, so those are removed.

Inputs of any size work: images are zero-padded (after normalisation) to a multiple of 32 and
the logits cropped back.
"""
from __future__ import annotations

from typing import Any, Dict, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError, StateDict, filter_state_dict, read_checkpoint, unwrap_state_dict
from ..model import MODEL_ARGS, RMT

HEADS = ("fpn", "upernet")
OUTPUT_STRIDE = 32

# prefixes under which a whole segmentation model keeps its backbone
_BACKBONE_PREFIXES = ("backbone.", "net.encoder.model.model.", "encoder.model.model.")


class FCNAuxHead(nn.Module):
    """Auxiliary head: conv3x3-BN-ReLU, dropout, conv1x1; ``(b, c_in, h, w) -> (b, classes, h, w)``."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_channels, channels, 3, padding=1, bias=False),
                                  nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)
        nn.init.kaiming_normal_(self.conv[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.normal_(self.classifier.weight, std=0.01)
        nn.init.zeros_(self.classifier.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class Segmenter(nn.Module):
    """An smp segmentation model on an RMT encoder, with the paper's extras (see module docstring).

    ``forward(x)`` maps normalised images ``(b, 3, H, W)`` to logits ``(b, classes, H, W)``;
    ``forward(x, return_aux=True)`` returns ``(logits, aux_logits or None)``, both ``(b, classes, H, W)``.
    """

    def __init__(self, net: nn.Module, head: str, num_classes: int, aux_head: Optional[nn.Module] = None,
                 head_dropout: float = 0.0):
        super().__init__()
        self.net = net
        self.head = head
        self.num_classes = num_classes
        self.head_dropout = nn.Dropout2d(head_dropout) if head_dropout > 0 else nn.Identity()
        self.aux_head = aux_head

    @property
    def backbone(self) -> RMT:
        """The RMT model inside smp's encoder (``features_only`` wrapper around it)."""
        return self.net.encoder.model.model

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        h, w = x.shape[-2:]
        pad_h, pad_w = (-h) % OUTPUT_STRIDE, (-w) % OUTPUT_STRIDE
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        # smp's encoder returns [image, empty stride-2 placeholder, stride 4, 8, 16, 32]
        features = self.net.encoder(x)
        logits = self.net.segmentation_head(self.head_dropout(self.net.decoder(features)))
        logits = logits[..., :h, :w]
        if not return_aux:
            return logits
        aux = None
        if self.aux_head is not None:
            aux = F.interpolate(self.aux_head(features[-2]), size=x.shape[-2:], mode="bilinear",
                                align_corners=False)[..., :h, :w]
        return logits, aux


def build_segmenter(model: str = "rmt_small", head: str = "upernet", num_classes: int = 150, *,
                    aux_head: Optional[bool] = None, pretrained: Optional[str] = None,
                    backbone_kwargs: Optional[Mapping[str, Any]] = None,
                    device: Optional[str | torch.device] = None) -> Segmenter:
    """Build Semantic FPN (``head="fpn"``) or UperNet (``head="upernet"``) on an RMT variant.

    Args:
        model: ``rmt_tiny``, ``rmt_small``, ``rmt_base`` or ``rmt_large``.
        num_classes: output classes (150 for ADE20K).
        aux_head: auxiliary FCN head on the stride-16 feature; default on for UperNet only.
        pretrained: backbone checkpoint (ours, released classification, released mmseg/mmdet
            segmentation or detection, or a whole segmentation checkpoint of this package).
        backbone_kwargs: passed to ``timm.create_model`` through smp's encoder kwargs, e.g.
            ``drop_path_rate``, ``attn_forms``, or a smaller architecture for tests.
        device: build on this device; ``"meta"`` builds without allocating memory.
    """
    import segmentation_models_pytorch as smp
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {', '.join(HEADS)}")
    if model not in MODEL_ARGS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODEL_ARGS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    encoder_kwargs = {k: (tuple(v) if isinstance(v, list) else v)
                      for k, v in (backbone_kwargs or {}).items() if v is not None}
    aux_head = (head == "upernet") if aux_head is None else aux_head
    with torch.device(device or "cpu"):
        if head == "fpn":
            net = smp.FPN(encoder_name=f"tu-{model}", encoder_weights=None, classes=num_classes,
                          decoder_pyramid_channels=256, decoder_segmentation_channels=128,
                          decoder_dropout=0.1, **encoder_kwargs)
            head_dropout = 0.0  # smp's FPN decoder already ends in dropout
        else:
            net = smp.UPerNet(encoder_name=f"tu-{model}", encoder_weights=None, classes=num_classes,
                              decoder_channels=512, **encoder_kwargs)
            net.decoder.feature_norms = nn.ModuleList(nn.Identity() for _ in net.decoder.feature_norms)
            head_dropout = 0.1
        channels = net.encoder.out_channels  # [in, 0, c0, c1, c2, c3]
        aux = FCNAuxHead(channels[-2], num_classes) if aux_head else None
        segmenter = Segmenter(net, head, num_classes, aux, head_dropout)
    if pretrained:
        load_backbone(segmenter, pretrained)
    return segmenter


# ------------------------------------------------------------------------------------------------
# checkpoints
# ------------------------------------------------------------------------------------------------

def backbone_state_dict(obj: Mapping[str, Any]) -> StateDict:
    """The backbone tensors of a checkpoint object, in a layout :func:`filter_state_dict` reads.

    Whole segmentation/detection models keep the backbone under a prefix: ``backbone.`` in the
    released mmseg/mmdet checkpoints (with ``extra_norms.{i}``), ``net.encoder.model.model.`` in
    this package's :class:`Segmenter`, ``encoder.model.model.`` in a bare smp model. Classification
    checkpoints (ours or released) pass through as they are.
    """
    sd = unwrap_state_dict(obj)
    for prefix in _BACKBONE_PREFIXES:
        if any(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def load_backbone(segmenter: Segmenter, path: str) -> None:
    """Load the backbone weights of any supported checkpoint file into ``segmenter.backbone``.

    Per-stage LayerNorms absent from the file (classification checkpoints) keep their fresh
    initialisation; a checkpoint of another variant raises :class:`CheckpointError`.
    """
    obj, _ = read_checkpoint(path)
    try:
        sd = filter_state_dict(backbone_state_dict(obj), segmenter.backbone)
    except CheckpointError as e:
        raise CheckpointError(f"'{path}': {e}") from None
    segmenter.backbone.load_state_dict(sd, strict=True)


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(segmenter: Segmenter) -> Dict[str, Any]:
    """Parameter counts of backbone, decoder+head and auxiliary head."""
    total = param_count(segmenter)
    backbone = param_count(segmenter.backbone)
    aux = param_count(segmenter.aux_head) if segmenter.aux_head is not None else 0
    return dict(head=segmenter.head, params=total, backbone_params=backbone,
                decoder_params=total - backbone - aux, aux_params=aux)
