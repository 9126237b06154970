"""mmsegmentation 0.x decoders as small modules of our own: UPerHead, FCNHead, FPN neck, FPNHead.

Module and parameter names follow mmsegmentation's, so a released segmentor's ``decode_head.*``,
``auxiliary_head.*`` and ``neck.*`` tensors load into them unchanged. Every convolution is a
:class:`ConvModule` (``conv``, then ``bn`` and ReLU when normalised), as mmcv's ``ConvModule``
with ``norm_cfg=dict(type='SyncBN')``; resizing is bilinear with ``align_corners=False``.

* :class:`UPerHead` (UperNet): a pyramid pooling module (scales 1/2/3/6) on the last feature, 1x1
  laterals on the others, a top-down path, 3x3 convs, every level upsampled to stride 4 and fused
  by a 3x3 conv; dropout 0.1 and a 1x1 classifier. ``(features at strides 4..32) -> (b, k, H/4, W/4)``.
* :class:`FCNHead`: the auxiliary head on one feature (UperNet: the stride-16 one), conv3x3-BN-ReLU,
  dropout 0.1, classifier.
* :class:`FPNNeck` + :class:`FPNHead` (Semantic FPN): the FPN neck (1x1 laterals and 3x3 output
  convs with biases, no norm or activation, nearest-neighbour top-down path), then per level
  conv3x3-BN-ReLU blocks with 2x upsampling down to stride 4, summed, dropout 0.1, classifier.

Initialisation is what mmsegmentation 0.x gives: every ConvModule's conv Kaiming-normal (fan-out,
ReLU) with zero bias, norms 1/0, classifiers normal(std 0.01). The FPN neck's own Xavier init is
never called by mmsegmentation 0.x's EncoderDecoder, so its convs keep the ConvModule init too.
"""
from __future__ import annotations

import math
from typing import List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

ALIGN_CORNERS: bool = False   # mmsegmentation's resize rule, not a switch


def resize(x: torch.Tensor, size) -> torch.Tensor:
    """Bilinear resize of ``(b, c, h, w)`` to ``size`` (``align_corners=False``)."""
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=ALIGN_CORNERS)


class ConvModule(nn.Module):
    """Conv, then BatchNorm and ReLU (``norm=True``), or a conv with bias alone (``norm=False``).

    Parameters are ``conv.*`` and ``bn.*`` as in mmcv's ConvModule.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, norm: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=not norm)
        self.bn = nn.BatchNorm2d(out_channels) if norm else None
        self.act = nn.ReLU(inplace=True) if norm else None
        nn.init.kaiming_normal_(self.conv.weight, mode="fan_out", nonlinearity="relu")
        if not norm:
            nn.init.zeros_(self.conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        if self.bn is not None:
            x = self.act(self.bn(x))
        return x


class DecodeHead(nn.Module):
    """What every mmseg decode head ends with: ``Dropout2d`` and the 1x1 classifier ``conv_seg``."""

    def __init__(self, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.channels, self.num_classes = channels, num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, 1)
        nn.init.normal_(self.conv_seg.weight, std=0.01)
        nn.init.zeros_(self.conv_seg.bias)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class PyramidPooling(nn.ModuleList):
    """PSPNet's pooling pyramid: per scale, adaptive average pooling and a 1x1 ConvModule, upsampled
    back; ``(b, c, h, w) -> [(b, channels, h, w)] * len(scales)`` (``psp_modules.{i}.1.*``)."""

    def __init__(self, scales: Sequence[int], in_channels: int, channels: int):
        super().__init__(nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels, channels, 1))
                         for s in scales)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return [resize(branch(x), x.shape[-2:]) for branch in self]


class UPerHead(DecodeHead):
    """UperNet's decoder: ``[(b, c_i, H/s_i, W/s_i)] -> (b, num_classes, H/s_0, W/s_0)``."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.in_channels = list(in_channels)
        self.psp_modules = PyramidPooling(pool_scales, in_channels[-1], channels)
        self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3)
        self.lateral_convs = nn.ModuleList(ConvModule(c, channels, 1) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(ConvModule(channels, channels, 3) for _ in in_channels[:-1])
        self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        top = features[-1]
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        laterals.append(self.bottleneck(torch.cat([top, *self.psp_modules(top)], dim=1)))
        for i in range(len(laterals) - 1, 0, -1):  # top-down
            laterals[i - 1] = laterals[i - 1] + resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)] + [laterals[-1]]
        size = outs[0].shape[-2:]
        outs = [outs[0]] + [resize(o, size) for o in outs[1:]]
        return self.classify(self.fpn_bottleneck(torch.cat(outs, dim=1)))


class FCNHead(DecodeHead):
    """Auxiliary FCN head on ``features[in_index]``: ``num_convs`` ConvModules (3x3), then the
    classifier (``concat_input=False``); ``-> (b, num_classes, h, w)`` at that feature's size."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, in_index: int = 2,
                 num_convs: int = 1, dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        self.in_index = in_index
        self.convs = nn.Sequential(*(ConvModule(in_channels if i == 0 else channels, channels, 3)
                                     for i in range(num_convs)))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        return self.classify(self.convs(features[self.in_index]))


class FPNNeck(nn.Module):
    """mmseg's FPN neck (no norm, no activation, nearest top-down):
    ``[(b, c_i, h_i, w_i)] -> [(b, out_channels, h_i, w_i)]``."""

    def __init__(self, in_channels: Sequence[int], out_channels: int = 256):
        super().__init__()
        self.in_channels, self.out_channels = list(in_channels), out_channels
        self.lateral_convs = nn.ModuleList(ConvModule(c, out_channels, 1, norm=False) for c in in_channels)
        self.fpn_convs = nn.ModuleList(ConvModule(out_channels, out_channels, 3, norm=False) for _ in in_channels)

    def forward(self, features: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[-2:],
                                                              mode="nearest")
        return [conv(lat) for conv, lat in zip(self.fpn_convs, laterals)]


class FPNHead(DecodeHead):
    """Semantic FPN's head: per level ``log2(s_i / s_0)`` (at least one) conv3x3-BN-ReLU blocks, each
    but the finest followed by 2x bilinear upsampling, summed at stride ``s_0``;
    ``[(b, c_i, H/s_i, W/s_i)] -> (b, num_classes, H/s_0, W/s_0)`` (``scale_heads.{i}.{j}.*``)."""

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 128,
                 feature_strides: Sequence[int] = (4, 8, 16, 32), dropout: float = 0.1):
        super().__init__(channels, num_classes, dropout)
        if len(in_channels) != len(feature_strides) or min(feature_strides) != feature_strides[0]:
            raise ValueError(f"FPNHead needs one stride per input, finest first; got channels "
                             f"{list(in_channels)}, strides {list(feature_strides)}")
        self.feature_strides = list(feature_strides)
        self.scale_heads = nn.ModuleList()
        for c, stride in zip(in_channels, feature_strides):
            layers: List[nn.Module] = []
            for k in range(max(1, int(math.log2(stride) - math.log2(feature_strides[0])))):
                layers.append(ConvModule(c if k == 0 else channels, channels, 3))
                if stride != feature_strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=ALIGN_CORNERS))
            self.scale_heads.append(nn.Sequential(*layers))

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        out = self.scale_heads[0](features[0])
        for head, f in zip(self.scale_heads[1:], features[1:]):
            out = out + resize(head(f), out.shape[-2:])
        return self.classify(out)
