"""A block trained as one autograd node (rmt.ops.block) against the same block module by module."""
import copy

import pytest
import timm
import torch

from rmt.config import set_fast_path
from rmt.ops.masa import HAS_TRITON

from conftest import ONE_BLOCK_ARGS, SMALL_ARGS, rel_err, saved_bytes

pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="the fused block runs the Triton kernels")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _model(**kw):
    args = dict(SMALL_ARGS, num_classes=5, masa_impl="triton", drop_path_rate=0.5)
    model = timm.create_model("rmt_tiny", **dict(args, **kw)).to(DEVICE).train()
    for name, p in model.named_parameters():
        if name.endswith("gamma"):
            torch.nn.init.normal_(p)  # layer scale far from its 1e-6 start, so it matters
    return model


def _bn_cancelled(name: str) -> bool:
    """Biases of the layers that feed a BatchNorm (stem, downsampling, the head's projection): their
    true gradient is zero, so what is computed is rounding noise with no relative accuracy to check."""
    return name.endswith(".bias") and (name.startswith("stem.") or ".downsample.conv." in name
                                       or name == "head.proj.bias")


def _fused_nodes(out: torch.Tensor) -> int:
    """How many ``_Block`` nodes the autograd graph of ``out`` has."""
    seen, todo, count = set(), [out.grad_fn], 0
    while todo:
        fn = todo.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += type(fn).__name__ == "_BlockBackward"
        todo.extend(f for f, _ in fn.next_functions)
    return count


def _run(model, x, fused: bool, monkeypatch, autocast: bool = False):
    from rmt.ops import block
    set_fast_path(fused_training_block=fused)
    torch.manual_seed(1)  # the same drop-path masks on both paths
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
        out = model(x)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out)).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads, _fused_nodes(out)


def test_fused_block_matches_modules_fp32(monkeypatch):
    """Outputs, input gradient and every parameter gradient (layer scales and drop path included)
    agree with the module-by-module block (on the reference ops: Triton's interpreter would take
    as long again on the CPU); every block ran as one node."""
    model = _model(depths=ONE_BLOCK_ARGS["depths"])
    modules = copy.deepcopy(model)
    if DEVICE == "cpu":
        modules.set_masa_impl("reference")
    x = torch.randn(2, 3, 33, 40, device=DEVICE)  # grids 9x10, 5x5, 3x3, 2x2
    out, gx, grads, nodes = _run(model, x, True, monkeypatch)
    want, want_gx, want_grads, plain_nodes = _run(modules, x, False, monkeypatch)
    assert nodes == sum(ONE_BLOCK_ARGS["depths"]) and plain_nodes == 0
    assert rel_err(out, want) <= 1e-5 and rel_err(gx, want_gx) <= 1e-5
    assert grads.keys() == want_grads.keys()
    for name in want_grads:
        got, expected = grads[name], want_grads[name]
        assert got.dtype == expected.dtype, name
        assert _bn_cancelled(name) or rel_err(got, expected) <= 1e-5, name


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 Triton kernels are checked on CUDA only")
def test_fused_block_under_bf16_autocast_as_accurate_as_modules(monkeypatch):
    """Under bf16 autocast the two paths round differently (the fused backward adds the residual
    gradients in float32 inside the LayerNorm kernel), so each is compared with the float32 result:
    the fused block is at least about as close to it as the module-by-module block."""
    model = _model()
    x = torch.randn(4, 3, 64, 64, device=DEVICE)
    exact = _run(model, x, False, monkeypatch)
    fused = _run(model, x, True, monkeypatch, autocast=True)
    plain = _run(model, x, False, monkeypatch, autocast=True)
    assert fused[3] == sum(SMALL_ARGS["depths"]) and fused[0].dtype == plain[0].dtype
    for i in (0, 1):  # outputs, input gradient
        assert rel_err(fused[i], exact[i]) <= max(1.25 * rel_err(plain[i], exact[i]), 1e-3)
    names = [n for n in exact[2] if not _bn_cancelled(n)]
    assert all(fused[2][n].dtype == torch.float32 for n in exact[2])
    # small gradients carry several percent of bf16 noise on either path: compare all of them at
    # once, and the worst tensor of each path
    flat = {k: torch.cat([run[2][n].flatten() / exact[2][n].norm() for n in names])
            for k, run in (("exact", exact), ("fused", fused), ("plain", plain))}
    assert rel_err(flat["fused"], flat["exact"]) <= 1.25 * rel_err(flat["plain"], flat["exact"]) + 1e-3
    worst = {k: max(rel_err(run[2][n], exact[2][n]) for n in names) for k, run in (("fused", fused), ("plain", plain))}
    assert worst["fused"] <= 1.5 * worst["plain"]


def test_fused_block_keeps_no_more_for_backward(monkeypatch):
    """The single node saves what the module-by-module block saves (and nothing more)."""
    from rmt.ops import block
    model = _model(drop_path_rate=0.0)
    blk, stage = model.stages[1].blocks[0], model.stages[1]
    from rmt.ops.masa.positions import stage_positions
    sin, cos, decay = stage_positions(6, 5, stage.head_dim, stage.num_heads, stage.init_value,
                                      stage.heads_range, torch.device(DEVICE))
    x = torch.randn(2, 6, 5, 32, device=DEVICE, requires_grad=True)
    sizes = []
    for fused in (True, False):
        set_fast_path(fused_training_block=fused)
        sizes.append(saved_bytes(lambda: blk(x, sin, cos, decay))[1])
    assert 0 < sizes[0] <= sizes[1]


def test_hooked_or_frozen_blocks_keep_the_module_path(monkeypatch):
    from rmt.ops import block
    set_fast_path(fused_training_block=True)
    model = _model(drop_path_rate=0.0, depths=ONE_BLOCK_ARGS["depths"])
    x = torch.randn(2, 3, 32, 32, device=DEVICE)
    calls = []
    handle = model.stages[0].blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: calls.append(1))
    out = model(x)
    assert calls == [1] and _fused_nodes(out) == sum(ONE_BLOCK_ARGS["depths"]) - 1
    handle.remove()
    model.requires_grad_(False)
    out = model(x)
    assert out.grad_fn is None  # nothing to train: the inference kernels ran
    model.requires_grad_(True)
    with torch.no_grad():
        assert model(x).grad_fn is None


def test_norm_backward_adds_the_residual_in_the_kernel_or_after_it():
    """The fused block's LayerNorm backward plus residual gradient: inside the kernel when dtypes
    agree, after it in the wider dtype when a layer scale promoted the residual stream."""
    from rmt.ops import layernorm
    from rmt.ops.block import _norm_backward
    torch.manual_seed(3)
    x = torch.randn(2, 3, 5, 16, device=DEVICE)
    weight, bias = torch.randn(16, device=DEVICE), torch.randn(16, device=DEVICE)
    _, mean, rstd = layernorm._forward(x.view(-1, 16), weight, bias, 1e-6, x.dtype)
    grad_y = torch.randn_like(x)
    dx, dw, db = layernorm._backward(grad_y.view(-1, 16), x.view(-1, 16), weight, mean, rstd)
    for residual in (torch.randn_like(x), torch.randn_like(x, dtype=torch.float64)):
        got, got_w, got_b = _norm_backward(grad_y, x, weight, mean, rstd, residual, residual.dtype)
        assert got.shape == x.shape and got.dtype == residual.dtype
        assert torch.equal(got_w, dw) and torch.equal(got_b, db)
        assert rel_err(got, dx.view_as(x).to(residual.dtype) + residual) <= 1e-6


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("scale_shape", [(3, 1, 1, 1), (12,), (3, 1, 1, 12), (1, 1, 1, 12)])
@pytest.mark.parametrize("with_x", [True, False])
def test_scaled_add_matches_addcmul(scale_shape, with_x):
    """The residual kernel: ``x + y * scale`` as ``torch.addcmul`` computes it, dtype promotion
    included (a float32 layer scale on bf16 activations gives float32), into ``out`` or a new
    tensor; a non-contiguous input takes PyTorch's ops."""
    from rmt.ops.residual import scaled_add
    x = torch.randn(3, 5, 7, 12, device=DEVICE)
    y = torch.randn(3, 5, 7, 12, device=DEVICE)
    scale = torch.rand(scale_shape, device=DEVICE) + 0.5
    want = torch.addcmul(x, y, scale) if with_x else y * scale
    got = scaled_add(x if with_x else None, y, scale)
    assert got.dtype == want.dtype and rel_err(got, want) <= 1e-6
    out = torch.empty_like(want)
    assert scaled_add(x if with_x else None, y, scale, out=out) is out and rel_err(out, want) <= 1e-6
    mixed = scaled_add(x.bfloat16() if with_x else None, y.bfloat16(), scale)  # float32 scale: promoted
    assert mixed.dtype == torch.float32
    as_bf16 = scaled_add(x if with_x else None, y, scale, dtype=torch.bfloat16)
    assert as_bf16.dtype == torch.bfloat16 and rel_err(as_bf16.float(), want) <= 1e-2
    strided = y.transpose(1, 2)  # not contiguous: PyTorch's ops
    want_t = torch.addcmul(x.transpose(1, 2), strided, scale) if with_x else strided * scale
    assert rel_err(scaled_add(x.transpose(1, 2) if with_x else None, strided, scale), want_t) <= 1e-6
