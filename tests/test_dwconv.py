"""Fused depthwise convolution (GELU, bias and residual in one pass) against F.gelu + F.conv2d.

On CUDA the Triton kernels run natively; without CUDA in Triton's interpreter (TRITON_INTERPRET=1,
set in conftest.py) at small sizes.
"""
import pytest
import torch

from rmt.config import set_fast_path
from rmt.ops.dwconv import HAS_TRITON, dwconv_nhwc, dwconv_nhwc_reference, dwconv_nhwc_triton

from conftest import assert_same_gradients, rel_err, saved_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


def _inputs(shape, ks, bias=True, dtype=torch.float32, device=DEVICE):
    b, h, w, c = shape
    wide = torch.randn(b, h, w, 3 * c, device=device, dtype=dtype, requires_grad=True)
    x = wide[..., c:2 * c]                     # a strided slice, like v inside the fused qkv output
    weight = torch.randn(c, 1, ks, ks, device=device, requires_grad=True)
    b_ = torch.randn(c, device=device, requires_grad=True) if bias else None
    return wide, x, weight, b_


@needs_triton
@pytest.mark.parametrize("ks", [3, 5])
@pytest.mark.parametrize("residual,gelu,shape", [
    (residual, gelu, shape) for shape in ((2, 7, 9, 16), (1, 1, 5, 24), (1, 12, 1, 8))
    for residual, gelu in ((True, False), (False, False), (True, True))
] + [(True, True, (1, 9, 40, 70))])   # several tiles of a row and of the channels, all features at once
def test_triton_dwconv_matches_reference_with_gradients(ks, residual, gelu, shape):
    wide, x, weight, bias = _inputs(shape, ks)
    want = dwconv_nhwc_reference(x, weight, bias, residual, gelu)
    got = dwconv_nhwc_triton(x, weight, bias, residual, gelu)
    assert got.shape == shape and got.is_contiguous() and got.dtype == x.dtype
    assert rel_err(got, want) <= 1e-6
    assert_same_gradients(got, want, (wide, weight, bias), ("input", "weight", "bias"), 1e-5)
    with torch.no_grad():
        assert rel_err(dwconv_nhwc_triton(x, weight, bias, residual, gelu), want) <= 1e-6


@needs_triton
# each number of rows with both kernel sizes; each kernel size and each number of rows under
# both loop orders (the full product costs twice the time under Triton's interpreter)
@pytest.mark.parametrize("rows, ks, taps_outer", [(1, 3, False), (2, 3, True), (3, 3, False), (4, 3, True),
                                                  (1, 5, True), (2, 5, False), (3, 5, True), (4, 5, False)])
def test_triton_dwconv_rows_per_program(rows, ks, taps_outer, monkeypatch):
    """Every number of output rows per program (1-4), with a partly-empty last group of rows, and
    both loop orders of the kernel, in the forward kernel and the input-gradient kernel (with the
    GELU derivative and bias sums)."""
    from rmt.ops import dwconv
    monkeypatch.setattr(dwconv, "_blocks", lambda w, c, k: (8, 16, 4, rows))
    monkeypatch.setattr(dwconv, "_backward_blocks", lambda w, c, k, gelu: (8, 16, 4, rows))
    monkeypatch.setattr(dwconv, "_taps_outer", lambda w, k: taps_outer)
    wide, x, weight, bias = _inputs((2, 7, 11, 20), ks)
    want = dwconv_nhwc_reference(x, weight, bias, True, True)
    got = dwconv_nhwc_triton(x, weight, bias, True, True)
    assert rel_err(got, want) <= 1e-6
    assert_same_gradients(got, want, (wide, weight, bias), ("input", "weight", "bias"), 1e-5)


@needs_triton
@pytest.mark.parametrize("ks", [3, 5])
def test_triton_dwconv_reads_weight_through_its_strides(ks):
    """A weight whose channels are its innermost dimension (a transposed view) gives the same
    results as a contiguous one, forward and backward."""
    wide, x, weight, bias = _inputs((2, 6, 10, 24), ks)
    flat = weight.detach().reshape(24, ks * ks).t().contiguous().requires_grad_()
    strided = flat.t().reshape(24, 1, ks, ks)
    assert strided.stride(0) == 1 and torch.equal(strided, weight)
    want = dwconv_nhwc_reference(x, weight, bias, True, False)
    got = dwconv_nhwc_triton(x, strided, bias, True, False)
    assert rel_err(got, want) <= 1e-6
    grad = torch.randn_like(want)
    w_want, = torch.autograd.grad(want, weight, grad)
    w_got, = torch.autograd.grad(got, flat, grad)
    assert rel_err(w_got.t().reshape(24, 1, ks, ks), w_want) <= 1e-5


@pytest.mark.parametrize("gelu", [False, True])
def test_cpu_folded_residual_matches_reference_with_gradients(gelu):
    """The CPU path folds the residual into the kernel's centre tap: same values and gradients."""
    from rmt.ops.dwconv import dwconv_nhwc_folded
    wide, x, weight, bias = _inputs((2, 7, 9, 16), 3, device="cpu")
    want = dwconv_nhwc_reference(x, weight, bias, True, gelu)
    got = dwconv_nhwc_folded(x, weight, bias, gelu)
    assert rel_err(got, want) <= 1e-6
    assert_same_gradients(got, want, (wide, weight, bias), ("input", "weight", "bias"), 1e-5)
    assert rel_err(dwconv_nhwc(x, weight, bias, True, False, gelu, cpu_fast=True), want) <= 1e-6


@needs_triton
def test_triton_dwconv_without_bias_and_frozen_weight():
    wide, x, weight, _ = _inputs((1, 6, 5, 8), 3, bias=False)
    weight = weight.detach()
    want = dwconv_nhwc_reference(x, weight, None, False)
    got = dwconv_nhwc_triton(x, weight, None, False)
    assert rel_err(got, want) <= 1e-6
    g = torch.randn_like(want)
    assert rel_err(torch.autograd.grad(got, wide, g)[0], torch.autograd.grad(want, wide, g)[0]) <= 1e-5


@needs_triton
@pytest.mark.parametrize("frozen", ["input", "weight"])
def test_triton_dwconv_bias_gradient_with_frozen_input_or_weight(frozen):
    """The bias gradient comes from the input-gradient kernel's partial sums, or from cuDNN when
    no input gradient is computed."""
    wide, x, weight, bias = _inputs((2, 5, 37, 12), 3)
    if frozen == "input":
        x = x.detach()
    else:
        weight = weight.detach()
    want = dwconv_nhwc_reference(x, weight, bias, True)
    got = dwconv_nhwc_triton(x, weight, bias, True)
    g = torch.randn_like(want)
    wrt = [bias, weight] if frozen == "input" else [bias, wide]
    for a, e in zip(torch.autograd.grad(got, wrt, g), torch.autograd.grad(want, wrt, g)):
        assert rel_err(a, e) <= 1e-5


@needs_triton
@pytest.mark.parametrize("ks", [3, 5])
@pytest.mark.parametrize("rows,block_w", [(1, 4), (3, 8), (8, 16)])
def test_weight_gradient_kernel_tiles_match_autograd(ks, rows, block_w, monkeypatch):
    """The weight-gradient kernel's partial sums over programs of 1, 3 and 8 rows (a partly-empty
    last group: 7 rows) and token tiles narrower and wider than the 11-token rows, on a strided
    input, with the bias sums; float32 results."""
    from rmt.ops import dwconv
    from rmt.ops.triton_support import eager_launch
    monkeypatch.setattr(dwconv, "_wgrad_blocks", lambda h, w, c, k: (block_w, 16, 4, rows))
    wide, x, weight, bias = _inputs((2, 7, 11, 20), ks)
    want = dwconv_nhwc_reference(x, weight, bias, False)
    grad = torch.randn_like(want)
    want_w, want_b = torch.autograd.grad(want, (weight, bias), grad)
    got_w, got_b = dwconv._weight_grad(eager_launch, grad.contiguous(), x.detach(), ks, True)
    assert got_w.shape == weight.shape and got_w.dtype == torch.float32
    assert rel_err(got_w, want_w) <= 1e-5 and rel_err(got_b, want_b) <= 1e-5
    only_w, none = dwconv._weight_grad(eager_launch, grad.contiguous(), x.detach(), ks, False)
    assert none is None and rel_err(only_w, want_w) <= 1e-5


@needs_triton
@pytest.mark.parametrize("frozen_input", [False, True])
def test_triton_weight_gradient_switch(frozen_input, monkeypatch):
    """``dwconv_triton_weight_grad=True`` takes the weight-gradient kernel in the backward pass (with the
    bias sums too when no input gradient is computed): the reference's gradients, float32 ones."""
    from rmt.ops import dwconv
    set_fast_path(dwconv_triton_weight_grad=True)
    wide, x, weight, bias = _inputs((2, 6, 9, 12), 3)
    if frozen_input:
        x = x.detach()
    want = dwconv_nhwc_reference(x, weight, bias, True, True)
    got = dwconv_nhwc_triton(x, weight, bias, True, True)
    wrt = (weight, bias) if frozen_input else (wide, weight, bias)
    assert_same_gradients(got, want, wrt, ("weight", "bias") if frozen_input else ("input", "weight", "bias"),
                          1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="autocast dtypes are checked on CUDA only")
def test_dispatch_under_autocast_keeps_float32_weight_gradients():
    _, x, weight, bias = _inputs((2, 14, 14, 96), 3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = dwconv_nhwc(x, weight, bias, True, True, gelu=True)
    assert got.dtype == torch.bfloat16
    want = dwconv_nhwc_reference(x, weight, bias, True, True)
    assert rel_err(got.float(), want) <= 1e-2
    got.float().sum().backward()
    assert weight.grad.dtype == torch.float32 and bias.grad.dtype == torch.float32


def test_dispatch_without_fused_uses_reference_with_autograd():
    x = torch.randn(1, 6, 6, 8, requires_grad=True)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    y = dwconv_nhwc(x, conv.weight, conv.bias, True, False, gelu=True)
    assert torch.allclose(y, dwconv_nhwc_reference(x, conv.weight, conv.bias, True, True))
    y.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


@needs_triton
def test_custom_op_used_by_compile_matches_eager_function():
    """The torch.library op (taken under torch.compile) and the eager Function agree exactly."""
    from rmt.ops import dwconv
    wide, x, weight, bias = _inputs((1, 5, 6, 8), 3)
    via_op = dwconv.dwconv_op(x, weight, bias, True, True)
    via_fn = dwconv._DWConv.apply(x, weight, bias, True, True)
    assert torch.equal(via_op, via_fn)
    g = torch.randn_like(via_op)
    for a, b in zip(torch.autograd.grad(via_op, (wide, weight, bias), g),
                    torch.autograd.grad(via_fn, (wide, weight, bias), g)):
        assert torch.equal(a, b)


@needs_triton
@pytest.mark.parametrize("with_gelu", [True, False])
def test_ffn_tail_recomputes_the_depthwise_output_and_matches_reference(with_gelu, monkeypatch):
    """Both ways of the FFN's input gradient: GELU's derivative written beside the recomputed GELU
    (the default) or evaluated inside the input-gradient kernel."""
    from rmt.ops import ffn
    from rmt.ops.ffn import ffn_tail
    set_fast_path(ffn_derivative_with_gelu=with_gelu)
    b, h, w, hidden, dim = 2, 5, 7, 24, 8
    a = torch.randn(b, h, w, hidden, device=DEVICE, requires_grad=True)
    dw_w = torch.randn(hidden, 1, 3, 3, device=DEVICE, requires_grad=True)
    dw_b = torch.randn(hidden, device=DEVICE, requires_grad=True)
    fc_w = torch.randn(dim, hidden, device=DEVICE, requires_grad=True)
    fc_b = torch.randn(dim, device=DEVICE, requires_grad=True)
    args = (a, dw_w, dw_b, fc_w, fc_b)
    want, want_saved = saved_bytes(lambda: ffn_tail(*args, False))
    got, got_saved = saved_bytes(lambda: ffn_tail(*args, True))
    assert rel_err(got, want) <= 1e-6
    assert got_saved <= want_saved - a.numel() * a.element_size()   # the (b, h, w, hidden) output is not kept
    g = torch.randn_like(want)
    for name, x, e in zip(("a", "dw weight", "dw bias", "fc weight", "fc bias"),
                          torch.autograd.grad(got, args, g), torch.autograd.grad(want, args, g)):
        assert rel_err(x, e) <= 1e-5, name


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gelu_and_derivative_match_autograd(dtype):
    from rmt.ops.ffn import gelu_and_derivative
    if dtype != torch.float32 and DEVICE == "cpu":
        pytest.skip("bf16 Triton kernels are checked on CUDA only")
    a = (3 * torch.randn(3, 5, 7, 11, device=DEVICE)).to(dtype)  # not a multiple of the block
    g, d = gelu_and_derivative(a)
    ref = a.float().requires_grad_()
    want = torch.nn.functional.gelu(ref)
    (want_d,) = torch.autograd.grad(want.sum(), ref)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert g.dtype == d.dtype == dtype and g.shape == d.shape == a.shape
    assert rel_err(g.float(), want) <= tol and rel_err(d.float(), want_d) <= tol


@needs_triton
@pytest.mark.parametrize("ks", [3, 5])
def test_input_gradient_added_in_place_to_a_strided_slice(ks):
    """``add_to``: the input gradient is added to a slice of a wider tensor, the rest untouched."""
    from rmt.ops import dwconv
    from rmt.ops.triton_support import eager_launch
    b, h, w, c = 2, 6, 9, 12
    x = torch.randn(b, h, w, c, device=DEVICE)
    weight = torch.randn(c, 1, ks, ks, device=DEVICE)
    grad = torch.randn(b, h, w, c, device=DEVICE)
    want, _, want_b = dwconv._backward(eager_launch, grad, x, weight, False, False, True, False, True)
    wide = torch.randn(b, h, w, 3 * c, device=DEVICE)
    before = wide.clone()
    got, _, got_b = dwconv._backward(eager_launch, grad, x, weight, False, False, True, False, True,
                                     add_to=wide[..., 2 * c:])
    assert got.data_ptr() == wide[..., 2 * c:].data_ptr()
    assert torch.equal(wide[..., :2 * c], before[..., :2 * c])
    assert rel_err(wide[..., 2 * c:], before[..., 2 * c:] + want) <= 1e-6
    assert torch.equal(got_b, want_b)


def test_mlp_calls_fc2_module_when_it_has_hooks():
    from rmt.model import Mlp
    mlp = Mlp(8, 24)
    x = torch.randn(1, 4, 4, 8)
    calls = []
    mlp.fc2.register_forward_hook(lambda *_: calls.append(1))
    want = mlp(x)
    assert calls == [1]
    ref = mlp.fc2(dwconv_nhwc_reference(mlp.fc1(x), mlp.dwconv.weight, mlp.dwconv.bias, True, True))
    assert torch.allclose(want, ref, atol=1e-6)



@needs_triton
@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt's GELU epilogue runs on CUDA only")
def test_mlp_inference_in_bf16_takes_the_gelu_epilogue(monkeypatch):
    from rmt.model import Mlp
    from rmt.ops import ffn, linear
    mlp = Mlp(32, 96).cuda()
    x = torch.randn(2, 9, 13, 32, device="cuda")
    calls = []
    original = ffn.linear_gelu
    monkeypatch.setattr(ffn, "linear_gelu", lambda *a: calls.append(1) or original(*a))
    with torch.no_grad():
        want = mlp.fc2(dwconv_nhwc_reference(mlp.fc1(x), mlp.dwconv.weight, mlp.dwconv.bias, True, True))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            got = mlp(x)
        assert calls == [1]
        set_fast_path(gelu_epilogue=False)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            exact = mlp(x)
        assert calls == [1]
    assert rel_err(got.float(), want) <= 1e-2 and rel_err(exact.float(), want) <= 1e-2
    assert rel_err(got.float(), exact.float()) <= 1e-2


def test_tiles_stay_small_enough_not_to_spill_at_any_resolution():
    """The forward and input-gradient tiles at RMT's shapes for inputs up to 1024x1024 (token rows of 7-256, widths
    64-1536): at most 2,048 elements per accumulator with 4 rows per program. The 5x5 kernel with
    64 x 64 tiles and 4 rows spilled its registers and ran 10-17x slower (2.6 ms against 0.15 ms for
    a 128-token LePE at 1024x1024, batch 16), which the 224x224 tuning had never met."""
    from rmt.ops.dwconv import _backward_blocks, _blocks
    for side in (7, 8, 14, 16, 28, 32, 56, 64, 128, 256):
        for c in (64, 128, 192, 256, 384, 512, 768, 1024, 1536):
            for ks in (3, 5):
                tiles = [_blocks(side, c, ks)] + [_backward_blocks(side, c, ks, gelu) for gelu in (False, True)]
                for block_w, block_c, warps, rows in tiles:  # the input-gradient kernel is the same kernel
                    assert block_w * block_c <= (2048 if rows == 4 else 4096), (side, c, ks)
