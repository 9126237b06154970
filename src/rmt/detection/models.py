"""torchvision detectors on RMT feature pyramids.

Detectors: ``mask_rcnn`` (boxes and masks), ``retinanet`` and ``fcos`` (boxes). torchvision has
no Cascade R-CNN heads, so Cascade Mask R-CNN is not offered; FCOS is the second one-stage
detector instead.

Labels: ``num_classes`` counts object categories; the models are built with ``num_classes + 1``
outputs and use labels ``1..num_classes`` (0 is background for Mask R-CNN and unused by the
one-stage detectors), so the three share one label convention.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torchvision.models.detection import FCOS, MaskRCNN, RetinaNet
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

from .backbone import DETECTION_FORMS, build_rmt_fpn

DETECTORS = ("mask_rcnn", "retinanet", "fcos")
_PYRAMID = {"mask_rcnn": "p2-p6", "retinanet": "p3-p7", "fcos": "p3-p7"}
# test-time settings of the mmdetection 1x configs the paper's numbers come from
_TEST_DEFAULTS: Dict[str, Dict[str, Any]] = {
    "mask_rcnn": dict(box_score_thresh=0.05, box_detections_per_img=100),
    "retinanet": dict(score_thresh=0.05, detections_per_img=100),
    "fcos": dict(score_thresh=0.05, detections_per_img=100),
}
_UNSUPPORTED = {
    "cascade_mask_rcnn": "torchvision has no Cascade R-CNN heads (multi-stage box refinement); "
                         "use 'mask_rcnn', or 'fcos' for a second detector family",
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
    """A torchvision detector with an RMT + FPN backbone.

    Args:
        detector: ``mask_rcnn``, ``retinanet`` or ``fcos``.
        model_name: RMT variant (``rmt_tiny`` ...).
        num_classes: number of object categories (background not counted).
        pretrained: backbone checkpoint (ImageNet or detection; ours or released).
        min_size: shorter image side; a tuple draws one per training batch (multi-scale).
        max_size: longer side limit.
        frozen_stages, frozen_bn, attn_forms, fpn_channels: see :func:`build_rmt_fpn`.
        mask_head_channels: width of the four convs of the Mask R-CNN mask head (256 in the paper).
        box_head_size: width of the two FC layers of the Mask R-CNN box head (1024 in the paper).
            Narrower heads make small CPU runs (the built-in dataset) several times faster.
        backbone_kwargs: extra ``timm.create_model`` arguments (``drop_path_rate``, widths ...).
        **detector_kwargs: passed to the torchvision detector (e.g. ``box_batch_size_per_image``).

    The model takes a list of float images ``(3, H, W)`` in [0, 1]; it normalises them with the
    ImageNet mean/std, resizes and batches them itself (see torchvision's detection API).
    """
    if detector in _UNSUPPORTED:
        raise ValueError(f"{detector}: {_UNSUPPORTED[detector]}")
    if detector not in DETECTORS:
        raise ValueError(f"unknown detector {detector!r}; choose from {', '.join(DETECTORS)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be at least 1, got {num_classes}")
    backbone = build_rmt_fpn(model_name, _PYRAMID[detector], fpn_channels, pretrained,
                             frozen_stages, frozen_bn, attn_forms, **(backbone_kwargs or {}))
    kwargs = dict(_TEST_DEFAULTS[detector], min_size=min_size, max_size=max_size,
                  image_mean=list(IMAGENET_DEFAULT_MEAN), image_std=list(IMAGENET_DEFAULT_STD))
    kwargs.update(detector_kwargs)
    if detector == "mask_rcnn":
        pool = 7 * 7  # torchvision's box RoIAlign output size
        kwargs.setdefault("box_head", TwoMLPHead(fpn_channels * pool, box_head_size))
        kwargs.setdefault("box_predictor", FastRCNNPredictor(box_head_size, num_classes + 1))
        kwargs.setdefault("mask_head", MaskRCNNHeads(fpn_channels, [mask_head_channels] * 4, 1))
        kwargs.setdefault("mask_predictor", MaskRCNNPredictor(mask_head_channels, mask_head_channels, num_classes + 1))
        model = MaskRCNN(backbone, num_classes=None, **kwargs)
        heads = [model.rpn.head, model.roi_heads.box_predictor, model.roi_heads.mask_predictor]
    else:
        model = {"retinanet": RetinaNet, "fcos": FCOS}[detector](backbone, num_classes=num_classes + 1, **kwargs)
        heads = [model.head]
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
    return detector == "mask_rcnn"


def lower_score_threshold(model: nn.Module, threshold: float) -> None:
    """Let the detector's own score filter keep detections down to ``threshold`` (if it is stricter)."""
    holder = model.roi_heads if hasattr(model, "roi_heads") else model
    holder.score_thresh = min(holder.score_thresh, threshold)
