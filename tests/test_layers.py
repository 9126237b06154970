"""The plug-in MaSA layer against the model's own attention and against torch's attention, and the
RMT-DeiT-S / RMT-Swin-T timm models (parameter counts by hand, forward/backward, timm arguments)."""
import pytest
import timm
import torch
import torch.nn.functional as F

from rmt.layers import MaSALayer
from rmt.model import stage_positions
from rmt.plugin_models import BlockMaSA, MaSASwinBlock

from conftest import SMALL_ARGS


def _model_with_sharp_attention():
    model = timm.create_model("rmt_tiny", **SMALL_ARGS).eval()
    with torch.no_grad():
        for stage in model.stages:
            for blk in stage.blocks:
                blk.attn.qkv.weight.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("form", ["full", "decomposed"])
def test_plugin_layer_matches_model_masa_on_same_weights(form):
    model = _model_with_sharp_attention()
    model.set_attention_form(form)
    h, w = 9, 6
    for i, stage in enumerate(model.stages):
        for j, blk in enumerate(stage.blocks):
            attn = blk.attn
            dim = attn.qkv.in_features
            nhwc = MaSALayer(dim, attn.num_heads, form=form, init_value=stage.init_value,
                             heads_range=stage.heads_range, data_format="NHWC")
            nchw = MaSALayer(dim, attn.num_heads, form=form, init_value=stage.init_value,
                             heads_range=stage.heads_range, data_format="NCHW")
            nhwc.load_state_dict(attn.state_dict())
            nchw.load_state_dict(attn.state_dict())
            x = torch.randn(2, h, w, dim)
            sin, cos, decay = stage_positions(h, w, stage.head_dim, stage.num_heads, stage.init_value,
                                              stage.heads_range, x.device)
            with torch.no_grad():
                ref = attn(x, sin, cos, decay)
                out_nhwc = nhwc(x)
                out_nchw = nchw(x.permute(0, 3, 1, 2).contiguous())
            assert out_nchw.shape == (2, dim, h, w)
            assert (out_nhwc - ref).abs().max() <= 1e-6, (i, j)
            assert (out_nchw.permute(0, 2, 3, 1) - ref).abs().max() <= 1e-6, (i, j)


def _qkv(layer, x):
    b, h, w, c = x.shape
    q, k, v = layer.qkv(x).split(c, dim=-1)
    heads = lambda t: t.reshape(b, h, w, layer.num_heads, -1).permute(0, 3, 1, 2, 4)  # noqa: E731
    return heads(q), heads(k), heads(v)


def test_switched_off_layer_is_plain_attention():
    """No decay, rotation or LePE: the full form is ordinary softmax attention."""
    layer = MaSALayer(32, 4, form="full", decay=False, rotation=False, lepe=False, data_format="NHWC")
    assert layer.lepe is None and not any("lepe" in k for k in layer.state_dict())
    x = torch.randn(2, 5, 7, 32)
    q, k, v = _qkv(layer, x)                                   # (b, n, h, w, d)
    o = F.scaled_dot_product_attention(q.flatten(2, 3), k.flatten(2, 3), v.flatten(2, 3))
    ref = layer.proj(o.view(2, 4, 5, 7, 8).permute(0, 2, 3, 1, 4).reshape(2, 5, 7, 32))
    with torch.no_grad():
        assert torch.allclose(layer(x), ref, atol=1e-6)


def test_switched_off_decomposed_layer_is_axial_attention():
    """No decay, rotation or LePE: the decomposed form attends along rows, then along columns."""
    layer = MaSALayer(32, 4, form="decomposed", decay=False, rotation=False, lepe=False, data_format="NHWC")
    x = torch.randn(2, 5, 7, 32)
    q, k, v = _qkv(layer, x)                                   # (b, n, h, w, d)
    v_rows = F.scaled_dot_product_attention(q, k, v)           # attention within each row
    qt, kt, vt = (t.transpose(2, 3) for t in (q, k, v_rows))   # columns
    o = F.scaled_dot_product_attention(qt, kt, vt).transpose(2, 3)
    ref = layer.proj(o.permute(0, 2, 3, 1, 4).reshape(2, 5, 7, 32))
    with torch.no_grad():
        assert torch.allclose(layer(x), ref, atol=1e-6)


def test_each_switch_changes_the_output():
    torch.manual_seed(0)
    base = MaSALayer(32, 4, data_format="NHWC")
    with torch.no_grad():
        base.qkv.weight.normal_(0, 0.3)
    x = torch.randn(1, 6, 6, 32)
    with torch.no_grad():
        ref = base(x)
        for option in ("decay", "rotation", "lepe"):
            other = MaSALayer(32, 4, data_format="NHWC", **{option: False})
            other.load_state_dict(base.state_dict(), strict=option != "lepe")
            assert (other(x) - ref).abs().max() > 1e-3, option


def test_layer_errors():
    with pytest.raises(ValueError, match="even width"):
        MaSALayer(30, 2)            # head width 15
    with pytest.raises(ValueError, match="form"):
        MaSALayer(32, 4, form="windowed")
    with pytest.raises(ValueError, match="impl"):
        MaSALayer(32, 4, impl="cuda")
    with pytest.raises(ValueError, match="data_format"):
        MaSALayer(32, 4, data_format="NLC")
    with pytest.raises(ValueError, match="built for 32 channels"):
        MaSALayer(32, 4, data_format="NCHW")(torch.randn(1, 8, 8, 32))
    with pytest.raises(ValueError, match="4-D"):
        MaSALayer(32, 4)(torch.randn(1, 64, 32))


# ------------------------------------------------------------------------------------------------
# RMT-DeiT-S and RMT-Swin-T
# ------------------------------------------------------------------------------------------------

RMT_DEIT_S_PARAMS = 22_094_440
RMT_SWIN_T_PARAMS = 28_379_848


def test_rmt_deit_small_parameter_count_by_hand():
    d, depth, hidden, classes, patch = 384, 12, 4 * 384, 1000, 16
    patch_embed = 3 * patch * patch * d + d
    block = (2 * d            # norm1
             + d * 3 * d + 3 * d  # qkv
             + 25 * d + d     # LePE: depthwise 5x5 with bias
             + d * d + d      # proj
             + 2 * d          # norm2
             + d * hidden + hidden + hidden * d + d)  # MLP
    head = 2 * d + d * classes + classes          # fc_norm (after pooling) + classifier
    assert patch_embed + depth * block + head == RMT_DEIT_S_PARAMS
    model = timm.create_model("rmt_deit_small", device="meta")
    assert sum(p.numel() for p in model.parameters()) == RMT_DEIT_S_PARAMS
    # = DeiT-S without class token and position table, with a LePE per block
    deit = timm.create_model("deit_small_patch16_224", device="meta")
    deit_params = sum(p.numel() for p in deit.parameters())
    assert RMT_DEIT_S_PARAMS == deit_params - d - 197 * d + depth * (25 * d + d)


def test_rmt_swin_tiny_parameter_count():
    model = timm.create_model("rmt_swin_tiny", device="meta")
    assert sum(p.numel() for p in model.parameters()) == RMT_SWIN_T_PARAMS
    swin = timm.create_model("swin_tiny_patch4_window7_224", device="meta")
    rel_bias = sum(p.numel() for n, p in swin.named_parameters() if "relative_position_bias_table" in n)
    assert rel_bias == 13 ** 2 * (2 * 3 + 2 * 6 + 6 * 12 + 2 * 24)
    lepe = 26 * (2 * 96 + 2 * 192 + 6 * 384 + 2 * 768)
    assert RMT_SWIN_T_PARAMS == sum(p.numel() for p in swin.parameters()) - rel_bias + lepe


def test_rmt_deit_small_forward_backward():
    model = timm.create_model("rmt_deit_small", num_classes=10, drop_path_rate=0.1, drop_rate=0.1)
    assert all(isinstance(b.attn, BlockMaSA) and b.attn.form == "full" for b in model.blocks)
    assert model.cls_token is None and model.pos_embed is None and model.global_pool == "avg"
    model.train()
    x = torch.randn(2, 3, 64, 96)                       # a 4x6 token grid
    logits = model(x)
    assert logits.shape == (2, 10)
    F.cross_entropy(logits, torch.tensor([1, 7])).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing, missing[:5]
    model.eval()
    with torch.no_grad():
        features = model.forward_features(x)
        assert features.shape == (2, 4, 6, 384) and model.output_fmt == "NHWC"   # the token grid
        assert torch.allclose(model.forward_head(features), model(x))
        final, inter = model.forward_intermediates(x, indices=2)
        assert torch.equal(final, features) and [t.shape for t in inter] == [(2, 384, 4, 6)] * 2
        _, inter = model.forward_intermediates(x, indices=1, output_fmt="NLC")
        assert [t.shape for t in inter] == [(2, 24, 384)]
        model.reset_classifier(0, "")
        assert model(x).shape == (2, 4, 6, 384)          # no pooling: the grid
        model.reset_classifier(10, "avg")
        assert model(torch.randn(1, 3, 224, 224)).shape == (1, 10)   # the paper's 14x14 grid
    model.reset_classifier(3)
    assert model(x).shape == (2, 3)


def test_rmt_deit_small_options_and_errors():
    model = timm.create_model("rmt_deit_small", embed_dim=64, depth=2, num_heads=2, masa_form="decomposed",
                              masa_lepe=False, pos_embed="learn", num_classes=4)
    assert model.blocks[0].attn.form == "decomposed" and model.blocks[0].attn.lepe is None
    assert model(torch.randn(1, 3, 48, 80)).shape == (1, 4)     # learned table resampled to 3x5
    with pytest.raises(ValueError, match="class or register tokens"):
        timm.create_model("rmt_deit_small", class_token=True, device="meta")
    with pytest.raises(ValueError, match="patch_drop_rate"):
        timm.create_model("rmt_deit_small", patch_drop_rate=0.1, device="meta")
    with pytest.raises(ValueError, match="attention mask"):
        model.blocks[0](torch.randn(1, 3, 5, 64), attn_mask=torch.ones(15, 15, dtype=torch.bool))
    with pytest.raises(RuntimeError, match="do not compile with TorchScript"):
        torch.jit.script(model)


def test_rmt_swin_tiny_forward_backward_and_forms():
    model = timm.create_model("rmt_swin_tiny", num_classes=5, drop_path_rate=0.2)
    blocks = [b for stage in model.layers for b in stage.blocks]
    assert all(isinstance(b, MaSASwinBlock) for b in blocks)
    assert [stage.blocks[0].attn.form for stage in model.layers] == ["decomposed", "decomposed", "full", "full"]
    assert [stage.blocks[0].attn.heads_range for stage in model.layers] == [4, 4, 6, 6]
    model.train()
    x = torch.randn(2, 3, 64, 96)
    logits = model(x)
    assert logits.shape == (2, 5)
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 72, 40)).shape == (1, 5)   # any size: odd grids are padded
    features = timm.create_model("rmt_swin_tiny", features_only=True, embed_dim=16,
                                 num_heads=(1, 2, 2, 4), depths=(1, 1, 1, 1))
    assert features.feature_info.channels() == [16, 32, 64, 128]
    with torch.no_grad():
        assert [tuple(f.shape[1:3]) for f in features(torch.randn(1, 3, 64, 64))] == [(16, 16), (8, 8), (4, 4), (2, 2)]
