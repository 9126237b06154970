"""Semantic FPN and UperNet on RMT backbones, in two implementations.

``decoder="mmseg"`` (the default): :class:`EncoderDecoder`, mmsegmentation's segmentor built from
this package's own modules (:mod:`.heads`): the RMT backbone's four per-stage-normalised features
(strides 4/8/16/32) go through the decoder (Semantic FPN: FPN neck 256 + FPNHead 128; UperNet:
UPerHead 512 with PPM 1/2/3/6, plus the auxiliary FCNHead 256 on the stride-16 feature); the
logits (stride 4) are upsampled bilinearly to the input size. Parameter names are
mmsegmentation's (``backbone.*`` in this package's RMT layout, ``neck.*``, ``decode_head.*``,
``auxiliary_head.*``), so the released ADE20K segmentors load whole (:mod:`.released`). Any input
size works as it does in mmsegmentation (no padding).

``decoder="smp"``: :class:`Segmenter`, segmentation_models_pytorch's decoders on smp's
timm-universal encoder ``tu-rmt_*`` (``timm.create_model("rmt_*", features_only=True)``; smp
treats the stride-4 start like Swin/ConvNeXt and adds an empty stride-2 placeholder), with the
paper's extras on top:

* ``fpn``: smp's FPN with 256 pyramid and 128 segmentation channels and dropout 0.1. It differs
  from mmsegmentation's: each top-down level feeds its segmentation branch directly
  (conv3x3-GroupNorm-ReLU-upsample blocks, as in the Panoptic FPN paper), without the neck's
  3x3 output conv per level, and with GroupNorm where mmsegmentation uses (Sync)BatchNorm.
* ``upernet``: smp's UPerNet with 512 channels (PPM 1/2/3/6 + FPN + fusion, BatchNorm), dropout
  0.1 before the classifier and the auxiliary FCN head on the stride-16 feature. smp's own
  per-feature LayerNorms are removed (the backbone applies its per-stage LayerNorms already); the
  decoder then computes what mmsegmentation's UPerHead does, but smp upsamples the logits 4x with
  ``align_corners=True``.

Images are zero-padded (after normalisation) to a multiple of 32 for smp and the logits cropped back.

smp's other decoders take the same encoder name, e.g. ``smp.Unet(encoder_name="tu-rmt_small")``.
"""
from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError, StateDict, filter_state_dict, read_checkpoint, unwrap_state_dict
from ..model import MODEL_ARGS, RMT
from .heads import FCNHead, FPNHead, FPNNeck, UPerHead, resize

HEADS = ("fpn", "upernet")
DECODERS = ("mmseg", "smp")
OUTPUT_STRIDE = 32  # smp's decoders need inputs padded to a multiple of this
AUX_INDEX = 2       # the auxiliary head reads the stride-16 feature

# prefixes under which a whole segmentation model keeps its backbone
_BACKBONE_PREFIXES = ("backbone.", "net.encoder.model.model.", "encoder.model.model.")


class EncoderDecoder(nn.Module):
    """mmsegmentation's segmentor on any backbone that gives four NCHW features (strides 4-32).

    ``backbone`` is an :class:`~rmt.model.RMT` (its ``forward_intermediates``) or a module whose call
    returns the features (e.g. a timm ``features_only`` model). ``forward(x)`` maps normalised images
    ``(b, 3, H, W)`` to logits ``(b, classes, H, W)``; ``forward(x, return_aux=True)`` returns
    ``(logits, aux_logits or None)``, both upsampled to ``(H, W)``.
    """

    def __init__(self, backbone: nn.Module, decode_head: nn.Module, neck: Optional[nn.Module] = None,
                 auxiliary_head: Optional[nn.Module] = None, head: str = "upernet"):
        super().__init__()
        self.backbone = backbone
        if neck is not None:
            self.neck = neck
        self.decode_head = decode_head
        self.auxiliary_head = auxiliary_head
        self.head = head
        self.num_classes = decode_head.num_classes

    @property
    def aux_head(self) -> Optional[nn.Module]:
        return self.auxiliary_head

    def extract_features(self, x: torch.Tensor) -> List[torch.Tensor]:
        """Backbone features (through the neck, if any): ``[(b, c_i, H/s_i, W/s_i)]``."""
        if isinstance(self.backbone, RMT):
            feats = self.backbone.forward_intermediates(x, intermediates_only=True)
        else:
            feats = list(self.backbone(x))
        return self.neck(feats) if hasattr(self, "neck") else feats

    def forward(self, x: torch.Tensor, return_aux: bool = False):
        size = x.shape[-2:]
        feats = self.extract_features(x)
        logits = resize(self.decode_head(feats), size)
        if not return_aux:
            return logits
        aux = resize(self.auxiliary_head(feats), size) if self.auxiliary_head is not None else None
        return logits, aux


# decoder widths of the released configs: UPerHead 512, its FCN auxiliary head 256; FPN neck 256, FPNHead 128
HEAD_CHANNELS = {"upernet": dict(decode=512, aux=256), "fpn": dict(neck=256, decode=128, aux=256)}


def build_heads(head: str, in_channels: Sequence[int], num_classes: int, aux_head: bool,
                channels: Optional[Mapping[str, int]] = None) -> Dict[str, Optional[nn.Module]]:
    """mmsegmentation's decoder of ``head`` for backbone widths ``in_channels``:
    ``dict(neck=..., decode_head=..., auxiliary_head=...)``.

    ``channels`` overrides widths of :data:`HEAD_CHANNELS` (keys ``neck``, ``decode``, ``aux``).
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {', '.join(HEADS)}")
    width = dict(HEAD_CHANNELS[head], **(channels or {}))
    neck = FPNNeck(in_channels, width["neck"]) if head == "fpn" else None
    if head == "fpn":
        decode_head = FPNHead([width["neck"]] * len(in_channels), num_classes, width["decode"])
    else:
        decode_head = UPerHead(in_channels, num_classes, width["decode"])
    # as in mmsegmentation, the auxiliary head reads what the decode head reads (after the neck)
    aux_in = neck.out_channels if neck is not None else in_channels[AUX_INDEX]
    aux = FCNHead(aux_in, num_classes, width["aux"], AUX_INDEX) if aux_head else None
    return dict(neck=neck, decode_head=decode_head, auxiliary_head=aux)


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
            aux = resize(self.aux_head(features[2:]), x.shape[-2:])[..., :h, :w]
        return logits, aux


def create_backbone(model: str, backbone_kwargs: Optional[Mapping[str, Any]] = None) -> RMT:
    """The RMT variant ``model`` for dense prediction: per-stage LayerNorms, no classifier."""
    import timm
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (backbone_kwargs or {}).items()
              if v is not None}
    backbone = timm.create_model(model, num_classes=0, feature_norms=True, **kwargs)
    backbone.prune_intermediate_layers(len(backbone.stages), prune_head=True)
    return backbone


def build_segmenter(model: str = "rmt_small", head: str = "upernet", num_classes: int = 150, *,
                    decoder: str = "mmseg", aux_head: Optional[bool] = None, pretrained: Optional[str] = None,
                    backbone_kwargs: Optional[Mapping[str, Any]] = None,
                    head_channels: Optional[Mapping[str, int]] = None,
                    device: Optional[str | torch.device] = None) -> nn.Module:
    """Build Semantic FPN (``head="fpn"``) or UperNet (``head="upernet"``) on an RMT variant.

    Args:
        model: ``rmt_tiny``, ``rmt_small``, ``rmt_base`` or ``rmt_large``.
        num_classes: output classes (150 for ADE20K).
        decoder: ``"mmseg"`` (:class:`EncoderDecoder`, the released architecture) or ``"smp"``
            (:class:`Segmenter`, segmentation_models_pytorch's decoders).
        aux_head: auxiliary FCN head on the stride-16 feature; default on for UperNet only.
        pretrained: backbone checkpoint (ours, released classification, released mmseg/mmdet
            segmentation or detection, or a whole segmentation checkpoint of this package).
        backbone_kwargs: passed to ``timm.create_model``, e.g. ``drop_path_rate``, ``attn_forms``,
            or a smaller architecture for tests.
        head_channels: decoder widths other than the released ones (``mmseg`` decoder only), see
            :func:`build_heads`.
        device: build on this device; ``"meta"`` builds without allocating memory.
    """
    if head not in HEADS:
        raise ValueError(f"unknown head {head!r}; choose from {', '.join(HEADS)}")
    if decoder not in DECODERS:
        raise ValueError(f"unknown decoder {decoder!r}; choose from {', '.join(DECODERS)}")
    if head_channels and decoder != "mmseg":
        raise ValueError("head_channels applies to the mmseg decoder only")
    if model not in MODEL_ARGS:
        raise ValueError(f"unknown model {model!r}; choose from {', '.join(MODEL_ARGS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    aux_head = (head == "upernet") if aux_head is None else aux_head
    with torch.device(device or "cpu"):
        if decoder == "mmseg":
            backbone = create_backbone(model, backbone_kwargs)
            segmenter = EncoderDecoder(backbone, head=head,
                                       **build_heads(head, backbone.embed_dims, num_classes, aux_head,
                                                     head_channels))
        else:
            segmenter = _build_smp(model, head, num_classes, aux_head, backbone_kwargs)
    if pretrained:
        load_backbone(segmenter, pretrained)
    return segmenter


def _build_smp(model: str, head: str, num_classes: int, aux_head: bool,
               backbone_kwargs: Optional[Mapping[str, Any]]) -> Segmenter:
    import segmentation_models_pytorch as smp
    encoder_kwargs = {k: (tuple(v) if isinstance(v, list) else v)
                      for k, v in (backbone_kwargs or {}).items() if v is not None}
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
    channels = net.encoder.out_channels[2:]  # [in, 0, c0, c1, c2, c3] -> stride 4..32
    aux = FCNHead(channels[AUX_INDEX], num_classes, 256, AUX_INDEX) if aux_head else None
    return Segmenter(net, head, num_classes, aux, head_dropout)


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


def load_backbone(segmenter: nn.Module, path: str, log=print) -> None:
    """Load the backbone weights of any supported checkpoint file into ``segmenter.backbone``.

    Per-stage LayerNorms absent from the file (classification checkpoints) keep their fresh
    initialisation; a checkpoint of another variant raises :class:`CheckpointError`. The decoder
    tensors of a whole segmentor are not loaded, and ``log`` says so.
    """
    from .released import whole_state_dict
    obj, _ = read_checkpoint(path)
    try:
        sd = filter_state_dict(backbone_state_dict(obj), segmenter.backbone)
    except CheckpointError as e:
        raise CheckpointError(f"'{path}': {e}") from None
    segmenter.backbone.load_state_dict(sd, strict=True)
    whole = whole_state_dict(obj)
    prefix = next((p for p in _BACKBONE_PREFIXES if any(k.startswith(p) for k in whole)), None)
    unused = sum(not k.startswith(prefix) for k in whole) if prefix else 0
    if unused:
        log(f"'{path}': backbone loaded; its other {unused} tensors (decoder and heads) are not used "
            "(to test that whole segmentor, give it to 'rmt segment eval')")


def param_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def describe(segmenter: nn.Module) -> Dict[str, Any]:
    """Parameter counts of backbone, decoder+head and auxiliary head."""
    total = param_count(segmenter)
    backbone = param_count(segmenter.backbone)
    aux = param_count(segmenter.aux_head) if segmenter.aux_head is not None else 0
    return dict(head=segmenter.head, params=total, backbone_params=backbone,
                decoder_params=total - backbone - aux, aux_params=aux)
