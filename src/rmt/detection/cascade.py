"""Cascade (Mask) R-CNN heads on torchvision's building blocks, as mmdetection 2.x's CascadeRoIHead.

:class:`CascadeRoIHeads` fills the ``roi_heads`` slot of any torchvision two-stage detector
(:class:`~torchvision.models.detection.generalized_rcnn.GeneralizedRCNN`): it takes the FPN
features, the RPN proposals and the image sizes, and returns detections (eval) or losses (train).

Stage ``t`` (three by default) has its own box head, box coder and IoU threshold:

* training: the ground-truth boxes join the stage's proposals; proposals with IoU >= ``thr_t``
  (0.5 / 0.6 / 0.7; no low-quality matches) are positives, the others negatives; 512 RoIs per
  image are sampled with up to 25% positives. Losses: cross-entropy over the K + 1 classes
  (mean over the sampled RoIs), GIoU between the decoded class-specific boxes of the positives
  and their ground truth (summed, divided by the number of sampled RoIs, weight 10), and the
  stage's mask loss on its positives, all weighted by the stage weight (1 / 0.5 / 0.25). The
  next stage's proposals are this stage's sampled RoIs, ground-truth boxes removed, regressed by
  their assigned class (positives) or predicted class (negatives), clipped to the image.
* test: each stage regresses the previous stage's boxes by its predicted class; the class
  logits of all stages are averaged and soft-maxed, boxes come from the last stage's regression,
  then per-class threshold 0.05, NMS 0.5, 100 per image. Every stage's mask head sees the final
  boxes; their sigmoid probabilities (of the detected class) are averaged.

Labels follow torchvision: 0 is background, objects are ``1..K``. Box deltas are normalised by
the stage's standard deviations (torchvision's :class:`BoxCoder` weights are their inverses).
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection._utils import BalancedPositiveNegativeSampler, BoxCoder, Matcher
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.ops import Conv2dNormActivation, box_iou, clip_boxes_to_image, generalized_box_iou_loss, roi_align

from .numerics import LevelRoIAlign, ReleasedTransform, select_detections
from .numerics import rpn_anchor_generator as rpn_anchor_generator_default

IOU_THRESHOLDS = (0.5, 0.6, 0.7)
BOX_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
STAGE_LOSS_WEIGHTS = (1.0, 0.5, 0.25)


class ConvFCBoxHead(nn.Module):
    """``num_convs`` conv3x3 + norm + ReLU, one FC + ReLU, a classifier and a class-specific regressor.

    ``(n, in_channels, roi, roi) -> logits (n, num_classes), deltas (n, num_classes * 4)``, where
    ``num_classes`` counts the background (index 0). ``4conv1fc`` with BatchNorm is the released
    Cascade head.
    """

    def __init__(self, in_channels: int, num_classes: int, roi_size: int = 7, conv_channels: int = 256,
                 num_convs: int = 4, fc_size: int = 1024, norm_layer: Optional[type] = nn.BatchNorm2d):
        super().__init__()
        self.convs = nn.Sequential(*[
            Conv2dNormActivation(in_channels if i == 0 else conv_channels, conv_channels, 3, norm_layer=norm_layer)
            for i in range(num_convs)])
        flat = (conv_channels if num_convs else in_channels) * roi_size * roi_size
        self.fc = nn.Linear(flat, fc_size)
        self.cls_score = nn.Linear(fc_size, num_classes)
        self.bbox_pred = nn.Linear(fc_size, num_classes * 4)
        for m in self.convs.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        nn.init.xavier_uniform_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)
        nn.init.normal_(self.cls_score.weight, std=0.01)
        nn.init.normal_(self.bbox_pred.weight, std=0.001)
        nn.init.zeros_(self.cls_score.bias)
        nn.init.zeros_(self.bbox_pred.bias)

    def forward(self, x: Tensor) -> Tuple[Tensor, Tensor]:
        x = F.relu(self.fc(self.convs(x).flatten(1)))
        return self.cls_score(x), self.bbox_pred(x)


class MaskHead(nn.Sequential):
    """FCN mask head: ``num_convs`` conv3x3 + ReLU, 2x deconv + ReLU, 1x1 to one logit map per class.

    ``(n, in_channels, 14, 14) -> (n, num_classes, 28, 28)`` (torchvision's Mask R-CNN head parts).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, num_convs: int = 4):
        super().__init__(OrderedDict(
            convs=MaskRCNNHeads(in_channels, [channels] * num_convs, 1),
            predictor=MaskRCNNPredictor(channels, channels, num_classes)))


def mask_targets(gt_masks: Tensor, rois: Tensor, matched: Tensor, size: int) -> Tensor:
    """``(g, H, W)`` instance masks cut by ``rois (n, 4)`` of ground truth ``matched (n,)`` -> ``(n, size, size)``.

    RoIAlign with ``aligned=True`` over the binary masks, then thresholded at 0.5 (mmdetection).
    """
    if len(rois) == 0:
        return gt_masks.new_zeros((0, size, size), dtype=torch.float32)
    boxes = torch.cat([matched[:, None].to(rois.dtype), rois], dim=1)
    cut = roi_align(gt_masks[:, None].float(), boxes, (size, size), spatial_scale=1.0, sampling_ratio=0, aligned=True)
    return (cut[:, 0] >= 0.5).float()


def _pick_class(deltas: Tensor, labels: Tensor) -> Tensor:
    """The 4 deltas of each row's class: ``(n, C * 4), (n,) -> (n, 4)``."""
    return deltas.reshape(len(deltas), -1, 4)[torch.arange(len(deltas), device=deltas.device), labels]


class CascadeRoIHeads(nn.Module):
    """Multi-stage box (and mask) heads; the ``roi_heads`` of a torchvision two-stage detector.

    Args:
        box_roi_pool: features of boxes for the box heads (e.g. :class:`LevelRoIAlign`, 7x7).
        box_heads: one module per stage, ``(n, C, 7, 7) -> (logits (n, K+1), deltas (n, (K+1)*4))``.
        mask_roi_pool, mask_heads: the same for masks (14x14 -> ``(n, K+1, 28, 28)`` logits), or None.
        iou_thresholds, box_stds, stage_loss_weights: per stage (the released values by default).
        batch_size_per_image, positive_fraction: RoI sampling in training.
        box_loss_weight: weight of the GIoU loss.
        mask_size: side of the mask targets.
        score_thresh, nms_thresh, detections_per_img: test-time selection.

    ``forward(features, proposals, image_shapes, targets=None) -> (detections, losses)`` with
    torchvision's conventions: ``detections`` is a list of dicts ``boxes``, ``labels``, ``scores``
    (and ``masks (d, 1, 28, 28)`` probabilities, pasted by the detector's transform).
    """

    def __init__(self, box_roi_pool: nn.Module, box_heads: Sequence[nn.Module],
                 mask_roi_pool: Optional[nn.Module] = None, mask_heads: Optional[Sequence[nn.Module]] = None,
                 iou_thresholds: Sequence[float] = IOU_THRESHOLDS,
                 box_stds: Sequence[Sequence[float]] = BOX_STDS,
                 stage_loss_weights: Sequence[float] = STAGE_LOSS_WEIGHTS,
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25, box_loss_weight: float = 10.0,
                 mask_size: int = 28, score_thresh: float = 0.05, nms_thresh: float = 0.5,
                 detections_per_img: int = 100):
        super().__init__()
        stages = len(box_heads)
        if not (len(iou_thresholds) == len(box_stds) == len(stage_loss_weights) == stages):
            raise ValueError(f"{stages} box heads need as many IoU thresholds, stds and loss weights, got "
                             f"{len(iou_thresholds)}, {len(box_stds)} and {len(stage_loss_weights)}")
        if (mask_heads is None) != (mask_roi_pool is None) or (mask_heads is not None and len(mask_heads) != stages):
            raise ValueError("masks need a mask_roi_pool and one mask head per box head")
        self.box_roi_pool = box_roi_pool
        self.box_heads = nn.ModuleList(box_heads)
        self.mask_roi_pool = mask_roi_pool
        self.mask_heads = nn.ModuleList(mask_heads) if mask_heads is not None else None
        self.iou_thresholds = tuple(float(t) for t in iou_thresholds)
        self.box_coders = [BoxCoder(tuple(1.0 / s for s in std)) for std in box_stds]
        self.matchers = [Matcher(t, t, allow_low_quality_matches=False) for t in self.iou_thresholds]
        self.sampler = BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.stage_loss_weights = tuple(float(w) for w in stage_loss_weights)
        self.box_loss_weight = box_loss_weight
        self.mask_size = mask_size
        self.score_thresh, self.nms_thresh, self.detections_per_img = score_thresh, nms_thresh, detections_per_img

    @property
    def num_stages(self) -> int:
        return len(self.box_heads)

    @property
    def has_masks(self) -> bool:
        return self.mask_heads is not None

    def forward(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]],
                targets: Optional[List[Dict[str, Tensor]]] = None) -> Tuple[List[Dict[str, Tensor]], Dict[str, Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError("CascadeRoIHeads needs targets in training mode")
            if self.has_masks and any("masks" not in t for t in targets):
                raise ValueError("Cascade Mask R-CNN needs 'masks' in every target")
            return [], self.losses(features, proposals, image_shapes, targets)
        return self.detect(features, proposals, image_shapes), {}

    # ---------------------------------------------------------------------------------------------
    # training
    # ---------------------------------------------------------------------------------------------

    def sample(self, stage: int, proposals: List[Tensor], targets: List[Dict[str, Tensor]]
               ) -> Tuple[List[Tensor], List[Tensor], List[Tensor], List[Tensor]]:
        """Stage ``stage``'s training RoIs per image: ``boxes (n, 4)``, ``labels (n,)`` (0 = background),
        ``matched (n,)`` (index of the assigned ground truth, 0 for negatives) and ``is_gt (n,)``.

        Ground-truth boxes are added to the proposals (each assigned to itself); positives come
        first, then negatives, as drawn by the sampler.
        """
        all_boxes, all_labels, all_matched, all_is_gt = [], [], [], []
        for props, target in zip(proposals, targets):
            gt_boxes, gt_labels = target["boxes"].to(props.dtype), target["labels"]
            boxes = torch.cat([gt_boxes, props])
            is_gt = torch.zeros(len(boxes), dtype=torch.bool, device=boxes.device)
            is_gt[:len(gt_boxes)] = True
            if len(gt_boxes) == 0:
                matched = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
                labels = torch.zeros(len(boxes), dtype=torch.int64, device=boxes.device)
            else:
                matched = self.matchers[stage](box_iou(gt_boxes, boxes))
                matched[:len(gt_boxes)] = torch.arange(len(gt_boxes), device=boxes.device)
                labels = gt_labels[matched.clamp(min=0)].clone()
                labels[matched == Matcher.BELOW_LOW_THRESHOLD] = 0
                labels[matched == Matcher.BETWEEN_THRESHOLDS] = -1  # ignored (none when low == high)
            pos, neg = self.sampler([labels])
            keep = torch.cat([torch.where(pos[0])[0], torch.where(neg[0])[0]])
            all_boxes.append(boxes[keep])
            all_labels.append(labels[keep])
            all_matched.append(matched.clamp(min=0)[keep])
            all_is_gt.append(is_gt[keep])
        return all_boxes, all_labels, all_matched, all_is_gt

    def losses(self, features: Dict[str, Tensor], proposals: List[Tensor], image_shapes: List[Tuple[int, int]],
               targets: List[Dict[str, Tensor]]) -> Dict[str, Tensor]:
        losses: Dict[str, Tensor] = {}
        proposals = [p.detach().float() for p in proposals]
        for stage in range(self.num_stages):
            rois, labels, matched, is_gt = self.sample(stage, proposals, targets)
            logits, deltas = (o.float() for o in self.box_heads[stage](self.box_roi_pool(features, rois, image_shapes)))
            all_labels = torch.cat(labels)
            weight = self.stage_loss_weights[stage]
            losses[f"s{stage}.loss_cls"] = weight * F.cross_entropy(logits, all_labels)
            losses[f"s{stage}.loss_box"] = weight * self.box_loss(stage, deltas, rois, all_labels, matched, targets)
            if self.has_masks:
                losses[f"s{stage}.loss_mask"] = weight * self.mask_loss(stage, features, rois, labels, matched,
                                                                        image_shapes, targets)
            if stage + 1 < self.num_stages:
                proposals = self.refine(stage, logits.detach(), deltas.detach(), rois, labels, is_gt, image_shapes)
        return losses

    def box_loss(self, stage: int, deltas: Tensor, rois: List[Tensor], labels: Tensor, matched: List[Tensor],
                 targets: List[Dict[str, Tensor]]) -> Tensor:
        """GIoU loss of the decoded class-specific boxes of the positives, over the number of RoIs."""
        pos = torch.where(labels > 0)[0]
        if len(pos) == 0:
            return deltas.sum() * 0.0
        gt = torch.cat([t["boxes"].float()[m] if len(t["boxes"]) else rois_i.new_zeros(len(m), 4)
                        for t, m, rois_i in zip(targets, matched, rois)])
        pred = self.box_coders[stage].decode_single(_pick_class(deltas[pos], labels[pos]), torch.cat(rois)[pos])
        giou = generalized_box_iou_loss(pred, gt[pos], reduction="sum")
        return self.box_loss_weight * giou / max(len(labels), 1)

    def mask_loss(self, stage: int, features: Dict[str, Tensor], rois: List[Tensor], labels: List[Tensor],
                  matched: List[Tensor], image_shapes: List[Tuple[int, int]],
                  targets: List[Dict[str, Tensor]]) -> Tensor:
        """Binary cross-entropy of the assigned class's mask logits on the positives (mean)."""
        pos = [torch.where(lab > 0)[0] for lab in labels]
        pos_rois = [r[p] for r, p in zip(rois, pos)]
        logits = self.mask_heads[stage](self.mask_roi_pool(features, pos_rois, image_shapes)).float()
        if logits.numel() == 0:
            return logits.sum() * 0.0
        goal = torch.cat([mask_targets(t["masks"], r, m[p], self.mask_size)
                          for t, r, m, p in zip(targets, pos_rois, matched, pos)])
        pos_labels = torch.cat([lab[p] for lab, p in zip(labels, pos)])
        picked = logits[torch.arange(len(logits), device=logits.device), pos_labels]
        return F.binary_cross_entropy_with_logits(picked, goal)

    @torch.no_grad()
    def refine(self, stage: int, logits: Tensor, deltas: Tensor, rois: List[Tensor], labels: List[Tensor],
               is_gt: List[Tensor], image_shapes: List[Tuple[int, int]]) -> List[Tensor]:
        """The next stage's proposals: sampled RoIs regressed by their assigned (positives) or predicted
        (negatives) class, clipped to the image, ground-truth boxes removed."""
        counts = [len(r) for r in rois]
        out = []
        for r, lab, gt, lg, dl, shape in zip(rois, labels, is_gt, logits.split(counts), deltas.split(counts),
                                             image_shapes):
            cls = torch.where(lab > 0, lab, lg[:, 1:].argmax(1) + 1)
            boxes = clip_boxes_to_image(self.box_coders[stage].decode_single(_pick_class(dl, cls), r), shape)
            out.append(boxes[~gt])
        return out

    # ---------------------------------------------------------------------------------------------
    # test
    # ---------------------------------------------------------------------------------------------

    def stage_outputs(self, features: Dict[str, Tensor], proposals: List[Tensor],
                      image_shapes: List[Tuple[int, int]]) -> Tuple[List[Tensor], List[Tensor], Tensor]:
        """Run every stage on refined boxes: per stage's input boxes (concatenated over images), the
        stage logits ``(n, K+1)`` list, and the last stage's deltas ``(n, (K+1)*4)``."""
        counts = [len(p) for p in proposals]
        rois = [p.float() for p in proposals]
        inputs, stage_logits = [], []
        deltas = torch.zeros(0)
        for stage, head in enumerate(self.box_heads):
            logits, deltas = (o.float() for o in head(self.box_roi_pool(features, rois, image_shapes)))
            inputs.append(torch.cat(rois))
            stage_logits.append(logits)
            if stage + 1 < self.num_stages:
                boxes = self.box_coders[stage].decode_single(_pick_class(deltas, logits[:, 1:].argmax(1) + 1),
                                                             inputs[-1])
                rois = [clip_boxes_to_image(b, s) for b, s in zip(boxes.split(counts), image_shapes)]
        return inputs, stage_logits, deltas

    @torch.no_grad()
    def detect(self, features: Dict[str, Tensor], proposals: List[Tensor],
               image_shapes: List[Tuple[int, int]]) -> List[Dict[str, Tensor]]:
        counts = [len(p) for p in proposals]
        inputs, stage_logits, deltas = self.stage_outputs(features, proposals, image_shapes)
        scores = F.softmax(torch.stack(stage_logits).mean(0), dim=-1)
        boxes = self.box_coders[-1].decode_single(deltas, inputs[-1]).reshape(len(deltas), -1, 4)
        detections = []
        for b, s, shape in zip(boxes.split(counts), scores.split(counts), image_shapes):
            b = clip_boxes_to_image(b, shape)
            b, s, lab = select_detections(b, s, self.score_thresh, self.nms_thresh, self.detections_per_img)
            detections.append({"boxes": b, "scores": s, "labels": lab})
        if self.has_masks:
            self.add_masks(features, detections, image_shapes)
        return detections

    def add_masks(self, features: Dict[str, Tensor], detections: List[Dict[str, Tensor]],
                  image_shapes: List[Tuple[int, int]]) -> None:
        """``masks (d, 1, 28, 28)``: the stages' sigmoid probabilities of the detected class, averaged."""
        boxes = [d["boxes"] for d in detections]
        labels = torch.cat([d["labels"] for d in detections])
        feats = self.mask_roi_pool(features, boxes, image_shapes)
        rows = torch.arange(len(labels), device=labels.device)
        probs = torch.stack([head(feats).float()[rows, labels].sigmoid() for head in self.mask_heads]).mean(0)
        for d, p in zip(detections, probs.split([len(b) for b in boxes])):
            d["masks"] = p[:, None]


def build_cascade_roi_heads(num_classes: int, in_channels: int = 256, conv_channels: int = 256, fc_size: int = 1024,
                            mask_channels: Optional[int] = 256, featmap_names: Sequence[str] = ("0", "1", "2", "3"),
                            norm_layer: Optional[type] = nn.BatchNorm2d,
                            featmap_strides: Optional[Sequence[int]] = (4, 8, 16, 32), **kwargs) -> CascadeRoIHeads:
    """The released Cascade Mask R-CNN heads for ``num_classes`` (background included) classes.

    Three 4conv1fc box heads on 7x7 RoIAlign features and (unless ``mask_channels`` is None)
    three FCN mask heads on 14x14 features, both RoIAligns ``aligned=True`` over ``featmap_names``
    of strides ``featmap_strides`` (None: inferred from the feature and image sizes).
    ``kwargs`` go to :class:`CascadeRoIHeads` (thresholds, sampling, test-time selection).
    """
    stages = len(kwargs.get("iou_thresholds", IOU_THRESHOLDS))
    box_heads = [ConvFCBoxHead(in_channels, num_classes, 7, conv_channels, 4, fc_size, norm_layer)
                 for _ in range(stages)]
    masks = mask_channels is not None
    return CascadeRoIHeads(
        LevelRoIAlign(featmap_names, 7, strides=featmap_strides), box_heads,
        LevelRoIAlign(featmap_names, 14, strides=featmap_strides) if masks else None,
        [MaskHead(in_channels, num_classes, mask_channels) for _ in range(stages)] if masks else None,
        **kwargs)


class CascadeMaskRCNN(GeneralizedRCNN):
    """Cascade (Mask) R-CNN: ``backbone`` (with ``out_channels``) + the Mask R-CNN RPN + :class:`CascadeRoIHeads`.

    The RPN and test-time arguments are torchvision's :class:`~torchvision.models.detection.FasterRCNN`
    ones (``rpn_*``, ``box_score_thresh``, ``box_nms_thresh``, ``box_detections_per_img``,
    ``box_batch_size_per_image``, ``box_positive_fraction``); ``box_head_size`` is the FC width,
    ``box_conv_channels`` the conv width of the box heads, ``mask_head_channels`` the mask heads'
    width (None: boxes only). Defaults are the released configuration: RPN 2000 proposals in
    training and 1000 at test, NMS 0.7; mmdetection's anchors, RoIAlign, resizing and mask pasting.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, min_size: int | Tuple[int, ...] = 800,
                 max_size: int = 1333, image_mean: Optional[List[float]] = None, image_std: Optional[List[float]] = None,
                 rpn_anchor_generator: Optional[nn.Module] = None, rpn_pre_nms_top_n_train: int = 2000,
                 rpn_pre_nms_top_n_test: int = 1000, rpn_post_nms_top_n_train: int = 2000,
                 rpn_post_nms_top_n_test: int = 1000, rpn_nms_thresh: float = 0.7, rpn_fg_iou_thresh: float = 0.7,
                 rpn_bg_iou_thresh: float = 0.3, rpn_batch_size_per_image: int = 256,
                 rpn_positive_fraction: float = 0.5, rpn_score_thresh: float = 0.0,
                 box_score_thresh: float = 0.05, box_nms_thresh: float = 0.5, box_detections_per_img: int = 100,
                 box_batch_size_per_image: int = 512, box_positive_fraction: float = 0.25, box_head_size: int = 1024,
                 box_conv_channels: int = 256, mask_head_channels: Optional[int] = 256,
                 norm_layer: Optional[type] = nn.BatchNorm2d, featmap_names: Sequence[str] = ("0", "1", "2", "3")):
        anchors = rpn_anchor_generator or rpn_anchor_generator_default()
        rpn = RegionProposalNetwork(
            anchors, RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0]),
            rpn_fg_iou_thresh, rpn_bg_iou_thresh, rpn_batch_size_per_image, rpn_positive_fraction,
            dict(training=rpn_pre_nms_top_n_train, testing=rpn_pre_nms_top_n_test),
            dict(training=rpn_post_nms_top_n_train, testing=rpn_post_nms_top_n_test),
            rpn_nms_thresh, score_thresh=rpn_score_thresh)
        rpn.min_size = 0.0  # mmdetection keeps proposals of any size
        roi_heads = build_cascade_roi_heads(
            num_classes, backbone.out_channels, box_conv_channels, box_head_size, mask_head_channels, featmap_names,
            norm_layer, batch_size_per_image=box_batch_size_per_image, positive_fraction=box_positive_fraction,
            score_thresh=box_score_thresh, nms_thresh=box_nms_thresh, detections_per_img=box_detections_per_img)
        transform = ReleasedTransform(min_size if isinstance(min_size, (tuple, list)) else (min_size,), max_size,
                                      image_mean or [0.485, 0.456, 0.406], image_std or [0.229, 0.224, 0.225])
        super().__init__(backbone, rpn, roi_heads, transform)
