"""mmdetection 2.x test-time numerics on torchvision's detection parts.

The released RMT detectors were trained and evaluated with mmdetection 2.11. Where torchvision's
defaults compute something else, the pieces here compute what mmdetection does, so that a
converted released detector gives the released outputs:

* :class:`FixedStrideAnchorGenerator` - anchors of float sizes (torchvision rounds the cell
  anchors to integers) placed at the level's nominal stride (torchvision derives strides as
  ``padded image size // feature size``, e.g. 61 instead of 64 for P6 of an 800-pixel image);
  anchors are always float32, also under bf16 autocast;
* :class:`LevelRoIAlign` - RoIAlign with ``aligned=True`` (half-pixel offset) and an adaptive
  sampling grid (``sampling_ratio=0``), level chosen by ``floor(log2(sqrt(area) / 56))``
  (torchvision: ``aligned=False``, 2 samples);
* :class:`ReleasedTransform` - resized sides rounded (``int(side * scale + 0.5)``; torchvision
  floors) and masks pasted by bilinear sampling of the 28x28 probabilities at pixel centres
  over the whole image (torchvision pastes a padded mask into an integer box);
* :func:`select_detections` - per-class score threshold, per-class NMS and the top-k of
  mmdetection's ``multiclass_nms`` (no small-box filter);
* :class:`ReleasedRetinaNet` - RetinaNet keeping per level the 1000 anchors of highest class
  score before the threshold (torchvision keeps the 1000 best (anchor, class) pairs).
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection import RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import batched_nms, boxes as box_ops, roi_align

# mmdetection's anchors per level: Mask R-CNN / Cascade RPN (scale 8 x stride, one size per level)
# and RetinaNet (octave base scale 4, three scales per octave)
RPN_STRIDES = (4, 8, 16, 32, 64)
RETINANET_STRIDES = (8, 16, 32, 64, 128)
ASPECT_RATIOS = (0.5, 1.0, 2.0)


def rpn_anchor_generator() -> "FixedStrideAnchorGenerator":
    """Anchors of the released Mask R-CNN / Cascade RPN: sizes 32-512 on P2-P6, ratios 0.5/1/2."""
    return FixedStrideAnchorGenerator([(8.0 * s,) for s in RPN_STRIDES], [ASPECT_RATIOS] * 5, RPN_STRIDES)


def retinanet_anchor_generator() -> "FixedStrideAnchorGenerator":
    """Anchors of the released RetinaNet: ``4 * stride * 2^(i/3)``, i = 0, 1, 2, ratios 0.5/1/2, P3-P7."""
    sizes = [tuple(4.0 * s * 2 ** (i / 3) for i in range(3)) for s in RETINANET_STRIDES]
    return FixedStrideAnchorGenerator(sizes, [ASPECT_RATIOS] * 5, RETINANET_STRIDES)


class FixedStrideAnchorGenerator(AnchorGenerator):
    """torchvision's AnchorGenerator with float cell anchors and fixed per-level strides.

    Anchor order per level is location-major, then ratio, then size (as torchvision and
    mmdetection both lay them out), centred on ``(x * stride, y * stride)``.
    """

    def __init__(self, sizes: Sequence[Tuple[float, ...]], aspect_ratios: Sequence[Tuple[float, ...]],
                 strides: Sequence[int]):
        super().__init__(tuple(tuple(s) for s in sizes), tuple(tuple(a) for a in aspect_ratios))
        if len(strides) != len(sizes):
            raise ValueError(f"one stride per level is needed: {len(sizes)} levels, {len(strides)} strides")
        self.strides = tuple(int(s) for s in strides)

    def generate_anchors(self, scales, aspect_ratios, dtype=torch.float32, device=torch.device("cpu")) -> Tensor:
        scales = torch.as_tensor(scales, dtype=torch.float32, device=device)
        h_ratios = torch.sqrt(torch.as_tensor(aspect_ratios, dtype=torch.float32, device=device))
        ws = (scales[None, :] / h_ratios[:, None]).reshape(-1)
        hs = (scales[None, :] * h_ratios[:, None]).reshape(-1)
        return torch.stack([-ws, -hs, ws, hs], dim=1) / 2  # no rounding

    def forward(self, image_list: ImageList, feature_maps: List[Tensor]) -> List[Tensor]:
        if len(feature_maps) != len(self.strides):
            raise ValueError(f"{len(feature_maps)} feature maps for {len(self.strides)} anchor levels")
        device = feature_maps[0].device
        self.set_cell_anchors(torch.float32, device)
        grid_sizes = [f.shape[-2:] for f in feature_maps]
        strides = [[torch.tensor(s, device=device), torch.tensor(s, device=device)] for s in self.strides]
        anchors = torch.cat(self.grid_anchors(grid_sizes, strides))
        return [anchors for _ in image_list.image_sizes]


class LevelRoIAlign(nn.Module):
    """RoIAlign over FPN levels with mmdetection's level rule; a drop-in for MultiScaleRoIAlign.

    ``forward(features, boxes, image_shapes) -> (sum(len(b)), C, output_size, output_size)``.
    A box of side ``sqrt(w * h)`` reads level ``floor(log2(side / finest_scale + 1e-6))`` of the
    listed maps (clamped), of the given ``strides`` (None: inferred from the map and image sizes,
    as torchvision does, which fails for images under ~75 pixels).
    """

    def __init__(self, featmap_names: Sequence[str], output_size: int, sampling_ratio: int = 0,
                 aligned: bool = True, finest_scale: float = 56.0, strides: Optional[Sequence[int]] = None):
        super().__init__()
        if strides is not None and len(strides) != len(featmap_names):
            raise ValueError(f"{len(featmap_names)} feature maps but {len(strides)} strides")
        self.strides = None if strides is None else tuple(int(s) for s in strides)
        self.featmap_names = list(featmap_names)
        self.output_size = (int(output_size), int(output_size))
        self.sampling_ratio = sampling_ratio
        self.aligned = aligned
        self.finest_scale = finest_scale

    def levels(self, boxes: Tensor) -> Tensor:
        """Level index of each box ``(n, 4)`` in ``0 .. len(featmap_names) - 1``."""
        side = ((boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])).clamp(min=0).sqrt()
        level = torch.floor(torch.log2(side / self.finest_scale + 1e-6))
        return level.clamp(0, len(self.featmap_names) - 1).long()

    def forward(self, features: Dict[str, Tensor], boxes: List[Tensor],
                image_shapes: List[Tuple[int, int]]) -> Tensor:
        feats = [features[name] for name in self.featmap_names]
        if self.strides is not None:
            scales = [1.0 / s for s in self.strides]
        else:  # padded sizes are multiples of the coarsest stride: the stride is a power of two
            image_h = max(s[0] for s in image_shapes)
            scales = [2.0 ** round(math.log2(f.shape[-2] / image_h)) for f in feats]
        rois = torch.cat([torch.cat([torch.full_like(b[:, :1], i), b], 1) for i, b in enumerate(boxes)])
        rois = rois.float()
        levels = self.levels(rois[:, 1:])
        out = feats[0].new_zeros((len(rois), feats[0].shape[1], *self.output_size))
        for level, (feat, scale) in enumerate(zip(feats, scales)):
            idx = torch.where(levels == level)[0]
            if len(idx):
                pooled = roi_align(feat, rois[idx], self.output_size, spatial_scale=scale,
                                   sampling_ratio=self.sampling_ratio, aligned=self.aligned)
                out[idx] = pooled.to(out.dtype)
        return out


def released_size(height: int, width: int, short: float, long: float) -> Tuple[int, int]:
    """mmcv's keep-ratio rescale: scale ``min(long / max side, short / min side)``, sides rounded."""
    scale = min(long / max(height, width), short / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def paste_masks(masks: Tensor, boxes: Tensor, height: int, width: int) -> Tensor:
    """``(n, 1, M, M)`` box-relative mask probabilities -> ``(n, 1, height, width)`` image masks.

    Each mask covers its float box exactly; every image pixel centre is sampled bilinearly
    (``grid_sample``, ``align_corners=False``, zero outside), as mmdetection pastes on a GPU.
    """
    out = masks.new_zeros((len(masks), 1, height, width), dtype=torch.float32)
    xs = torch.arange(width, device=masks.device, dtype=torch.float32) + 0.5
    ys = torch.arange(height, device=masks.device, dtype=torch.float32) + 0.5
    chunk = max(1, min(32, 2 ** 24 // (height * width)))  # sampling grids of at most ~128 MiB
    for start in range(0, len(masks), chunk):
        m, b = masks[start:start + chunk].float(), boxes[start:start + chunk].float()
        x0, y0, x1, y1 = b.unbind(1)
        gx = (xs[None] - x0[:, None]) / (x1 - x0).clamp(min=1e-6)[:, None] * 2 - 1  # (c, W)
        gy = (ys[None] - y0[:, None]) / (y1 - y0).clamp(min=1e-6)[:, None] * 2 - 1  # (c, H)
        grid = torch.stack([gx[:, None, :].expand(-1, height, -1), gy[:, :, None].expand(-1, -1, width)], dim=3)
        out[start:start + chunk] = F.grid_sample(m, grid, align_corners=False)
    return out


class ReleasedTransform(GeneralizedRCNNTransform):
    """GeneralizedRCNNTransform with mmdetection's resized sizes and mask pasting.

    Training draws the shorter side from ``min_size`` per image as torchvision does.
    """

    def resize(self, image: Tensor, target: Optional[Dict[str, Tensor]] = None
               ) -> Tuple[Tensor, Optional[Dict[str, Tensor]]]:
        h, w = image.shape[-2:]
        short = self.torch_choice(self.min_size) if self.training else self.min_size[-1]
        size = released_size(h, w, short, self.max_size)
        image = F.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        if target is None:
            return image, target
        target["boxes"] = resize_boxes(target["boxes"], (h, w), size)
        if "masks" in target:
            masks = target["masks"]
            target["masks"] = F.interpolate(masks[:, None].float(), size=size)[:, 0].to(masks.dtype)
        return image, target

    def postprocess(self, result: List[Dict[str, Tensor]], image_shapes: List[Tuple[int, int]],
                    original_image_sizes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        if self.training:
            return result
        for pred, shape, original in zip(result, image_shapes, original_image_sizes):
            pred["boxes"] = resize_boxes(pred["boxes"], shape, original)
            if "masks" in pred:
                pred["masks"] = paste_masks(pred["masks"], pred["boxes"], int(original[0]), int(original[1]))
        return result


def select_detections(boxes: Tensor, scores: Tensor, score_thresh: float, nms_thresh: float,
                      detections_per_img: int) -> Tuple[Tensor, Tensor, Tensor]:
    """Class-specific boxes ``(n, K + 1, 4)`` and scores ``(n, K + 1)`` (column 0 background)
    -> ``boxes (d, 4)``, ``scores (d,)``, ``labels (d,)`` in ``1..K``, best first.

    Every (box, class) pair scoring above ``score_thresh`` enters a per-class NMS; the best
    ``detections_per_img`` survivors are kept (mmdetection's ``multiclass_nms``).
    """
    num_classes = scores.shape[1]
    labels = torch.arange(num_classes, device=scores.device).expand_as(scores)
    boxes, scores, labels = boxes[:, 1:].reshape(-1, 4), scores[:, 1:].reshape(-1), labels[:, 1:].reshape(-1)
    keep = torch.where(scores > score_thresh)[0]
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    keep = batched_nms(boxes, scores, labels, nms_thresh)[:detections_per_img]
    return boxes[keep], scores[keep], labels[keep]


class ReleasedRetinaNet(RetinaNet):
    """torchvision's RetinaNet with mmdetection 2.x's test-time selection.

    Per level, the ``topk_candidates`` anchors of highest best-class score are decoded; all
    their (anchor, class) pairs above the score threshold go through per-class NMS over all
    levels, and the best ``detections_per_img`` remain. Label 0 (never trained) is ignored.
    """

    def postprocess_detections(self, head_outputs: Dict[str, List[Tensor]], anchors: List[List[Tensor]],
                               image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        detections = []
        for index, image_shape in enumerate(image_shapes):
            image_boxes, image_scores = [], []
            for logits, deltas, level_anchors in zip(head_outputs["cls_logits"], head_outputs["bbox_regression"],
                                                     anchors[index]):
                scores = torch.sigmoid(logits[index].float())
                scores[:, 0] = 0.0
                if len(scores) > self.topk_candidates:
                    top = scores.max(dim=1).values.topk(self.topk_candidates).indices
                    scores, level_deltas, level_anchors = scores[top], deltas[index][top], level_anchors[top]
                else:
                    level_deltas = deltas[index]
                boxes = self.box_coder.decode_single(level_deltas.float(), level_anchors)
                image_boxes.append(box_ops.clip_boxes_to_image(boxes, image_shape))
                image_scores.append(scores)
            boxes = torch.cat(image_boxes)
            scores = torch.cat(image_scores)
            boxes, scores, labels = select_detections(boxes[:, None].expand(-1, scores.shape[1], -1), scores,
                                                      self.score_thresh, self.nms_thresh, self.detections_per_img)
            detections.append({"boxes": boxes, "scores": scores, "labels": labels})
        return detections
