"""Depthwise convolution on channels-last tokens with its bias, residual and GELU fused.

RMT has three depthwise convolutions per block, each with element-wise work around it:

* CPE:  ``x + dwconv3x3(x) + b``
* LePE: ``dwconv5x5(v) + b`` (``v`` a strided slice of the fused qkv projection)
* FFN:  ``g + dwconv3x3(g) + b`` with ``g = gelu(fc1(x))``

In eager PyTorch each is a GELU, a cuDNN convolution, a bias addition and a residual addition,
and as many again in the backward pass. The Triton kernels here read the input once from memory
(neighbours come from cache; each program computes a few consecutive output rows, so every shifted
input row it loads serves all of them) and write the result once:

* forward: ``y = [g +] dwconv(g) + b`` where ``g = gelu(x)`` (one element-wise pass, not kept)
  or ``g = x``;
* input gradient: the same kernel on ``dy`` with the kernel flipped, plus ``dy`` for the residual,
  times ``gelu'(x)``;
* bias gradient: per-program partial sums of ``dy`` written by the input-gradient kernel;
* weight gradient: cuDNN's reduction kernel on ``g`` (recomputed from ``x``), or with
  ``rmt.config.fast_path.dwconv_triton_weight_grad`` per-program partial sums of ``dy * g[shifted]`` for every tap, then one GEMV
  over the programs (cheaper to launch than cuDNN's call, slower on the GPU so far).

Only ``x`` is kept for the backward pass, so the FFN stores its hidden activation once instead of
three times. :func:`dwconv_nhwc_reference` (``F.gelu`` + ``F.conv2d``) is the oracle and the path
on other devices. In eager mode the kernels launch from an ``autograd.Function``; under
``torch.compile`` through ``torch.library.triton_op`` ops.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..compat import nchw_for_conv
from ..config import fast_path
from .linear import column_sum
from .triton_support import (HAS_TRITON, SUPPORTED_DTYPES, as_dtype, cdiv, eager_launch, next_power_of_2,
                             triton_runs_on, unit_channel_stride)

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton



def dwconv_nhwc_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                          residual: bool, gelu: bool = False) -> torch.Tensor:
    """``[g +] dwconv(g) + bias`` with ``g = gelu(x)`` or ``x``; ``x`` ``(b, h, w, c)`` (any strides)."""
    if gelu:
        x = F.gelu(x)
    k = weight.shape[-1]
    y = F.conv2d(nchw_for_conv(x), weight, bias, padding=k // 2, groups=weight.shape[0])
    y = y.permute(0, 2, 3, 1)
    return x + y if residual else y


def dwconv_nhwc_folded(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       gelu: bool = False) -> torch.Tensor:
    """``g + dwconv(g) + bias`` (:func:`dwconv_nhwc_reference` with ``residual``) as one convolution:
    ``g + dwconv(g, W)`` is ``dwconv(g, W + e)`` with ``e`` one at the centre tap, which saves a full
    pass over the activations (the CPU path; equal up to float rounding)."""
    k = weight.shape[-1]
    centre = torch.zeros(k * k, dtype=weight.dtype, device=weight.device)
    centre[k * k // 2] = 1.0
    return dwconv_nhwc_reference(x, weight + centre.view(1, 1, k, k), bias, False, gelu)


if HAS_TRITON:
    @triton.jit
    def _gelu_grad(x):
        """Derivative of the exact GELU at float32 ``x``."""
        cdf = 0.5 * (1.0 + tl.math.erf(x * 0.7071067811865476))
        return cdf + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)

    @triton.jit
    def _tap(acc, xv, WT, w_off, I: tl.constexpr, O: tl.constexpr, DX: tl.constexpr,
             KS: tl.constexpr, FLIP: tl.constexpr, RESIDUAL: tl.constexpr, w_sh, w_sw, mask_c):
        """Add input row ``I`` of the program's window, shifted by ``DX``, to output row ``O``'s
        accumulator (when that input row is within the kernel's reach of the output row); ``w_off``
        the offsets of the program's channels in ``WT``."""
        DY: tl.constexpr = I - O
        if DY >= 0:
            if DY < KS:
                if FLIP:
                    tap = (KS - 1 - DY) * w_sh + (KS - 1 - DX) * w_sw
                else:
                    tap = DY * w_sh + DX * w_sw
                wv = tl.load(WT + w_off + tap, mask=mask_c, other=0.0)
                acc += xv * wv.to(tl.float32)[None, :]
                if RESIDUAL:
                    if DY == KS // 2:
                        if DX == KS // 2:
                            acc += xv  # the centre tap is the residual input
        return acc

    @triton.jit
    def _shifted_row(acc0, acc1, acc2, acc3, sums, X, WT, w_off, b, r0, offs_w, offs_c, mask_c, H, W,
                     x_sb, x_sh, x_sw, w_sh, w_sw, I: tl.constexpr, DX: tl.constexpr, KS: tl.constexpr,
                     FLIP: tl.constexpr, RESIDUAL: tl.constexpr, COLUMN_SUMS: tl.constexpr, ROWS: tl.constexpr):
        """Load input row ``I`` of the program's window shifted by ``DX`` and add it to the ``ROWS``
        output rows it reaches (and, with ``COLUMN_SUMS``, the unshifted own rows to ``sums``)."""
        rr = r0 + I - KS // 2
        ss = offs_w + DX - KS // 2
        m = ((ss >= 0) & (ss < W) & (rr >= 0) & (rr < H))[:, None] & mask_c[None, :]
        xv = tl.load(X + b * x_sb + rr * x_sh + ss[:, None] * x_sw + offs_c[None, :],
                     mask=m, other=0.0).to(tl.float32)
        if COLUMN_SUMS:
            if DX == KS // 2:
                if I >= KS // 2:
                    if I < ROWS + KS // 2:
                        sums += tl.sum(xv, axis=0)  # the program's own rows
        acc0 = _tap(acc0, xv, WT, w_off, I, 0, DX, KS, FLIP, RESIDUAL, w_sh, w_sw, mask_c)
        if ROWS > 1:
            acc1 = _tap(acc1, xv, WT, w_off, I, 1, DX, KS, FLIP, RESIDUAL, w_sh, w_sw, mask_c)
        if ROWS > 2:
            acc2 = _tap(acc2, xv, WT, w_off, I, 2, DX, KS, FLIP, RESIDUAL, w_sh, w_sw, mask_c)
        if ROWS > 3:
            acc3 = _tap(acc3, xv, WT, w_off, I, 3, DX, KS, FLIP, RESIDUAL, w_sh, w_sw, mask_c)
        return acc0, acc1, acc2, acc3, sums

    @triton.jit
    def _finish_row(acc, r, b, offs_w, offs_c, mask_c, B, Z, Y, H, W, C, z_sb, z_sh, z_sw, y_sb, y_sh, y_sw,
                    HAS_BIAS: tl.constexpr, GELU_GRAD: tl.constexpr, GRAD_GIVEN: tl.constexpr,
                    ACCUMULATE: tl.constexpr):
        """Bias, GELU derivative (of ``Z``, or ``Z`` itself with ``GRAD_GIVEN``) and store (or with
        ``ACCUMULATE`` addition to ``Y``) of output row ``r`` (skipped past the last row)."""
        mask = ((offs_w < W)[:, None] & mask_c[None, :]) & (r < H)
        if HAS_BIAS:
            acc += tl.load(B + offs_c, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        if GELU_GRAD:
            z = tl.load(Z + b * z_sb + r * z_sh + offs_w[:, None] * z_sw + offs_c[None, :],
                        mask=mask, other=0.0).to(tl.float32)
            if GRAD_GIVEN:
                acc = acc * z
            else:
                acc = acc * _gelu_grad(z)
        y = Y + b * y_sb + r * y_sh + offs_w[:, None] * y_sw + offs_c[None, :]
        if ACCUMULATE:
            acc += tl.load(y, mask=mask, other=0.0).to(tl.float32)
        tl.store(y, acc.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _dwconv_nhwc_kernel(X, WT, B, Z, Y, DB_PART, H, W, C, x_sb, x_sh, x_sw, z_sb, z_sh, z_sw,
                            y_sb, y_sh, y_sw, w_sc, w_sh, w_sw, KS: tl.constexpr, TAPS_OUTER: tl.constexpr,
                            FLIP: tl.constexpr, HAS_BIAS: tl.constexpr,
                            RESIDUAL: tl.constexpr, GELU_GRAD: tl.constexpr, GRAD_GIVEN: tl.constexpr,
                            ACCUMULATE: tl.constexpr, COLUMN_SUMS: tl.constexpr, ROWS: tl.constexpr,
                            BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """Grid ``(b * cdiv(h, ROWS), cdiv(w, BLOCK_W), cdiv(c, BLOCK_C))``: the same segment of
        ``ROWS`` (1-4) consecutive token rows per program.

        ``Y = [gelu'(Z) *] ([X +] sum_taps X[shifted] * WT[tap] [+ B])``, or ``Z *`` with ``GRAD_GIVEN``
        (``Z`` then holds GELU's derivative, computed beforehand), written to ``Y`` through its strides
        ``y_*`` (unit channel stride) or with ``ACCUMULATE`` added to it; ``FLIP`` mirrors the kernel
        (the input gradient). Each shifted input row is loaded once and added to
        every output row it reaches, so a program loads ``(ROWS + KS - 1) * KS`` tiles for ``ROWS``
        rows instead of ``KS * KS`` per row: the loads, not the memory traffic, limit this kernel.
        ``TAPS_OUTER`` loops over the horizontal taps outside the input rows (fewer weights live at
        once; see :func:`_taps_outer`). ``WT`` is read through its strides ``w_sc`` (channel),
        ``w_sh`` and ``w_sw`` (tap row and column). ``COLUMN_SUMS`` also writes the program's sum
        of ``X`` over its tokens to row ``pid(0) * cdiv(w, BLOCK_W) + pid(1)`` of ``DB_PART``
        (float32, ``C`` wide): with ``X`` the output gradient, the parts of the bias gradient.
        """
        pid = tl.program_id(0)
        row_blocks = (H + ROWS - 1) // ROWS
        b = (pid // row_blocks).to(tl.int64)
        r0 = (pid % row_blocks) * ROWS
        offs_w = tl.program_id(1) * BLOCK_W + tl.arange(0, BLOCK_W)
        offs_c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        acc0 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        acc1 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        acc2 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        acc3 = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        sums = tl.zeros([BLOCK_C], tl.float32)
        w_off = offs_c * w_sc
        if TAPS_OUTER:
            # horizontal taps outermost: only the KS weights of one column of taps are live at a time
            for dx in tl.static_range(KS):
                for i in tl.static_range(ROWS + KS - 1):
                    acc0, acc1, acc2, acc3, sums = _shifted_row(
                        acc0, acc1, acc2, acc3, sums, X, WT, w_off, b, r0, offs_w, offs_c, mask_c, H, W,
                        x_sb, x_sh, x_sw, w_sh, w_sw, i, dx, KS, FLIP, RESIDUAL, COLUMN_SUMS, ROWS)
        else:
            for i in tl.static_range(ROWS + KS - 1):
                for dx in tl.static_range(KS):
                    acc0, acc1, acc2, acc3, sums = _shifted_row(
                        acc0, acc1, acc2, acc3, sums, X, WT, w_off, b, r0, offs_w, offs_c, mask_c, H, W,
                        x_sb, x_sh, x_sw, w_sh, w_sw, i, dx, KS, FLIP, RESIDUAL, COLUMN_SUMS, ROWS)
        if COLUMN_SUMS:
            part = pid * tl.num_programs(1) + tl.program_id(1)
            tl.store(DB_PART + part.to(tl.int64) * C + offs_c, sums, mask=mask_c)
        _finish_row(acc0, r0, b, offs_w, offs_c, mask_c, B, Z, Y, H, W, C, z_sb, z_sh, z_sw,
                    y_sb, y_sh, y_sw, HAS_BIAS, GELU_GRAD, GRAD_GIVEN, ACCUMULATE)
        if ROWS > 1:
            _finish_row(acc1, r0 + 1, b, offs_w, offs_c, mask_c, B, Z, Y, H, W, C, z_sb, z_sh, z_sw,
                        y_sb, y_sh, y_sw, HAS_BIAS, GELU_GRAD, GRAD_GIVEN, ACCUMULATE)
        if ROWS > 2:
            _finish_row(acc2, r0 + 2, b, offs_w, offs_c, mask_c, B, Z, Y, H, W, C, z_sb, z_sh, z_sw,
                        y_sb, y_sh, y_sw, HAS_BIAS, GELU_GRAD, GRAD_GIVEN, ACCUMULATE)
        if ROWS > 3:
            _finish_row(acc3, r0 + 3, b, offs_w, offs_c, mask_c, B, Z, Y, H, W, C, z_sb, z_sh, z_sw,
                        y_sb, y_sh, y_sw, HAS_BIAS, GELU_GRAD, GRAD_GIVEN, ACCUMULATE)

    @triton.jit
    def _dwconv_wgrad_kernel(G, X, PART, H, W, C, ROWS_PER_PROGRAM, g_sb, g_sh, g_sw, x_sb, x_sh, x_sw,
                             KS: tl.constexpr, DY_PAD: tl.constexpr, BIAS: tl.constexpr,
                             BLOCK_W: tl.constexpr, BLOCK_C: tl.constexpr):
        """Grid ``(b * cdiv(h, ROWS_PER_PROGRAM), cdiv(c, BLOCK_C))``: one program's partial sums of the
        weight gradient, ``sum G[r, w, c] * X[r + dy - KS // 2, w + dx - KS // 2, c]`` over its token
        rows ``r`` of one image and all ``w``, stored to ``PART[pid(0), c, dy * KS + dx]`` (float32).

        The ``KS`` (at most 5) vertical taps are one dimension of a ``(DY_PAD, BLOCK_W, BLOCK_C)``
        accumulator per horizontal tap, summed over ``w`` once at the end. ``BIAS`` also sums ``G`` into
        ``PART[pid(0), c, KS * KS]`` (the bias gradient, when no input gradient was computed).
        """
        pid = tl.program_id(0)
        row_blocks = (H + ROWS_PER_PROGRAM - 1) // ROWS_PER_PROGRAM
        b = (pid // row_blocks).to(tl.int64)
        r_start = (pid % row_blocks) * ROWS_PER_PROGRAM
        r_end = tl.minimum(r_start + ROWS_PER_PROGRAM, H)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask_c = offs_c < C
        dys = tl.arange(0, DY_PAD)
        acc0 = tl.zeros([DY_PAD, BLOCK_W, BLOCK_C], tl.float32)
        acc1 = tl.zeros([DY_PAD, BLOCK_W, BLOCK_C], tl.float32)
        acc2 = tl.zeros([DY_PAD, BLOCK_W, BLOCK_C], tl.float32)
        acc3 = tl.zeros([DY_PAD, BLOCK_W, BLOCK_C], tl.float32)
        acc4 = tl.zeros([DY_PAD, BLOCK_W, BLOCK_C], tl.float32)
        acc_b = tl.zeros([BLOCK_W, BLOCK_C], tl.float32)
        for r in range(r_start, r_end):
            rows = r + dys - KS // 2
            row_ok = (dys < KS) & (rows >= 0) & (rows < H)
            for w0 in range(0, W, BLOCK_W):
                offs_w = w0 + tl.arange(0, BLOCK_W)
                gm = (offs_w < W)[:, None] & mask_c[None, :]
                g = tl.load(G + b * g_sb + r * g_sh + offs_w[:, None] * g_sw + offs_c[None, :],
                            mask=gm, other=0.0).to(tl.float32)
                if BIAS:
                    acc_b += g
                for dx in tl.static_range(KS):
                    cols = offs_w + dx - KS // 2
                    m = (row_ok[:, None, None] & ((cols >= 0) & (cols < W))[None, :, None]
                         & mask_c[None, None, :])
                    xv = tl.load(X + b * x_sb + rows[:, None, None] * x_sh + cols[None, :, None] * x_sw
                                 + offs_c[None, None, :], mask=m, other=0.0).to(tl.float32)
                    if dx == 0:
                        acc0 += g[None, :, :] * xv
                    elif dx == 1:
                        acc1 += g[None, :, :] * xv
                    elif dx == 2:
                        acc2 += g[None, :, :] * xv
                    elif dx == 3:
                        acc3 += g[None, :, :] * xv
                    else:
                        acc4 += g[None, :, :] * xv
        part = PART + pid.to(tl.int64) * C * (KS * KS + BIAS) + offs_c[None, :] * (KS * KS + BIAS)
        store_mask = (dys < KS)[:, None] & mask_c[None, :]
        tl.store(part + dys[:, None] * KS, tl.sum(acc0, axis=1), mask=store_mask)
        tl.store(part + dys[:, None] * KS + 1, tl.sum(acc1, axis=1), mask=store_mask)
        tl.store(part + dys[:, None] * KS + 2, tl.sum(acc2, axis=1), mask=store_mask)
        if KS > 3:
            tl.store(part + dys[:, None] * KS + 3, tl.sum(acc3, axis=1), mask=store_mask)
            tl.store(part + dys[:, None] * KS + 4, tl.sum(acc4, axis=1), mask=store_mask)
        if BIAS:
            tl.store(PART + pid.to(tl.int64) * C * (KS * KS + 1) + offs_c * (KS * KS + 1) + KS * KS,
                     tl.sum(acc_b, axis=0), mask=mask_c)


def _blocks(w: int, c: int, ks: int) -> Tuple[int, int, int, int]:
    """``(BLOCK_W, BLOCK_C, num_warps, ROWS)`` for token rows of width ``w``, ``c`` channels and a
    ``ks x ks`` kernel, as ``tools/kernel_tiles.py`` (which times the alternatives through the
    ``tile`` argument of :func:`_forward`) found best at the RMT-S shapes on an H200:

    * 3x3 on grids of 16 tokens or more: 4 rows of 32 x 64 tiles (stage 1: 97 -> 51 us for the
      CPE, 225 -> 140 us for the FFN conv against one row per program, batch 128);
    * 5x5 (LePE), horizontal taps outermost (:func:`_taps_outer`): 4 rows of 64 x 32 tiles at 64
      channels (stage 1: 277 -> 234 us against 2 rows, batch 256), 32 x 64 at 128 channels or more
      on rows of 32 tokens or longer (stage 2: 131 -> 110 us; at 1024x1024, batch 16, the 128- and
      64-token rows of stages 2-3 took 2,648 and 1,242 us with 64 x 64 tiles, which spill, and
      149 and 74 us with these), 2 rows of 16 x 128 on 16-token rows, 4 rows of whole-row x 128 on
      shorter ones (stage 4: 39 -> 29 us);
    * 3x3 on small grids: 2 rows of whole-row x 128-channel tiles (stage 4, timed from CUDA-graph
      replays: 15 -> 9 us for the CPE, 41 -> 25 us for the FFN conv against 64-channel tiles).
    """
    bw = next_power_of_2(w)
    if ks > 3:
        if bw >= 32:  # 2,048-element tiles: 64 x 64 spills (4 rows: 10-20x slower)
            return (min(64, bw), min(32, next_power_of_2(c)), 4, 4) if c < 128 else (32, 64, 4, 4)
        return bw, 128, 4, 2 if bw >= 16 else 4
    if w >= 16:
        return min(32, bw), min(64, next_power_of_2(c)), 4, 4
    return bw, 128, 4, 2


def _taps_outer(w: int, ks: int) -> bool:
    """Whether the kernel loops over horizontal taps outermost (``TAPS_OUTER``) for token rows of
    width ``w`` and a ``ks x ks`` kernel: for 5x5 kernels and short rows. Graph-timed on an H200
    (batch 256, BENCHMARKS.md run N) it took the 5x5 LePE from 277 to 234 us in stage 1 (4 rows per
    program, which spilled 10-20x slower with input rows outermost) and stage 3's FFN conv from 90 to
    76 us; the 3x3 kernels on 28- and 56-token rows, whose four accumulators fill the registers either
    way, stay 6-11% faster with input rows outermost."""
    return ks > 3 or w < 16


def _backward_blocks(w: int, c: int, ks: int, gelu: bool) -> Tuple[int, int, int, int]:
    """``(BLOCK_W, BLOCK_C, num_warps, ROWS)`` of the input-gradient kernel, which also reads the
    pre-activation for GELU's derivative (``gelu``) and sums the bias gradient, so it prefers other
    tiles than the forward pass. ``tools/kernel_tiles.py --kernels dwconv_bwd`` at the RMT-S
    shapes (batch 128, H200, graph-timed), against the forward tiles: stage 1 CPE 95 -> 77 us, LePE
    168 -> 147 us, FFN 578 -> 466 us; stage 2 FFN 299 -> 237 us; stage 3 FFN 161 -> 135 us; stage 4
    FFN 113 -> 76 us: 4 rows of 32-channel tiles on small grids, 2 rows of wider tiles on large ones
    (4 for the 5x5 kernel).
    """
    bw = next_power_of_2(w)
    bc = next_power_of_2(c)
    if bw >= 32:
        if ks > 3:  # the forward's tiles (64 x 64 with 4 rows would spill on long rows)
            return _blocks(w, c, ks)
        return (32, min(64, bc), 4, 2) if gelu else (min(64, bw), min(64, bc), 4, 2)
    return bw, min(32, bc), 4, 2 if gelu and bw >= 16 else 4


def _wgrad_blocks(h: int, w: int, c: int, ks: int) -> Tuple[int, int, int, int]:
    """``(BLOCK_W, BLOCK_C, num_warps, ROWS_PER_PROGRAM)`` of the weight-gradient kernel: 16-token
    (8 for 5x5, whose five accumulators are twice as tall) by 32-channel tiles, up to 8 rows of one
    image per program."""
    return min(16 if ks <= 3 else 8, next_power_of_2(w)), min(32, next_power_of_2(c)), 4, min(h, 8)


def _weight_grad(launch, grad: torch.Tensor, g: torch.Tensor, ks: int, with_bias: bool,
                 tile: Optional[Tuple[int, int, int, int]] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Float32 gradients of a ``ks x ks`` depthwise weight ``(c, 1, ks, ks)`` and, with ``with_bias``,
    of its bias ``(c,)``, for output gradient ``grad`` and input ``g`` (both ``(b, h, w, c)``, unit
    channel stride): the kernel's per-program partial sums, then one GEMV over the programs.
    ``tile``: ``(BLOCK_W, BLOCK_C, num_warps, ROWS_PER_PROGRAM)`` instead of :func:`_wgrad_blocks`."""
    b, h, w, c = g.shape
    block_w, block_c, warps, rows = tile or _wgrad_blocks(h, w, c, ks)
    programs = b * cdiv(h, rows)
    taps = ks * ks + int(with_bias)
    parts = torch.empty((programs, c * taps), dtype=torch.float32, device=g.device)
    launch(_dwconv_wgrad_kernel)[(programs, cdiv(c, block_c))](
        grad, g, parts, h, w, c, rows, grad.stride(0), grad.stride(1), grad.stride(2),
        g.stride(0), g.stride(1), g.stride(2), KS=ks, DY_PAD=next_power_of_2(ks), BIAS=with_bias,
        BLOCK_W=block_w, BLOCK_C=block_c, num_warps=warps)
    sums = column_sum(parts).view(c, taps)
    if not with_bias:
        return sums.view(c, 1, ks, ks), None
    return sums[:, :ks * ks].reshape(c, 1, ks, ks), sums[:, ks * ks]


def _forward(launch, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
             residual: bool, gelu: bool, tile: Optional[Tuple[int, int, int, int]] = None) -> torch.Tensor:
    """``[g +] dwconv(g) + bias`` (``g = gelu(x)`` or ``x``); ``x`` ``(b, h, w, c)`` with unit channel stride.

    GELU is one element-wise pass before the kernel: inside it, each input would be evaluated once
    per tap (9x the erf work). ``tile``: ``(BLOCK_W, BLOCK_C, num_warps, ROWS)`` instead of :func:`_blocks`.
    """
    if gelu:
        x = F.gelu(x)
    b, h, w, c = x.shape
    y = torch.empty((b, h, w, c), dtype=x.dtype, device=x.device)
    block_w, block_c, warps, rows = tile or _blocks(w, c, weight.shape[-1])
    launch(_dwconv_nhwc_kernel)[(b * cdiv(h, rows), cdiv(w, block_w), cdiv(c, block_c))](
        x, weight, bias if bias is not None else weight, x, y, y, h, w, c,
        x.stride(0), x.stride(1), x.stride(2), 0, 0, 0, y.stride(0), y.stride(1), y.stride(2),
        weight.stride(0), weight.stride(2), weight.stride(3),
        KS=weight.shape[-1], TAPS_OUTER=_taps_outer(w, weight.shape[-1]), FLIP=False, HAS_BIAS=bias is not None,
        RESIDUAL=residual,
        GELU_GRAD=False, GRAD_GIVEN=False, ACCUMULATE=False, COLUMN_SUMS=False, ROWS=rows, BLOCK_W=block_w,
        BLOCK_C=block_c, num_warps=warps)
    return y


def _backward(launch, grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, residual: bool,
              gelu: bool, need_input: bool, need_weight: bool, need_bias: bool = True,
              activated: Optional[torch.Tensor] = None, tile: Optional[Tuple[int, int, int, int]] = None,
              derivative: Optional[torch.Tensor] = None, add_to: Optional[torch.Tensor] = None
              ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients of ``x`` (its dtype), of ``weight`` ``(c, 1, k, k)`` (float32 from the weight-gradient
    kernel, the dtype of ``x`` from cuDNN) and of the bias ``(c,)`` (float32 when a kernel summed it,
    else the dtype of ``x``).
    ``activated``: ``gelu(x)`` when the caller has it, else it is recomputed for the weight gradient.
    ``tile``: the input-gradient kernel's ``(BLOCK_W, BLOCK_C, num_warps, ROWS)`` instead of
    :func:`_backward_blocks`. ``derivative``: ``gelu'(x)`` when the caller has it (then the kernel
    multiplies by it instead of evaluating ``erf`` and ``exp`` per element). ``add_to``: a
    ``(b, h, w, c)`` tensor (unit channel stride, say a slice of a larger gradient) that the input
    gradient is added to in place and returned as it.

    The bias gradient is the sum of ``grad`` over batch and space: the input-gradient kernel, which
    reads ``grad`` anyway, writes one partial sum per program, so no separate pass over ``grad``.
    """
    b, h, w, c = x.shape
    ks = weight.shape[-1]
    grad = grad.contiguous()
    block_w, block_c, warps, rows = tile or _backward_blocks(w, c, ks, gelu)
    grid = (b * cdiv(h, rows), cdiv(w, block_w), cdiv(c, block_c))
    gx = gw = gb = None
    if need_input:
        gx = add_to if add_to is not None else torch.empty((b, h, w, c), dtype=x.dtype, device=x.device)
        parts = (torch.empty((grid[0] * grid[1], c), dtype=torch.float32, device=x.device)
                 if need_bias else gx)
        z = derivative if gelu and derivative is not None else x
        launch(_dwconv_nhwc_kernel)[grid](
            grad, weight, weight, z, gx, parts, h, w, c, grad.stride(0), grad.stride(1), grad.stride(2),
            z.stride(0), z.stride(1), z.stride(2), gx.stride(0), gx.stride(1), gx.stride(2),
            weight.stride(0), weight.stride(2), weight.stride(3),
            KS=ks, TAPS_OUTER=_taps_outer(w, ks), FLIP=True, HAS_BIAS=False, RESIDUAL=residual,
            GELU_GRAD=gelu, GRAD_GIVEN=z is not x, ACCUMULATE=add_to is not None, COLUMN_SUMS=need_bias,
            ROWS=rows, BLOCK_W=block_w, BLOCK_C=block_c, num_warps=warps)
        if need_bias:
            gb = column_sum(parts)
    if need_weight or (need_bias and gb is None):
        g = (activated if activated is not None else F.gelu(x)) if gelu else x
        if fast_path.dwconv_triton_weight_grad and ks <= 5:
            gw, gb_parts = _weight_grad(launch, grad, g, ks, need_bias and gb is None)
            return gx, gw if need_weight else None, gb if gb is not None else gb_parts
        # cuDNN's weight-gradient kernel (a reduction over batch and space) on NCHW views of the
        # channels-last tensors; the weight's values are not read for these two gradients, only its
        # shape and dtype: an uninitialised tensor of g's dtype saves casting it (a launch per call)
        shaped = weight if weight.dtype == g.dtype else weight.new_empty(weight.shape, dtype=g.dtype)
        _, gw, gb_conv = torch.ops.aten.convolution_backward(
            grad.permute(0, 3, 1, 2), g.permute(0, 3, 1, 2), shaped, [c], [1, 1],
            [ks // 2, ks // 2], [1, 1], False, [0, 0], c, [False, need_weight, need_bias and gb is None])
        gb = gb if gb is not None else gb_conv
    return gx, gw, gb


if HAS_TRITON:
    # --- torch.compile: custom ops that Inductor sees through ------------------------------------
    @triton_op("rmt::dwconv_nhwc", mutates_args={})
    def dwconv_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: bool,
                  gelu: bool) -> torch.Tensor:
        """Graph-capturable forward pass (see :func:`_forward`)."""
        return _forward(wrap_triton, x, weight, bias, residual, gelu)

    @triton_op("rmt::dwconv_nhwc_backward", mutates_args={})
    def dwconv_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, residual: bool,
                           gelu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Graph-capturable backward pass (see :func:`_backward`), all three gradients."""
        gx, gw, gb = _backward(wrap_triton, grad, x, weight, residual, gelu, True, True, True)
        return gx, gw, gb

    def _setup_context(ctx, inputs, output) -> None:
        x, weight, bias, residual, gelu = inputs
        ctx.save_for_backward(x, weight)
        ctx.residual, ctx.gelu, ctx.has_bias = residual, gelu, bias is not None

    def _op_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx, gw, gb = dwconv_backward_op(grad, x, weight, ctx.residual, ctx.gelu)
        return gx, gw.to(weight.dtype), gb.to(weight.dtype) if ctx.has_bias else None, None, None

    dwconv_op.register_autograd(_op_backward, setup_context=_setup_context)


    # --- torch.compile, training: opaque ops launching at run time with the given strides -----------
    # (see rmt.ops.masa.triton_masa for why training graphs do not trace through; switch:
    # rmt.config's compiled_training_opaque_ops)
    @torch.library.custom_op("rmt::dwconv_nhwc_train", mutates_args=())
    def dwconv_train_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: bool,
                        gelu: bool) -> torch.Tensor:
        """:func:`_forward` on ``x`` of any strides (copied when its channels are not unit-strided)."""
        return _forward(eager_launch, unit_channel_stride(x), weight, bias, residual, gelu)

    @dwconv_train_op.register_fake
    def _(x, weight, bias, residual, gelu):
        return x.new_empty(x.shape)

    @torch.library.custom_op("rmt::dwconv_nhwc_train_backward", mutates_args=())
    def dwconv_train_backward_op(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, residual: bool,
                                 gelu: bool, has_bias: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dx, dweight, dbias)`` of :func:`dwconv_train_op`, the weight's gradients in its dtype
        (``dbias`` is zeros of the weight's channel count when there is no bias)."""
        gx, gw, gb = _backward(eager_launch, grad, unit_channel_stride(x), weight, residual, gelu,
                               True, True, has_bias)
        gb = gb.to(weight.dtype) if gb is not None else weight.new_zeros(weight.shape[0])
        return gx, gw.to(weight.dtype).contiguous(), gb.clone() if gb._base is not None else gb

    @dwconv_train_backward_op.register_fake
    def _(grad, x, weight, residual, gelu, has_bias):
        return x.new_empty(x.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape[0])

    def _train_backward(ctx, grad):
        x, weight = ctx.saved_tensors
        gx, gw, gb = dwconv_train_backward_op(grad, x, weight, ctx.residual, ctx.gelu, ctx.has_bias)
        return gx, gw, gb if ctx.has_bias else None, None, None

    dwconv_train_op.register_autograd(_train_backward, setup_context=_setup_context)


class _DWConv(torch.autograd.Function):
    """Eager autograd wrapper of the kernels (no custom-op dispatch overhead)."""

    @staticmethod
    def forward(ctx, x, weight, bias, residual, gelu):
        ctx.save_for_backward(x, weight)
        ctx.residual, ctx.gelu, ctx.has_bias = residual, gelu, bias is not None
        return _forward(eager_launch, x, weight, bias, residual, gelu)

    @staticmethod
    def backward(ctx, grad):
        x, weight = ctx.saved_tensors
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        gx, gw, gb = _backward(eager_launch, grad, x, weight, ctx.residual, ctx.gelu,
                               ctx.needs_input_grad[0], ctx.needs_input_grad[1], need_b)
        return gx, as_dtype(gw, weight.dtype), as_dtype(gb, weight.dtype), None, None


def dwconv_nhwc_triton(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       residual: bool, gelu: bool = False) -> torch.Tensor:
    """Fused ``[g +] dwconv(g) + bias`` on ``(b, h, w, c)`` tokens (unit channel stride), with autograd.

    ``weight``/``bias`` may stay float32 under autocast: the kernels read them in float32 and
    return their gradients in their own dtype. The output has the dtype of ``x``.
    """
    if torch.compiler.is_compiling():
        training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
        if training and fast_path.compiled_training_opaque_ops:
            return dwconv_train_op(x, weight, bias, residual, gelu)
        return dwconv_op(x, weight, bias, residual, gelu)
    return _DWConv.apply(x, weight, bias, residual, gelu)


def triton_dwconv_supported(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether the fused kernels handle this input here (CUDA, or CPU under ``TRITON_INTERPRET=1``)."""
    return (triton_runs_on(x)
            and x.stride(-1) == 1 and x.dtype in SUPPORTED_DTYPES and weight.shape[1] == 1
            and weight.shape[-1] == weight.shape[-2] and weight.shape[-1] % 2 == 1)


@torch.jit.ignore
def dwconv_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: bool,
                fused: bool, gelu: bool = False, cpu_fast: bool = False) -> torch.Tensor:
    """``[g +] dwconv(g) + bias`` with ``g = gelu(x)`` (``gelu``) or ``x``, for a depthwise ``weight``
    ``(c, 1, k, k)`` on ``(b, h, w, c)`` tokens; returns ``(b, h, w, c)``.

    ``fused`` allows the Triton kernels (forward and backward; on CUDA, or on CPU under
    ``TRITON_INTERPRET=1``); otherwise, or when they do not apply, :func:`dwconv_nhwc_reference` runs,
    or with ``cpu_fast`` on a CPU tensor :func:`dwconv_nhwc_folded`.
    """
    training = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if (fused and fast_path.dwconv_kernels and triton_dwconv_supported(x, weight)
            and (fast_path.dwconv_training_kernels or not training)):
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        return dwconv_nhwc_triton(x, weight, bias, residual, gelu)
    if cpu_fast and residual and fast_path.cpu_fold_residual and x.device.type == "cpu":
        return dwconv_nhwc_folded(x, weight, bias, gelu)
    return dwconv_nhwc_reference(x, weight, bias, residual, gelu)
