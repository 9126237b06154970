"""Depthwise convolution on channels-last tokens with its bias and residual fused (inference).

RMT has three depthwise convolutions per block, each followed by element-wise work:

* CPE:  ``x + dwconv3x3(x) + b``
* LePE: ``dwconv5x5(v) + b`` (``v`` a strided slice of the fused qkv projection)
* FFN:  ``u + dwconv3x3(u) + b``

In eager PyTorch each is a cuDNN convolution, a separate bias addition and a residual addition:
five passes over the tensor. The Triton kernel here reads the input once (neighbours come from
cache) and writes the result once. It has no backward: it is used when no gradient is needed,
and :func:`dwconv_nhwc_reference` (plain ``F.conv2d``) is the path otherwise and the oracle.
"""
from typing import Optional

import torch
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False


def dwconv_nhwc_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          residual: bool) -> torch.Tensor:
    """``[x +] dwconv(x) + bias`` for ``x`` ``(b, h, w, c)`` (any strides); returns ``(b, h, w, c)``."""
    k = weight.shape[-1]
    y = F.conv2d(x.permute(0, 3, 1, 2), weight, bias, padding=k // 2, groups=weight.shape[0])
    y = y.permute(0, 2, 3, 1)
    return x + y if residual else y


if HAS_TRITON:
    @triton.jit
    def _dwconv_nhwc_kernel(X, WT, B, Y, H, W, C, x_sb, x_sh, x_sw, y_sb, y_sh, y_sw,
                            KS: tl.constexpr, RESIDUAL: tl.constexpr, BLOCK_W: tl.constexpr,
                            BLOCK_C: tl.constexpr):
        """Grid ``(b * h, cdiv(w, BLOCK_W), cdiv(c, BLOCK_C))``: one row segment of tokens per program."""
        pid_bh = tl.program_id(0)
        b = (pid_bh // H).to(tl.int64)
        r = pid_bh % H
        offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        mask_w = offs_w < W
        acc = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        for dy in tl.static_range(KS):
            rr = r + dy - KS // 2
            row_ok = (rr >= 0) & (rr < H)
            for dx in tl.static_range(KS):
                ss = offs_w + dx - KS // 2
                m = (row_ok & (ss >= 0) & (ss < W))[:, None] & mask_c[None, :]
                xv = tl.load(X + b * x_sb + rr * x_sh + ss[:, None] * x_sw + offs_c[None, :], mask=m, other=0.0)
                wv = tl.load(WT + offs_c * (KS * KS) + dy * KS + dx, mask=mask_c, other=0.0)
                acc += xv.to(tl.float32) * wv.to(tl.float32)[None, :]
        acc += tl.load(B + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        m = mask_w[:, None] & mask_c[None, :]
        if RESIDUAL:
            acc += tl.load(X + b * x_sb + r * x_sh + offs_w[:, None] * x_sw + offs_c[None, :],
                           mask=m, other=0.0).to(tl.float32)
        tl.store(Y + b * y_sb + r * y_sh + offs_w[:, None] * y_sw + offs_c[None, :],
                 acc.to(Y.dtype.element_ty), mask=m)


def dwconv_nhwc_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                       residual: bool, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Fused ``[x +] dwconv(x) + bias``; ``x`` ``(b, h, w, c)`` with unit channel stride; no autograd."""
    b, h, w, c = x.shape
    y = torch.empty((b, h, w, c), dtype=out_dtype or x.dtype, device=x.device)
    block_c = min(64, triton.next_power_of_2(c))
    block_w = min(32, triton.next_power_of_2(w))
    grid = (b * h, triton.cdiv(w, block_w), triton.cdiv(c, block_c))
    _dwconv_nhwc_kernel[grid](x, weight, bias, y, h, w, c, x.stride(0), x.stride(1), x.stride(2),
                              y.stride(0), y.stride(1), y.stride(2), KS=weight.shape[-1],
                              RESIDUAL=residual, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=4)
    return y


@torch.jit.ignore
def dwconv_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: bool,
                fused: bool) -> torch.Tensor:
    """``[x +] dwconv(x) + bias`` for depthwise ``weight`` ``(c, 1, k, k)`` on ``(b, h, w, c)`` tokens.

    ``fused`` allows the Triton kernel; it is taken only on CUDA, without autograd and outside
    ``torch.compile`` (which fuses these itself).
    """
    if (fused and HAS_TRITON and x.is_cuda and bias is not None and x.stride(-1) == 1
            and not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad))
            and not torch.compiler.is_compiling()):
        dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        return dwconv_nhwc_triton(x.to(dtype), weight.to(dtype), bias.to(dtype), residual)
    return dwconv_nhwc_reference(x, weight, bias, residual)
