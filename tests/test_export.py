"""ONNX export round trip (dynamic batch and image size), torch.export of both MaSA forms and of the
plug-in models, and the export command's errors."""
import json
import os

import pytest
import timm
import torch

from rmt.cli import main
from rmt.export import (check_pt2, check_program, export_program, export_pt2,
                        max_relative_error)

# a tiny RMT: one block per stage, narrow, so an export takes seconds
TINY_ARGS = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8),
                 head_hidden_size=64, num_classes=10, drop_path_rate=0.0)


def _tiny_rmt(forms="TTFF"):
    model = timm.create_model("rmt_tiny", attn_forms=forms, **TINY_ARGS)
    with torch.no_grad():   # larger q/k than at init, so attention is far from uniform
        for stage in model.stages:
            for blk in stage.blocks:
                blk.attn.qkv.weight.normal_(0, 0.3)
    return model.eval()


def test_onnx_round_trip_at_two_sizes(tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    model = _tiny_rmt("TTFF")     # both forms in one graph
    ckpt = tmp_path / "tiny.pth"
    torch.save({"model": model.state_dict()}, ckpt)
    out = tmp_path / "tiny.onnx"
    rc = main(["export", "rmt_tiny", "--checkpoint", str(ckpt), "--model-args", json.dumps(TINY_ARGS),
               "--forms", "TTFF", "--size", "64x96", "--check-size", "80x48", "--out", str(out)])
    printed = capsys.readouterr().out
    assert rc == 0, printed
    assert "batch 1, 64x96" in printed and "batch 2, 80x48" in printed and "check passed" in printed
    assert out.is_file() and not list(tmp_path.glob(".tiny.onnx*"))   # no temporary left over

    # independently of the command's own check: symbolic input dims, other batches and sizes
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    dims = session.get_inputs()[0].shape
    assert isinstance(dims[0], str) and dims[1] == 3 and isinstance(dims[2], str) and isinstance(dims[3], str)
    for b, h, w in [(3, 97, 61), (1, 128, 160), (2, 33, 47)]:
        x = torch.randn(b, 3, h, w)
        with torch.no_grad():
            ref = model(x)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
        assert got.shape == (b, 10)
        assert max_relative_error(torch.from_numpy(got), ref) <= 1e-4


def test_plugin_model_exports_with_dynamic_sizes():
    """MaSALayer switches to the reference ops (one-block full form) while exporting (RMT-DeiT, sides multiple of 16)."""
    model = timm.create_model("rmt_deit_small", num_classes=5, embed_dim=64, depth=2, num_heads=2).eval()
    program = export_program(model, (64, 64))
    results = check_program(model, program, [(1, 64, 96), (3, 112, 48)])
    assert all(r.ok for r in results), [r.line() for r in results]


def test_export_command_errors(tmp_path, capsys):
    assert main(["export", "rmt_tiny", "--size", "32", "--out", str(tmp_path / "a.onnx")]) == 1
    assert "at least 33" in capsys.readouterr().err
    assert main(["export", "rmt_nano", "--out", str(tmp_path / "a.onnx")]) == 1
    assert "unknown model 'rmt_nano'" in capsys.readouterr().err
    assert main(["export", "rmt_tiny", "--model-args", "{depths", "--out", str(tmp_path / "a.onnx")]) == 1
    assert "not valid JSON" in capsys.readouterr().err
    assert main(["export", "rmt_tiny", "--checkpoint", str(tmp_path / "missing.pth")]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.skipif(not os.environ.get("RMT_SLOW_TESTS"),
                    reason="AOTInductor compiles C++ for minutes; set RMT_SLOW_TESTS=1 to run")
def test_aotinductor_package_round_trip(tmp_path):
    model = _tiny_rmt("TTFF")
    path = export_pt2(model, tmp_path / "tiny.pt2", (64, 96))
    results = check_pt2(model, path, [(1, 64, 96), (2, 80, 48)])
    assert all(r.ok for r in results), [r.line() for r in results]
