"""Attention weights read from the operator against explicit formulas, and the three viz commands:
each writes a non-empty PNG whose pixels follow its inputs."""
import json

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from rmt.cli import main
from rmt.ops.masa import head_decays, rotate, rotation_tables
from rmt.visualize import attention_maps, attention_weights, class_activation_map, decay_patterns, load_image

from conftest import SMALL_ARGS


def _random_qk(h, w, n=2, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, h, w, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(1, h, w, n, d, generator=g, dtype=torch.float64)
    sin, cos = (t.double() for t in rotation_tables(h, w, d))
    decay = head_decays(n, 2.0, 4.0).double()
    return q, k, sin, cos, decay, d ** -0.5


def _rotated(q, k, sin, cos, scale):
    return rotate(q[0].permute(2, 0, 1, 3), sin, cos), rotate(k[0].permute(2, 0, 1, 3) * scale, sin, cos)


def test_full_form_weights_are_the_softmax_row():
    h, w, (r, s) = 5, 6, (3, 1)
    q, k, sin, cos, decay, scale = _random_qk(h, w)
    qr, kr = _rotated(q, k, sin, cos, scale)                     # (n, h, w, d)
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    dist = ((rows - r).abs() + (cols - s).abs()).double()
    logits = (qr[:, r, s, None, None, :] * kr).sum(-1) + decay[:, None, None] * dist
    expected = logits.flatten(1).softmax(-1).view(-1, h, w)
    got = attention_weights(q, k, sin, cos, decay, scale, "full", (r, s))
    assert torch.allclose(got, expected, atol=1e-12)


def test_decomposed_form_effective_weights_are_column_times_row_attention():
    h, w, (r, s) = 5, 6, (1, 4)
    q, k, sin, cos, decay, scale = _random_qk(h, w)
    qr, kr = _rotated(q, k, sin, cos, scale)
    idx_w, idx_h = torch.arange(w), torch.arange(h)
    # row pass, in every row r': query (r', s) over keys (r', s')
    a_w = ((qr[:, :, s, None, :] * kr).sum(-1) + decay[:, None, None] * (idx_w - s).abs()).softmax(-1)  # (n, h, w)
    # column pass, in column s: query (r, s) over keys (r', s)
    a_h = ((qr[:, r, s, None, :] * kr[:, :, s]).sum(-1) + decay[:, None] * (idx_h - r).abs()).softmax(-1)  # (n, h)
    expected = a_h[:, :, None] * a_w
    got = attention_weights(q, k, sin, cos, decay, scale, "decomposed", (r, s))
    assert torch.allclose(got, expected, atol=1e-12)
    assert torch.allclose(got.sum((1, 2)), torch.ones(2, dtype=torch.float64))


def test_decay_patterns_are_the_normalised_manhattan_decay_in_both_forms():
    model = timm.create_model("rmt_tiny", device="meta", **SMALL_ARGS)
    patterns = decay_patterns(model, (96, 64), (0.25, 0.75))
    assert [(p["stage"], p["form"]) for p in patterns][:2] == [(0, "full"), (0, "decomposed")]
    for p in patterns:
        h, w = p["grid"]
        r, s = p["query"]
        rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        dist = ((rows - r).abs() + (cols - s).abs()).double()
        expected = torch.exp(p["decays"].double()[:, None, None] * dist)
        expected = expected / expected.sum((1, 2), keepdim=True)
        assert torch.allclose(p["weights"], expected, atol=1e-12), (p["stage"], p["form"])
    assert patterns[0]["grid"] == (24, 16) and patterns[0]["query"] == (6, 12)


ARCH = json.dumps(SMALL_ARGS)   # a narrow RMT keeps the commands fast


def _png(path):
    assert path.is_file() and path.stat().st_size > 1000
    pixels = np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)
    assert pixels.std() > 1           # not a constant picture
    return pixels


def _changed_fraction(a, b):
    return (np.abs(a - b).sum(-1) > 0).mean() if a.shape == b.shape else 1.0


def test_viz_decay_writes_png_that_follows_the_query(tmp_path, capsys):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["viz", "decay", "rmt_tiny", "--model-args", ARCH, "--size", "96", "--out", str(a)]) == 0
    printed = capsys.readouterr().out
    assert "max difference" in printed and f"wrote {a}" in printed
    assert main(["viz", "decay", "rmt_tiny", "--model-args", ARCH, "--size", "96", "--query", "0.1,0.9",
                 "--out", str(b)]) == 0
    assert _changed_fraction(_png(a), _png(b)) > 0.01
    c = tmp_path / "c.png"
    assert main(["viz", "decay", "rmt_tiny", "--model-args", ARCH, "--size", "96", "--forms", "model",
                 "--log", "--out", str(c)]) == 0
    assert _png(c).shape[0] < _png(a).shape[0]          # one row per stage instead of two


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Two different pictures and a checkpoint of a narrow RMT with sharp (content-driven) attention."""
    folder = tmp_path_factory.mktemp("viz")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:120, 0:160]
    first = np.stack([xx * 1.5, yy * 2, np.full_like(xx, 90)], -1)
    first[30:80, 40:100] = [250, 20, 20]
    second = rng.integers(0, 256, (140, 100, 3))
    paths = []
    for i, arr in enumerate((first, second)):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(arr.astype(np.uint8)).save(paths[-1])
    torch.manual_seed(0)
    model = timm.create_model("rmt_tiny", num_classes=7, **SMALL_ARGS)
    with torch.no_grad():
        for stage in model.stages:
            for blk in stage.blocks:
                blk.attn.qkv.weight.normal_(0, 0.15)
    ckpt = folder / "tiny.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    return paths, ckpt


def test_attention_maps_depend_on_the_image(images):
    (img0, img1), ckpt = images
    from rmt.loading import create_model
    model = create_model("rmt_tiny", ckpt, **SMALL_ARGS)
    assert model.num_classes == 7                    # the classifier size comes from the checkpoint
    maps = [attention_maps(model, load_image(p, model, (96, 96))[0], 1, -1, (0.5, 0.5)) for p in (img0, img1)]
    assert maps[0]["grid"] == (12, 12) and maps[0]["form"] == "decomposed"
    assert torch.allclose(maps[0]["weights"].sum((1, 2)), torch.ones(2, dtype=torch.float64))
    assert (maps[0]["weights"] - maps[1]["weights"]).abs().max() > 1e-3


def test_viz_attention_writes_png_that_follows_image_and_query(images, tmp_path, capsys):
    (img0, img1), ckpt = images
    outs = [tmp_path / f"{i}.png" for i in range(3)]
    common = ["--checkpoint", str(ckpt), "--model-args", ARCH, "--size", "96", "--stage", "2",
              "--head", "0", "--head", "3"]
    assert main(["viz", "attention", "rmt_tiny", str(img0), *common, "--out", str(outs[0])]) == 0
    assert main(["viz", "attention", "rmt_tiny", str(img1), *common, "--out", str(outs[1])]) == 0
    assert main(["viz", "attention", "rmt_tiny", str(img0), *common, "--query", "0.1,0.1",
                 "--out", str(outs[2])]) == 0
    assert "full form, grid 6x6" in capsys.readouterr().out
    pixels = [_png(p) for p in outs]
    assert _changed_fraction(pixels[0], pixels[1]) > 0.05
    assert _changed_fraction(pixels[0], pixels[2]) > 0.01
    assert main(["viz", "attention", "rmt_tiny", str(img0), *common[:8], "--head", "9",
                 "--out", str(tmp_path / "x.png")]) == 1
    assert "--head 9 is outside 0..3" in capsys.readouterr().err


def test_viz_cam_writes_png_that_follows_the_image(images, tmp_path, capsys):
    pytest.importorskip("pytorch_grad_cam")
    (img0, img1), ckpt = images
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    assert main(["viz", "cam", "rmt_tiny", str(img0), "--checkpoint", str(ckpt), "--model-args", ARCH,
                 "--size", "96", "--class", "2", "--out", str(a)]) == 0
    assert main(["viz", "cam", "rmt_tiny", str(img1), "--checkpoint", str(ckpt), "--model-args", ARCH,
                 "--size", "96", "--class", "2", "--out", str(b)]) == 0
    assert "class 2" in capsys.readouterr().out
    assert _changed_fraction(_png(a), _png(b)) > 0.05
    assert main(["viz", "cam", "rmt_tiny", str(img0), "--checkpoint", str(ckpt), "--model-args", ARCH,
                 "--size", "96", "--class", "7", "--out", str(tmp_path / "c.png")]) == 1
    assert "outside 0..6" in capsys.readouterr().err


def test_class_activation_map_of_a_plugin_model(images):
    pytest.importorskip("pytorch_grad_cam")
    (img0, _), _ = images
    model = timm.create_model("rmt_swin_tiny", num_classes=3, embed_dim=16, depths=(1, 1, 1, 1),
                              num_heads=(1, 2, 2, 4)).eval()
    image, picture = load_image(img0, model, (64, 64))
    cam, target, probs = class_activation_map(model, image, None, -1, "gradcam++")
    assert cam.shape == (64, 64) == picture.shape[:2] and target == int(probs.argmax())
    assert 0 <= cam.min() and cam.max() <= 1


def test_viz_errors(tmp_path, capsys):
    assert main(["viz", "attention", "rmt_tiny", str(tmp_path / "none.jpg")]) == 1
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    assert main(["viz", "cam", "rmt_tiny", str(bad)]) == 1
    assert "cannot read" in capsys.readouterr().err
    assert main(["viz", "decay", "rmt_deit_small"]) == 1
    assert "needs an RMT variant" in capsys.readouterr().err
    assert main(["viz"]) == 2
    with pytest.raises(SystemExit):
        main(["viz", "decay", "rmt_tiny", "--query", "2,0.5"])
