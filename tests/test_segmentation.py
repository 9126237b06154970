"""Semantic segmentation: smp heads on RMT, checkpoints, data, metrics, inference, training, CLI."""
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import segmentation_models_pytorch as smp
import timm
import torch
from PIL import Image

import rmt
from rmt.checkpoint import CheckpointError, ours_to_released
from rmt.cli import main
from rmt.engine.metrics_log import read_jsonl
from rmt.segmentation.data import (IGNORE_INDEX, ADE20K_CLASSES, SegmentationFolder, TrainTransform,
                                   read_class_names, reduce_zero_label, rescale_size)
from rmt.segmentation.engine import TrainConfig, resolve_config, train
from rmt.segmentation.evaluation import load_trained
from rmt.segmentation.inference import predict_probs, slide_logits, window_starts
from rmt.segmentation.metrics import confusion_matrix, scores
from rmt.segmentation.models import build_segmenter
from rmt.segmentation.synthetic import SYNTHETIC_CLASSES, make_sample, make_synthetic_dataset

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8))


pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", [smp.FPN, smp.UPerNet])
def test_smp_timm_universal_encoder_takes_rmt_unchanged(arch):
    net = arch(encoder_name="tu-rmt_tiny", encoder_weights=None, classes=3, **TINY).eval()
    assert net.encoder.out_channels == [3, 0, 16, 32, 64, 128]  # stride-4 start: "transformer style"
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        assert net(x).shape == (2, 3, 64, 96)
        feats = net.encoder(x)[2:]
        # the same features as timm's features_only model (per-stage LayerNorms included)
        ref = timm.create_model("rmt_tiny", features_only=True, **TINY).eval()
        ref.load_state_dict(net.encoder.model.state_dict())
        assert "model.feature_norms.0.weight" in net.encoder.model.state_dict()
        for a, b in zip(feats, ref(x)):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [f.shape[-2:] for f in feats] == [(16, 24), (8, 12), (4, 6), (2, 3)]


@pytest.mark.parametrize("head", ["fpn", "upernet"])
@pytest.mark.parametrize("variant,decoder", [(v, "mmseg") for v in rmt.VARIANTS] + [("rmt_small", "smp")])
def test_heads_build_for_every_variant(variant, head, decoder):
    model = build_segmenter(variant, head, 150, decoder=decoder, device="meta").eval()
    assert model.backbone.feature_norms is not None
    assert (model.aux_head is not None) == (head == "upernet")
    if head == "upernet" and decoder == "smp":  # the backbone's per-stage LayerNorms replace smp's own
        assert all(isinstance(n, torch.nn.Identity) for n in model.net.decoder.feature_norms)
    x = torch.empty(1, 3, 80, 112, device="meta")  # not a multiple of 32
    logits, aux = model(x, return_aux=True)
    assert logits.shape == (1, 150, 80, 112)
    assert aux is None if head == "fpn" else aux.shape == (1, 150, 80, 112)


@pytest.mark.parametrize("decoder", ["mmseg", "smp"])
def test_segmenter_takes_any_size_and_keeps_batch_independence(decoder):
    model = build_segmenter("rmt_tiny", "upernet", 4, decoder=decoder, backbone_kwargs=TINY).eval()
    x = torch.randn(2, 3, 50, 70)
    with torch.no_grad():
        out = model(x)
        assert out.shape == (2, 4, 50, 70)
        torch.testing.assert_close(model(x[1:]), out[1:], rtol=1e-4, atol=1e-5)


def _released_classification(tmp_path):
    src = timm.create_model("rmt_tiny", num_classes=10, **TINY)
    path = tmp_path / "released_cls.pth"
    torch.save({"model": ours_to_released(src.state_dict(), src)}, path)
    return src, path


def test_backbone_loads_released_classification_checkpoint(tmp_path):
    src, path = _released_classification(tmp_path)
    model = build_segmenter("rmt_tiny", "fpn", 5, backbone_kwargs=TINY, pretrained=str(path))
    got = model.backbone.state_dict()
    for k, v in src.state_dict().items():
        if not k.startswith("head."):
            assert torch.equal(got[k], v), k
    assert torch.equal(got["feature_norms.2.weight"], torch.ones(64))  # fresh: not in the file
    # the same file through smp's own pretrained path (timm's pretrained_cfg_overlay)
    net = smp.FPN(encoder_name="tu-rmt_tiny", encoder_weights=True, classes=5,
                  pretrained_cfg_overlay=dict(file=str(path)), **TINY)
    assert torch.equal(net.encoder.model.model.stages[2].blocks[0].attn.qkv.weight,
                       src.stages[2].blocks[0].attn.qkv.weight)


def test_backbone_loads_released_mmseg_checkpoint(tmp_path, capsys):
    src = timm.create_model("rmt_tiny", feature_norms=True, num_classes=0, **TINY)
    with torch.no_grad():
        for norm in src.feature_norms:
            norm.weight.normal_(), norm.bias.normal_()
    sd = {k: v for k, v in src.state_dict().items() if not k.startswith("head.")}
    released = ours_to_released(sd, src)
    assert any(k.startswith("extra_norms.") for k in released)
    ckpt = {"meta": {"iter": 160000}, "state_dict": {
        **{f"backbone.{k}": v for k, v in released.items()},
        "decode_head.conv_seg.weight": torch.randn(150, 512, 1, 1),
        "auxiliary_head.conv_seg.weight": torch.randn(150, 256, 1, 1)}}
    path = tmp_path / "upernet_released.pth"
    torch.save(ckpt, path)
    model = build_segmenter("rmt_tiny", "upernet", 150, backbone_kwargs=TINY, pretrained=str(path))
    got = model.backbone.state_dict()
    for k, v in sd.items():
        assert torch.equal(got[k], v), k
    assert "other 2 tensors (decoder and heads) are not used" in capsys.readouterr().out
    # a checkpoint of another architecture says so
    with pytest.raises(CheckpointError, match="depths"):
        build_segmenter("rmt_tiny", "fpn", 5, backbone_kwargs=dict(TINY, depths=(1, 1, 2, 1)),
                        pretrained=str(path))


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def test_ade20k_class_list_and_label_conventions():
    assert len(ADE20K_CLASSES) == 150 and len(set(ADE20K_CLASSES)) == 150
    assert read_class_names("ade20k") == ADE20K_CLASSES
    label = torch.tensor([[0, 1, 2], [150, 255, 7]])
    assert reduce_zero_label(label).tolist() == [[255, 0, 1], [149, 255, 6]]
    assert rescale_size(480, 640, (2048, 512)) == (512, 683)      # short side binds
    assert rescale_size(100, 1000, (2048, 512)) == (205, 2048)    # long side binds


def test_synthetic_dataset_is_deterministic_and_in_ade20k_layout(tmp_path):
    a, b = make_sample(np.random.default_rng(3), (64, 80)), make_sample(np.random.default_rng(3), (64, 80))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    root = make_synthetic_dataset(tmp_path / "syn", num_train=4, num_val=2, size=(64, 80))
    ds = SegmentationFolder(root, "training", reduce_zero_label=True)
    assert len(ds) == 4 and len(SegmentationFolder(root, "validation")) == 2
    image, label = ds[0]
    assert image.shape == (3, 64, 80) and image.dtype == torch.uint8 and label.shape == (64, 80)
    values = set(label.unique().tolist())
    assert values <= set(range(len(SYNTHETIC_CLASSES))) | {IGNORE_INDEX} and 0 in values
    raw = np.array(Image.open(ds.labels[0]))
    assert (raw == 0).any() and (label[torch.from_numpy(raw == 0)] == IGNORE_INDEX).all()  # rims ignored


def test_dataset_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="images/training"):
        SegmentationFolder(tmp_path, "training")
    root = make_synthetic_dataset(tmp_path / "syn", num_train=3, num_val=1, size=(64, 80))
    next((root / "annotations" / "training").iterdir()).unlink()
    with pytest.raises(FileNotFoundError, match="1 of 3 images .* no label map"):
        SegmentationFolder(root, "training")


def test_train_transform_crops_pads_and_is_seeded(tmp_path):
    root = make_synthetic_dataset(tmp_path / "syn", num_train=2, num_val=1, size=(64, 80))
    ds = SegmentationFolder(root, "training", TrainTransform(crop_size=(96, 96), scale=(160, 64)), True)
    image, label = ds[(0, 123)]
    assert image.shape == (3, 96, 96) and image.dtype == torch.float32 and label.shape == (96, 96)
    image2, label2 = ds[(0, 123)]
    assert torch.equal(image, image2) and torch.equal(label, label2)
    # images smaller than the crop (scale 64 x ratio <= 2 < 96 on the short side) are padded with 255
    assert (label[-1] == IGNORE_INDEX).all()
    assert set(label.unique().tolist()) <= set(range(6)) | {IGNORE_INDEX}


# ------------------------------------------------------------------------------------------------
# metrics and inference
# ------------------------------------------------------------------------------------------------

def test_miou_equals_hand_computed_value():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 0, 2]])
    cm = confusion_matrix(pred, target, 4)
    # class 0: tp 1, labels 2, predicted 2 -> 1/3; class 1: tp 2, 3, 3 -> 2/4; class 2: tp 1, 2, 2 -> 1/3
    # class 3 occurs nowhere: NaN, left out of the mean
    r = scores(cm)
    assert r["mIoU"] == pytest.approx(100 * (1 / 3 + 1 / 2 + 1 / 3) / 3, abs=1e-3)
    assert r["aAcc"] == pytest.approx(100 * 4 / 7, abs=1e-3)
    assert r["mAcc"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 2) / 3, abs=1e-3)
    assert [c["pixels"] for c in r["per_class"]] == [2, 3, 2, 0] and math.isnan(r["per_class"][3]["IoU"])


def test_window_starts_cover_the_image():
    assert window_starts(128, 64, 64) == [0, 64]
    assert window_starts(70, 32, 20) == [0, 20, 38]
    assert window_starts(20, 32, 20) == [0]


def test_sliding_window_averages_overlaps_exactly():
    torch.manual_seed(0)
    pointwise = torch.nn.Conv2d(3, 5, 1)  # per-pixel model: every window gives the same logits
    x = torch.randn(2, 3, 70, 90)
    with torch.no_grad():
        torch.testing.assert_close(slide_logits(pointwise, x, 5, crop=(32, 48), stride=(20, 30)), pointwise(x))
        probs = predict_probs(pointwise, x, 5, scale=None, flip=True, mode="slide", crop=(32, 48), stride=(20, 30))
        torch.testing.assert_close(probs, pointwise(x).softmax(1))


def test_sliding_window_equals_whole_image_when_windows_cover_it_exactly():
    model = build_segmenter("rmt_tiny", "fpn", 4, backbone_kwargs=TINY).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        whole = model(x)
        torch.testing.assert_close(slide_logits(model, x, 4, crop=(64, 96), stride=(64, 96)), whole)
        torch.testing.assert_close(slide_logits(model, x, 4, crop=(512, 512), stride=(341, 341)), whole)
        ms = predict_probs(model, x, 4, scale=(96, 64), ratios=(0.75, 1.0, 1.5), flip=True)
    assert ms.shape == (1, 4, 64, 96)
    torch.testing.assert_close(ms.sum(1), torch.ones(1, 64, 96))


# ------------------------------------------------------------------------------------------------
# training, resume, eval and predict (one small run shared by the tests below)
# ------------------------------------------------------------------------------------------------

def _config(data, out, **kw):
    base = dict(data=str(data), out=str(out), model="rmt_tiny", head="fpn", iterations=10, batch_size=4,
                lr=1e-3, crop_size=(64, 64), backbone_kwargs=dict(TINY), workers=0, log_interval=1,
                device="cpu", checkpoint_interval=100)
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("seg")
    data = make_synthetic_dataset(tmp / "data", num_train=16, num_val=3, size=(64, 80))
    out = tmp / "run"
    result = train(_config(data, out))
    return data, out, result


def test_training_lowers_the_loss_and_writes_its_outputs(trained):
    data, out, result = trained
    losses = [r["train_loss"] for r in read_jsonl(out / "log.jsonl") if "train_loss" in r]
    assert len(losses) == 10
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    for name in ("last.pt", "best.safetensors", "model.safetensors", "curves.png", "per_class_iou.png",
                 "metrics.txt"):
        assert (out / name).is_file(), name
    assert 0 <= result["mIoU"] <= 100 and result["images"] == 3


def test_resume_continues_exactly(trained, tmp_path):
    data, out, _ = trained
    part = tmp_path / "part"
    train(_config(data, part, stop_after=4))
    with pytest.raises(RuntimeError, match="--resume"):
        train(_config(data, part))
    train(_config(data, part, resume="auto"))
    straight = load_trained(out / "model.safetensors")[0].state_dict()
    resumed = load_trained(part / "model.safetensors")[0].state_dict()
    for k, v in straight.items():
        assert torch.equal(v, resumed[k]), k
    a = [r["train_loss"] for r in read_jsonl(out / "log.jsonl") if "train_loss" in r]
    b = [r["train_loss"] for r in read_jsonl(part / "log.jsonl") if "train_loss" in r]
    assert a == b


def test_resume_keeps_the_saved_settings_and_refuses_changed_ones(trained):
    """``rmt segment train --out OUT --resume`` (every other option at its default) continues with the
    saved settings, runtime ones included unless given; a changed training setting is refused."""
    data, out, _ = trained
    cfg, ckpt = resolve_config(TrainConfig(data="", out=str(out), resume="auto"))
    assert ckpt is not None and cfg.data == str(data)
    assert (cfg.model, cfg.head, cfg.iterations, cfg.crop_size, cfg.backbone_kwargs) == (
        "rmt_tiny", "fpn", 10, (64, 64), dict(TINY))
    assert (cfg.log_interval, cfg.workers, cfg.device, cfg.stop_after) == (1, 0, "cpu", None)
    again, _ = resolve_config(TrainConfig(data="", out=str(out), resume="auto", workers=2, stop_after=3))
    assert (again.workers, again.stop_after, again.log_interval) == (2, 3, 1)
    with pytest.raises(ValueError, match=r"--iters 20 \(the run has 10\), --lr 0.5 \(the run has 0.001\) "
                                         r"was given: drop those options"):
        resolve_config(TrainConfig(data="", out=str(out), resume="auto", iterations=20, lr=0.5))


def test_a_pair_that_fails_to_load_stops_with_a_checkpoint_or_is_skipped(tmp_path, capsys):
    from rmt.bad_images import BadImageError
    from rmt.segmentation.engine import TrainSampler
    data = make_synthetic_dataset(tmp_path / "data", num_train=8, num_val=1, size=(64, 80))
    train_set = SegmentationFolder(data, "training")
    sampler = iter(TrainSampler(len(train_set), 4, 0, 1, seed=0))
    chosen = [next(sampler)[0] for _ in range(8)][5]  # in the second batch
    image = train_set.images[chosen]
    Image.fromarray(np.zeros((32, 40), np.uint8)).save(train_set.labels[chosen])  # a label map of another size
    out = tmp_path / "run"
    with pytest.raises(BadImageError, match=rf"cannot load image '{image}': SegmentationFolder.load raised "
                                            r"ValueError: .* but its label map is \(32, 40\). Training stopped; "
                                            r"the run was saved at iteration 1 .*--skip-bad-images"):
        train(_config(data, out))
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 1
    capsys.readouterr()
    train(_config(data, out, resume="auto", skip_bad_images=True, stop_after=2))
    captured = capsys.readouterr()
    assert f"skipped: cannot load image '{image}'" in captured.err
    assert re.search(rf"training: [12] images? skipped: {re.escape(str(image))}\n", captured.out)
    assert torch.load(out / "last.pt", weights_only=True)["iteration"] == 3
    assert [r["step"] for r in read_jsonl(out / "log.jsonl") if "train_loss" in r] == [1, 2, 3]


def test_eval_command_reproduces_training_evaluation(trained, tmp_path, capsys):
    data, out, result = trained
    assert main(["segment", "eval", str(out / "model.safetensors"), "--data", str(data),
                 "--out", str(tmp_path), "--device", "cpu", "--workers", "0"]) == 0
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["mIoU"] == pytest.approx(result["mIoU"], abs=1e-9)
    assert [c["class"] for c in metrics["per_class"]] == list(SYNTHETIC_CLASSES)
    assert (tmp_path / "per_class_iou.png").stat().st_size > 1000
    assert "mIoU" in capsys.readouterr().out
    # multi-scale + flip runs through the same command
    assert main(["segment", "eval", str(out / "last.pt"), "--data", str(data), "--device", "cpu",
                 "--workers", "0", "--ratios", "0.75,1.25", "--flip", "--mode", "slide"]) == 0


def test_predict_writes_overlays_and_label_maps(trained, tmp_path):
    data, out, _ = trained
    images = sorted((data / "images" / "validation").iterdir())
    assert main(["segment", "predict", str(out / "best.safetensors"), str(images[0]),
                 str(data / "images" / "validation"), "--out", str(tmp_path), "--device", "cpu"]) == 0
    for image in images:
        overlay = Image.open(tmp_path / f"{image.stem}_overlay.png")
        mask = np.array(Image.open(tmp_path / f"{image.stem}_mask.png"))
        assert overlay.mode == "RGB" and overlay.width == 80 and overlay.height >= 64  # legend below
        assert mask.shape == (64, 80) and 1 <= mask.min() and mask.max() <= len(SYNTHETIC_CLASSES)


def test_cli_errors_are_short_and_clear(tmp_path, capsys):
    assert main(["segment", "train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["segment", "eval", str(tmp_path / "nothing.pt"), "--data", str(tmp_path)]) == 1
    assert "does not exist" in capsys.readouterr().err
    # labels beyond the class list: the fix is named
    bad = tmp_path / "data2"
    make_synthetic_dataset(bad, num_train=4, num_val=1, size=(64, 80))
    assert main(["segment", "train", "--data", str(bad), "--out", str(tmp_path / "o3"), "--model", "rmt_tiny",
                 "--head", "fpn", "--no-reduce-zero-label", "--classes", str(_two_classes(tmp_path)),
                 "--iters", "1", "--batch-size", "2", "--crop-size", "64", "--workers", "0",
                 "--device", "cpu", "--backbone-kwargs", json.dumps(TINY)]) == 1
    err = capsys.readouterr().err
    assert "outside 0..1" in err and "--reduce-zero-label" in err


def _two_classes(tmp_path):
    path = tmp_path / "classes.txt"
    path.write_text("background\nshape\n")
    return path


# ------------------------------------------------------------------------------------------------
# benchmark script
# ------------------------------------------------------------------------------------------------

def test_benchmark_skips_without_cuda_and_runs_on_cpu(tmp_path):
    script = ROOT / "benchmarks" / "segmentation.py"
    if not torch.cuda.is_available():
        done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
        assert done.returncode == 0 and "skipped" in done.stdout
    sys.path.insert(0, str(script.parent))
    try:
        import segmentation as bench
    finally:
        sys.path.pop(0)
    out = tmp_path / "bench.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert [r["backbone"] for r in rows] == ["rmt_small", "convnext_tiny", "resnet50"]
    assert all(r["head"] == "upernet" and r["train_img_s"] > 0 and r["infer_img_s"] > 0 for r in rows)
    # the same decoder on every backbone: only its input widths differ
    assert rows[1]["params_m"] - rows[1]["backbone_m"] < rows[2]["params_m"] - rows[2]["backbone_m"]
