"""mmsegmentation-layout heads and released segmentors: shapes, numerics against smp / torchvision,
the released key layout, whole-checkpoint round trips, test settings from the config, errors."""
import json
import re
from pathlib import Path

import pytest
import segmentation_models_pytorch as smp
import torch
import torch.nn.functional as F
from torchvision.ops import FeaturePyramidNetwork

from rmt.checkpoint import CheckpointError, save_safetensors
from rmt.cli import main
from rmt.segmentation.data import SegmentationFolder, normalize
from rmt.segmentation.evaluation import load_trained, save_weights
from rmt.segmentation.heads import FCNHead, FPNHead, FPNNeck, UPerHead
from rmt.segmentation.metrics import confusion_matrix, scores
from rmt.segmentation.models import EncoderDecoder, build_segmenter
from rmt.segmentation.released import config_test_settings, parse_config_text, segmentor_to_released
from rmt.segmentation.synthetic import SYNTHETIC_CLASSES, make_synthetic_dataset

DATA = Path(__file__).parent / "data"
TINY = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8))
# small decoder widths: the released layout at a fraction of the compute
SMALL_HEADS = {"upernet": dict(decode=32, aux=16), "fpn": dict(neck=24, decode=16)}


pytestmark = pytest.mark.usefixtures("one_thread")


def _features(channels, size, batch=2):
    """Random backbone features at strides 4..32 of an image ``size``, with ceil division as RMT's."""
    h, w = size
    return [torch.randn(batch, c, -(-h // s), -(-w // s)) for c, s in zip(channels, (4, 8, 16, 32))]


def _randomize(module: torch.nn.Module) -> None:
    """Non-trivial weights and BatchNorm statistics, so comparisons cannot pass on initial values."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


# ------------------------------------------------------------------------------------------------
# heads: shapes and numerics
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(96, 160), (70, 45)])
def test_head_output_shapes_at_non_square_sizes(size):
    channels = (16, 32, 64, 128)
    feats = _features(channels, size)
    stride4, stride16 = feats[0].shape[-2:], feats[2].shape[-2:]
    with torch.no_grad():
        assert UPerHead(channels, 5, 32).eval()(feats).shape == (2, 5, *stride4)
        assert FCNHead(channels[2], 5, 16).eval()(feats).shape == (2, 5, *stride16)
        pyramid = FPNNeck(channels, 24).eval()(feats)
        assert [p.shape for p in pyramid] == [(2, 24, *f.shape[-2:]) for f in feats]
        # FPNHead upsamples 2x per block: odd sizes end one pixel off and are resized to stride 4
        assert FPNHead([24] * 4, 5, 16).eval()(pyramid).shape == (2, 5, *stride4)
    for head in ("upernet", "fpn"):
        model = build_segmenter("rmt_tiny", head, 5, backbone_kwargs=TINY, head_channels=SMALL_HEADS[head]).eval()
        with torch.no_grad():
            logits, aux = model(torch.randn(1, 3, *size), return_aux=True)
        assert logits.shape == (1, 5, *size)
        assert aux is None if head == "fpn" else aux.shape == (1, 5, *size)


def test_uperhead_equals_smp_upernet_decoder():
    """smp's UPerNet decoder is the same computation: with our weights it gives our features."""
    channels, width = (16, 32, 64, 128), 32
    ours = UPerHead(channels, 5, width).eval()
    _randomize(ours)
    theirs = smp.decoders.upernet.decoder.UPerNetDecoder([3, 0, *channels], decoder_channels=width).eval()
    theirs.feature_norms = torch.nn.ModuleList(torch.nn.Identity() for _ in channels)

    def copy(dst, src):  # smp's Conv2dReLU is Sequential(conv, bn, relu)
        dst[0].weight.data.copy_(src.conv.weight)
        dst[1].load_state_dict(src.bn.state_dict())
    for i in range(4):
        copy(theirs.psp.blocks[i][1], ours.psp_modules[i][1])
    copy(theirs.psp.out_conv, ours.bottleneck)
    for j in range(3):  # smp orders the FPN levels top-down: stride 16, 8, 4
        copy(theirs.fpn_lateral_blocks[j].conv_norm_relu, ours.lateral_convs[2 - j])
        copy(theirs.fpn_conv_blocks[j], ours.fpn_convs[2 - j])
    copy(theirs.fusion_block, ours.fpn_bottleneck)
    feats = _features(channels, (70, 90))
    with torch.no_grad():
        want = ours.conv_seg(theirs([None, None, *feats]))
        torch.testing.assert_close(ours(feats), want, rtol=1e-5, atol=1e-5)


def test_fpn_neck_equals_torchvision_feature_pyramid():
    """torchvision's FPN (no norm, nearest top-down) is mmsegmentation's FPN neck."""
    channels = (16, 32, 64, 128)
    ours = FPNNeck(channels, 24).eval()
    _randomize(ours)
    theirs = FeaturePyramidNetwork(list(channels), 24).eval()
    for i in range(4):
        theirs.inner_blocks[i][0].load_state_dict(ours.lateral_convs[i].conv.state_dict())
        theirs.layer_blocks[i][0].load_state_dict(ours.fpn_convs[i].conv.state_dict())
    feats = _features(channels, (70, 90))
    with torch.no_grad():
        want = list(theirs({str(i): f for i, f in enumerate(feats)}).values())
        for a, b in zip(ours(feats), want):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_fpnhead_sums_the_upsampled_levels():
    """One level at a time: the output is that level's branch (upsampled) through the classifier."""
    head = FPNHead([8] * 4, 3, 4).eval()
    _randomize(head)
    feats = _features([8] * 4, (64, 96), batch=1)
    with torch.no_grad():
        zeros = [torch.zeros_like(f) for f in feats]
        parts = []
        for i in range(4):
            inputs = [f if j == i else z for j, (f, z) in enumerate(zip(feats, zeros))]
            parts.append(head(inputs) - head(zeros))
        torch.testing.assert_close(head(feats) - head(zeros), sum(parts), rtol=1e-4, atol=1e-5)
        branch = head.scale_heads[3](feats[3])  # three conv blocks, three 2x upsamplings
        assert branch.shape[-2:] == feats[0].shape[-2:]


# ------------------------------------------------------------------------------------------------
# the released key layout (lists written from mmsegmentation's modules and the released configs)
# ------------------------------------------------------------------------------------------------

def _key_list(path: Path):
    keys = {}
    for line in path.read_text().splitlines():
        if line and not line.startswith("#"):
            key, shape = line.split(" ", 1)
            keys[key] = tuple(int(v) for v in re.findall(r"\d+", shape))
    return keys


def _released_backbone_keys(short: str):
    keys = _key_list(DATA / f"official_keys_rmt_{short}.txt")
    return {f"backbone.{k}": v for k, v in keys.items() if not k.startswith(("proj.", "norm.", "head."))}


@pytest.mark.parametrize("head,variant,short", [("upernet", "rmt_small", "s"), ("upernet", "rmt_large", "l"),
                                                 ("fpn", "rmt_tiny", "t"), ("fpn", "rmt_base", "b")])
def test_released_layout_covers_the_released_configs_keys(head, variant, short):
    model = build_segmenter(variant, head, 150, device="meta")
    got = {k: tuple(v.shape) for k, v in segmentor_to_released(model).items()}
    want = {**_released_backbone_keys(short), **_key_list(DATA / f"mmseg_keys_{head}_rmt_{short}.txt")}
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k: v for k, v in got.items() if want[k] != v} == {}


# ------------------------------------------------------------------------------------------------
# whole released checkpoints
# ------------------------------------------------------------------------------------------------

# excerpt of an mmcv Config.pretty_text dump as mmsegmentation stores it in checkpoint meta
CONFIG_TEXT = """norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    type='EncoderDecoder',
    pretrained=None,
    backbone=dict(
        type='RMT',
        embed_dims=[64, 128, 256, 512],
        chunkwise_recurrents=[True, True, True, False],
        out_indices=(0, 1, 2, 3)),
    decode_head=dict(type='UPerHead', channels=512, norm_cfg=dict(type='SyncBN', requires_grad=True),
                     align_corners=False),
    train_cfg=dict(),
    test_cfg=dict(mode='slide', crop_size=(48, 48), stride=(32, 32)))
dataset_type = 'ADE20KDataset'
img_norm_cfg = dict(mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True)
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='MultiScaleFlipAug',
        img_scale=(160, 64),
        img_ratios=[0.75, 1.0],
        flip=True,
        transforms=[
            dict(type='Resize', keep_ratio=True),
            dict(type='RandomFlip'),
            dict(type='Normalize', mean=[123.675, 116.28, 103.53], std=[58.395, 57.12, 57.375], to_rgb=True),
            dict(type='ImageToTensor', keys=['img']),
            dict(type='Collect', keys=['img'])
        ])
]
data = dict(test=dict(type='ADE20KDataset', img_dir='images/validation'))
work_dir = print('executed')
"""


def test_test_settings_come_from_the_config_text():
    cfg = parse_config_text(CONFIG_TEXT)
    assert cfg["model"]["test_cfg"] == dict(mode="slide", crop_size=[48, 48], stride=[32, 32])
    assert "work_dir" not in cfg  # not a literal: skipped, never executed
    s = config_test_settings(cfg)
    assert (s["test_mode"], s["crop_size"], s["stride"]) == ("slide", [48, 48], [32, 32])
    assert (s["scale"], s["ratios"], s["flip"], s["reduce_zero_label"]) == ([160, 64], [0.75, 1.0], True, True)
    # without a config: what every released RMT config says
    s = config_test_settings({})
    assert (s["test_mode"], s["scale"], s["ratios"], s["flip"]) == ("whole", [2048, 512], [1.0], False)


def _released_file(tmp_path, head, meta=None, edit=None, classes=5, name="released"):
    model = build_segmenter("rmt_tiny", head, classes, head_channels=SMALL_HEADS[head]).eval()
    _randomize(model)
    sd = segmentor_to_released(model)
    assert all(k.startswith(("backbone.", "decode_head.", "auxiliary_head.", "neck.")) for k in sd)
    if edit:
        edit(sd)
    path = tmp_path / f"{name}_{head}.pth"
    torch.save({"meta": dict(meta or {}), "state_dict": sd}, path)
    return model, path


@pytest.mark.parametrize("head", ["upernet", "fpn"])
def test_released_checkpoint_round_trips_with_identical_outputs(tmp_path, head):
    model, path = _released_file(tmp_path, head, meta={"CLASSES": ("a", "b", "c", "d", "e")})
    logs = []
    loaded, spec = load_trained(path, log=logs.append)
    assert isinstance(loaded, EncoderDecoder) and not loaded.training
    described = (spec["model"], spec["head"], spec["num_classes"], spec["aux_head"])
    assert described == ("rmt_tiny", head, 5, head == "upernet")
    assert spec["class_names"] == ["a", "b", "c", "d", "e"] and spec["reduce_zero_label"]
    assert any("holds no config" in line for line in logs)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    x = torch.randn(1, 3, 70, 90)
    with torch.no_grad():
        want, got = model(x, return_aux=True), loaded(x, return_aux=True)
    assert torch.equal(want[0], got[0]) and (want[1] is None or torch.equal(want[1], got[1]))
    # and back: the released layout again, tensor for tensor
    again = segmentor_to_released(loaded)
    original = torch.load(path, weights_only=True)["state_dict"]
    assert set(again) == set(original) and all(torch.equal(again[k], original[k]) for k in original)


def test_released_checkpoint_errors_name_both_sides(tmp_path, capsys):
    _, path = _released_file(tmp_path, "upernet")
    with pytest.raises(CheckpointError, match=r"released UperNet on rmt_tiny .* but --head fpn was asked"):
        load_trained(path, head="fpn")
    with pytest.raises(CheckpointError, match=r"UperNet on rmt_tiny .* --model rmt_small was asked.*--model rmt_tiny"):
        load_trained(path, model="rmt_small")
    assert main(["segment", "eval", str(path), "--data", str(tmp_path), "--head", "fpn", "--device", "cpu"]) == 1
    assert "--head fpn" in capsys.readouterr().err


def test_no_released_tensor_is_dropped_silently(tmp_path):
    def extra_head(sd):
        sd["decode_head.conv_extra.weight"] = torch.zeros(3)

    def missing(sd):
        del sd["auxiliary_head.convs.0.bn.running_var"]

    def other_decay(sd):
        sd["backbone.layers.1.Relpos.decay"] = sd["backbone.layers.1.Relpos.decay"] * 2
    for name, edit, error in (("extra", extra_head, "unused head tensors .*decode_head.conv_extra.weight"),
                              ("missing", missing, "missing .*auxiliary_head.convs.0.bn.running_var"),
                              ("decay", other_decay, "layers.1.Relpos.decay differs")):
        _, path = _released_file(tmp_path, "upernet", edit=edit, name=name)
        with pytest.raises(CheckpointError, match=error):
            load_trained(path)
    # a tensor of neither the backbone nor a head is reported
    _, path = _released_file(tmp_path, "fpn", edit=lambda sd: sd.update({"ema.step": torch.zeros(())}))
    logs = []
    load_trained(path, log=logs.append)
    assert any("1 tensors not used: ema.step" in line for line in logs)


def test_smp_files_written_before_the_mmseg_decoder_still_load(tmp_path):
    model = build_segmenter("rmt_tiny", "fpn", 4, decoder="smp", aux_head=True, backbone_kwargs=TINY).eval()
    legacy = {}
    for k, v in model.state_dict().items():  # the auxiliary head's old names
        for new, old in (("aux_head.convs.0.conv.", "aux_head.conv.0."),
                         ("aux_head.convs.0.bn.", "aux_head.conv.1."),
                         ("aux_head.conv_seg.", "aux_head.classifier.")):
            k = k.replace(new, old)
        legacy[k] = v
    spec = dict(model="rmt_tiny", head="fpn", num_classes=4, aux_head=True, backbone_kwargs=TINY,
                class_names=list("abcd"), reduce_zero_label=False, scale=[96, 64], crop_size=[64, 64])
    save_safetensors(legacy, tmp_path / "old.safetensors", {"rmt_segmenter": json.dumps(spec)})
    loaded, got = load_trained(tmp_path / "old.safetensors")
    assert got["decoder"] == "smp"
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(loaded(x, return_aux=True)[1], model(x, return_aux=True)[1])
    save_weights(loaded, got, tmp_path / "new.safetensors")
    assert load_trained(tmp_path / "new.safetensors")[1]["decoder"] == "smp"


def test_eval_of_a_released_file_reproduces_mmseg_whole_inference(tmp_path):
    """``rmt segment eval`` on a released file: resize to the config's scale (keep ratio), the
    segmentor, logits resized to the resized image and then to the original (align_corners=False),
    labels with reduce_zero_label; written here from mmsegmentation's whole_inference."""
    data = make_synthetic_dataset(tmp_path / "data", num_train=1, num_val=3, size=(64, 80))
    config = CONFIG_TEXT.replace("mode='slide', crop_size=(48, 48), stride=(32, 32)", "mode='whole'")
    config = config.replace("img_scale=(160, 64),\n        img_ratios=[0.75, 1.0],\n        flip=True",
                            "img_scale=(200, 96),\n        flip=False")
    model, path = _released_file(tmp_path, "upernet", classes=len(SYNTHETIC_CLASSES),
                                 meta={"config": config, "CLASSES": SYNTHETIC_CLASSES})
    assert main(["segment", "eval", str(path), "--data", str(data), "--out", str(tmp_path / "m"),
                 "--device", "cpu", "--workers", "0"]) == 0
    got = json.loads((tmp_path / "m" / "metrics.json").read_text())
    assert got["settings"]["mode"] == "whole" and got["settings"]["scale"] == [200, 96]
    # the config's chunkwise_recurrents (RMT-S's, TTTF) choose the MaSA forms, not rmt_tiny's TTFF
    assert load_trained(path)[1]["backbone_kwargs"] == {"attn_forms": "TTTF"}
    model.backbone.set_attention_form("TTTF")

    dataset = SegmentationFolder(data, "validation", reduce_zero_label=True)
    cm = 0
    with torch.no_grad():
        for i in range(len(dataset)):
            image, label = dataset[i]
            h, w = label.shape
            factor = min(200 / max(h, w), 96 / min(h, w))
            size = (int(h * factor + 0.5), int(w * factor + 0.5))
            x = F.interpolate(normalize(image)[None], size=size, mode="bilinear", align_corners=False)
            out = model.decode_head(model.backbone.forward_intermediates(x, intermediates_only=True))
            out = F.interpolate(out, size=x.shape[-2:], mode="bilinear", align_corners=False)
            out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
            cm = cm + confusion_matrix(out.softmax(1).argmax(1)[0], label, len(SYNTHETIC_CLASSES))
    assert size == (96, 120)
    want = scores(cm, SYNTHETIC_CLASSES)
    assert got["mIoU"] == pytest.approx(want["mIoU"], abs=1e-9)
    assert got["aAcc"] == pytest.approx(want["aAcc"], abs=1e-9)
    assert [c["class"] for c in got["per_class"]] == list(SYNTHETIC_CLASSES)
