"""Multi-row Triton LayerNorm against PyTorch's, values and gradients.

On CUDA the kernels run natively; without CUDA in Triton's interpreter (TRITON_INTERPRET=1, set in
conftest.py) at small sizes.
"""
import pytest
import torch
import torch.nn.functional as F

from rmt.norm import LayerNorm, layer_norm, layer_norm_autocast
from rmt.ops.layernorm import HAS_TRITON, layer_norm_triton

from conftest import assert_same_gradients, rel_err, saved_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")


def _params(c):
    weight = (1 + 0.3 * torch.randn(c, device=DEVICE)).requires_grad_()
    bias = (0.2 * torch.randn(c, device=DEVICE)).requires_grad_()
    return weight, bias


@needs_triton
@pytest.mark.parametrize("shape", [(1, 16), (37, 17), (2, 5, 7, 48), (3, 130, 64), (600, 24), (4, 512)])
def test_triton_layer_norm_matches_torch_with_gradients(shape):
    torch.manual_seed(0)
    x = (3 * torch.randn(shape, device=DEVICE) + 1).requires_grad_()
    weight, bias = _params(shape[-1])
    want = F.layer_norm(x, shape[-1:], weight, bias, 1e-6)
    got = layer_norm_triton(x, weight, bias, 1e-6)
    assert got.shape == want.shape and got.dtype == x.dtype
    assert rel_err(got, want) <= 1e-6
    assert_same_gradients(got, want, (x, weight, bias), ("input", "weight", "bias"), 1e-5)


@needs_triton
def test_rows_many_times_the_backward_programs_and_a_strided_input():
    """More row blocks than backward programs (each loops over several), and a non-contiguous input."""
    torch.manual_seed(1)
    wide = torch.randn(2, 9, 11, 80, device=DEVICE, requires_grad=True)
    x = wide[..., 8:72]  # 64 channels, row stride 80
    weight, bias = _params(64)
    want = F.layer_norm(x, (64,), weight, bias, 1e-5)
    got = layer_norm_triton(x, weight, bias, 1e-5)
    assert rel_err(got, want) <= 1e-6
    g = torch.randn_like(want)
    for a, e in zip(torch.autograd.grad(got, (wide, weight, bias), g),
                    torch.autograd.grad(want, (wide, weight, bias), g)):
        assert rel_err(a, e) <= 1e-5


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_output_dtype_and_float32_parameter_gradients(dtype):
    """Under autocast: output in the autocast dtype (as layer_norm_autocast), float32 weight gradients."""
    torch.manual_seed(2)
    x = torch.randn(5, 6, 32, device=DEVICE, requires_grad=True)
    weight, bias = _params(32)
    with torch.autocast(DEVICE, dtype=dtype):
        got = layer_norm_triton(x, weight, bias, 1e-6)
        want = layer_norm_autocast(x, [32], weight, bias, 1e-6)
    assert got.dtype == want.dtype == dtype
    exact = F.layer_norm(x.double(), (32,), weight.double(), bias.double(), 1e-6)
    assert rel_err(got, exact) <= 1e-2
    got.float().sum().backward()
    assert x.grad.dtype == weight.grad.dtype == bias.grad.dtype == torch.float32
    assert rel_err(bias.grad, torch.full_like(bias, 30.0)) <= 1e-6  # 30 rows, each dy = 1


def _producer(y: torch.Tensor) -> str:
    """Name of the autograd node that made ``y``, looking through views."""
    fn = y.grad_fn
    while "View" in type(fn).__name__:
        fn = fn.next_functions[0][0]
    return type(fn).__name__


@needs_triton
def test_module_dispatch_follows_impl():
    torch.manual_seed(3)
    norm = LayerNorm(24, eps=1e-6, impl="triton").to(DEVICE)
    x = torch.randn(3, 4, 24, device=DEVICE, requires_grad=True)
    y = norm(x)
    assert _producer(y) == "_LayerNormBackward"
    norm.impl = "reference"
    assert _producer(norm(x)) == "NativeLayerNormBackward0"
    assert rel_err(y, norm(x)) <= 1e-6
    # two normalised dimensions: the reference handles them whatever ``fused`` says
    w2 = torch.ones(4, 24, device=DEVICE)
    out = layer_norm(x, [4, 24], w2, torch.zeros_like(w2), 1e-6, True)
    assert rel_err(out, F.layer_norm(x, (4, 24), w2, torch.zeros_like(w2), 1e-6)) <= 1e-6




@needs_triton
def test_autocast_keeps_the_same_activation_memory_as_the_reference():
    """A float32 input under autocast: like the reference, the kernels keep its 16-bit copy for backward."""
    x = torch.randn(64, 48, device=DEVICE, requires_grad=True)
    weight, bias = _params(48)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        _, got = saved_bytes(lambda: layer_norm_triton(x, weight, bias, 1e-6))
        _, want = saved_bytes(lambda: layer_norm_autocast(x, [48], weight, bias, 1e-6))
    assert got <= want + 8 * x.shape[0]  # + float32 row statistics (PyTorch's CPU kernel keeps them in bf16)
    assert got < x.numel() * 4            # not the float32 input


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] if torch.cuda.is_available() else [torch.float32])
def test_backward_adds_a_residual_gradient_in_the_kernel(dtype):
    """``_backward(..., residual=r)`` is the input gradient plus ``r`` (one pass instead of two)."""
    from rmt.ops import layernorm
    torch.manual_seed(2)
    x = torch.randn(70, 48, device=DEVICE).to(dtype)
    weight, bias = _params(48)
    _, mean, rstd = layernorm._forward(x, weight.detach(), bias.detach(), 1e-6, dtype)
    dy, r = torch.randn(70, 48, device=DEVICE).to(dtype), torch.randn(70, 48, device=DEVICE).to(dtype)
    dx, dw, db = layernorm._backward(dy, x, weight.detach(), mean, rstd)
    dx_r, dw_r, db_r = layernorm._backward(dy, x, weight.detach(), mean, rstd, residual=r)
    assert dx_r.dtype == dtype and torch.equal(dw_r, dw) and torch.equal(db_r, db)
    assert rel_err(dx_r, dx.float() + r.float()) <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert rel_err(dx_r, dx) > 0.1  # the residual did arrive
