"""The model exports as users export any timm model: ``torch.onnx.export`` with ``dynamic_axes`` from a
batch-1 example (the ``torch.export``-based exporter and the TorchScript-based one) and
``torch.export.export`` with ``Dim`` ranges give programs that are correct at other batches and
sizes, or fail at export time; never a file pinned to the example."""
import warnings

import pytest
import timm
import torch
from torch.export import Dim

from rmt.export import check_program, max_relative_error
from rmt.ops.triton_support import HAS_TRITON

from conftest import SMALL_ARGS

# SMALL_ARGS (layer scale, both forms, odd MLP ratios) with one block per stage: an export takes seconds
EXPORT_ARGS = dict(SMALL_ARGS, depths=(1, 1, 1, 1), num_classes=10)
DYNAMIC_AXES = {"x": {0: "b", 2: "h", 3: "w"}}
OTHER_SIZES = [(2, 64, 64), (2, 96, 80)]   # batch 1 -> 2, at the example's size and another one


def _model(name: str = "rmt_tiny", **kwargs) -> torch.nn.Module:
    model = timm.create_model(name, **(kwargs or EXPORT_ARGS))
    with torch.no_grad():   # larger q/k than at init, so attention is far from uniform
        for m in model.modules():
            if hasattr(m, "qkv"):
                m.qkv.weight.normal_(0, 0.3)
    return model.eval()


def _onnx_errors(model: torch.nn.Module, path, sizes) -> list:
    ort = pytest.importorskip("onnxruntime")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    errors = []
    gen = torch.Generator().manual_seed(1)
    for b, h, w in sizes:
        x = torch.randn(b, 3, h, w, generator=gen)
        with torch.no_grad():
            ref = model(x)
        got = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])
        assert got.shape == ref.shape, (b, h, w)
        errors.append(max_relative_error(got, ref))
    return errors


def _onnx_export(model: torch.nn.Module, path, dynamo: bool, size=(64, 64)) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the exporters' advice on dynamic_axes and tracer warnings
        torch.onnx.export(model, (torch.randn(1, 3, *size),), str(path), input_names=["x"],
                          output_names=["logits"], dynamic_axes=DYNAMIC_AXES, dynamo=dynamo)


@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_from_a_batch_of_one_stays_dynamic(tmp_path, dynamo):
    """The default model (fast paths on) exported from a 1x3x64x64 example runs at batch 2 and at
    96x80: while an exporter traces, the model takes the reference ops and keeps sizes symbolic."""
    model = _model()
    _onnx_export(model, tmp_path / "m.onnx", dynamo)
    assert max(_onnx_errors(model, tmp_path / "m.onnx", OTHER_SIZES)) <= 1e-4


@pytest.mark.parametrize("name,kwargs,size", [
    ("rmt_deit_small", dict(num_classes=5, embed_dim=64, depth=2, num_heads=2), (64, 64)),
    ("rmt_swin_tiny", dict(num_classes=5, embed_dim=32, depths=(1, 1, 1, 1), num_heads=(2, 2, 2, 2)), (64, 64)),
])
def test_plugin_models_export_to_onnx_from_a_batch_of_one(tmp_path, name, kwargs, size):
    model = _model(name, **kwargs)
    _onnx_export(model, tmp_path / "m.onnx", dynamo=False, size=size)
    assert max(_onnx_errors(model, tmp_path / "m.onnx", [(2, 64, 64), (2, 96, 80)])) <= 1e-4


def test_torch_export_with_dim_ranges_is_correct_at_other_batches_and_sizes():
    model = _model()
    shapes = ({0: Dim("b", min=1, max=64), 2: Dim("h", min=33, max=1024), 3: Dim("w", min=33, max=1024)},)
    program = torch.export.export(model, (torch.randn(2, 3, 64, 64),), dynamic_shapes=shapes)
    results = check_program(model, program, [(1, 96, 80), (3, 33, 47)])
    assert all(r.ok for r in results), [r.line() for r in results]


def test_torch_export_from_a_batch_of_one_is_dynamic_or_refused():
    """From a batch-1 example, torch.export with size-oblivious reasoning (as ``torch.onnx.export``
    traces) keeps the batch symbolic and gives a correct program; with plain ``Dim`` ranges it either
    refuses the batch range at export time (its own size-1 specialisation, as for any timm model) or
    gives a correct program. (The RMT model's batch-1 ONNX export above goes through the former.)"""
    model = _model("rmt_deit_small", num_classes=5, embed_dim=64, depth=2, num_heads=2)
    x = torch.randn(1, 3, 64, 64)
    with torch.fx.experimental._config.patch(backed_size_oblivious=True):
        program = torch.export.export(model, (x,), dynamic_shapes=({0: Dim.DYNAMIC, 2: Dim.DYNAMIC, 3: Dim.DYNAMIC},))
    results = check_program(model, program, [(2, 64, 64), (3, 96, 80)])
    assert all(r.ok for r in results), [r.line() for r in results]
    sides = Dim("side", min=2, max=64)
    ranges = ({0: Dim("b", min=1, max=64), 2: 16 * sides, 3: 16 * sides},)
    try:
        program = torch.export.export(model, (x,), dynamic_shapes=ranges)
    except torch._dynamo.exc.UserError as e:
        assert "Constraints violated" in str(e)
    else:
        results = check_program(model, program, [(2, 64, 64), (3, 96, 96)])
        assert all(r.ok for r in results), [r.line() for r in results]


@pytest.mark.skipif(not HAS_TRITON, reason="needs Triton")
def test_triton_impl_refuses_onnx_export_naming_the_exporter(tmp_path):
    model = _model()
    model.set_masa_impl("triton")
    with pytest.raises(Exception, match=r"rmt\.export\.export_onnx"):
        _onnx_export(model, tmp_path / "m.onnx", dynamo=False)


def test_transformers_timm_wrappers_build_rmt_models():
    """``transformers``' TimmWrapper and TimmBackbone build registered rmt models once rmt is imported
    (without the import, transformers reports the name as unknown to this timm version)."""
    pytest.importorskip("transformers")
    from transformers import (TimmBackbone, TimmBackboneConfig, TimmWrapperConfig,
                              TimmWrapperForImageClassification)

    args = {k: v for k, v in EXPORT_ARGS.items() if k != "num_classes"}
    x = torch.randn(2, 3, 64, 64)
    classifier = TimmWrapperForImageClassification(
        TimmWrapperConfig(architecture="rmt_tiny", num_labels=7, model_args=args)).eval()
    with torch.no_grad():
        logits = classifier(pixel_values=x).logits
        want = classifier.timm_model(x)
    assert logits.shape == (2, 7) and torch.equal(logits, want)
    backbone = TimmBackbone(TimmBackboneConfig(backbone="rmt_tiny", out_indices=(1, 2, 3),
                                               use_pretrained_backbone=False)).eval()
    with torch.no_grad():
        maps = backbone(x).feature_maps
    assert [tuple(m.shape[1:]) for m in maps] == [(128, 8, 8), (256, 4, 4), (512, 2, 2)]
