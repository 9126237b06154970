"""Depthwise-convolution forward on whole token rows, each input row loaded once (GELU fused).

:mod:`rmt.ops.dwconv`'s general kernel loads every input row once per horizontal tap (``k`` shifted
loads of the same row), so a 5x5 convolution costs its programs 15 tile loads per output row and runs
at a quarter of the memory bandwidth its 3x3 siblings reach; the FFN's GELU would be evaluated once
per load, so it runs as its own pass. When a whole token row fits one tile (``w <= 64``: every RMT
stage at 224x224) the kernel here loads each input row once, applies GELU to it once, and takes the
horizontal shifts as products with 0/1 shift matrices on the tensor cores, which are exact (one
non-zero term per output; float32 inputs use IEEE float32 products). The tile's zero columns beyond
the row are the convolution's zero padding. Loads per output row: ``(ROWS + k - 1) / ROWS``.

:func:`rows_forward` is called by :func:`rmt.ops.dwconv._forward` (eager and ``torch.compile``), which
checks :func:`rows_apply`; :func:`rmt.ops.dwconv.dwconv_nhwc_reference` stays the oracle.
"""
from typing import Optional, Tuple

import torch

from .triton_support import HAS_TRITON, INTERPRET, cdiv, next_power_of_2

if HAS_TRITON:
    import triton
    import triton.language as tl

# False: every depthwise forward through the general kernel, GELU as its own pass
# (benchmarks/inference_modes.py's switch "rowsoff" compares the two)
ROW_KERNEL = True
# widest token row the kernel takes whole (the shift matrices are BLOCK_W x BLOCK_W)
MAX_ROW = 64
# the tensor cores' smallest matrix side: narrower rows are padded to it
MIN_BLOCK_W = 16


if HAS_TRITON:
    @triton.jit
    def _gelu(x):
        """The exact GELU of float32 ``x``."""
        return 0.5 * x * (1.0 + tl.math.erf(x * 0.7071067811865476))

    @triton.jit
    def _add_tap(acc, xv, WT, offs_c, mask_c, I: tl.constexpr, O: tl.constexpr, DX: tl.constexpr,
                 KS: tl.constexpr, RESIDUAL: tl.constexpr):
        """Add input row ``I`` of the program's window, shifted by ``DX``, to output row ``O``'s
        accumulator when the kernel reaches it (and the row itself at the centre tap for the residual)."""
        DY: tl.constexpr = I - O
        if DY >= 0:
            if DY < KS:
                wv = tl.load(WT + offs_c * (KS * KS) + (DY * KS + DX), mask=mask_c, other=0.0)
                acc += xv * wv.to(tl.float32)[None, :]
                if RESIDUAL:
                    if DY == KS // 2:
                        if DX == KS // 2:
                            acc += xv
        return acc

    @triton.jit
    def _store_row(acc, r, b, offs_w, offs_c, mask_w, mask_c, B, Y, H, W, C, HAS_BIAS: tl.constexpr):
        """Bias and store of output row ``r`` (skipped past the last row)."""
        mask = (mask_w[:, None] & mask_c[None, :]) & (r < H)
        if HAS_BIAS:
            acc += tl.load(B + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + ((b * H + r) * W + offs_w[:, None]) * C + offs_c[None, :],
                 acc.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _dwconv_rows_kernel(X, WT, B, Y, H, W, C, x_sb, x_sh, x_sw,
                            KS: tl.constexpr, HAS_BIAS: tl.constexpr, RESIDUAL: tl.constexpr,
                            GELU: tl.constexpr, F32_DOT: tl.constexpr, ROWS: tl.constexpr,
                            BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """Grid ``(b * cdiv(h, ROWS), cdiv(c, BLOCK_C))``: ``ROWS`` (1-4) whole output rows per program,
        ``W <= BLOCK_W``. ``Y = [g +] sum_taps g[shifted] * WT[tap] [+ B]`` with ``g = gelu(X)`` rounded
        to ``X``'s dtype (``GELU``) or ``X``; ``Y`` contiguous. ``F32_DOT``: shift in float32 (float32
        inputs, and Triton's interpreter, whose half-precision products are wrong).
        """
        pid = tl.program_id(0)
        row_blocks = (H + ROWS - 1) // ROWS
        b = (pid // row_blocks).to(tl.int64)
        r0 = (pid % row_blocks) * ROWS
        offs_w = tl.arange(0, BLOCK_W)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_w = offs_w < W
        mask_c = offs_c < C
        mask = mask_w[:, None] & mask_c[None, :]
        offs = offs_w[:, None] * x_sw + offs_c[None, :]
        X = X + b * x_sb
        acc0 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        acc1 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        acc2 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        acc3 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        for i in tl.static_range(ROWS + KS - 1):
            rr = r0 + i - KS // 2
            t = tl.load(X + rr * x_sh + offs, mask=mask & ((rr >= 0) & (rr < H)), other=0.0)
            if GELU:
                t = _gelu(t.to(tl.float32)).to(X.dtype.element_ty)
            tf = t.to(tl.float32)
            for dx in tl.static_range(KS):
                if dx == KS // 2:
                    xv = tf
                else:  # xv[j] = t[j + dx - KS // 2], zero outside the tile
                    hit = offs_w[None, :] == offs_w[:, None] + (dx - KS // 2)
                    if F32_DOT:
                        xv = tl.dot(hit.to(tl.float32), tf, input_precision="ieee", out_dtype=tl.float32)
                    else:
                        xv = tl.dot(hit.to(X.dtype.element_ty), t, out_dtype=tl.float32)
                acc0 = _add_tap(acc0, xv, WT, offs_c, mask_c, i, 0, dx, KS, RESIDUAL)
                if ROWS > 1:
                    acc1 = _add_tap(acc1, xv, WT, offs_c, mask_c, i, 1, dx, KS, RESIDUAL)
                if ROWS > 2:
                    acc2 = _add_tap(acc2, xv, WT, offs_c, mask_c, i, 2, dx, KS, RESIDUAL)
                if ROWS > 3:
                    acc3 = _add_tap(acc3, xv, WT, offs_c, mask_c, i, 3, dx, KS, RESIDUAL)
        _store_row(acc0, r0, b, offs_w, offs_c, mask_w, mask_c, B, Y, H, W, C, HAS_BIAS)
        if ROWS > 1:
            _store_row(acc1, r0 + 1, b, offs_w, offs_c, mask_w, mask_c, B, Y, H, W, C, HAS_BIAS)
        if ROWS > 2:
            _store_row(acc2, r0 + 2, b, offs_w, offs_c, mask_w, mask_c, B, Y, H, W, C, HAS_BIAS)
        if ROWS > 3:
            _store_row(acc3, r0 + 3, b, offs_w, offs_c, mask_w, mask_c, B, Y, H, W, C, HAS_BIAS)


def rows_apply(w: int) -> bool:
    """Whether :func:`rows_forward` takes token rows ``w`` wide."""
    return ROW_KERNEL and HAS_TRITON and w <= MAX_ROW


def row_blocks(w: int, c: int, ks: int) -> Tuple[int, int, int]:
    """``(BLOCK_C, num_warps, ROWS)`` for rows ``w`` wide, ``c`` channels and a ``ks x ks`` kernel."""
    return max(16, min(32, next_power_of_2(c))), 4, 4


def rows_forward(launch, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: bool,
                 gelu: bool, tile: Optional[Tuple[int, int, int]] = None) -> torch.Tensor:
    """``[g +] dwconv(g) + bias`` with ``g = gelu(x)`` or ``x``; ``x`` ``(b, h, w, c)`` with unit channel
    stride and ``w <= MAX_ROW``. ``tile``: ``(BLOCK_C, num_warps, ROWS)`` instead of :func:`row_blocks`."""
    b, h, w, c = x.shape
    ks = weight.shape[-1]
    block_c, warps, rows = tile or row_blocks(w, c, ks)
    y = torch.empty((b, h, w, c), dtype=x.dtype, device=x.device)
    launch(_dwconv_rows_kernel)[(b * cdiv(h, rows), cdiv(c, block_c))](
        x, weight, bias if bias is not None else weight, y, h, w, c, x.stride(0), x.stride(1), x.stride(2),
        KS=ks, HAS_BIAS=bias is not None, RESIDUAL=residual, GELU=gelu,
        F32_DOT=x.dtype == torch.float32 or INTERPRET, ROWS=rows,
        BLOCK_W=max(MIN_BLOCK_W, next_power_of_2(w)), BLOCK_C=block_c, num_warps=warps)
    return y
