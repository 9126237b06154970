"""Detection: RMT feature pyramids, checkpoints, COCO data and metrics, training/eval/predict CLI."""
import json
import math
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torchvision.ops import FrozenBatchNorm2d

from rmt.checkpoint import CheckpointError, ours_to_released
from rmt.cli import main
from rmt.detection.backbone import build_rmt_fpn, freeze_batchnorm
from rmt.detection.config import TrainConfig
from rmt.detection.data import CocoInstances, TrainSampler, collate, find_split
from rmt.detection.evaluation import coco_evaluate, to_coco_results
from rmt.detection.models import build_detector
from rmt.detection.shapes import write_shapes_dataset

from test_checkpoint import _randomize  # random weights and BatchNorm statistics

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8), drop_path_rate=0.0)
# cheap heads for CPU tests: few proposals and sampled RoIs
LIGHT = dict(rpn_pre_nms_top_n_train=300, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=300,
             rpn_post_nms_top_n_test=100, box_batch_size_per_image=64)
TINY_CLI = ["--backbone-kwargs", json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()}),
            "--fpn-channels", "32", "--min-size", "96", "--max-size", "96", "--device", "cpu", "--workers", "0",
            "--warmup-iters", "2", "--lr", "1e-3"]
LIGHT_CLI = ["--detector-kwargs", json.dumps(LIGHT)]


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)  # the tests run many tiny ops: one thread is fastest on a busy machine


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    return write_shapes_dataset(tmp_path_factory.mktemp("shapes"), num_train=6, num_val=4, image_size=96, seed=0)


def _read_png(path):
    return torch.from_numpy(np.array(Image.open(path).convert("RGB")))


# ------------------------------------------------------------------------------------------------
# backbone
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("pyramid,strides,names", [
    ("p2-p6", [4, 8, 16, 32, 64], ["0", "1", "2", "3", "pool"]),
    ("p3-p7", [8, 16, 32, 64, 128], ["0", "1", "2", "p6", "p7"]),
])
def test_pyramid_shapes_and_strides_at_odd_sizes(pyramid, strides, names):
    backbone = build_rmt_fpn("rmt_tiny", pyramid, out_channels=32, **TINY).eval()
    assert backbone.rmt.attention_forms == ("decomposed", "decomposed", "decomposed", "full")
    for h, w in [(97, 131), (64, 45), (33, 200)]:
        with torch.no_grad():
            feats = backbone(torch.randn(2, 3, h, w))
        assert list(feats) == names
        for s, f in zip(strides, feats.values()):
            assert f.shape == (2, 32, math.ceil(h / s), math.ceil(w / s)), (h, w, s, f.shape)


def test_body_is_timm_features_with_per_stage_norms():
    backbone = build_rmt_fpn("rmt_tiny", "p2-p6", **TINY).eval()
    ref = timm.create_model("rmt_tiny", features_only=True, attn_forms="TTTF", **TINY).eval()
    ref.load_state_dict(backbone.body.state_dict())
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        for a, b in zip(backbone.body(x), ref(x)):
            assert torch.equal(a, b)
    norms = backbone.rmt.feature_norms
    assert len(norms) == 4 and all(n.eps == 1e-5 for n in norms)


def test_frozen_stages_stay_frozen_in_train_mode():
    backbone = build_rmt_fpn("rmt_tiny", "p2-p6", frozen_stages=1, **TINY)
    backbone.train()
    rmt = backbone.rmt
    assert not any(p.requires_grad for p in rmt.stem.parameters())
    assert not any(p.requires_grad for p in rmt.stages[0].parameters())
    assert not any(p.requires_grad for p in rmt.feature_norms[0].parameters())
    assert all(p.requires_grad for p in rmt.stages[1].parameters())
    assert not rmt.stem.training and not rmt.stages[0].training and rmt.stages[1].training
    with pytest.raises(ValueError, match="frozen_stages"):
        backbone.freeze_stages(7)


def test_frozen_batchnorm_keeps_outputs():
    backbone = _randomize(build_rmt_fpn("rmt_tiny", "p2-p6", **TINY)).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        before = backbone(x)
        n = freeze_batchnorm(backbone.rmt.stem) + sum(freeze_batchnorm(s.downsample) for s in backbone.rmt.stages)
        after = backbone(x)
    assert n == 4 + 3
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    assert sum(isinstance(m, FrozenBatchNorm2d) for m in backbone.modules()) == 7
    for a, b in zip(before.values(), after.values()):  # FrozenBatchNorm2d rounds a little differently
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_released_detection_checkpoint_round_trips(tmp_path):
    """mmdet layout (backbone.* under state_dict, extra_norms) -> identical features after load."""
    source = _randomize(build_rmt_fpn("rmt_tiny", "p2-p6", **TINY)).eval()
    rmt = source.rmt
    released = ours_to_released(rmt.state_dict(), rmt)
    assert any(k.startswith("extra_norms.3.") for k in released)
    ckpt = {"meta": {"epoch": 12}, "state_dict": {
        **{f"backbone.{k}": v for k, v in released.items()},
        "neck.lateral_convs.0.conv.weight": torch.randn(256, 16, 1, 1),
        "rpn_head.rpn_cls.weight": torch.randn(3, 256, 1, 1)}}
    torch.save(ckpt, tmp_path / "mask_rcnn_rmt.pth")
    x = torch.randn(1, 3, 75, 99)
    for frozen_bn in (False, True):
        loaded = build_rmt_fpn("rmt_tiny", "p2-p6", pretrained=tmp_path / "mask_rcnn_rmt.pth",
                               frozen_bn=frozen_bn, **TINY).eval()
        with torch.no_grad():
            for a, b in zip(source.body(x), loaded.body(x)):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # a backbone of another width is refused with the cause named
    with pytest.raises(CheckpointError, match="widths"):
        build_rmt_fpn("rmt_tiny", "p2-p6", pretrained=tmp_path / "mask_rcnn_rmt.pth",
                      **dict(TINY, embed_dims=(32, 64, 128, 256)))


def test_imagenet_checkpoint_loads_without_head_and_norms(tmp_path):
    classifier = _randomize(timm.create_model("rmt_tiny", attn_forms="TTTF", **TINY)).eval()
    torch.save({"model": classifier.state_dict()}, tmp_path / "in1k.pth")
    backbone = build_rmt_fpn("rmt_tiny", "p3-p7", pretrained=tmp_path / "in1k.pth", **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = classifier.forward_features(x)  # (b, h, w, c) before any feature norm
        got = backbone.rmt.forward_intermediates(x, indices=[3], intermediates_only=True)[0]
    # fresh per-stage norms (weight 1, bias 0) are a plain LayerNorm of the stage output
    torch.testing.assert_close(got, torch.nn.functional.layer_norm(expected, (128,), eps=1e-5).permute(0, 3, 1, 2))
    # stage 0's norm feeds no P3-P7 level: frozen so that DDP sees no unused trainable parameter
    assert not any(p.requires_grad for p in backbone.rmt.feature_norms[0].parameters())


@pytest.mark.parametrize("detector", ["mask_rcnn", "cascade_mask_rcnn", "retinanet", "fcos"])
def test_boxes_are_decoded_in_float32_under_bf16_autocast(detector):
    # narrow heads: bf16 convolutions take a slow path on CPU
    model = build_detector(detector, "rmt_tiny", 3, min_size=96, max_size=96, fpn_channels=32,
                           mask_head_channels=8, box_head_size=16, backbone_kwargs=TINY).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model([torch.rand(3, 96, 96), torch.rand(3, 80, 96)])[0]
    assert out["boxes"].dtype == out["scores"].dtype == torch.float32
    assert out.get("masks", out["boxes"]).dtype == torch.float32


def test_unknown_detector_refused():
    with pytest.raises(ValueError, match="mask_rcnn, cascade_mask_rcnn, retinanet, fcos"):
        build_detector("yolo", "rmt_tiny", 3)


# ------------------------------------------------------------------------------------------------
# data and metrics
# ------------------------------------------------------------------------------------------------

def test_shapes_dataset_is_deterministic_and_consistent(shapes, tmp_path):
    again = write_shapes_dataset(tmp_path / "again", num_train=6, num_val=4, image_size=96, seed=0)
    for split in ("train", "val"):
        assert ((shapes / "annotations" / f"instances_{split}.json").read_text()
                == (again / "annotations" / f"instances_{split}.json").read_text())
    images, ann = find_split(shapes, "train")
    ds = CocoInstances(images, ann, train=True, with_masks=True)
    assert ds.class_names == ["circle", "square", "triangle"]
    for i in range(len(ds)):
        image, target = ds[i]
        assert image.dtype == torch.uint8 and image.shape == (3, 96, 96)
        assert target["labels"].min() >= 1 and target["labels"].max() <= 3
        for box, mask in zip(target["boxes"], target["masks"]):  # each box bounds its mask
            ys, xs = torch.nonzero(mask, as_tuple=True)
            assert abs(xs.min() - box[0]) <= 1 and abs(xs.max() + 1 - box[2]) <= 1
            assert abs(ys.min() - box[1]) <= 1 and abs(ys.max() + 1 - box[3]) <= 1


def test_flip_depends_only_on_seed_epoch_index(shapes):
    ds = CocoInstances(*find_split(shapes, "train"), train=True, hflip_prob=0.5, seed=3)
    plain = CocoInstances(*find_split(shapes, "train"), train=False, with_masks=True)
    flips = []
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            img, t = ds[i]
            ref_img, ref_t = plain[plain.ids.index(ds.ids[i])]
            flipped = not torch.equal(img, ref_img)
            flips.append(flipped)
            if flipped:
                assert torch.equal(img, ref_img.flip(-1)) and torch.equal(t["masks"], ref_t["masks"].flip(-1))
                torch.testing.assert_close(t["boxes"][:, [2, 0]], 96 - ref_t["boxes"][:, [0, 2]])
            assert torch.equal(ds[i][0], img)  # same call, same result
    assert 0 < sum(flips) < len(flips)


def test_train_sampler_partitions_and_resumes():
    samplers = [TrainSampler(10, batch_size=2, rank=r, world_size=2, seed=1) for r in range(2)]
    for s in samplers:
        s.set_epoch(4)
    parts = [s.indices() for s in samplers]
    assert len(parts[0]) == len(parts[1]) == 6 and set(parts[0] + parts[1]) == set(range(10))
    samplers[0].set_epoch(4, skip_batches=2)
    assert list(samplers[0]) == parts[0][4:] and len(samplers[0]) == 2
    samplers[0].set_epoch(5)
    assert samplers[0].indices() != parts[0]
    # step k of the two ranks at batch 2 = step k of one process at batch 4
    single = TrainSampler(10, batch_size=4, seed=1)
    single.set_epoch(4)
    assert single.indices() == [i for k in range(3) for r in range(2) for i in parts[r][2 * k:2 * k + 2]]


def test_perfect_detections_score_100_ap(shapes):
    ds = CocoInstances(*find_split(shapes, "val"), train=False, with_masks=True)
    results, ids = [], []
    for i in range(len(ds)):
        _, t = ds[i]
        n = len(t["labels"])
        out = dict(boxes=t["boxes"], labels=t["labels"], scores=torch.linspace(0.9, 0.5, n),
                   masks=t["masks"][:, None].float())
        results += to_coco_results(out, int(t["image_id"]), ds.cat_ids)
        ids.append(int(t["image_id"]))
    metrics = coco_evaluate(ds.coco, results, ids)
    assert metrics["bbox_AP"] == pytest.approx(100.0) and metrics["segm_AP"] == pytest.approx(100.0)
    # wrong classes score zero; no detections at all is zeros, not a crash
    wrong = [dict(r, category_id=ds.cat_ids[(ds.cat_ids.index(r["category_id"]) + 1) % 3]) for r in results]
    assert coco_evaluate(ds.coco, wrong, ids)["bbox_AP"] == 0.0
    # size ranges without ground truth (no large objects in 96-pixel images) are None, not 0
    assert metrics["bbox_APl"] is None
    nothing = coco_evaluate(ds.coco, [], ids, ("bbox",))
    assert nothing == {k: None if metrics[k] is None else 0.0 for k in metrics if k.startswith("bbox_")}


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("detector", ["mask_rcnn", "cascade_mask_rcnn", "retinanet", "fcos"])
def test_training_steps_lower_the_loss(shapes, detector):
    ds = CocoInstances(*find_split(shapes, "train"), train=True, with_masks=detector.endswith("mask_rcnn"))
    images, targets = collate([ds[0], ds[1]])
    images = [im.float() / 255 for im in images]
    extra = dict(LIGHT, mask_head_channels=32, box_head_size=64) if detector.endswith("mask_rcnn") else {}
    model = build_detector(detector, "rmt_tiny", 3, min_size=96, max_size=96, fpn_channels=32,
                           backbone_kwargs=TINY, **extra).train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    def loss():
        torch.manual_seed(0)  # same proposal sampling for both measurements
        return sum(model(images, targets).values())

    with torch.no_grad():
        start = loss().item()
    for _ in range(6):
        opt.zero_grad()
        sum(model(images, targets).values()).backward()
        opt.step()
    with torch.no_grad():
        end = loss().item()
    assert end < 0.8 * start, (start, end)


# SPEC.md section 9, transcribed: lr, weight decay, drop path, epochs, LR steps, crop pipeline
SPEC_RECIPES = {
    "maskrcnn_t_1x": (4e-4, 0.05, 0.1, 12, (8, 11), False), "maskrcnn_s_1x": (4e-4, 0.05, 0.15, 12, (8, 11), False),
    "maskrcnn_m_1x": (4e-4, 0.05, 0.4, 12, (8, 11), False), "maskrcnn_l_1x": (2e-4, 0.05, 0.5, 12, (8, 11), False),
    "maskrcnn_s_3x": (4e-4, 0.05, 0.15, 36, (27, 33), True), "maskrcnn_m_3x": (2e-4, 0.05, 0.4, 36, (27, 33), True),
    "maskrcnn_l_3x": (2e-4, 0.05, 0.5, 36, (27, 33), True),
    "retinanet_t_1x": (4e-4, 1e-4, 0.1, 12, (8, 11), False), "retinanet_s_1x": (4e-4, 1e-4, 0.15, 12, (8, 11), False),
    "retinanet_m_1x": (4e-4, 1e-4, 0.4, 12, (8, 11), False), "retinanet_l_1x": (2e-4, 1e-4, 0.5, 12, (8, 11), False),
    "casrcnn_s_3x": (4e-4, 0.05, 0.15, 36, (27, 33), True), "casrcnn_m_3x": (2e-4, 0.05, 0.4, 36, (27, 33), True),
}


@pytest.mark.parametrize("name", sorted(SPEC_RECIPES))
def test_recipes_match_the_released_configs(name):
    lr, wd, drop, epochs, steps, crop = SPEC_RECIPES[name]
    family, variant, schedule = name.split("_")
    cfg = TrainConfig(recipe=name).resolved(world_size=8)  # 2 images x 8 GPUs = batch 16
    assert cfg.detector == {"maskrcnn": "mask_rcnn", "retinanet": "retinanet", "casrcnn": "cascade_mask_rcnn"}[family]
    assert cfg.model == {"t": "rmt_tiny", "s": "rmt_small", "m": "rmt_base", "l": "rmt_large"}[variant]
    assert (cfg.lr, cfg.weight_decay, cfg.drop_path, cfg.epochs, tuple(cfg.milestones)) == (lr, wd, drop, epochs, steps)
    assert cfg.crop == cfg.multiscale == crop and cfg.schedule == schedule
    # the released T configs set chunkwise_recurrents [True, True, False, False]; the others TTTF
    assert cfg.attn_forms == ("TTFF" if variant == "t" else "TTTF")
    assert TrainConfig(recipe=name, batch_size=1).resolved(world_size=4).lr == pytest.approx(lr / 4)


def test_defaults_follow_the_matching_recipe_and_recipes_refuse_conflicts():
    cfg = TrainConfig().resolved(world_size=8)
    assert (cfg.detector, cfg.model, cfg.lr, cfg.weight_decay, cfg.drop_path) == ("mask_rcnn", "rmt_tiny", 4e-4, 0.05, 0.1)
    assert (cfg.epochs, cfg.milestones, cfg.multiscale, cfg.crop) == (12, [8, 11], False, False)
    assert TrainConfig(model="rmt_large").resolved(8).lr == 2e-4
    assert TrainConfig(detector="retinanet", model="rmt_base").resolved(8).weight_decay == 1e-4
    # an unreleased combination takes the variant's values
    cas = TrainConfig(detector="cascade_mask_rcnn", model="rmt_tiny").resolved(8)
    assert (cas.lr, cas.drop_path, cas.attn_forms, cas.epochs) == (4e-4, 0.1, "TTTF", 12)
    three = TrainConfig(schedule="3x").resolved(1)
    assert (three.epochs, three.milestones, three.multiscale, three.crop) == (36, [27, 33], True, True)
    assert three.train_min_sizes() == list(range(480, 801, 32))
    assert three.crop_sizes() == ((400, 500, 600), (384, 600))
    assert TrainConfig(epochs=24).resolved(1).milestones == [16, 22]
    # explicit settings win over the recipe; the detector and variant define it
    assert TrainConfig(recipe="casrcnn_m_3x", lr=1e-4, drop_path=0.2).resolved(8).lr == 1e-4
    assert TrainConfig(backbone_kwargs={"drop_path_rate": 0.0}).resolved(1).drop_path == 0.0
    with pytest.raises(ValueError, match="recipe casrcnn_m_3x trains model 'rmt_base', not 'rmt_tiny'"):
        TrainConfig(recipe="casrcnn_m_3x", model="rmt_tiny").resolved(8)
    with pytest.raises(ValueError, match="unknown recipe 'maskrcnn_x_1x'.*maskrcnn_t_1x"):
        TrainConfig(recipe="maskrcnn_x_1x").resolved(8)


def test_crop_policy_is_seeded_and_keeps_boxes_inside(shapes):
    images, ann = find_split(shapes, "train")
    ds = CocoInstances(images, ann, train=True, with_masks=True, seed=1, hflip_prob=0.0, crop=((40, 50, 60), (38, 60)))
    plain = CocoInstances(images, ann, train=True, with_masks=True, seed=1, hflip_prob=0.0)
    cropped = 0
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            image, t = ds[i]
            again = ds[i]
            assert torch.equal(image, again[0]) and torch.equal(t["boxes"], again[1]["boxes"])
            h, w = image.shape[-2:]
            if (h, w) == (96, 96):
                assert torch.equal(image, plain[i][0])
                continue
            cropped += 1
            assert 38 <= h <= 60 and 38 <= w <= 60
            assert t["masks"].shape[1:] == (h, w) and len(t["masks"]) == len(t["boxes"]) == len(t["labels"])
            b = t["boxes"]
            assert ((b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])).all()
            assert (b[:, 0::2] >= 0).all() and (b[:, 0::2] <= w).all() and (b[:, 1::2] <= h).all()
    assert 0 < cropped < 3 * len(ds)


def _train(out, shapes, *extra):
    return main(["detect", "train", "--train-images", str(shapes / "train"), "--train-ann",
                 str(shapes / "annotations/instances_train.json"), "--val-images", str(shapes / "val"),
                 "--val-ann", str(shapes / "annotations/instances_val.json"), "--out", str(out),
                 "--epochs", "2", "--batch-size", "2", "--eval-every", "0", "--log-every", "1", *TINY_CLI, *LIGHT_CLI,
                 *extra])


def test_train_resume_eval_predict_cli(shapes, tmp_path, capsys):
    # an uninterrupted run, and one stopped in the middle of epoch 2 then resumed: same weights
    assert _train(tmp_path / "full", shapes) == 0
    assert _train(tmp_path / "split", shapes, "--max-steps", "4") == 0
    stopped = torch.load(tmp_path / "split/last.pth", weights_only=True)
    assert (stopped["epoch"], stopped["batch"], stopped["step"]) == (1, 1, 4)
    assert main(["detect", "train", "--resume", str(tmp_path / "split/last.pth"), "--out", str(tmp_path / "split")]) == 0
    full = torch.load(tmp_path / "full/last.pth", weights_only=True)
    resumed = torch.load(tmp_path / "split/last.pth", weights_only=True)
    assert resumed["step"] == full["step"] == 6
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    assert resumed["metrics"] == full["metrics"]
    assert {"bbox_AP", "segm_AP", "bbox_AP50"} <= set(full["metrics"])
    out = tmp_path / "full"
    assert (out / "curves.png").stat().st_size > 1000
    losses = [r for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in losses] == [1, 2, 3, 4, 5, 6] and "loss_mask" in losses[0]

    # its backbone initialises another detector (a Mask R-CNN run's backbone into RetinaNet's)
    trained = {k[len("backbone.body."):]: v for k, v in full["model"].items() if k.startswith("backbone.body.")}
    reused = build_rmt_fpn("rmt_tiny", "p3-p7", pretrained=out / "last.pth", **TINY)
    assert all(torch.equal(v, trained[k]) for k, v in reused.body.state_dict().items())

    # the same run again into the same folder is refused; resuming with other settings too
    capsys.readouterr()
    assert _train(out, shapes) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert main(["detect", "train", "--resume", str(out / "last.pth"), "--lr", "0.5"]) == 1
    assert "lr=0.5" in capsys.readouterr().err

    # eval reproduces the training run's final metrics
    assert main(["detect", "eval", str(out / "last.pth"), "--device", "cpu", "--json", str(tmp_path / "m.json")]) == 0
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert {k: metrics[k] for k in full["metrics"]} == full["metrics"]
    assert "box " in capsys.readouterr().out

    # predict: one PNG per image (same size) and a JSON of detections
    pred = tmp_path / "pred"
    shutil.copy(shapes / "val/000000.png", tmp_path / "extra.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert main(["detect", "predict", str(out / "last.pth"), str(shapes / "val"), str(tmp_path / "extra.png"),
                 str(tmp_path / "broken.png"), "--out", str(pred), "--score-threshold", "0", "--device", "cpu"]) == 0
    records = json.loads((pred / "detections.json").read_text())
    assert len(records) == 6 and "error" in records[-1]
    for rec in records[:-1]:
        png = _read_png(rec["output"])
        assert png.shape == (96, 96, 3)
        assert rec["detections"], rec["image"]
        d = rec["detections"][0]
        assert d["label"] in ("circle", "square", "triangle") and len(d["box_xyxy"]) == 4
        assert d["mask_rle"]["size"] == [96, 96]
    # drawing changed the pixels of the first image
    assert not torch.equal(_read_png(records[0]["output"]), _read_png(shapes / "val/000000.png"))


def test_an_image_that_fails_to_load_stops_with_a_checkpoint_or_is_skipped(shapes, tmp_path, capsys):
    data = tmp_path / "shapes"
    shutil.copytree(shapes, data)
    ds = CocoInstances(*find_split(data, "train"), train=True)
    chosen = ds.ids[TrainSampler(len(ds), 2, seed=0).indices()[2]]  # in the second batch of the first epoch
    image = data / "train" / ds.coco.imgs[chosen]["file_name"]
    ann = data / "annotations" / "instances_train.json"
    coco = json.loads(ann.read_text())
    for a in coco["annotations"]:
        if a["image_id"] == chosen:
            a["segmentation"] = {"counts": 5, "size": [96, 96]}  # not a mask pycocotools can decode
    ann.write_text(json.dumps(coco))
    out = tmp_path / "run"
    assert _train(out, data) == 1
    err = capsys.readouterr().err
    assert f"cannot load image '{image}': CocoInstances._mask (in " in err and "raised TypeError" in err
    assert "the run was saved after step 1" in err and "--skip-bad-images" in err and "Traceback" not in err
    assert torch.load(out / "last.pth", weights_only=True)["step"] == 1
    assert main(["detect", "train", "--resume", str(out / "last.pth"), "--skip-bad-images", "--max-steps", "3"]) == 0
    captured = capsys.readouterr()
    assert f"skipped: cannot load image '{image}'" in captured.err
    assert re.search(rf"training: [12] images? skipped: {re.escape(str(image))}\n", captured.out)
    assert torch.load(out / "last.pth", weights_only=True)["step"] == 3


def test_cli_errors_are_clear(tmp_path, capsys):
    assert main(["detect", "train", "--data", str(tmp_path), "--out", str(tmp_path / "o")]) == 1
    assert "no COCO 'train' split" in capsys.readouterr().err
    assert main(["detect", "train", "--data", "shapes", "--backbone-kwargs", "{bad", "--out", str(tmp_path)]) == 1
    assert "JSON object" in capsys.readouterr().err
    torch.save({"model": {"w": torch.zeros(1)}}, tmp_path / "other.pth")
    assert main(["detect", "eval", str(tmp_path / "other.pth"), "--device", "cpu"]) == 1
    assert "not a checkpoint written by 'rmt detect train'" in capsys.readouterr().err


def test_torchrun_two_processes_train_and_evaluate(shapes, tmp_path):
    """DDP on CPU (gloo): two ranks train three steps at batch 1, evaluate sharded, rank 0 writes one
    checkpoint; the ranks end with equal weights, and (frozen BatchNorm, RetinaNet's per-image
    normalised losses) the loss curve is one process's at batch 2 up to float rounding."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun not installed next to the interpreter")
    cmd = [str(torchrun), "--nproc_per_node", "2", "--master_port", "29517", "-m", "rmt", "detect", "train",
           "--train-images", str(shapes / "train"), "--train-ann", str(shapes / "annotations/instances_train.json"),
           "--val-images", str(shapes / "val"), "--val-ann", str(shapes / "annotations/instances_val.json"),
           "--out", str(tmp_path / "ddp"), "--epochs", "1", "--batch-size", "1", "--eval-every", "0",
           "--detector", "retinanet", "--bn", "frozen", "--log-every", "1", *TINY_CLI]
    env = {"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent), "PYTHONPATH": ":".join(sys.path)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = torch.load(tmp_path / "ddp/last.pth", weights_only=True)
    assert state["step"] == 3 and len(state["rng"]) == 2  # 6 images / (1 x 2 ranks)
    assert state["metrics"]["num_images"] == 4  # every val image evaluated once across the ranks
    records = [json.loads(line) for line in (tmp_path / "ddp/log.jsonl").read_text().splitlines()]
    ranks = [r for r in records if r.get("event") == "ranks"]
    assert len(ranks) == 1 and ranks[0]["step"] == 3 and ranks[0]["rank_max_param_diff"] == 0.0
    one = tmp_path / "one"  # one process, the same 3 global batches of 2
    assert main(cmd[cmd.index("train") - 1:] + ["--out", str(one), "--batch-size", "2"]) == 0
    curves = [[r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "loss" in r]
              for out in (tmp_path / "ddp", one)]
    assert len(curves[0]) == len(curves[1]) == 3
    np.testing.assert_allclose(curves[0], curves[1], rtol=1e-4)
    assert curves[0][0] != curves[0][2]  # the weights moved


def _benchmark_module():
    import importlib.util
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "detection.py"
    spec = importlib.util.spec_from_file_location("detection_benchmark", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_skips_without_cuda_and_runs_on_cpu(tmp_path, monkeypatch, capsys):
    bench = _benchmark_module()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.main(["--json", str(tmp_path / "gpu.json")]) == 0
    assert "skipped: no CUDA" in capsys.readouterr().out and not (tmp_path / "gpu.json").exists()
    assert bench.main(["--smoke", "--models", "rmt_tiny", "resnet50", "--json", str(tmp_path / "cpu.json")]) == 0
    rows = json.loads((tmp_path / "cpu.json").read_text())["results"]
    assert [(r["model"], r["detector"]) for r in rows] == [
        ("rmt_tiny", "mask_rcnn"), ("resnet50", "mask_rcnn"), ("rmt_tiny", "cascade_mask_rcnn"),
        ("resnet50", "cascade_mask_rcnn")]
    for row in rows:
        assert row["size"] == "128x96" and row["batch"] == 2 and row["precision"] == "fp32"
        assert row["train_img_s"] > 0 and row["infer_img_s"] > 0 and row["train_s_step"] > 0
    assert rows[0]["attn_forms"] == "TTTF" and rows[1]["attn_forms"] == "-"
    assert rows[1]["backbone_params_m"] > 20  # ResNet-50 under the same FPN
    out = capsys.readouterr().out
    assert "| rmt_tiny | cascade_mask_rcnn | 128x96 |" in out and "| resnet50 | mask_rcnn | 128x96 |" in out
