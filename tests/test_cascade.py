"""Cascade R-CNN heads and the mmdetection test-time numerics, on small hand-worked cases."""
import math

import pytest
import torch
import torch.nn as nn

from rmt.detection.cascade import CascadeRoIHeads, mask_targets
from rmt.detection.numerics import (FixedStrideAnchorGenerator, LevelRoIAlign, paste_masks, released_size,
                                    retinanet_anchor_generator, rpn_anchor_generator, select_detections)
from torchvision.models.detection.image_list import ImageList


class FixedPool(nn.Module):
    """Stands in for the RoIAlign: one feature per box, its row number (so heads can tell boxes apart)."""

    def forward(self, features, boxes, image_shapes):
        n = sum(len(b) for b in boxes)
        return torch.arange(n, dtype=torch.float32)[:, None, None, None]


class FixedBoxHead(nn.Module):
    """Returns the same logits and deltas for every box (or per-row ones when given 2-D tables)."""

    def __init__(self, logits, deltas):
        super().__init__()
        self.logits, self.deltas = torch.as_tensor(logits, dtype=torch.float32), torch.as_tensor(deltas, dtype=torch.float32)
        self.seen = []

    def forward(self, x):
        n = len(x)
        self.seen.append(n)
        lg = self.logits.expand(n, -1) if self.logits.dim() == 1 else self.logits[:n]
        dl = self.deltas.expand(n, -1) if self.deltas.dim() == 1 else self.deltas[:n]
        return lg.clone(), dl.clone()


class FixedMaskHead(nn.Module):
    def __init__(self, logit):
        super().__init__()
        self.logit = logit

    def forward(self, x):
        return torch.full((len(x), 3, 28, 28), float(self.logit))


def _heads(box_heads, mask_heads=None, **kwargs):
    return CascadeRoIHeads(FixedPool(), box_heads, FixedPool() if mask_heads else None, mask_heads, **kwargs)


def _box_with_iou(iou, side=10.0):
    """A box of the gt's size (0, 0, side, side) shifted right so that its IoU with the gt is ``iou``."""
    shift = side * (1 - iou) / (1 + iou)  # overlap (side - s) side / (2 side^2 - (side - s) side) = iou
    return [shift, 0.0, side + shift, side]


def test_each_stage_assigns_with_its_own_iou_threshold():
    gt = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([2])}
    ious = [0.45, 0.55, 0.65, 0.75]
    proposals = [torch.tensor([_box_with_iou(i) for i in ious])]
    heads = _heads([FixedBoxHead([0, 0, 0], [0] * 12)] * 3, batch_size_per_image=100, positive_fraction=1.0)
    for stage, threshold in enumerate((0.5, 0.6, 0.7)):
        boxes, labels, matched, is_gt = (x[0] for x in heads.sample(stage, proposals, [gt]))
        # the gt box joins the proposals and is a positive assigned to itself
        assert is_gt.sum() == 1 and labels[is_gt].tolist() == [2]
        got = {round(b[0].item(), 4): int(lab) for b, lab in zip(boxes[~is_gt], labels[~is_gt])}
        want = {round(_box_with_iou(i)[0], 4): (2 if i >= threshold else 0) for i in ious}
        assert got == want, (stage, got, want)
        assert (matched == 0).all()
        # positives come before negatives
        pos = (labels > 0).int()
        assert torch.equal(pos, pos.sort(descending=True).values)


def test_sampling_keeps_the_positive_fraction_and_images_without_objects():
    gt = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1])}
    near = [_box_with_iou(0.8) for _ in range(10)]
    far = [[50.0 + i, 50, 60 + i, 60] for i in range(30)]
    heads = _heads([FixedBoxHead([0, 0], [0] * 8)], iou_thresholds=[0.5], box_stds=[[1, 1, 1, 1]],
                   stage_loss_weights=[1.0], batch_size_per_image=8, positive_fraction=0.25)
    torch.manual_seed(0)
    boxes, labels, _, _ = (x[0] for x in heads.sample(0, [torch.tensor(near + far)], [gt]))
    assert len(boxes) == 8 and int((labels > 0).sum()) == 2  # 25% of 8
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    boxes, labels, _, is_gt = (x[0] for x in heads.sample(0, [torch.tensor(far[:5])], [empty]))
    assert len(boxes) == 5 and (labels == 0).all() and not is_gt.any()


def test_refinement_regresses_by_assigned_or_predicted_class_and_drops_gt():
    # classes (background, 1, 2); a normalised dx of 1 with std 0.1 shifts by 0.1 x width: class 1
    # moves boxes right by 1 px, class 2 moves them down by 1 px; class 2 always scores highest
    deltas = [0, 0, 0, 0, 1, 0, 0, 0, 0, 1, 0, 0]
    stage0 = FixedBoxHead([0, 0, 5], deltas)
    heads = _heads([stage0, FixedBoxHead([0, 0, 0], [0] * 12)], iou_thresholds=[0.5, 0.6],
                   box_stds=[[0.1, 0.1, 0.2, 0.2]] * 2, stage_loss_weights=[1, 1],
                   batch_size_per_image=10, positive_fraction=1.0)
    rois = [torch.tensor([[0.0, 0, 10, 10], [1.0, 0, 11, 10], [85.0, 85, 95, 95]])]
    labels = [torch.tensor([1, 1, 0])]  # gt and a positive of class 1, a negative
    is_gt = [torch.tensor([True, False, False])]
    logits, dl = stage0(torch.zeros(3))
    refined = heads.refine(0, logits, dl, rois, labels, is_gt, [(90, 100)])  # image 90 high, 100 wide
    # the positive moves right by 1 px (its assigned class 1, although class 2 scores higher);
    # the negative takes its predicted class 2: down by 1 px, then clipped to the image height 90
    torch.testing.assert_close(refined[0], torch.tensor([[2.0, 0, 12, 10], [85.0, 86, 95, 90]]))


def test_training_losses_per_stage_weights_and_giou():
    gt = {"boxes": torch.tensor([[0.0, 0, 10, 10]]), "labels": torch.tensor([1]),
          "masks": torch.zeros(1, 20, 20, dtype=torch.uint8)}
    gt["masks"][0, :10, :10] = 1
    proposal = torch.tensor([[0.0, 0, 10, 20]])  # IoU 0.5 with the gt
    zero = [0.0] * 8
    heads = _heads([FixedBoxHead([0.0, 0.0], zero) for _ in range(2)], [FixedMaskHead(0.0)] * 2,
                   iou_thresholds=[0.5, 0.6], box_stds=[[0.1, 0.1, 0.2, 0.2]] * 2, stage_loss_weights=[1.0, 0.5],
                   batch_size_per_image=10, positive_fraction=1.0).train()
    losses = heads({}, [proposal], [(20, 20)], [gt])[1]
    ce = math.log(2)  # uniform logits over 2 classes
    # stage 0: the gt (GIoU loss 0) and the proposal (IoU 0.5 = its GIoU: the hull is the proposal) are
    # positive; loss = 10 x (0 + 0.5) / 2 RoIs
    assert losses["s0.loss_cls"].item() == pytest.approx(ce)
    assert losses["s0.loss_box"].item() == pytest.approx(10 * 0.5 / 2)
    assert losses["s0.loss_mask"].item() == pytest.approx(math.log(2), rel=1e-5)  # logits 0: BCE log 2
    # stage 1 sees the refined (unchanged) proposal and the gt again: IoU 0.5 < 0.6 is now negative
    assert losses["s1.loss_box"].item() == pytest.approx(0.5 * 10 * 0.0 / 2)
    assert losses["s1.loss_cls"].item() == pytest.approx(0.5 * ce)


def test_mask_targets_are_aligned_and_binary():
    masks = torch.zeros(1, 8, 8, dtype=torch.uint8)
    masks[0, :, :4] = 1  # left half
    t = mask_targets(masks, torch.tensor([[0.0, 0, 8, 8]]), torch.tensor([0]), 4)
    assert torch.equal(t[0], torch.tensor([[1.0, 1, 0, 0]] * 4))


def test_test_time_averages_logits_regresses_through_stages_and_averages_mask_probabilities():
    # stage logits for classes (bg, 1, 2): their mean (0, 1, 1) favours neither class on average,
    # although stage 0 says class 1 and stage 1 says class 2
    s0 = FixedBoxHead([0, 3, 0], [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0])  # class 1: right by 0.1 w
    s1 = FixedBoxHead([0, 0, 3], [0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0])  # class 2: down by 0.05 h
    s2 = FixedBoxHead([0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0])  # class 2: wider
    masks = [FixedMaskHead(v) for v in (-2.0, 0.0, 2.0)]
    heads = _heads([s0, s1, s2], masks, score_thresh=0.0).eval()
    out = heads({}, [torch.tensor([[10.0, 10, 30, 30]])], [(100, 100)])[0][0]
    p = torch.softmax(torch.tensor([0.0, 1, 1]), 0)
    assert sorted(out["scores"].tolist()) == pytest.approx([p[1].item(), p[2].item()])
    # stage 0 regresses by its predicted class 1: (12, 10, 32, 30); stage 1 by class 2: down 1 px;
    # the final boxes decode the last stage's deltas (std 0.067 on w: x exp(0.067)) on that box
    w = 20 * math.exp(0.067)
    want = {1: [12.0, 11, 32, 31], 2: [22 - w / 2, 11, 22 + w / 2, 31]}
    for box, label in zip(out["boxes"], out["labels"]):
        torch.testing.assert_close(box, torch.tensor(want[int(label)]), rtol=1e-5, atol=1e-4)
    # mask probabilities: the mean of the sigmoids, not the sigmoid of the mean logit (0.5)
    mean = (torch.sigmoid(torch.tensor(-2.0)) + 0.5 + torch.sigmoid(torch.tensor(2.0))) / 3
    assert out["masks"].shape == (2, 1, 28, 28)
    torch.testing.assert_close(out["masks"], torch.full_like(out["masks"], mean.item()))
    assert (s0.seen, s1.seen, s2.seen) == ([1], [1], [1])


def test_select_detections_thresholds_and_suppresses_per_class():
    boxes = torch.tensor([[[0.0, 0, 10, 10]] * 3, [[1.0, 0, 11, 10]] * 3, [[50.0, 50, 60, 60]] * 3])
    scores = torch.tensor([[0.1, 0.9, 0.04], [0.1, 0.8, 0.7], [0.5, 0.03, 0.3]])
    b, s, lab = select_detections(boxes, scores, 0.05, 0.5, 100)
    # class 1: boxes 0 and 1 overlap (IoU 0.82): 0 survives; class 2: box 1 (0.7) and box 2 (0.3)
    assert s.tolist() == pytest.approx([0.9, 0.7, 0.3]) and lab.tolist() == [1, 2, 2]
    assert select_detections(boxes, scores, 0.05, 0.5, 2)[1].tolist() == pytest.approx([0.9, 0.7])


# ------------------------------------------------------------------------------------------------
# mmdetection numerics
# ------------------------------------------------------------------------------------------------

def test_anchors_are_float_at_fixed_strides():
    gen = rpn_anchor_generator()
    images = ImageList(torch.zeros(1, 3, 800, 800), [(800, 800)])
    feats = [torch.zeros(1, 1, 800 // s, 800 // s, dtype=torch.bfloat16) for s in (4, 8, 16, 32)]
    feats.append(torch.zeros(1, 1, 13, 13, dtype=torch.bfloat16))  # P6 of a 800-pixel image
    anchors = gen(images, feats)[0]
    assert anchors.dtype == torch.float32
    # level 0, location (0, 0), ratio 0.5 (h / w): w = 32 / sqrt(0.5), h = 32 sqrt(0.5), not rounded
    w, h = 32 / math.sqrt(0.5), 32 * math.sqrt(0.5)
    torch.testing.assert_close(anchors[0], torch.tensor([-w / 2, -h / 2, w / 2, h / 2]))
    # P6 anchors step by 64 (torchvision would use 800 // 13 = 61)
    p6 = anchors[-13 * 13 * 3:].reshape(13, 13, 3, 4)
    assert (p6[0, 1, 1] - p6[0, 0, 1]).tolist() == [64.0, 0.0, 64.0, 0.0]
    sizes = retinanet_anchor_generator().sizes[0]
    assert sizes == pytest.approx((32.0, 32 * 2 ** (1 / 3), 32 * 2 ** (2 / 3)))
    with pytest.raises(ValueError, match="one stride per level"):
        FixedStrideAnchorGenerator([(32.0,)], [(1.0,)], [4, 8])


def test_roi_levels_and_aligned_pooling():
    pool = LevelRoIAlign(["0", "1", "2", "3"], 2)
    sides = torch.tensor([50.0, 111.9, 112.0, 224.0, 447.0, 448.0, 2000.0])
    boxes = torch.stack([torch.zeros(7), torch.zeros(7), sides, sides], 1)
    assert pool.levels(boxes).tolist() == [0, 0, 1, 2, 2, 3, 3]
    # a ramp feature map (value = column) at stride 4: box (0, 0, 8, 8) spans feature columns
    # -0.5 .. 1.5 with the half-pixel offset (aligned), one sample per bin at columns 0 and 1;
    # without the offset the samples would sit at 0.5 and 1.5
    ramp = torch.arange(16.0).repeat(16, 1)[None, None]
    feats = {"0": ramp, "1": ramp[..., ::2, ::2], "2": ramp[..., ::4, ::4], "3": ramp[..., ::8, ::8]}
    out = pool(feats, [torch.tensor([[0.0, 0, 8, 8]])], [(64, 64)])
    torch.testing.assert_close(out[0, 0], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
    unaligned = LevelRoIAlign(["0", "1", "2", "3"], 2, aligned=False)(feats, [torch.tensor([[0.0, 0, 8, 8]])], [(64, 64)])
    torch.testing.assert_close(unaligned[0, 0], torch.tensor([[0.5, 1.5], [0.5, 1.5]]))
    # a 33-pixel image padded to 64: the strides cannot be told from the sizes, but can be given
    fixed = LevelRoIAlign(["0", "1", "2", "3"], 2, strides=(4, 8, 16, 32))
    torch.testing.assert_close(fixed(feats, [torch.tensor([[0.0, 0, 8, 8]])], [(33, 33)]), out)


def test_released_sizes_round_and_masks_paste_at_pixel_centres():
    assert released_size(480, 640, 800, 1333) == (800, 1067)  # 1066.67 rounds up (torchvision: 1066)
    assert released_size(427, 640, 800, 1333) == (800, 1199)
    assert released_size(200, 1000, 800, 1333) == (267, 1333)
    ones = torch.ones(1, 1, 28, 28)
    pasted = paste_masks(ones, torch.tensor([[2.0, 3.0, 6.0, 5.0]]), 8, 10)[0, 0]
    # pixels whose centres lie in the float box read the mask; the others are more than half a
    # mask pixel outside it and read zero
    assert pasted.shape == (8, 10) and (pasted[3:5, 2:6] == 1).all()
    assert pasted.sum() == 8
    assert paste_masks(torch.zeros(0, 1, 28, 28), torch.zeros(0, 4), 8, 10).shape == (0, 1, 8, 10)


def test_cascade_heads_fit_a_torchvision_faster_rcnn():
    from rmt.detection.cascade import build_cascade_roi_heads
    from torchvision.models.detection import fasterrcnn_resnet50_fpn
    torch.manual_seed(0)
    detector = fasterrcnn_resnet50_fpn(weights=None, weights_backbone=None, num_classes=3, min_size=64, max_size=64,
                                       rpn_pre_nms_top_n_train=100, rpn_post_nms_top_n_train=50,
                                       rpn_pre_nms_top_n_test=100, rpn_post_nms_top_n_test=50)
    detector.roi_heads = build_cascade_roi_heads(3, conv_channels=16, fc_size=32, mask_channels=None,
                                                 batch_size_per_image=32)
    images = [torch.rand(3, 64, 64), torch.rand(3, 48, 64)]
    targets = [{"boxes": torch.tensor([[4.0, 4, 40, 30]]), "labels": torch.tensor([2])},
               {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}]
    losses = detector.train()(images, targets)
    assert {"s0.loss_cls", "s2.loss_box", "loss_objectness"} <= set(losses) and "s0.loss_mask" not in losses
    sum(losses.values()).backward()
    assert detector.roi_heads.box_heads[2].fc.weight.grad.abs().sum() > 0
    detector.roi_heads.score_thresh = 0.0
    with torch.no_grad():
        out = detector.eval()(images)
    assert len(out) == 2 and out[0]["boxes"].shape[1] == 4 and "masks" not in out[0]
    assert (out[0]["labels"] >= 1).all() and (out[0]["boxes"][:, 2:] <= 64).all()
