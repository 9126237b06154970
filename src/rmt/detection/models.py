"""torchvision detectors on RMT feature pyramids.

Detectors: ``mask_rcnn`` and ``cascade_mask_rcnn`` (boxes and masks), ``retinanet`` and ``fcos``
(boxes). Mask R-CNN, Cascade Mask R-CNN and RetinaNet compute what the released mmdetection 2.x
detectors compute at test time (anchors, RoIAlign, resizing, mask pasting, proposal counts and
detection selection: see :mod:`rmt.detection.numerics`); FCOS is torchvision's.

Labels: ``num_classes`` counts object categories; the models are built with ``num_classes + 1``
outputs and use labels ``1..num_classes`` (0 is background for the two-stage detectors and unused
by the one-stage ones), so all share one label convention.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.models.detection import FCOS, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from .backbone import DETECTION_FORMS, build_feature_pyramid
from .cascade import CascadeMaskRCNN
from .numerics import (LevelRoIAlign, ReleasedRetinaNet, ReleasedTransform, retinanet_anchor_generator,
                       rpn_anchor_generator)

DETECTORS = ("mask_rcnn", "cascade_mask_rcnn", "retinanet", "fcos")
_PYRAMID = {"mask_rcnn": "p2-p6", "cascade_mask_rcnn": "p2-p6", "retinanet": "p3-p7", "fcos": "p3-p7"}
# test-time settings (and RPN proposal counts) of the released mmdetection configs
_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "mask_rcnn": dict(box_score_thresh=0.05, box_detections_per_img=100, rpn_post_nms_top_n_train=1000),
    "cascade_mask_rcnn": dict(box_score_thresh=0.05, box_detections_per_img=100),
    "retinanet": dict(score_thresh=0.05, detections_per_img=100, nms_thresh=0.5, topk_candidates=1000),
    "fcos": dict(score_thresh=0.05, detections_per_img=100),
}


def build_detector(
        detector: str,
        model_name: str,
        num_classes: int,
        pretrained: Optional[str | Path] = None,
        min_size: int | Tuple[int, ...] = 800,
        max_size: int = 1333,
        frozen_stages: int = -1,
        frozen_bn: bool = False,
        attn_forms: str = DETECTION_FORMS,
        fpn_channels: int = 256,
        mask_head_channels: int = 256,
        box_head_size: int = 1024,
        backbone_kwargs: Optional[Dict[str, Any]] = None,
        **detector_kwargs,
) -> nn.Module:
    """A torchvision detector with an RMT + FPN backbone (or another timm backbone + FPN).

    Args:
        detector: ``mask_rcnn``, ``cascade_mask_rcnn``, ``retinanet`` or ``fcos``.
        model_name: RMT variant (``rmt_tiny`` ...), or another timm model with ``features_only``
            (``convnext_tiny``, ``resnet50``: random weights; RMT-only options are then ignored).
        num_classes: number of object categories (background not counted).
        pretrained: backbone checkpoint (ImageNet or detection; ours or released).
        min_size: shorter image side; a tuple draws one per training image (multi-scale).
        max_size: longer side limit.
        frozen_stages, frozen_bn, attn_forms, fpn_channels: see :func:`build_rmt_fpn`.
        mask_head_channels: width of the four convs of the mask head(s) (256 in the paper).
        box_head_size: width of the FC layers of the box head(s) (1024 in the paper). Narrower
            heads make small CPU runs (the built-in dataset) several times faster. The Cascade
            box heads' convs are ``fpn_channels`` wide.
        backbone_kwargs: extra ``timm.create_model`` arguments (``drop_path_rate``, widths ...).
        **detector_kwargs: passed to the detector (torchvision's names, e.g.
            ``box_batch_size_per_image``, ``rpn_post_nms_top_n_test``).

    The model takes a list of float images ``(3, H, W)`` in [0, 1]; it normalises them with the
    ImageNet mean/std, resizes and batches them itself (see torchvision's detection API).
    """
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose from {', '.join(DETECTORS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    backbone_options = dict(backbone_kwargs or {})
    if model_name.startswith("rmt"):
        backbone_options.update(pretrained=pretrained, frozen_stages=frozen_stages, frozen_bn=frozen_bn,
                                attn_forms=attn_forms)
    backbone = build_feature_pyramid(model_name, _PYRAMID[detector], fpn_channels, p7_relu=detector == "fcos",
                                     **backbone_options)
    mean, std = list(IMAGENET_DEFAULT_MEAN), list(IMAGENET_DEFAULT_STD)
    kwargs = dict(_DEFAULTS[detector], min_size=min_size, max_size=max_size, image_mean=mean, image_std=std)
    kwargs.update(detector_kwargs)
    classes = num_classes + 1
    if detector == "mask_rcnn":
        kwargs.setdefault("rpn_anchor_generator", rpn_anchor_generator())
        kwargs.setdefault("box_head", TwoMLPHead(fpn_channels * 7 * 7, box_head_size))
        kwargs.setdefault("box_predictor", FastRCNNPredictor(box_head_size, classes))
        kwargs.setdefault("mask_head", MaskRCNNHeads(fpn_channels, [mask_head_channels] * 4, 1))
        kwargs.setdefault("mask_predictor", MaskRCNNPredictor(mask_head_channels, mask_head_channels, classes))
        model = MaskRCNN(backbone, num_classes=None, **kwargs)
        model.rpn.min_size = 0.0  # mmdetection keeps proposals of any size
        levels, strides = ["0", "1", "2", "3"], (4, 8, 16, 32)
        model.roi_heads.box_roi_pool = LevelRoIAlign(levels, 7, strides=strides)
        model.roi_heads.mask_roi_pool = LevelRoIAlign(levels, 14, strides=strides)
        heads = [model.rpn.head, model.roi_heads.box_predictor, model.roi_heads.mask_predictor]
    elif detector == "cascade_mask_rcnn":
        model = CascadeMaskRCNN(backbone, classes, box_head_size=box_head_size, box_conv_channels=fpn_channels,
                                mask_head_channels=mask_head_channels, **kwargs)
        heads = [model.rpn.head]  # the cascade heads return float32 themselves
    elif detector == "retinanet":
        kwargs.setdefault("anchor_generator", retinanet_anchor_generator())
        model = ReleasedRetinaNet(backbone, num_classes=classes, **kwargs)
        heads = [model.head]
    else:
        model = FCOS(backbone, num_classes=classes, **kwargs)
        heads = [model.head]
    if detector != "fcos":
        model.transform = ReleasedTransform(model.transform.min_size, max_size, mean, std)
    for head in heads:
        head.register_forward_hook(_outputs_to_float32)
    return model


def _outputs_to_float32(module: nn.Module, inputs: Any, output: Any) -> Any:
    """Forward hook: head outputs in float32, so that boxes are decoded in float32 under autocast.

    torchvision decodes boxes in the dtype of the regression output; in bfloat16 a coordinate near
    1000 px would be rounded to a multiple of 4-8 px.
    """
    if torch.is_tensor(output):
        return output.float() if output.is_floating_point() else output
    if isinstance(output, dict):
        return {k: _outputs_to_float32(module, inputs, v) for k, v in output.items()}
    if isinstance(output, (list, tuple)):
        return type(output)(_outputs_to_float32(module, inputs, v) for v in output)
    return output


def detector_has_masks(detector: str) -> bool:
    return detector in ("mask_rcnn", "cascade_mask_rcnn")


def lower_score_threshold(model: nn.Module, threshold: float) -> None:
    """Let the detector's own score filter keep detections down to ``threshold`` (if it is stricter)."""
    holder = model.roi_heads if hasattr(model, "roi_heads") else model
    holder.score_thresh = min(holder.score_thresh, threshold)
