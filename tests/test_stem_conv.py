"""The stem's fused first layers (conv -> BatchNorm in eval -> GELU, one Triton kernel) against the modules.

On CUDA the kernel runs natively; without CUDA in Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py) at small sizes.
"""
import copy

import pytest
import torch
import torch.nn as nn

from rmt.config import fast_path, set_fast_path
from rmt.stem import Stem
from rmt.ops import stem_conv
from rmt.ops.triton_support import HAS_TRITON

from conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


def _layers(cin=3, cout=32, stride=2, bias=True, act=None, device=DEVICE):
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, stride, 1, bias=bias)
    norm = nn.BatchNorm2d(cout)
    norm.running_mean.normal_()
    norm.running_var.uniform_(0.3, 3.0)
    norm.weight.data.normal_()
    norm.bias.data.normal_()
    act = nn.GELU() if act is None else act
    return [m.to(device).eval() for m in (conv, norm, act)]


@pytest.mark.parametrize("cin,cout,stride,bias,gelu", [
    (3, 32, 2, True, True), (1, 40, 2, False, True), (3, 16, 1, True, False), (4, 56, 2, True, True)])
@pytest.mark.parametrize("size", [(9, 9), (16, 23), (1, 70)])
def test_fused_stem_layers_match_the_modules(cin, cout, stride, bias, gelu, size):
    conv, norm, act = _layers(cin, cout, stride, bias, None if gelu else nn.Identity())
    x = torch.randn(2, cin, *size, device=DEVICE)
    with torch.no_grad():
        assert stem_conv.fuses(x, conv, norm, act, True)
        got = stem_conv.conv_bn_gelu(x, conv, norm, gelu)
        want = act(norm(conv(x)))
    assert got.shape == want.shape and got.dtype == want.dtype
    assert got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got, want) <= 1e-5


def test_fused_stem_reads_any_input_layout_and_follows_autocast():
    conv, norm, act = _layers()
    x = torch.randn(2, 3, 12, 15, device=DEVICE)
    with torch.no_grad():
        want = act(norm(conv(x)))
        strided = torch.empty(2, 6, 12, 30, device=DEVICE)[:, ::2, :, ::2]
        strided.copy_(x)
        for inp in (x, x.contiguous(memory_format=torch.channels_last), strided):
            assert rel_err(stem_conv.conv_bn_gelu(inp, conv, norm, True), want) <= 1e-5
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            got = stem_conv.conv_bn_gelu(x, conv, norm, True)
            mods = act(norm(conv(x)))
    assert got.dtype == mods.dtype == torch.bfloat16
    assert rel_err(got.float(), want) <= 1e-2


def test_fused_stem_dispatch():
    conv, norm, act = _layers()
    x = torch.randn(1, 3, 8, 8, device=DEVICE)
    with torch.no_grad():
        assert stem_conv.fuses(x, conv, norm, act, True)
        assert not stem_conv.fuses(x, conv, norm, act, False)          # the model's setting
        assert not stem_conv.fuses(x, conv, norm, nn.GELU(approximate="tanh"), True)
        assert not stem_conv.fuses(x[:, :2], conv, norm, act, True)    # channels do not match
        norm.train()
        assert not stem_conv.fuses(x, conv, norm, act, True)           # batch statistics
        norm.eval()
        handle = conv.register_forward_hook(lambda *_: None)
        assert not stem_conv.fuses(x, conv, norm, act, True)
        handle.remove()
        big, big_norm, _ = _layers(cin=8)
        assert not stem_conv.fuses(torch.randn(1, 8, 8, 8, device=DEVICE), big, big_norm, act, True)
        wide = nn.Conv2d(3, 32, 5, 2, 2).to(DEVICE).eval()                # 75 taps > MAX_PATCH
        assert not stem_conv.fuses(x, wide, norm, act, True)
    assert not stem_conv.fuses(x, conv, norm, act, True)               # gradients recorded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="half-precision dot products run on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_stem_half_precision_product_matches_the_modules(dtype):
    """Under autocast the patches and weight are multiplied in the half dtype (as cuDNN does)."""
    conv, norm, act = _layers(3, 56)
    x = torch.randn(3, 3, 37, 150, device=DEVICE).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = act(norm(conv(x)))
        with torch.autocast("cuda", dtype=dtype):
            got = stem_conv.conv_bn_gelu(x, conv, norm, True)
    assert got.dtype == dtype and got.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(got.float(), want) <= 1e-2


@pytest.mark.parametrize("impl,fused", [("triton" if DEVICE == "cpu" else "auto", True), ("reference", False)])
def test_stem_module_uses_the_kernel_only_where_allowed(impl, fused, monkeypatch):
    # the later convs would round their inputs to TF32 on CUDA, the kernel's and the modules' alike
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    stem = Stem(3, 32, impl).to(DEVICE).eval()
    for m in stem:
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.normal_()
            m.running_var.uniform_(0.5, 2.0)
    calls = []
    original = stem_conv.conv_bn_gelu
    monkeypatch.setattr(stem_conv, "conv_bn_gelu", lambda *a: calls.append(1) or original(*a))
    x = torch.randn(2, 3, 20, 18, device=DEVICE)
    with torch.no_grad():
        got = stem(x)
        want = x
        for m in stem:
            want = m(want)
    assert calls == ([1] if fused else [])
    assert rel_err(got, want) <= 1e-5
    stem.train()
    with torch.no_grad():
        stem(x)
    assert calls == ([1] if fused else [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch.compile of the kernel is checked on CUDA")
def test_fused_stem_under_torch_compile_fullgraph():
    conv, norm, act = _layers()
    x = torch.randn(2, 3, 32, 30, device="cuda")

    def f(x):
        return stem_conv.conv_bn_gelu(x, conv, norm, True)
    with torch.no_grad():
        got = torch.compile(f, fullgraph=True)(x)
        want = act(norm(conv(x)))
    assert rel_err(got, want) <= 1e-5


def test_conv_bias_folded_into_the_norm_shift_at_inference(monkeypatch):
    from rmt import stem
    set_fast_path(fold_conv_bias_devices=("cuda", "cpu"))
    conv, norm, _ = _layers(cin=8, cout=16, stride=2, device="cpu")
    x = torch.randn(2, 8, 11, 10)
    with torch.no_grad():
        assert stem.folds_bias(x, conv, norm)
        want = norm(conv(x))
        assert rel_err(stem.conv_norm(x, conv, norm), want) <= 1e-6
        handle = conv.register_forward_pre_hook(lambda *_: None)   # a hooked conv runs as a module
        assert not stem.folds_bias(x, conv, norm)
        handle.remove()
        norm.train()                                               # batch statistics: the modules
        assert not stem.folds_bias(x, conv, norm)
        before = norm.running_mean.clone()
        stem.conv_norm(x, conv, norm)
        assert not torch.equal(before, norm.running_mean)
        norm.eval()
    # the fold is differentiable: the same gradients as the modules
    assert stem.folds_bias(x, conv, norm)
    params = (x.requires_grad_(), conv.weight, conv.bias, norm.weight, norm.bias)
    g = torch.randn_like(want)
    got = torch.autograd.grad(stem.conv_norm(x, conv, norm), params, g)
    ref = torch.autograd.grad(norm(conv(x)), params, g)
    assert all(rel_err(a, e) <= 1e-5 for a, e in zip(got, ref))


@pytest.mark.parametrize("affine", [True, False])
def test_conv_bias_left_out_with_batch_statistics(affine, monkeypatch):
    """Training mode: the same output, gradients (the bias's exactly zero), running statistics and
    batch count as the modules, over two steps; a momentum of None (cumulative average) and a hooked
    norm run as the modules."""
    from rmt import stem
    set_fast_path(fold_conv_bias_devices=("cuda", "cpu"))
    conv, norm, _ = _layers(cin=8, cout=16, stride=2, device="cpu")
    norm = nn.BatchNorm2d(16, affine=affine).train()
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(0.5, 1.5)
            norm.bias.normal_()
    twin = copy.deepcopy(norm)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(3, 8, 11, 10, requires_grad=True)
    assert stem.folds_bias_in_training(x, conv, norm)
    params = [x, conv.weight, conv.bias] + ([norm.weight, norm.bias] if affine else [])
    twin_params = [x, conv.weight, conv.bias] + ([twin.weight, twin.bias] if affine else [])
    for _ in range(2):
        got = stem.conv_norm(x, conv, norm)
        want = twin(conv(x))
        assert rel_err(got, want) <= 1e-5
        g = torch.randn_like(want)
        grads = torch.autograd.grad(got, params, g)
        ref = torch.autograd.grad(want, twin_params, g)
        for name, a, e in zip(("input", "conv weight", "norm weight", "norm bias"),
                              grads[:2] + grads[3:], ref[:2] + ref[3:]):
            assert rel_err(a, e) <= 1e-4, name
        # the modules' bias gradient is rounding noise around the exact zero
        assert torch.equal(grads[2], torch.zeros_like(conv.bias))
        assert ref[2].abs().max() <= 1e-5 * ref[1].abs().max()
        assert rel_err(norm.running_mean, twin.running_mean) <= 1e-6
        assert rel_err(norm.running_var, twin.running_var) <= 1e-6
        assert norm.num_batches_tracked.item() == twin.num_batches_tracked.item()
    # two forward passes before one backward pass (the running mean changes in between)
    got = stem.conv_norm(x, conv, norm) + stem.conv_norm(2 * x, conv, norm)
    want = twin(conv(x)) + twin(conv(2 * x))
    g = torch.randn_like(want)
    assert rel_err(got, want) <= 1e-5
    assert rel_err(torch.autograd.grad(got, x, g)[0], torch.autograd.grad(want, x, g)[0]) <= 1e-4
    assert rel_err(norm.running_mean, twin.running_mean) <= 1e-6
    norm.momentum = None
    assert not stem.folds_bias_in_training(x, conv, norm)
    norm.momentum = 0.1
    handle = norm.register_forward_hook(lambda *_: None)
    assert not stem.folds_bias_in_training(x, conv, norm)
    handle.remove()


def test_downsample_and_stem_fold_match_the_modules_in_eval(monkeypatch):
    from rmt import stem
    set_fast_path(fold_conv_bias_devices=("cuda", "cpu"))
    calls = []
    original = stem.conv_norm
    monkeypatch.setattr(stem, "conv_norm", lambda *a: calls.append(stem.folds_bias(*a)) or original(*a))
    down = stem.Downsample(16, 32).eval()
    down.norm.running_mean.normal_()
    down.norm.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 9, 7, 16)
    st = stem.Stem(3, 32, "reference").eval()
    img = torch.randn(1, 3, 20, 20)
    with torch.no_grad():
        want = down.norm(down.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        assert rel_err(down(x), want) <= 1e-6
        ref = img
        for layer in st:
            ref = layer(ref)
        assert rel_err(st(img), ref) <= 1e-6
    assert calls == [True] * 5   # the downsample, then the stem's four convs (the first: no kernel here)


def test_folded_shift_is_cached_until_a_parameter_changes(monkeypatch):
    from rmt import stem
    set_fast_path(fold_conv_bias_devices=("cuda", "cpu"))
    conv, norm, _ = _layers(cin=4, cout=8, device="cpu")
    x = torch.randn(1, 4, 6, 6)
    with torch.no_grad():
        first = stem.conv_norm(x, conv, norm)
        shift = stem._shift(conv, norm)
        assert stem._shift(conv, norm) is shift                     # computed once
        conv.bias.add_(1.0)                                         # in place: the version changes
        assert stem._shift(conv, norm) is not shift
        assert rel_err(stem.conv_norm(x, conv, norm), norm(conv(x))) <= 1e-6
        assert not torch.allclose(stem.conv_norm(x, conv, norm), first)
        norm.running_var.mul_(2.0)
        assert rel_err(stem.conv_norm(x, conv, norm), norm(conv(x))) <= 1e-6
    # gradients recorded: computed afresh, with its graph
    assert stem._shift(conv, norm).grad_fn is not None


def test_bias_fold_stays_off_on_cpu_by_default():
    from rmt import stem
    conv, norm, _ = _layers(cin=4, cout=8, device="cpu")
    with torch.no_grad():
        assert fast_path.fold_conv_bias_devices == ("cuda",)
        assert not stem.folds_bias(torch.randn(1, 4, 6, 6), conv, norm)
