"""The block's Linear layers in training (bias gradient as a GEMV, float32 gradients) against F.linear."""
import pytest
import torch
import torch.nn.functional as F

from rmt.config import set_fast_path
from rmt.ops import linear as lin

from conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _params(n=24, k=16, bias=True, device=DEVICE):
    w = (torch.randn(n, k, device=device) * k ** -0.5).requires_grad_()
    b = torch.randn(n, device=device, requires_grad=True) if bias else None
    return w, b


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 7, 9, 16), (5, 16), (0, 3, 16)])
def test_linear_matches_f_linear_with_gradients_fp32(shape, bias):
    w, b = _params(bias=bias)
    x = torch.randn(*shape, device=DEVICE, requires_grad=True)
    got = lin.linear(x, w, b, True)
    assert got.grad_fn is not None and type(got.grad_fn).__name__ == "_LinearBackward"
    want = F.linear(x, w, b)
    assert got.shape == want.shape
    assert (got - want).abs().sum() <= 1e-6 * want.abs().sum() + 1e-12
    g = torch.randn_like(want)
    params = [x, w] + ([b] if bias else [])
    got_grads = torch.autograd.grad(got, params, g)
    want_grads = torch.autograd.grad(want, params, g)
    for name, a, e in zip(("input", "weight", "bias"), got_grads, want_grads):
        assert a.dtype == e.dtype and a.shape == e.shape, name
        assert (a - e).abs().sum() <= 1e-5 * e.abs().sum() + 1e-12, name


def test_linear_under_autocast_keeps_float32_gradients():
    dtype = torch.bfloat16
    w, b = _params(n=40, k=32)
    x = torch.randn(3, 11, 32, device=DEVICE, requires_grad=True)
    with torch.autocast(DEVICE, dtype=dtype):
        got = lin.linear(x, w, b, True)
        want = F.linear(x, w, b)
    assert got.dtype == want.dtype == dtype
    assert rel_err(got, want) <= 1e-2
    g = torch.randn_like(want)
    got_grads = torch.autograd.grad(got, [x, w, b], g)
    want_grads = torch.autograd.grad(want, [x, w, b], g)
    for name, a, e in zip(("input", "weight", "bias"), got_grads, want_grads):
        assert a.dtype == e.dtype, name           # float32 parameters get float32 gradients
        assert rel_err(a, e) <= 1e-2, name


def test_linear_dispatch():
    w, b = _params()
    x = torch.randn(4, 16, device=DEVICE)
    assert type(lin.linear(x, w, b, False).grad_fn).__name__ == "AddmmBackward0"   # not allowed
    with torch.no_grad():
        assert lin.linear(x, w, b, True).grad_fn is None                         # inference
        assert torch.equal(lin.linear(x, w, b, True), F.linear(x, w, b))
    with pytest.raises(RuntimeError):
        lin.linear(x.double(), w, b, True)   # dtype mismatch: F.linear's own error


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 777, 5000])
def test_column_sum_float32_result(dtype, rows):
    t = torch.randn(rows, 37, device=DEVICE).to(dtype)
    got = lin.column_sum(t)
    assert got.dtype == torch.float32 and got.shape == (37,)
    want = t.double().sum(0)
    assert (got.double() - want).abs().max() <= 1e-5 * rows ** 0.5 * max(1.0, want.abs().max().item())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the GEMV path runs on CUDA only")
def test_column_sum_gemv_on_cuda_and_tf32_fallback():
    t = torch.randn(4096, 64, device="cuda")
    lin._ONES.clear()
    got = lin.column_sum(t)
    assert any(dtype == torch.float32 for _, dtype in lin._ONES)
    assert rel_err(got, t.double().sum(0)) <= 1e-6
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        assert torch.equal(lin.column_sum(t), t.sum(0))     # TF32 would round the inputs: plain sum
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    half = t.bfloat16()
    assert rel_err(lin.column_sum(half), half.double().sum(0)) <= 1e-5


def test_weight_grad_dtype():
    g = torch.randn(50, 8, device=DEVICE, dtype=torch.bfloat16)
    x = torch.randn(50, 6, device=DEVICE, dtype=torch.bfloat16)
    got = lin.weight_grad(g, x, torch.float32)
    assert got.dtype == torch.float32 and got.shape == (8, 6)
    assert rel_err(got, g.double().t() @ x.double()) <= 1e-2


def test_ones_rows_are_cached_views_and_regrown(monkeypatch):
    """The GEMV's row of ones: one cached view per length, views of the new row once it grows."""
    monkeypatch.setattr(lin, "_ONES", {})
    monkeypatch.setattr(lin, "_ONES_VIEWS", {})
    dev = torch.device("cpu")
    a = lin._ones(300, torch.float32, dev)
    assert a.shape == (1, 300) and bool((a == 1).all())
    assert lin._ones(300, torch.float32, dev) is a                     # looked up, not sliced again
    b = lin._ones(5000, torch.float32, dev)                            # grows past the first 1024
    assert b.shape == (1, 5000) and bool((b == 1).all())
    c = lin._ones(300, torch.float32, dev)
    assert c is not a and c.shape == (1, 300)
    assert c.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()   # a view of the new row
    assert lin._ones(300, torch.bfloat16, dev).dtype == torch.bfloat16


def test_gelu_epilogue_dispatch():
    w, b = _params(n=24, k=16, device="cpu")
    x = torch.randn(3, 5, 16)
    # CPU, float32, gradients: the exact composition, whatever the switch says
    assert not lin.gelu_epilogue_applies(x, w, b)
    with torch.no_grad():
        assert not lin.gelu_epilogue_applies(x.bfloat16(), w, b)
        want = F.gelu(F.linear(x, w, b))
        assert torch.equal(lin.linear_gelu(x, w, b), want)
    got = lin.linear_gelu(x, w, b)
    assert got.grad_fn is not None
    torch.testing.assert_close(got, want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="cuBLASLt's GELU epilogue runs on CUDA only")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gelu_epilogue_on_cuda_matches_exact_gelu_within_rounding(dtype, monkeypatch):
    w, b = _params(n=96, k=32, device="cuda")
    x = torch.randn(2, 9, 11, 32, device="cuda") * 2
    exact = F.gelu(F.linear(x, w, b)).detach()  # float32
    with torch.no_grad():
        assert lin.gelu_epilogue_applies(x.to(dtype), w, b)
        with torch.autocast("cuda", dtype=dtype):
            assert lin.gelu_epilogue_applies(x, w, b)
            got = lin.linear_gelu(x, w, b)
        assert got.dtype == dtype and got.shape == exact.shape
        assert (got.float() - exact).abs().max() <= 4e-3 * exact.abs().max()
        # the tanh approximation of the same GEMM, the switch off: the exact GELU again
        tanh = F.gelu(F.linear(x.to(dtype), w.to(dtype), b.to(dtype)).float(), approximate="tanh")
        assert (got.float() - tanh).abs().max() <= 8e-3 * tanh.abs().max()
        set_fast_path(gelu_epilogue=False)
        assert not lin.gelu_epilogue_applies(x.to(dtype), w, b)
    assert not lin.gelu_epilogue_applies(x.to(dtype), w, b)  # gradients recorded: never


@pytest.mark.skipif(not lin._HAS_ONEDNN_LINEAR, reason="this PyTorch build has no oneDNN matmul")
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(2, 7, 9, 48), (5, 48), (1, 1, 1, 48), (3, 0, 48)])
def test_cpu_linear_through_onednn_matches_f_linear(shape, bias, monkeypatch):
    """The CPU path's float32 inference GEMM (oneDNN) against F.linear, with odd and empty shapes, a
    non-contiguous input and frozen or trainable layers."""
    torch.manual_seed(0)
    w, b = (torch.randn(40, 48), torch.randn(40) if bias else None)
    x = torch.randn(*shape)
    applies = x.numel() > 0
    assert lin.cpu_linear_applies(x, w, b) == applies
    got, want = lin.cpu_linear(x, w, b), F.linear(x, w, b)
    assert got.shape == want.shape and got.dtype == torch.float32
    assert rel_err(got, want) <= 1e-6
    wide = torch.randn(*shape[:-1], 96)[..., ::2]                       # strided input
    assert rel_err(lin.cpu_linear(wide, w, b), F.linear(wide, w, b)) <= 1e-6
    with torch.no_grad():
        assert lin.cpu_linear_applies(x, w.requires_grad_(), b) == applies
    assert not lin.cpu_linear_applies(x, w, b)                          # gradients to record
    out = lin.linear(x, w, b, False, cpu_fast=True)
    assert out.grad_fn is not None and rel_err(out, want) <= 1e-6
    w = w.detach()
    assert not lin.cpu_linear_applies(x.double(), w.double(), None)     # float32 only
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not lin.cpu_linear_applies(x, w, None)
    set_fast_path(cpu_onednn_linear=False)
    assert not lin.cpu_linear_applies(x, w, None)


@pytest.mark.skipif(not lin._HAS_ONEDNN_LINEAR, reason="this PyTorch build has no oneDNN matmul")
def test_cpu_linear_leaves_compile_and_export_to_f_linear():
    """Under ``torch.compile`` and ``torch.export`` the graph gets ``F.linear``, not the oneDNN op."""
    w, b, x = torch.randn(8, 16), torch.randn(8), torch.randn(3, 16)
    seen = []

    def f(x):
        seen.append(lin.cpu_linear_applies(x, w, b))
        return lin.cpu_linear(x, w, b)
    torch._dynamo.reset()
    assert rel_err(torch.compile(f, fullgraph=True, backend="eager")(x), F.linear(x, w, b)) <= 1e-6

    class M(torch.nn.Module):
        def forward(self, x):
            return f(x)
    program = torch.export.export(M(), (x,))
    assert seen == [False, False]
    assert not any("mkldnn" in str(node.target) for node in program.graph.nodes)
