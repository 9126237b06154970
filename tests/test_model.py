"""The timm model contract, input sizes and input errors."""
import copy

import pytest
import timm
import torch

import rmt
from rmt.model import MODEL_ARGS
from rmt.ops.masa import HAS_TRITON

from conftest import SMALL_ARGS, rel_err

PARAMS = {"rmt_tiny": 14_334_216, "rmt_small": 26_967_240, "rmt_base": 54_154_896,
          "rmt_large": 95_464_864}


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts_match_spec(name):
    model = timm.create_model(name, device="meta")
    assert sum(p.numel() for p in model.parameters()) == PARAMS[name]


def test_registered_in_timm():
    assert set(timm.list_models("rmt_*")) >= set(PARAMS)
    cfg = timm.get_pretrained_cfg("rmt_small")
    assert cfg.input_size == (3, 224, 224) and cfg.crop_pct == 0.9 and cfg.interpolation == "bicubic"
    assert cfg.mean == timm.data.IMAGENET_DEFAULT_MEAN and cfg.std == timm.data.IMAGENET_DEFAULT_STD
    assert cfg.first_conv == "stem.0" and cfg.classifier == "head.fc"


def test_default_forms_per_variant():
    assert timm.create_model("rmt_tiny", device="meta").attention_forms == (
        "decomposed", "decomposed", "full", "full")
    for name in ("rmt_small", "rmt_base", "rmt_large"):
        assert timm.create_model(name, device="meta").attention_forms == (
            "decomposed", "decomposed", "decomposed", "full")


def test_unknown_argument_raises_type_error():
    with pytest.raises(TypeError):
        timm.create_model("rmt_tiny", not_an_argument=1)


def test_device_and_dtype_arguments():
    model = timm.create_model("rmt_tiny", device="meta", dtype=torch.float64)
    assert all(p.device.type == "meta" and p.dtype == torch.float64 for p in model.parameters())


def _small(**kw):
    return timm.create_model("rmt_tiny", **dict(SMALL_ARGS, **kw))


def test_forward_features_head_and_classifier_reset():
    model = _small(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 96)
    feats = model.forward_features(x)
    assert feats.shape == (2, 2, 3, 128)                      # NHWC, stride 32
    pre = model.forward_head(feats, pre_logits=True)
    assert pre.shape == (2, 64)
    logits = model.forward_head(feats)
    assert logits.shape == (2, 7)
    assert torch.allclose(model(x), logits)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)
    model.reset_classifier(0)
    assert torch.allclose(model(x), pre, atol=1e-6)
    model.reset_classifier(0, "")
    assert model(x).shape == (2, 2, 3, 64)


@pytest.mark.parametrize("size", [(32, 32), (33, 47), (72, 40), (97, 161)])
def test_features_only_shapes_at_odd_sizes(size):
    model = timm.create_model("rmt_tiny", features_only=True, **SMALL_ARGS).eval()
    assert model.feature_info.reduction() == [4, 8, 16, 32]
    assert model.feature_info.channels() == [16, 32, 64, 128]
    x = torch.randn(1, 3, *size)
    with torch.no_grad():
        feats = model(x)
    h, w = size
    for f, r, c in zip(feats, (4, 8, 16, 32), (16, 32, 64, 128)):
        assert f.shape == (1, c, -(-h // r), -(-w // r))       # NCHW, ceil division
        assert f.is_contiguous()


def test_features_only_out_indices_and_norms():
    model = timm.create_model("rmt_tiny", features_only=True, out_indices=(1, 3), **SMALL_ARGS)
    assert model.feature_info.channels() == [32, 128]
    with torch.no_grad():
        feats = model(torch.randn(2, 3, 64, 64))
    assert [f.shape[1] for f in feats] == [32, 128]
    # per-stage LayerNorms of dense prediction are part of the features-only backbone
    norms = model.model.feature_norms
    assert norms is not None and all(n.eps == 1e-5 for n in norms)
    # features are normalised over channels
    f = feats[0].permute(0, 2, 3, 1)
    assert torch.allclose(f.mean(-1), torch.zeros(()), atol=1e-4)


def test_forward_intermediates_and_prune():
    model = _small().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        final, inter = model.forward_intermediates(x)
        assert torch.allclose(final, model.forward_features(x))
        last2 = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [t.shape[1] for t in last2] == [64, 128]
        assert torch.allclose(last2[0], inter[2])
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        assert torch.allclose(early[0], inter[1])
    kept = model.prune_intermediate_layers([0, 1])
    assert kept == [0, 1] and len(model.stages) == 2
    with torch.no_grad():
        assert torch.allclose(model.forward_intermediates(x, intermediates_only=True)[1], inter[1])


@pytest.mark.parametrize("impl", ["auto", "reference"] + (["triton"] if HAS_TRITON else []))
def test_grad_checkpointing_same_outputs_and_grads(impl):
    """Activation checkpointing recomputes the same values (Triton kernels under the interpreter on CPU)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = _small(num_classes=5, masa_impl=impl, depths=(1, 1, 1, 1)).to(device)
    model.train()
    x = torch.randn(2, 3, 32, 40, device=device)
    plain = copy.deepcopy(model)
    if impl == "triton" and device == "cpu":   # Triton's interpreter takes seconds a block on the CPU
        plain.set_masa_impl("reference")
    plain(x).sum().backward()   # no checkpointing
    ref = {n: p.grad.clone() for n, p in plain.named_parameters()}
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, ref[n], rtol=1e-4, atol=1e-6), n


def test_group_matcher_and_no_weight_decay():
    from timm.models._manipulate import group_parameters
    from timm.optim import create_optimizer_v2
    model = _small()
    groups = group_parameters(model, model.group_matcher(coarse=False), reverse=True)
    assert len(set(groups.values())) > 3
    names = [n for n, _ in model.named_parameters()]
    assert any(n.endswith("ls1.gamma") for n in names)
    opt = create_optimizer_v2(model, "adamw", lr=1e-3, weight_decay=0.05)
    no_decay = {id(p) for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    for n, p in model.named_parameters():
        decays = id(p) not in no_decay
        assert decays == (p.ndim > 1), n  # norms, biases and layer scale have no weight decay


def test_set_attention_form_variants_and_errors():
    model = _small()
    model.set_attention_form("full")
    assert model.attention_forms == ("full",) * 4
    model.set_attention_form(["decomposed", "full", "decomposed", "full"])
    assert model.attention_forms == ("decomposed", "full", "decomposed", "full")
    model.set_attention_form("TTTF")
    assert model.attention_forms == ("decomposed",) * 3 + ("full",)
    with pytest.raises(ValueError, match="attention form"):
        model.set_attention_form("sparse")
    with pytest.raises(ValueError):
        model.set_attention_form(["full"] * 3)


def test_bad_inputs_raise_value_error():
    model = _small().eval()
    with pytest.raises(ValueError, match="at least 32x32"):
        model(torch.randn(1, 3, 31, 64))
    with pytest.raises(ValueError, match=r"\(batch, 3, height, width\)"):
        model(torch.randn(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"got \(3, 64, 64\): one image without a batch dimension; add one with "
                                         r"x.unsqueeze\(0\)"):
        model(torch.randn(3, 64, 64))
    with pytest.raises(ValueError, match=r"channels last; use x.permute\(0, 3, 1, 2\)"):
        model(torch.randn(2, 64, 64, 3))
    for dtype in (torch.uint8, torch.int64):
        with pytest.raises(ValueError, match=rf"floating-point images, got {dtype}: .*x.float\(\) / 255"):
            model(torch.zeros(1, 3, 64, 64, dtype=dtype))
    with pytest.raises(ValueError, match=r"images are torch.float64 but the model's weights are torch.float32: "
                                         r"convert the images with x.to\(torch.float32\)$"):
        model(torch.zeros(1, 3, 64, 64, dtype=torch.float64))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts float16 (not float64) for the weights
        assert model(torch.zeros(1, 3, 64, 64, dtype=torch.float16)).dtype == torch.bfloat16
    assert model.double()(torch.zeros(1, 3, 64, 64, dtype=torch.float64)).dtype == torch.float64


def test_full_and_decomposed_forms_at_non_square_sizes():
    model = _small().eval()
    with torch.no_grad():   # larger q/k: at init logits are ~0 and the two forms nearly coincide
        for blk in model.stages[0].blocks:
            blk.attn.qkv.weight.normal_(0, 0.5)
    x = torch.randn(1, 3, 161, 97)
    outs = {}
    for form in ("full", "decomposed"):
        model.set_attention_form(form)
        with torch.no_grad():
            logits, feats = model(x), model.forward_intermediates(x, intermediates_only=True)
        assert torch.isfinite(logits).all() and logits.shape == (1, 1000)
        outs[form] = feats[0]
    assert rel_err(outs["full"], outs["decomposed"]) > 1e-4


def test_large_detection_size_default_forms():
    """1333x800 through the full-width tiny variant's backbone (decomposed in stages 0-2)."""
    model = timm.create_model("rmt_tiny", features_only=True, attn_forms="TTTF").eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 800, 1333))
    assert [tuple(f.shape[-2:]) for f in feats] == [(200, 334), (100, 167), (50, 84), (25, 42)]
    assert all(torch.isfinite(f).all() for f in feats)


def test_full_form_reference_blocks_rows_without_changing_result():
    from rmt.ops.masa import masa_full_reference, rotation_tables
    b, h, w, n, d = 1, 9, 7, 2, 8
    q, k, v = (torch.randn(b, h, w, n, d, dtype=torch.float64) for _ in range(3))
    sin, cos = rotation_tables(h, w, d)
    decay = torch.tensor([-0.3, -0.05])
    whole = masa_full_reference(q, k, v, sin.double(), cos.double(), decay.double(), d ** -0.5)
    blocked = masa_full_reference(q, k, v, sin.double(), cos.double(), decay.double(), d ** -0.5,
                                  max_logits=b * n * h * w * 5)
    assert torch.allclose(whole, blocked, rtol=1e-12, atol=1e-12)


def test_model_args_table_matches_spec_forms():
    assert MODEL_ARGS["rmt_tiny"]["attn_forms"] == "TTFF"
    assert rmt.VARIANTS == ("rmt_tiny", "rmt_small", "rmt_base", "rmt_large")


def test_torchscript_and_fx_tracing_match_eager():
    """timm's TorchScript and torch.fx paths (feature extraction by graph rewriting) keep working."""
    from timm.models import create_feature_extractor
    model = _small(num_classes=3).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        ref = model(x)
        assert torch.allclose(torch.jit.script(model)(x), ref, atol=1e-6)
        extractor = create_feature_extractor(model, return_nodes={"stages.2": "s2", "head": "logits"})
        out = extractor(x)
    assert torch.allclose(out["logits"], ref, atol=1e-6)
    assert out["s2"].shape == (1, 4, 6, 64)


def test_position_tables_cached_once_and_usable_after_inference_mode():
    from rmt.ops.masa.positions import _POSITION_CACHE, cached_stage_positions

    model = timm.create_model("rmt_tiny", num_classes=3, **SMALL_ARGS)
    x = torch.randn(2, 3, 64, 48)
    with torch.inference_mode():   # the first call fills the cache inside inference mode
        model.eval()(x)
    model.train()
    model(x).sum().backward()      # the cached tables must be usable by autograd afterwards
    assert all(p.grad is not None for p in model.stages[0].blocks[0].attn.qkv.parameters())
    stage = model.stages[1]
    args = (12, 16, stage.head_dim, stage.num_heads, stage.init_value, stage.heads_range, torch.device("cpu"))
    assert cached_stage_positions(*args)[0] is cached_stage_positions(*args)[0]
    with torch.no_grad():
        cached = model.eval()(x)
        _POSITION_CACHE.clear()
        assert torch.equal(model(x), cached)



def test_position_table_op_under_compile_with_dynamic_grids():
    """``rmt::stage_positions`` (the tables compiled CUDA models read) returns the eager tables as
    fresh tensors, passes PyTorch's op checks and traces with symbolic grid sizes."""
    from rmt.ops.masa.positions import cached_stage_positions, stage_positions, stage_positions_op

    cpu = torch.device("cpu")
    args = (5, 7, 16, 4, 2.0, 4.0, cpu)
    got, want = stage_positions_op(*args), stage_positions(*args)
    assert all(torch.equal(g, t) for g, t in zip(got, want))
    assert all(g.data_ptr() != c.data_ptr() for g, c in zip(got, cached_stage_positions(*args)))
    torch.library.opcheck(stage_positions_op, args, test_utils=("test_schema", "test_faketensor"))

    def tables(x):
        sin, cos, decay = stage_positions_op(x.shape[0], x.shape[1], 16, 4, 2.0, 4.0, cpu)
        return x[..., None] * sin + cos, decay

    torch._dynamo.reset()
    compiled = torch.compile(tables, fullgraph=True, dynamic=True, backend="aot_eager")
    for h, w in ((3, 4), (6, 5), (2, 9)):
        x = torch.randn(h, w)
        sin, cos, decay = stage_positions(h, w, 16, 4, 2.0, 4.0, cpu)
        out, d = compiled(x)
        assert torch.equal(out, x[..., None] * sin + cos) and torch.equal(d, decay)

@pytest.mark.parametrize("impl", ["auto", "reference", "triton"])
def test_empty_batch_runs_forward_and_backward(impl):
    """A batch of zero images gives zero rows of logits on every path (no empty kernel launches)."""
    if impl == "triton" and not HAS_TRITON:
        pytest.skip("Triton is not installed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = timm.create_model("rmt_tiny", num_classes=3, masa_impl=impl, **SMALL_ARGS).to(device)
    x = torch.zeros(0, 3, 64, 64, device=device, requires_grad=True)
    out = model(x)
    assert out.shape == (0, 3)
    out.sum().backward()
    assert x.grad.shape == x.shape


@pytest.mark.parametrize("layerscales", [(False,) * 4, (False, False, True, True)])
def test_residual_branches_as_one_addcmul_match_plain_composition(layerscales, monkeypatch):
    """Training with drop path (and layer scale): the block's fused ``x + drop_path(ls(branch))``
    draws the same masks and gives the same outputs and gradients as the three separate ops."""
    from rmt.model import RMTBlock
    model = _small(num_classes=5, layerscales=layerscales, drop_path_rate=0.5).train()
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            torch.nn.init.normal_(p)   # layer scale far from its 1e-6 start, so it matters
    x = torch.randn(3, 3, 40, 36)

    def run():
        torch.manual_seed(1)
        model.zero_grad()
        out = model(x)
        out.square().sum().backward()
        return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    fused, fused_grads = run()
    monkeypatch.setattr(RMTBlock, "_add_branch", lambda self, x, b, ls: x + self.drop_path(getattr(self, ls)(b)))
    plain, plain_grads = run()
    assert torch.allclose(fused, plain, rtol=1e-5, atol=1e-6)
    assert fused_grads.keys() == plain_grads.keys()
    for n in plain_grads:
        assert torch.allclose(fused_grads[n], plain_grads[n], rtol=1e-4, atol=1e-6), n
