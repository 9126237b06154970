"""LayerNorm over the channels of ``(..., c)`` tokens, many rows per Triton program.

RMT normalises 58 times per RMT-S forward pass, over rows of only 64-512 channels. PyTorch's CUDA
LayerNorm kernels give each row (forward) or a few rows (backward) their own thread block, which
for such short rows leaves the GPU far from its memory bandwidth: in the RMT-S training profile
LayerNorm forward and backward took 12 ms of a 105 ms step for about 1.5 ms worth of memory
traffic. The kernels here normalise a tile of ``BLOCK_M`` rows per program:

* forward: ``y = (x - mean) * rstd * weight + bias`` in float32, stored in the output dtype
  (the autocast dtype under autocast, as :func:`rmt.norm.layer_norm_autocast`), with the row
  ``mean`` and ``rstd`` kept for the backward pass;
* backward: ``dx`` row by row, and per-program partial sums of ``dy * xhat`` and ``dy`` that one
  small reduction turns into the weight and bias gradients.

:func:`rmt.norm.layer_norm_autocast` is the reference and the path elsewhere. The kernels launch
from an ``autograd.Function`` in eager mode: under ``torch.compile`` Inductor generates its own
multi-row LayerNorm kernels and fuses the residual additions around them into those, which a custom
op would prevent. The exception is the inference blocks' add+LayerNorm (:func:`add_layer_norm`),
whose neighbours are custom ops and GEMMs that Inductor cannot fuse into: it runs this module's
kernel under ``torch.compile`` too, as the op ``rmt::add_layer_norm``.
"""
import functools
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from ..config import fast_path
from .linear import column_sum
from .triton_support import HAS_TRITON, SUPPORTED_DTYPES, cdiv, eager_launch, next_power_of_2, triton_runs_on

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

MAX_CHANNELS = 4096

if HAS_TRITON:
    @triton.jit
    def _normalize(x, mask, cols, mask_c, W, B, C, eps):
        """``(y, mean, rstd)`` of the float32 rows ``x`` ``[BLOCK_M, BLOCK_C]`` (``C`` valid columns)."""
        mean = tl.sum(x, axis=1) / C
        xc = tl.where(mask, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=1) / C + eps)
        w = tl.load(W + cols, mask=mask_c, other=0.0).to(tl.float32)
        b = tl.load(B + cols, mask=mask_c, other=0.0).to(tl.float32)
        return xc * rstd[:, None] * w[None, :] + b[None, :], mean, rstd

    @triton.jit
    def _ln_fwd_kernel(X, W, B, Y, MEAN, RSTD, M, C, eps,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """Grid ``(cdiv(M, BLOCK_M),)``: ``BLOCK_M`` rows of ``C`` channels per program."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_C)
        mask_r, mask_c = rows < M, cols < C
        mask = mask_r[:, None] & mask_c[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        y, mean, rstd = _normalize(x, mask, cols, mask_c, W, B, C, eps)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)
        tl.store(MEAN + rows, mean, mask=mask_r)
        tl.store(RSTD + rows, rstd, mask=mask_r)

    @triton.jit
    def _add_ln_fwd_kernel(X, R, SHIFT, W, B, S, Y, M, C, eps,
                           BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr):
        """Grid ``(cdiv(M, BLOCK_M),)``: ``s = X + R`` (rounded to the dtype of ``S``), then
        ``S = s + SHIFT`` (per channel) and ``Y = LayerNorm(s)``; no statistics kept (inference)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = tl.arange(0, BLOCK_C)
        mask_r, mask_c = rows < M, cols < C
        mask = mask_r[:, None] & mask_c[None, :]
        offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
        s = (tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
             + tl.load(R + offs, mask=mask, other=0.0).to(tl.float32))
        s = s.to(S.dtype.element_ty).to(tl.float32)  # the sum as the residual stream holds it
        shift = tl.load(SHIFT + cols, mask=mask_c, other=0.0).to(tl.float32)
        tl.store(S + offs, (s + shift[None, :]).to(S.dtype.element_ty), mask=mask)
        y, _, _ = _normalize(s, mask, cols, mask_c, W, B, C, eps)
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)

    @triton.jit
    def _ln_bwd_kernel(DY, X, W, MEAN, RSTD, DX, PARTS, RES, M, C, rows_per_program,
                       BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, HAS_RES: tl.constexpr):
        """Grid ``(programs,)``: ``rows_per_program`` rows (a multiple of ``BLOCK_M``) per program;
        ``PARTS`` ``(programs, 2, C)`` float32 gets the program's column sums of ``dy * xhat`` and ``dy``.
        ``HAS_RES``: ``DX`` also gets ``RES`` added (the gradient of a residual path around the norm)."""
        pid = tl.program_id(0)
        cols = tl.arange(0, BLOCK_C)
        mask_c = cols < C
        w = tl.load(W + cols, mask=mask_c, other=0.0).to(tl.float32)
        dw = tl.zeros([BLOCK_C], tl.float32)
        db = tl.zeros([BLOCK_C], tl.float32)
        first = pid * rows_per_program
        for start in range(0, rows_per_program, BLOCK_M):
            rows = first + start + tl.arange(0, BLOCK_M)
            mask_r = rows < M
            mask = mask_r[:, None] & mask_c[None, :]
            offs = rows.to(tl.int64)[:, None] * C + cols[None, :]
            x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
            mean = tl.load(MEAN + rows, mask=mask_r, other=0.0)
            rstd = tl.load(RSTD + rows, mask=mask_r, other=0.0)
            xhat = tl.where(mask, (x - mean[:, None]) * rstd[:, None], 0.0)
            wdy = dy * w[None, :]
            c1 = tl.sum(xhat * wdy, axis=1) / C
            c2 = tl.sum(wdy, axis=1) / C
            dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
            if HAS_RES:
                dx += tl.load(RES + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
            dw += tl.sum(dy * xhat, axis=0)
            db += tl.sum(dy, axis=0)
        tl.store(PARTS + pid * 2 * C + cols, dw, mask=mask_c)
        tl.store(PARTS + (pid * 2 + 1) * C + cols, db, mask=mask_c)


def _tile(c: int, backward: bool = False) -> Tuple[int, int, int]:
    """``(BLOCK_M, BLOCK_C, num_warps)``: about 4096 elements per forward tile (at least 16 rows up to
    512 channels) and 8192 per backward tile, as ``tools/kernel_tiles.py`` found best at the
    RMT-S shapes (64-512 channels) on an H200."""
    block_c = next_power_of_2(c)
    if backward:
        block_m = max(1, min(64, 8192 // block_c))
    else:
        block_m = min(64, max(4096 // block_c, 16 if block_c <= 512 else 1))
    return block_m, block_c, 8 if block_c >= 2048 else 4


@functools.lru_cache(maxsize=None)
def _programs_for_backward(device: torch.device) -> int:
    """How many programs share the backward rows: a few per SM (each one writes a partial sum row)."""
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def _forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float,
             out_dtype: torch.dtype, block_m: Optional[int] = None, num_warps: Optional[int] = None
             ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(y, mean, rstd)`` for ``x`` ``(m, c)`` contiguous; ``y`` in ``out_dtype``, the others float32 ``(m,)``.
    ``block_m``/``num_warps`` replace :func:`_tile`'s choice (tools/kernel_tiles.py times them)."""
    m, c = x.shape
    y = torch.empty((m, c), dtype=out_dtype, device=x.device)
    mean = torch.empty((m,), dtype=torch.float32, device=x.device)
    rstd = torch.empty((m,), dtype=torch.float32, device=x.device)
    block_m0, block_c, warps0 = _tile(c)
    block_m, warps = block_m or block_m0, num_warps or warps0
    eager_launch(_ln_fwd_kernel)[(cdiv(m, block_m),)](
        x, weight, bias, y, mean, rstd, m, c, eps, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
    return y, mean, rstd


def _add_layer_norm(launch, x: torch.Tensor, r: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`add_layer_norm` through the kernel (``x``, ``r`` contiguous)."""
    c = x.shape[-1]
    m = x.numel() // c
    s, y = torch.empty_like(x), torch.empty_like(x)
    block_m, block_c, warps = _tile(c)
    launch(_add_ln_fwd_kernel)[(cdiv(m, block_m),)](
        x, r, shift, weight, bias, s, y, m, c, eps, BLOCK_M=block_m, BLOCK_C=block_c, num_warps=warps)
    return s, y


if HAS_TRITON:
    @triton_op("rmt::add_layer_norm", mutates_args={})
    def add_layer_norm_op(x: torch.Tensor, r: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                          bias: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
        """Graph-capturable :func:`add_layer_norm` (inference: no autograd formula)."""
        return _add_layer_norm(wrap_triton, x, r, shift, weight, bias, eps)


def add_layer_norm(x: torch.Tensor, r: torch.Tensor, shift: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(s + shift, layer_norm(s))`` with ``s = x + r`` for ``x``, ``r`` ``(..., c)`` of one dtype and
    ``shift`` ``(c,)``, both results in that dtype, without autograd: one pass where the Triton kernel
    takes the tensors (contiguous, in a supported dtype; under ``torch.compile`` as the op
    ``rmt::add_layer_norm`` unless ``fast_path.layernorm_compiled_kernels`` is off), else the same ops in PyTorch (which
    Inductor fuses into one kernel)."""
    c = x.shape[-1]
    compiling = torch.compiler.is_compiling()
    if (fast_path.layernorm_kernels and (fast_path.layernorm_compiled_kernels or not compiling) and triton_runs_on(x)
            and x.dtype in SUPPORTED_DTYPES and r.dtype == x.dtype and x.is_contiguous() and r.is_contiguous()
            and weight.dtype in SUPPORTED_DTYPES and 0 < c <= MAX_CHANNELS):
        if compiling:
            return add_layer_norm_op(x, r, shift, weight, bias, eps)
        return _add_layer_norm(eager_launch, x, r, shift, weight, bias, eps)
    s = x + r
    y = F.layer_norm(s.float(), (c,), weight.float(), bias.float(), eps).to(s.dtype)
    return (s.float() + shift.float()).to(s.dtype), y


def _backward(grad: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
              rstd: torch.Tensor, block_m: Optional[int] = None, num_warps: Optional[int] = None,
              residual: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dweight, dbias)``: ``dx`` in the dtype of ``x``, the others float32 ``(c,)``.
    ``residual`` (``(m, c)`` contiguous): added to ``dx`` in the kernel (one pass fewer than adding it after)."""
    m, c = x.shape
    grad = grad.contiguous()
    block_m0, block_c, warps0 = _tile(c, backward=True)
    block_m, warps = block_m or block_m0, num_warps or warps0
    blocks = cdiv(m, block_m)
    programs = max(1, min(blocks, _programs_for_backward(x.device)))
    rows_per_program = cdiv(blocks, programs) * block_m
    programs = cdiv(m, rows_per_program)
    dx = torch.empty_like(x)
    parts = torch.empty((programs, 2, c), dtype=torch.float32, device=x.device)
    eager_launch(_ln_bwd_kernel)[(programs,)](
        grad, x, weight, mean, rstd, dx, parts, residual if residual is not None else dx, m, c,
        rows_per_program, BLOCK_M=block_m, BLOCK_C=block_c, HAS_RES=residual is not None, num_warps=warps)
    dw, db = column_sum(parts.view(programs, 2 * c)).view(2, c)  # one reduction for both (a GEMV on CUDA)
    return dx, dw, db


class _LayerNorm(torch.autograd.Function):
    """Eager autograd wrapper of the kernels (no custom-op dispatch overhead)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, out_dtype):
        y, mean, rstd = _forward(x, weight, bias, eps, out_dtype)
        ctx.save_for_backward(x, weight, mean, rstd)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db = _backward(grad, x, weight, mean, rstd)
        return dx, dw.to(weight.dtype), db.to(weight.dtype), None, None


def triton_layer_norm_supported(x: torch.Tensor, weight: Optional[torch.Tensor],
                                bias: Optional[torch.Tensor]) -> bool:
    """Whether the kernels handle this input here (CUDA, or CPU under ``TRITON_INTERPRET=1``; in
    training only while ``fast_path.layernorm_training_kernels``)."""
    training = torch.is_grad_enabled() and (x.requires_grad or (weight is not None and weight.requires_grad))
    return (fast_path.layernorm_kernels and (fast_path.layernorm_training_kernels or not training) and triton_runs_on(x)
            and weight is not None and bias is not None and x.dtype in SUPPORTED_DTYPES
            and weight.dtype in SUPPORTED_DTYPES and 0 < x.shape[-1] <= MAX_CHANNELS)


def layer_norm_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm of ``(..., c)`` over ``c`` with autograd; returns the autocast dtype under autocast,
    else the dtype of ``x``. ``weight``/``bias`` ``(c,)`` are read as they are (float32 under autocast)."""
    device = x.device.type
    out_dtype = x.dtype
    if torch.is_autocast_enabled(device):
        # as the reference: normalise the autocast-dtype copy, so that is what backward keeps
        out_dtype = torch.get_autocast_dtype(device)
        x = x.to(out_dtype)
    shape = x.shape
    rows = x.reshape(-1, shape[-1])
    if not rows.is_contiguous():
        rows = rows.contiguous()
    return _LayerNorm.apply(rows, weight, bias, eps, out_dtype).view(shape)
