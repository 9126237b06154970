"""Fused depthwise convolution (bias and residual in one pass) against F.conv2d."""
import pytest
import torch

from rmt.ops.dwconv import HAS_TRITON, dwconv_nhwc, dwconv_nhwc_reference, dwconv_nhwc_triton

from conftest import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
@pytest.mark.parametrize("ks", [3, 5])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("shape", [(2, 7, 9, 16), (1, 1, 5, 24), (1, 12, 1, 8), (1, 9, 40, 70)])
def test_triton_dwconv_matches_conv2d(ks, residual, shape):
    b, h, w, c = shape
    wide = torch.randn(b, h, w, 3 * c, device=DEVICE)
    x = wide[..., c:2 * c]                     # a strided slice, like v inside the fused qkv output
    weight = torch.randn(c, 1, ks, ks, device=DEVICE)
    bias = torch.randn(c, device=DEVICE)
    want = dwconv_nhwc_reference(x, weight, bias, residual)
    got = dwconv_nhwc_triton(x, weight, bias, residual)
    assert got.shape == (b, h, w, c) and got.is_contiguous()
    assert rel_err(got, want) <= 1e-6


def test_dispatch_uses_reference_with_autograd():
    x = torch.randn(1, 6, 6, 8, requires_grad=True)
    conv = torch.nn.Conv2d(8, 8, 3, padding=1, groups=8)
    y = dwconv_nhwc(x, conv.weight, conv.bias, True, True)
    y.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None
