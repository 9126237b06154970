"""Whole released detectors: mmdetection 2.x layout <-> our torchvision detectors."""
import json

import pytest
import torch

from rmt.checkpoint import CheckpointError
from rmt.cli import main
from rmt.detection.engine import load_detector
from rmt.detection.models import build_detector, lower_score_threshold
from rmt.detection.released import detector_to_released, inspect_released
from rmt.detection.shapes import write_shapes_dataset

from test_checkpoint import _randomize
from conftest import DATA

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # pycocotools

TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8), drop_path_rate=0.0)
TINY_JSON = json.dumps({k: list(v) if isinstance(v, tuple) else v for k, v in TINY.items()})
NARROW = dict(fpn_channels=32, mask_head_channels=16, box_head_size=32)
FAMILIES = ("mask_rcnn", "cascade_mask_rcnn", "retinanet")
CONFIG_TEXT = "model = dict(backbone=dict(type='RMT', chunkwise_recurrents=[True, True, {}, False]))"


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _released_file(path, model, detector, forms="TTTF", classes=("circle", "square", "triangle"), edit=None):
    sd = detector_to_released(model, detector)
    if edit:
        edit(sd)
    meta = dict(CLASSES=list(classes), epoch=12, config=CONFIG_TEXT.format(forms[2] == "T"))
    torch.save({"meta": meta, "state_dict": sd}, path)
    return path


def _key_list(detector):
    rows = [line.split() for line in (DATA / "mmdet_keys" / f"{detector}.txt").read_text().splitlines()
            if line and not line.startswith("#")]
    return {k: tuple(int(v) for v in shape.split(",")) if shape else () for k, *rest in rows
            for shape in [rest[0] if rest else ""]}


@pytest.mark.parametrize("detector", FAMILIES)
def test_released_layout_covers_the_config_key_lists(detector):
    """Every non-backbone tensor of the released config, with its shape, and nothing else."""
    model = build_detector(detector, "rmt_tiny", 80, backbone_kwargs=dict(depths=(1, 1, 1, 1)))
    released = detector_to_released(model, detector)
    heads = {k: tuple(v.shape) for k, v in released.items() if not k.startswith("backbone.")}
    want = _key_list(detector)
    assert set(heads) == set(want), (sorted(set(heads) - set(want))[:5], sorted(set(want) - set(heads))[:5])
    assert heads == want
    assert {f"backbone.extra_norms.{i}.weight" for i in range(4)} <= set(released)
    assert "backbone.layers.0.Relpos.decay" in released


@pytest.mark.parametrize("detector", FAMILIES)
def test_released_round_trip_gives_identical_detections(detector, tmp_path, capsys):
    torch.manual_seed(0)
    forms = "TTFF" if detector == "retinanet" else "TTTF"  # read back from the config text
    source = _randomize(build_detector(detector, "rmt_tiny", 3, min_size=96, max_size=128, attn_forms=forms,
                                       backbone_kwargs=TINY, **NARROW)).eval()
    path = _released_file(tmp_path / f"{detector}.pth", source, detector, forms)
    info = inspect_released(torch.load(path, weights_only=True))
    assert (info.detector, info.num_classes, info.attn_forms, info.variant) == (detector, 3, forms, None)
    loaded, meta = load_detector(path, min_size=96, max_size=128, model_name="rmt_tiny", backbone_kwargs=TINY)
    assert "Relpos buffers recomputed" in capsys.readouterr().out
    assert meta["classes"] == ["circle", "square", "triangle"] and meta["cat_ids"] == [1, 2, 3]
    assert meta["config"].attn_forms == forms and loaded.backbone.rmt.attention_forms[2] == source.backbone.rmt.attention_forms[2]
    for model in (source, loaded):
        lower_score_threshold(model, 0.0)
    images = [torch.rand(3, 96, 128), torch.rand(3, 70, 100)]
    with torch.no_grad():
        want, got = source(images), loaded(images)
    for w, g in zip(want, got):
        assert len(w["boxes"]) > 0 and set(w) == set(g)
        for key in w:
            assert torch.equal(w[key], g[key]), key
    # and back: the converted model exports the same released tensors
    again = detector_to_released(loaded, detector)
    original = torch.load(path, weights_only=True)["state_dict"]
    assert set(again) == set(original) and all(torch.equal(again[k], original[k]) for k in original)


def test_released_files_of_another_kind_fail_with_both_named(tmp_path, capsys):
    model = build_detector("cascade_mask_rcnn", "rmt_tiny", 3, backbone_kwargs=TINY, **NARROW)
    good = _released_file(tmp_path / "cascade.pth", model, "cascade_mask_rcnn")
    with pytest.raises(CheckpointError, match="holds a Cascade Mask R-CNN with an RMT of widths \\[16, 32, 64, 128\\].*"
                                              "not a Mask R-CNN"):
        load_detector(good, detector="mask_rcnn", model_name="rmt_tiny", backbone_kwargs=TINY)
    with pytest.raises(CheckpointError, match="holds a Cascade Mask R-CNN .* but the model is rmt_tiny \\(widths "
                                              "\\[64, 128, 256, 512\\]"):
        load_detector(good, model_name="rmt_tiny")
    with pytest.raises(CheckpointError, match="no registered variant: name it with --model"):
        load_detector(good)

    def extra_head(sd):
        sd["roi_head.bbox_head.0.fc_iou.weight"] = torch.zeros(1, 32)
    with pytest.raises(CheckpointError, match="1 head tensors .* no place.*fc_iou"):
        load_detector(_released_file(tmp_path / "x.pth", model, "cascade_mask_rcnn", edit=extra_head),
                      model_name="rmt_tiny", backbone_kwargs=TINY)

    def missing_head(sd):
        del sd["roi_head.mask_head.2.upsample.bias"]
    with pytest.raises(CheckpointError, match="missing \\['roi_heads.mask_heads.2.predictor.conv5_mask.bias'\\]"):
        load_detector(_released_file(tmp_path / "m.pth", model, "cascade_mask_rcnn", edit=missing_head),
                      model_name="rmt_tiny", backbone_kwargs=TINY)

    def no_masks(sd):
        for k in [k for k in sd if k.startswith("roi_head.mask_head.")]:
            del sd[k]
    with pytest.raises(CheckpointError, match="without mask heads"):
        load_detector(_released_file(tmp_path / "f.pth", model, "cascade_mask_rcnn", edit=no_masks))

    def stray(sd):
        sd["ema_step"] = torch.zeros(())
    load_detector(_released_file(tmp_path / "s.pth", model, "cascade_mask_rcnn", edit=stray),
                  model_name="rmt_tiny", backbone_kwargs=TINY)
    assert "not used: ['ema_step']" in capsys.readouterr().out


def test_released_detector_evaluates_and_predicts_from_the_cli(tmp_path, capsys):
    root = write_shapes_dataset(tmp_path / "shapes", num_train=1, num_val=3, image_size=96, seed=0)
    model = _randomize(build_detector("mask_rcnn", "rmt_tiny", 3, backbone_kwargs=TINY, **NARROW))
    path = _released_file(tmp_path / "mask_rcnn_released.pth", model, "mask_rcnn")
    common = ["--model", "rmt_tiny", "--backbone-kwargs", TINY_JSON, "--device", "cpu", "--min-size", "96",
              "--max-size", "96"]
    assert main(["detect", "eval", str(path), "--data", str(root), "--workers", "0", "--json",
                 str(tmp_path / "m.json"), *common]) == 0
    out = capsys.readouterr().out
    assert "mask_rcnn rmt_tiny (epoch 12, released) on 3 images" in out and "box " in out and "mask" in out
    assert json.loads((tmp_path / "m.json").read_text())["num_images"] == 3
    assert main(["detect", "predict", str(path), str(root / "val"), "--out", str(tmp_path / "pred"),
                 "--score-threshold", "0", *common]) == 0
    records = json.loads((tmp_path / "pred" / "detections.json").read_text())
    assert len(records) == 3 and records[0]["detections"][0]["label"] in ("circle", "square", "triangle")
    assert main(["detect", "eval", str(path), "--data", str(root), "--detector", "retinanet", *common]) == 1
    assert "holds a Mask R-CNN" in capsys.readouterr().err


def test_class_order_moves_background_first_and_fills_background_slots(tmp_path):
    """mmdetection 2.x: classifier rows (class 0 .. K-1, background), regressors / mask logits /
    RetinaNet logits per class without background; ours: background (label 0) first."""
    K = 3
    for detector in FAMILIES:
        model = _randomize(build_detector(detector, "rmt_tiny", K, backbone_kwargs=TINY, **NARROW))
        path = _released_file(tmp_path / f"{detector}.pth", model, detector)
        sd = torch.load(path, weights_only=True)["state_dict"]
        loaded, _ = load_detector(path, model_name="rmt_tiny", backbone_kwargs=TINY)
        if detector == "retinanet":
            theirs = sd["bbox_head.retina_cls.bias"].reshape(9, K)
            ours = loaded.head.classification_head.cls_logits.bias.reshape(9, K + 1)
            assert torch.equal(ours[:, 1:], theirs)
            assert torch.allclose(ours[:, 0], torch.tensor(-4.59512))  # prior 0.01 for the unused label 0
            continue
        prefix, heads = ("roi_head.bbox_head.", loaded.roi_heads.box_predictor) if detector == "mask_rcnn" else \
            ("roi_head.bbox_head.2.", loaded.roi_heads.box_heads[2])
        cls, reg = sd[prefix + "fc_cls.bias"], sd[prefix + "fc_reg.weight"]
        assert torch.equal(heads.cls_score.bias, torch.cat([cls[K:], cls[:K]]))
        assert (heads.bbox_pred.weight[:4] == 0).all() and torch.equal(heads.bbox_pred.weight[4:], reg)
        mask_key = "roi_head.mask_head.conv_logits.bias" if detector == "mask_rcnn" else "roi_head.mask_head.1.conv_logits.bias"
        logits = (loaded.roi_heads.mask_predictor if detector == "mask_rcnn" else loaded.roi_heads.mask_heads[1].predictor)
        assert logits.mask_fcn_logits.bias[0] == 0 and torch.equal(logits.mask_fcn_logits.bias[1:], sd[mask_key])
