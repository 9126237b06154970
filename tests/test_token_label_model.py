"""The token-label models (SPEC section 8): released layout, eval fusion, MixToken, wrong-kind errors."""
import math
import os

import pytest
import timm
import torch
from safetensors.torch import load_file

import rmt.token_label as tl
from rmt.checkpoint import CheckpointError, convert, ours_to_released
from rmt.token_label import TokenLabelRMT, draw_mix_box, mix_region

from conftest import SMALL_ARGS
from test_checkpoint import _official_layout, _randomize


def _star(**kw):
    return _randomize(timm.create_model("rmt_small.tl_in1k", **dict(SMALL_ARGS, **kw)))


def _released_file(model, path):
    torch.save({"model": ours_to_released(model.state_dict(), model), "epoch": 299}, path)
    return path


def _load(name, path, **kw):
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)),
                             **dict(SMALL_ARGS, **kw)).eval()


def _fused_by_hand(model, x):
    """SPEC section 8's eval logits from the model's own pieces."""
    features = model.forward_features(x)                                  # (b, h, w, c3)
    head = model.head
    t = features @ head.proj.weight.T + head.proj.bias
    t = (t - head.norm.running_mean) / torch.sqrt(head.norm.running_var + head.norm.eps) * head.norm.weight \
        + head.norm.bias
    logits = (t * torch.sigmoid(t)).mean(dim=(1, 2)) @ head.fc.weight.T + head.fc.bias
    aux = features @ model.aux_head.weight.T + model.aux_head.bias        # (b, h, w, classes)
    return logits + 0.5 * aux.flatten(1, 2).max(dim=1).values


@pytest.mark.parametrize("name,plain", [("rmt_small.tl_in1k", "rmt_small"), ("rmt_base.tl_in1k", "rmt_base"),
                                        ("rmt_large.tl_in1k", "rmt_large")])
def test_tagged_models_have_the_released_star_layout(name, plain):
    model = timm.create_model(name, device="meta")
    assert isinstance(model, TokenLabelRMT) and model.mix_token
    released = ours_to_released(model.state_dict(), model)
    official = dict(_official_layout(plain), **{"aux_head.weight": (1000, model.num_features),
                                                "aux_head.bias": (1000,)})
    assert {k: tuple(v.shape) for k, v in released.items()} == official
    params = sum(p.numel() for p in model.parameters())
    assert params == {"rmt_small": 27_480_240, "rmt_base": 54_667_896, "rmt_large": 96_105_864}[plain]
    assert timm.create_model(plain, device="meta").__class__.__name__ == "RMT"


def test_released_star_checkpoint_loads_bit_exact_with_the_fused_logits(tmp_path):
    model = _star(num_classes=7).eval()
    path = _released_file(model, tmp_path / "rmt_s_star.pth")
    loaded = _load("rmt_small.tl_in1k", path, num_classes=7)
    for x in (torch.randn(2, 3, 64, 96), torch.randn(1, 3, 72, 40)):
        with torch.no_grad():
            out = loaded(x)
            assert torch.equal(out, model(x))
            assert torch.allclose(out, _fused_by_hand(loaded, x), rtol=1e-5, atol=1e-5)
            assert not torch.allclose(out, loaded.head(loaded.forward_features(x)), atol=1e-3)  # the aux term counts
    for key, value in loaded.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key


def test_wrong_kind_errors_say_which_is_which(tmp_path):
    star = _released_file(_star(), tmp_path / "star.pth")
    with pytest.raises(CheckpointError, match=r"token-label classifier .*aux_head.*plain RMT classifier"):
        _load("rmt_small", star)
    plain_model = _randomize(timm.create_model("rmt_small", **SMALL_ARGS))
    plain = _released_file(plain_model, tmp_path / "plain.pth")
    with pytest.raises(CheckpointError, match=r"plain RMT classifier \(no aux_head\).*token-label classifier"):
        _load("rmt_small.tl_in1k", plain)
    # real variants: the error names the tag to use
    full = timm.create_model("rmt_tiny", num_classes=3, use_aux_head=True)
    sd = ours_to_released(full.state_dict(), full)
    from rmt.checkpoint import filter_state_dict
    with pytest.raises(CheckpointError, match="'rmt_tiny' with use_aux_head=True"):
        filter_state_dict({"model": sd}, timm.create_model("rmt_tiny", num_classes=3, device="meta"))
    # a model without class heads takes either; another class count re-initialises both heads
    feats = _load("rmt_small", star, num_classes=0)
    assert feats.num_classes == 0 and not hasattr(feats, "aux_head")
    ten = _load("rmt_small.tl_in1k", plain, num_classes=10)
    assert ten.aux_head.weight.shape == (10, 128)


def test_features_intermediates_and_reset_classifier():
    model = _star(num_classes=5).eval()
    plain = timm.create_model("rmt_small", num_classes=5, **SMALL_ARGS).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("aux_head.")})
    x = torch.randn(2, 3, 72, 40)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        ref_final, ref_inter = plain.forward_intermediates(x)
        assert torch.equal(final, ref_final) and all(torch.equal(a, b) for a, b in zip(inter, ref_inter))
        feat_model = timm.create_model("rmt_small.tl_in1k", features_only=True, **SMALL_ARGS)
        assert [f.shape[1] for f in feat_model(x)] == [16, 32, 64, 128]
        assert not hasattr(feat_model, "aux_head") or feat_model.aux_head is None
    model.reset_classifier(3)
    assert model.head.fc.out_features == model.aux_head.out_features == 3 and model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert model.aux_head is None and model(x).shape == (2, 64)
    model.train()
    assert model(x).shape == (2, 64)  # no class heads: no token-label outputs either


def test_fast_inference_path_matches_reference():
    model = _star(num_classes=4).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        fast = model(x)
        model.set_masa_impl("reference")
        ref = model(x)
    assert torch.allclose(fast, ref, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------------------
# MixToken
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("grid", [(7, 7), (3, 2), (2, 5), (1, 1)])
def test_mix_box_follows_the_released_formula(grid):
    h, w = grid
    for seed in range(40):
        torch.manual_seed(seed)
        box = draw_mix_box(grid, torch.device("cpu"))
        torch.manual_seed(seed)  # the same draws, in the documented order, by hand
        lam = torch.rand(()).item()
        cr, cc = torch.randint(h, ()).item(), torch.randint(w, ()).item()
        cut_h, cut_w = int(h * math.sqrt(1 - lam)), int(w * math.sqrt(1 - lam))
        want = [min(max(cr - cut_h // 2, 0), h), min(max(cc - cut_w // 2, 0), w),
                min(max(cr + cut_h // 2, 0), h), min(max(cc + cut_w // 2, 0), w)]
        assert box.tolist() == want and box.dtype == torch.long
        assert 0 <= want[0] <= want[2] <= h and 0 <= want[1] <= want[3] <= w


def test_mix_region_is_the_slice_swap_and_an_involution():
    x = torch.randn(4, 18, 10, 3)  # a stem grid of a 72x40 image: final grid 3x2, last row partial
    box = torch.tensor([1, 0, 3, 1])
    got = mix_region(x, box, 8)
    want = x.clone()
    want[:, 8:18, 0:8] = x.flip(0)[:, 8:18, 0:8]  # rows 8..24 clipped to the 18 rows that exist
    assert torch.equal(got, want)
    assert torch.equal(mix_region(got, box, 8), x)
    assert torch.equal(mix_region(x, torch.zeros(4, dtype=torch.long), 8), x)


@pytest.mark.parametrize("size", [(64, 96), (72, 40), (100, 36)])
def test_train_mode_mixtoken_matches_the_spec(size, monkeypatch):
    """Train mode on non-square inputs (also sizes that are not multiples of 32): the stem output is
    mixed in the box x8, the aux logits are swapped back in the box, the box comes back."""
    model = _star(num_classes=6).train()
    x = torch.randn(4, 3, *size)
    hs, ws = -(-size[0] // 4), -(-size[1] // 4)
    h, w = -(-hs // 8), -(-ws // 8)
    box = torch.tensor([h - 1, 0, h, max(w - 1, 1)]) if h > 1 else torch.tensor([0, 0, 1, 1])
    drawn = []
    monkeypatch.setattr(tl, "draw_mix_box", lambda grid, device, beta: drawn.append(grid) or box.clone())
    torch.manual_seed(0)
    logits, aux, got_box = model(x)
    assert drawn == [(h, w)] and torch.equal(got_box, box)
    assert logits.shape == (4, 6) and aux.shape == (4, h * w, 6)

    r1, c1, r2, c2 = box.tolist()
    with torch.no_grad():
        tokens = model._stem_tokens(x)
        mixed = tokens.clone()
        mixed[:, 8 * r1:8 * r2, 8 * c1:8 * c2] = tokens.flip(0)[:, 8 * r1:8 * r2, 8 * c1:8 * c2]
        features = model.stages(mixed)
        want_logits = model.head(features)
        raw = model.aux_head(features)
        back = raw.clone()
        back[:, r1:r2, c1:c2] = raw.flip(0)[:, r1:r2, c1:c2]
    assert torch.allclose(logits, want_logits, rtol=1e-5, atol=1e-6)
    assert torch.allclose(aux, back.flatten(1, 2), rtol=1e-5, atol=1e-6)


def test_train_mode_without_mixtoken_returns_a_zero_box():
    model = _star(num_classes=3, use_mix_token=False).train()
    logits, aux, box = model(torch.randn(2, 3, 64, 64))
    assert torch.equal(box, torch.zeros(4, dtype=torch.long)) and aux.shape == (2, 4, 3)
    with pytest.raises(ValueError, match="use_mix_token needs use_aux_head"):
        timm.create_model("rmt_small", use_mix_token=True, device="meta")
    with pytest.raises(ValueError, match="token-label model"):
        timm.create_model("rmt_small.tl_in1k", use_aux_head=False, device="meta")


def test_convert_keeps_the_aux_head(tmp_path):
    model = _randomize(timm.create_model("rmt_tiny", num_classes=4, use_aux_head=True)).eval()
    src = _released_file(model, tmp_path / "tiny_star.pth")
    name, arch = convert(src, tmp_path / "tiny_star.safetensors")
    assert name == "rmt_tiny" and arch["aux_head"]
    sd = load_file(str(tmp_path / "tiny_star.safetensors"))
    assert torch.equal(sd["aux_head.weight"], model.aux_head.weight)
    again = timm.create_model("rmt_tiny", num_classes=4, use_aux_head=True, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(tmp_path / "tiny_star.safetensors"))).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


# ------------------------------------------------------------------------------------------------
# commands: export, eval, predict
# ------------------------------------------------------------------------------------------------

EXPORT_ARGS = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8),
                   head_hidden_size=64, num_classes=10, drop_path_rate=0.0)


def test_exported_program_computes_the_fused_eval_logits(tmp_path, capsys):
    """torch.export (the graph that both ONNX and AOTInductor exports are made from), dynamic sizes."""
    import json
    from rmt.cli import main
    from rmt.export import export_program
    model = _randomize(timm.create_model("rmt_small.tl_in1k", **EXPORT_ARGS)).eval()
    program = export_program(model, (64, 96))
    for size in ((2, 64, 96), (1, 72, 40)):
        x = torch.randn(*size[:1], 3, *size[1:])
        with torch.no_grad():
            assert torch.allclose(program.module()(x), _fused_by_hand(model, x), rtol=1e-4, atol=1e-4)
    plain = _released_file(_randomize(timm.create_model("rmt_small", **EXPORT_ARGS)), tmp_path / "plain.pth")
    assert main(["export", "rmt_small.tl_in1k", "--checkpoint", str(plain), "--model-args", json.dumps(EXPORT_ARGS),
                 "--out", str(tmp_path / "x.onnx")]) == 1
    assert "plain RMT classifier (no aux_head)" in capsys.readouterr().err


@pytest.mark.skipif(not os.environ.get("RMT_SLOW_TESTS"),
                    reason="an ONNX export takes a minute or more on a small CPU; set RMT_SLOW_TESTS=1 to run")
def test_onnx_export_carries_the_fused_eval_logits(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    import json
    from rmt.cli import main
    model = _randomize(timm.create_model("rmt_small.tl_in1k", **EXPORT_ARGS)).eval()
    ckpt = _released_file(model, tmp_path / "star.pth")
    out = tmp_path / "star.onnx"
    assert main(["export", "rmt_small.tl_in1k", "--checkpoint", str(ckpt), "--model-args", json.dumps(EXPORT_ARGS),
                 "--size", "64x96", "--check-size", "80x48", "--out", str(out)]) == 0, capsys.readouterr().err
    assert "check passed" in capsys.readouterr().out
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    x = torch.randn(2, 3, 72, 40)
    got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
    with torch.no_grad():
        want = _fused_by_hand(model, x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-4)


def test_eval_and_predict_of_a_released_star_checkpoint(tmp_path, capsys):
    """A released-layout token-label file (rmt_tiny shapes with the aux head, 2 classes) evaluates and
    predicts with the fused logits, its kind read from the file."""
    import json
    from rmt.cli import main
    from rmt.classification.data import DataSpec, ImageFolderDataset, eval_transform
    from train_utils import write_image_folder
    root = write_image_folder(tmp_path / "imgs", per_class=3)
    model = _randomize(timm.create_model("rmt_tiny", num_classes=2, use_aux_head=True)).eval()
    ckpt = _released_file(model, tmp_path / "tiny_star.pth")
    ds = ImageFolderDataset(root / "val", eval_transform(DataSpec()))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    with torch.no_grad():
        fused = _fused_by_hand(model, x)
    expected = 100.0 * (fused.argmax(1) == torch.tensor([t for _, t in ds.samples])).float().mean().item()
    assert main(["eval", str(ckpt), "--data", str(root), "--json", "--device", "cpu", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == "rmt_tiny" and result["top1"] == pytest.approx(expected)
    path = ds.samples[0][0]
    assert main(["predict", str(ckpt), path, "--json", "--top-k", "2"]) == 0
    top = json.loads(capsys.readouterr().out)[0]["top"]
    assert top[0]["probability"] == pytest.approx(fused[0].softmax(0).max().item(), abs=1e-4)
