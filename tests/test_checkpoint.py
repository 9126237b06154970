"""Released checkpoint layouts, conversion, loading through timm and errors."""
import re
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import load_file

from rmt.checkpoint import CheckpointError, ours_to_released, released_to_ours

from conftest import DATA, SMALL_ARGS

SHORT = {"rmt_tiny": "t", "rmt_small": "s", "rmt_base": "b", "rmt_large": "l"}


def _official_layout(name):
    layout = {}
    for line in (DATA / f"official_keys_rmt_{SHORT[name]}.txt").read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, shape = re.match(r"(\S+) \((.*)\)", line).groups()
        layout[key] = tuple(int(s) for s in shape.split(",") if s.strip())
    return layout


def _randomize(model):
    """Random weights and BN statistics so that every tensor matters in comparisons."""
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand_like(t) + 0.5 if "running_var" in name else torch.randn_like(t) * 0.2)
    return model


@pytest.mark.parametrize("name", list(SHORT))
def test_released_layout_matches_official_key_list(name):
    model = timm.create_model(name, device="meta")
    released = ours_to_released(model.state_dict(), model)
    official = _official_layout(name)
    assert set(released) == set(official)
    for k, shape in official.items():
        assert tuple(released[k].shape) == shape, k


@pytest.mark.parametrize("name", ["rmt_tiny", "rmt_base"])
def test_round_trip_through_released_layout(name):
    """our model -> released layout -> our model gives identical outputs (RMT-T without layer scale,
    RMT-B with it; every variant's key layout is checked against the released key lists above)."""
    model = _randomize(timm.create_model(name)).eval()
    released = ours_to_released(model.state_dict(), model)
    again = timm.create_model(name).eval()
    again.load_state_dict(released_to_ours(released), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model(x), again(x))


@pytest.fixture
def released_small(tmp_path):
    """A released-layout classification checkpoint of a small configuration, under 'model'."""
    model = _randomize(timm.create_model("rmt_tiny", **SMALL_ARGS)).eval()
    path = tmp_path / "released.pth"
    torch.save({"model": ours_to_released(model.state_dict(), model), "epoch": 299}, path)
    return model, path


def _load(path, **kw):
    return timm.create_model("rmt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **dict(SMALL_ARGS, **kw)).eval()


@pytest.mark.parametrize("wrapper", ["model", "model_ema", "state_dict", None])
def test_timm_pretrained_file_loads_any_wrapper(released_small, tmp_path, wrapper):
    model, path = released_small
    sd = torch.load(path, weights_only=True)["model"]
    path2 = tmp_path / "wrapped.pth"
    torch.save(sd if wrapper is None else {wrapper: sd}, path2)
    loaded = _load(path2)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_ema_weights_preferred(released_small, tmp_path):
    model, path = released_small
    sd = torch.load(path, weights_only=True)["model"]
    ema = {k: v + 1 if v.is_floating_point() and "running_var" not in k else v for k, v in sd.items()}
    path2 = tmp_path / "with_ema.pth"
    torch.save({"model": sd, "model_ema": ema}, path2)
    loaded = _load(path2)
    assert torch.equal(loaded.stem[0].weight, ema["patch_embed.proj.0.weight"])


def test_other_num_classes_reinitialises_head(released_small):
    model, path = released_small
    loaded = _load(path, num_classes=10)
    assert loaded.head.fc.out_features == 10
    assert torch.equal(loaded.stem[0].weight, model.stem[0].weight)
    assert torch.equal(loaded.head.proj.weight, model.head.proj.weight)


def test_dense_checkpoint_keeps_per_stage_norms(tmp_path):
    backbone = _randomize(timm.create_model("rmt_tiny", num_classes=0, feature_norms=True, **SMALL_ARGS)).eval()
    sd = {k: v for k, v in ours_to_released(backbone.state_dict(), backbone).items()
          if not k.startswith(("proj.", "norm.", "head."))}
    assert any(k.startswith("extra_norms.") for k in sd)
    path = tmp_path / "mask_rcnn.pth"
    torch.save({"state_dict": sd, "meta": {"epoch": 12}}, path)
    feats = timm.create_model("rmt_tiny", features_only=True, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)), **SMALL_ARGS).eval()
    for i in range(4):
        assert torch.equal(feats.model.feature_norms[i].weight, backbone.feature_norms[i].weight)
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = backbone.forward_intermediates(x, intermediates_only=True)
        for a, b in zip(feats(x), ref):
            assert torch.equal(a, b)


def test_convert_writes_safetensors_that_load_without_filter(tmp_path):
    model = _randomize(timm.create_model("rmt_tiny")).eval()
    src = tmp_path / "rmt_t_released.pth"
    torch.save({"model": ours_to_released(model.state_dict(), model)}, src)
    dst = tmp_path / "rmt_t.safetensors"
    result = subprocess.run([sys.executable, "-m", "rmt", "convert", str(src), str(dst)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "rmt_tiny" in result.stdout
    fresh = timm.create_model("rmt_tiny").eval()
    fresh.load_state_dict(load_file(dst), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    via_timm = timm.create_model("rmt_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(dst))).eval()
    with torch.no_grad():
        assert torch.equal(via_timm(x), model(x))


def test_wrong_variant_names_the_mismatch(tmp_path):
    base = timm.create_model("rmt_base", device="meta")
    sd = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in ours_to_released(base.state_dict(), base).items()}
    path = tmp_path / "rmt_b.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(CheckpointError, match=r"rmt_base.*widths \[80, 160, 320, 512\].*widths \[64, 128, 256, 512\]"):
        timm.create_model("rmt_small", pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))


def test_corrupt_file_gives_readable_error(released_small, tmp_path):
    _, path = released_small
    broken = tmp_path / "truncated.pth"
    broken.write_bytes(path.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match="could not be read"):
        _load(broken)
    bad_st = tmp_path / "bad.safetensors"
    bad_st.write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="safetensors"):
        _load(bad_st)
    with pytest.raises(CheckpointError, match="does not exist"):
        _load(tmp_path / "missing.pth")


class _Evil:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_arbitrary_objects_are_not_unpickled(tmp_path, capsys):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"x": torch.zeros(1)}, "payload": _Evil()}, path)
    with pytest.raises(CheckpointError, match="not loaded for safety"):
        _load(path)
    assert "this must never run" not in capsys.readouterr().out


def test_files_that_are_no_checkpoint_are_called_so_and_unsafe_loading_is_never_suggested(tmp_path, capsys):
    from rmt.cli import main
    from rmt.engine import load_checkpoint
    rng = np.random.default_rng(0)
    random_bytes = tmp_path / "random.pth"
    random_bytes.write_bytes(b"\x13" + rng.bytes(4000))
    pickle_like = tmp_path / "pickle_like.pth"  # starts as a pickle does, then noise
    pickle_like.write_bytes(b"\x80\x02" + rng.bytes(4000))
    for path in (random_bytes, pickle_like):
        for load in (_load, load_checkpoint):
            with pytest.raises(CheckpointError, match="is not a checkpoint") as info:
                load(path)
            assert "weights_only" not in str(info.value)
    evil = tmp_path / "evil.pth"
    torch.save({"payload": _Evil()}, evil)
    with pytest.raises(CheckpointError, match=r"holds a Python object \(print\)") as info:
        load_checkpoint(evil)
    assert "weights_only" not in str(info.value)
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    assert main(["predict", str(random_bytes), str(image)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("rmt predict: error:") and "not a checkpoint" in err and "weights_only" not in err
    assert main(["train", "--resume", str(pickle_like)]) == 1
    err = capsys.readouterr().err
    assert "not a checkpoint" in err and "weights_only" not in err and "Traceback" not in err


def test_whole_detector_checkpoint_loads_its_backbone(tmp_path):
    """mmdet/mmseg files hold the backbone under 'backbone.' beside necks and heads."""
    backbone = _randomize(timm.create_model("rmt_tiny", num_classes=0, feature_norms=True, **SMALL_ARGS)).eval()
    sd = {"backbone." + k: v for k, v in ours_to_released(backbone.state_dict(), backbone).items()
          if not k.startswith(("proj.", "norm.", "head."))}
    sd["neck.fpn_convs.0.conv.weight"] = torch.zeros(4, 4, 3, 3)
    sd["decode_head.conv_seg.weight"] = torch.zeros(150, 4, 1, 1)
    path = tmp_path / "upernet.pth"
    torch.save({"state_dict": sd, "meta": {"iter": 160000}}, path)
    feats = timm.create_model("rmt_tiny", features_only=True, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)), **SMALL_ARGS).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        for a, b in zip(feats(x), backbone.forward_intermediates(x, intermediates_only=True)):
            assert torch.equal(a, b)
