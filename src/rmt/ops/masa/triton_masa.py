"""Fused MaSA on GPU: Triton kernels wrapped as ``torch.library`` ops with autograd.

``masa_triton`` computes exactly what :mod:`rmt.ops.masa.naive` computes (same layouts, same
rotation tables), forward and backward, for float32 (IEEE dot products), bfloat16 and float16.
In eager mode the kernels are launched from a plain ``autograd.Function`` (lowest launch overhead);
under ``torch.compile`` the same launches go through ``torch.library.triton_op`` so that the graph
captures them (``fullgraph=True`` works). Both compose with activation checkpointing. Under ``TRITON_INTERPRET=1`` they also run on CPU tensors (slowly), which is how the
test suite checks them without a GPU.
"""
from typing import Optional, Tuple

import torch
from torch.library import triton_op, wrap_triton

from ...config import fast_path
from ..triton_support import SUPPORTED_DTYPES, cdiv, eager_launch, next_power_of_2, unit_channel_stride
from .triton_kernels import (MODE_COL, MODE_FULL, MODE_ROW, masa_bwd_dkdv_kernel, masa_bwd_dq_kernel,
                             masa_bwd_tile_kernel, masa_fwd_kernel, masa_fwd_seqs_kernel)

MAX_HEAD_DIM = 128


def _geometry(shape: Tuple[int, ...], mode: int) -> Tuple[int, int]:
    """``(tokens per sequence, sequences per image)`` of a ``(b, h, w, n, d)`` input."""
    _, h, w, _, _ = shape
    if mode == MODE_ROW:
        return w, h
    if mode == MODE_COL:
        return h, w
    return h * w, 1


def _launch_config(seq: int, head_dim: int) -> Tuple[int, int, int]:
    """Block sizes and warps: one tile for short rows/columns, 64x64 flash tiles otherwise."""
    block = min(64, max(16, next_power_of_2(seq)))
    warps = 4 if block * head_dim >= 64 * 32 else 2
    return block, block, warps


def _forward_config(seq: int, head_dim: int) -> Tuple[int, int, int]:
    """Forward-pass tiles: :func:`_launch_config` for sequences that fit one tile (keys in tiles of at
    most 32); longer ones take wider query tiles, as ``tools/kernel_tiles.py --size 1024`` found
    best on an H200 (batch 16:
    256-token rows 1,475 -> 1,223 us with 128 x 64 tiles, 128-token rows 971 -> 819 us with 2 warps,
    the 1,024-token full form 1,286 -> 721 us with 128 x 128 tiles)."""
    if seq <= 64:
        block_m, block_n, warps = _launch_config(seq, head_dim)
        # 33-64 tokens in one flash tile (the full form at 7x7): 32-key tiles, 55.9 -> 47.2 us per
        # pass at batch 256 (kernel_tiles.py, H200); rows and columns take the batched kernel instead
        return block_m, min(block_n, 32), warps
    if seq < 256:
        return 64, 64, 2
    return 128, 128 if seq >= 1024 and head_dim >= 32 else 64, 4


def _seqs_per_program(block: int, nseq: int) -> int:
    """Rows or columns per program of the batched forward kernel, as ``tools/kernel_tiles.py``
    found best on an H200 (timed from CUDA-graph replays): about 128 token slots per program (2 rows
    of 56 tokens, 4 of 28), but two per program for sequences of at most 16 tokens (14-token rows at
    batch 256: 45.0 -> 38.7 us per pass against one per program since the rotation tables load whole
    rows; 8 per program took 53 us at batch 128 against 39 for one)."""
    if block <= 16:
        return min(2, next_power_of_2(nseq))
    return max(1, min(next_power_of_2(nseq), 128 // block))


def _seqs_warps(block: int) -> int:
    """Warps of the batched forward kernel: 2 for one 64-token tile or one 16-token tile, else 4."""
    return 2 if block >= 64 or block <= 16 else 4


def _block_d(head_dim: int) -> int:
    """Head width padded to a power of two of at least 16 (the smallest matrix-unit tile)."""
    return max(16, next_power_of_2(head_dim))


def _dot_precision(dtype: torch.dtype) -> Optional[str]:
    """Exact float32 products for float32 inputs (no TF32); the default for 16-bit inputs."""
    return "ieee" if dtype == torch.float32 else None


def _strides(t: torch.Tensor) -> Tuple[int, int, int, int]:
    s = t.stride()
    return s[0], s[1], s[2], s[3]


def _attend(launch, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sin: torch.Tensor,
            cos: torch.Tensor, decay: torch.Tensor, add: Optional[torch.Tensor], scale: float,
            mode: int, need_lse: bool, config: Optional[Tuple[int, int, int]] = None,
            seqs: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward pass over sequences of ``mode``; returns ``(out (b,h,w,n,d), lse (b,h,w,n))``.

    ``launch`` maps a kernel to its launcher: :func:`~rmt.ops.triton_support.eager_launch` in eager mode, ``wrap_triton``
    inside ``torch.compile``. ``config``: ``(BLOCK_M, BLOCK_N, num_warps)`` instead of
    :func:`_launch_config` (tools/kernel_tiles.py times the alternatives). Rows and columns
    that fit one tile go through the batched kernel with ``seqs`` of them per program (default
    :func:`_seqs_per_program`; 0: the one-sequence kernel).
    """
    b, h, w, n, d = q.shape
    out = torch.empty((b, h, w, n, d), dtype=v.dtype, device=q.device)
    lse = torch.empty((b, h, w, n) if need_lse else (1,), dtype=torch.float32, device=q.device)
    seq, nseq = _geometry(q.shape, mode)
    block_m, block_n, warps = config or _forward_config(seq, d)
    extra = add if add is not None else out
    if seqs is None:
        seqs = _seqs_per_program(block_m, nseq) if fast_path.masa_sequences_per_program else 0
    if seqs and mode != MODE_FULL and seq <= block_m:
        if config is None:
            warps = _seqs_warps(block_m)
        launch(masa_fwd_seqs_kernel)[(cdiv(nseq, seqs) * n, b)](
            q, k, v, out, extra, lse, sin, cos, decay,
            *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(extra),
            n, w, seq, nseq, h * w, scale,
            MODE=mode, HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK=block_m, SEQS=seqs,
            HAS_ADD=add is not None, STORE_LSE=need_lse, DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=warps)
        return out, lse
    launch(masa_fwd_kernel)[(cdiv(seq, block_m), nseq * n, b)](
        q, k, v, out, extra, lse, sin, cos, decay,
        *_strides(q), *_strides(k), *_strides(v), *_strides(out), *_strides(extra),
        n, w, seq, h * w, scale,
        MODE=mode, HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_ADD=add is not None, STORE_LSE=need_lse, DOT_PRECISION=_dot_precision(q.dtype),
        num_warps=warps)
    return out, lse


def _one_tile_backward(shape: Tuple[int, ...], mode: int) -> bool:
    """Whether the backward pass of ``mode`` on a ``(b, h, w, n, d)`` input takes the single-tile kernel."""
    seq, _ = _geometry(shape, mode)
    return fast_path.masa_single_tile_backward and seq <= _launch_config(seq, shape[-1])[0]


def _attend_backward(launch, grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                     v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, sin: torch.Tensor,
                     cos: torch.Tensor, decay: torch.Tensor, scale: float, mode: int,
                     grads: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
                     accumulate_qk: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the raw (unrotated, unscaled) q, k and of v, each ``(b, h, w, n, d)``.

    ``grads``: ``(dq, dk, dv)`` to write them to (unit channel stride; dq and dk with equal strides,
    e.g. slices of one qkv gradient); with ``accumulate_qk`` dq and dk are added to what they hold."""
    b, h, w, n, d = q.shape
    grad_out = grad_out.contiguous()
    seq, nseq = _geometry(q.shape, mode)
    block_m, block_n, warps = _launch_config(seq, d)
    if _one_tile_backward(q.shape, mode):  # every sequence fits one tile: one kernel for all three
        if grads is None:
            grads = tuple(torch.empty((b, h, w, n, d), dtype=t.dtype, device=q.device) for t in (q, k, v))
            accumulate_qk = False
        dq, dk, dv = grads
        if dq.stride() != dk.stride():
            raise ValueError("attention_backward: dq and dk must have equal strides")
        strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out), *_strides(dq), *_strides(dv))
        launch(masa_bwd_tile_kernel)[(1, nseq * n, b)](
            q, k, v, out, grad_out, lse, dq, dk, dv, sin, cos, decay, *strides,
            n, w, seq, h * w, scale, MODE=mode, HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK=block_m,
            ACCUMULATE_QK=accumulate_qk, DOT_PRECISION=_dot_precision(q.dtype),
            num_warps=max(warps, 4))  # four [BLOCK, BLOCK] tiles live
        return dq, dk, dv
    if grads is not None:  # the two-kernel path writes contiguous gradients; add or copy them over
        parts = _attend_backward(launch, grad_out, q, k, v, out, lse, sin, cos, decay, scale, mode)
        for i, (dst, part) in enumerate(zip(grads, parts)):
            if accumulate_qk and i < 2:
                dst.add_(part)
            else:
                dst.copy_(part)
        return grads
    dq = torch.empty((b, h, w, n, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((b, h, w, n, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((b, h, w, n, d), dtype=v.dtype, device=q.device)
    strides = (*_strides(q), *_strides(k), *_strides(v), *_strides(grad_out))
    common = dict(MODE=mode, HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=block_m, BLOCK_N=block_n,
                  DOT_PRECISION=_dot_precision(q.dtype), num_warps=warps)
    # dq first: it also writes delta = rowsum(dO * O), which the dk/dv kernel reads
    delta = torch.empty((b, h, w, n), dtype=torch.float32, device=q.device)
    launch(masa_bwd_dq_kernel)[(cdiv(seq, block_m), nseq * n, b)](
        q, k, v, out, grad_out, lse, delta, dq, sin, cos, decay, *strides,
        n, w, seq, h * w, scale, **common)
    launch(masa_bwd_dkdv_kernel)[(cdiv(seq, block_n), nseq * n, b)](
        q, k, v, grad_out, lse, delta, dk, dv, sin, cos, decay, *strides,
        n, w, seq, h * w, scale, **common)
    return dq, dk, dv


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sin: torch.Tensor,
                      cos: torch.Tensor, decay: torch.Tensor, scale: float, form: str
                      ) -> Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]:
    """MaSA of ``form`` on ``(b, h, w, n, d)`` inputs without autograd, for a caller that writes its
    own backward pass: ``(out, state)`` with ``out`` ``(b, h, w, n, d)`` and ``state`` what
    :func:`attention_backward` needs besides q, k and v. ``sin``/``cos``/``decay`` float32, contiguous."""
    if form == "full":
        out, lse = _attend(eager_launch, q, k, v, sin, cos, decay, None, scale, MODE_FULL, True)
        return out, (out, lse)
    rows, lse_rows = _attend(eager_launch, q, k, v, sin, cos, decay, None, scale, MODE_ROW, True)
    out, lse = _attend(eager_launch, q, k, rows, sin, cos, decay, None, scale, MODE_COL, True)
    return out, (out, lse, rows, lse_rows)


def attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       state: Tuple[torch.Tensor, ...], sin: torch.Tensor, cos: torch.Tensor,
                       decay: torch.Tensor, scale: float, form: str,
                       grads: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(dq, dk, dv)`` of :func:`attention_forward` (the decomposed form's dq and dk are the
    sums of the row and column passes' parts), written to ``grads`` where given (``(b, h, w, n, d)``
    views with equal strides, such as the three slices of the fused qkv projection's gradient)."""
    if form == "full":
        out, lse = state
        return _attend_backward(eager_launch, grad_out, q, k, v, out, lse, sin, cos, decay, scale, MODE_FULL,
                                grads)
    out, lse, rows, lse_rows = state
    if not (_one_tile_backward(q.shape, MODE_COL) and _one_tile_backward(q.shape, MODE_ROW)):
        # the two-kernel path writes its own contiguous gradients: the parts are added, then copied
        dq, dk, drows = _attend_backward(eager_launch, grad_out, q, k, rows, out, lse, sin, cos, decay,
                                         scale, MODE_COL)
        dq_rows, dk_rows, dv = _attend_backward(eager_launch, drows, q, k, v, rows, lse_rows, sin, cos,
                                                decay, scale, MODE_ROW)
        result = (dq.add_(dq_rows), dk.add_(dk_rows), dv)
        if grads is None:
            return result
        for dst, src in zip(grads, result):
            dst.copy_(src)
        return grads
    if grads is None:
        grads = (torch.empty_like(q, memory_format=torch.contiguous_format),
                 torch.empty_like(k, memory_format=torch.contiguous_format), None)
    # one tile per sequence: the column pass writes dq and dk; the row pass adds its parts to them
    # (no separate additions) and writes dv
    drows = torch.empty_like(v, memory_format=torch.contiguous_format)
    _attend_backward(eager_launch, grad_out, q, k, rows, out, lse, sin, cos, decay, scale, MODE_COL,
                     (grads[0], grads[1], drows))
    dv = grads[2] if grads[2] is not None else torch.empty_like(drows)
    return _attend_backward(eager_launch, drows, q, k, v, rows, lse_rows, sin, cos, decay, scale, MODE_ROW,
                            (grads[0], grads[1], dv), accumulate_qk=True)


# --- torch.compile: custom ops that Inductor sees through -----------------------------------------

@triton_op("rmt::masa_attend", mutates_args={})
def masa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sin: torch.Tensor,
                cos: torch.Tensor, decay: torch.Tensor, add: Optional[torch.Tensor], scale: float,
                mode: int, need_lse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Graph-capturable forward pass (see :func:`_attend`)."""
    return _attend(wrap_triton, q, k, v, sin, cos, decay, add, scale, mode, need_lse)


@triton_op("rmt::masa_attend_backward", mutates_args={})
def masa_attend_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                         out: torch.Tensor, lse: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                         decay: torch.Tensor, scale: float, mode: int
                         ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Graph-capturable backward pass (see :func:`_attend_backward`)."""
    return _attend_backward(wrap_triton, grad_out, q, k, v, out, lse, sin, cos, decay, scale, mode)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, sin, cos, decay, add, scale, mode, need_lse = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, sin, cos, decay, out, lse)
    ctx.scale, ctx.mode = scale, mode


def _backward(ctx, grad_out, grad_lse):
    q, k, v, sin, cos, decay, out, lse = ctx.saved_tensors
    dq, dk, dv = masa_attend_backward(grad_out, q, k, v, out, lse, sin, cos, decay, ctx.scale, ctx.mode)
    return dq, dk, dv, None, None, None, None, None, None, None


masa_attend.register_autograd(_backward, setup_context=_setup_context)


# --- torch.compile, training: opaque custom ops ------------------------------------------------------
# In a compiled training graph the kernels run from opaque ops whose bodies launch them at run time,
# with the strides of the tensors they are given. Traced through (``triton_op``), a launch keeps the
# strides of the tensors seen while tracing as constants, and in a backward graph Inductor promises
# only their order, not their values; the opaque ops also launch exactly what eager mode launches.
# Switch: rmt.config's compiled_training_opaque_ops.


@torch.library.custom_op("rmt::masa_attend_train", mutates_args=())
def masa_attend_train(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sin: torch.Tensor,
                      cos: torch.Tensor, decay: torch.Tensor, scale: float, mode: int
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(out (b,h,w,n,d), lse (b,h,w,n) float32)`` of one pass (see :func:`_attend`), any strides."""
    q, k, v = unit_channel_stride(q), unit_channel_stride(k), unit_channel_stride(v)
    return _attend(eager_launch, q, k, v, sin.contiguous(), cos.contiguous(), decay.contiguous(), None,
                   scale, mode, True)


@masa_attend_train.register_fake
def _(q, k, v, sin, cos, decay, scale, mode):
    return v.new_empty(q.shape), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("rmt::masa_attend_train_backward", mutates_args=())
def masa_attend_train_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                               decay: torch.Tensor, scale: float, mode: int
                               ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Contiguous ``(dq, dk, dv)`` of :func:`masa_attend_train`, any input strides."""
    q, k, v = unit_channel_stride(q), unit_channel_stride(k), unit_channel_stride(v)
    return _attend_backward(eager_launch, grad_out, q, k, v, out.contiguous(), lse.contiguous(),
                            sin.contiguous(), cos.contiguous(), decay.contiguous(), scale, mode)


@masa_attend_train_backward.register_fake
def _(grad_out, q, k, v, out, lse, sin, cos, decay, scale, mode):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_train_context(ctx, inputs, output) -> None:
    q, k, v, sin, cos, decay, scale, mode = inputs
    ctx.save_for_backward(q, k, v, sin, cos, decay, *output)
    ctx.scale, ctx.mode = scale, mode


def _train_backward(ctx, grad_out, grad_lse):
    q, k, v, sin, cos, decay, out, lse = ctx.saved_tensors
    dq, dk, dv = masa_attend_train_backward(grad_out, q, k, v, out, lse, sin, cos, decay, ctx.scale, ctx.mode)
    return dq, dk, dv, None, None, None, None, None


masa_attend_train.register_autograd(_train_backward, setup_context=_setup_train_context)


# --- eager mode: the same kernels without the custom-op dispatch overhead ---------------------------

class _MasaAttend(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sin, cos, decay, add, scale, mode, need_lse):
        out, lse = _attend(eager_launch, q, k, v, sin, cos, decay, add, scale, mode, need_lse)
        ctx.save_for_backward(q, k, v, sin, cos, decay, out, lse)
        ctx.scale, ctx.mode = scale, mode
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, sin, cos, decay, out, lse = ctx.saved_tensors
        dq, dk, dv = _attend_backward(eager_launch, grad_out, q, k, v, out, lse, sin, cos, decay,
                                      ctx.scale, ctx.mode)
        return dq, dk, dv, None, None, None, None, None, None, None


def _attend_op(q, k, v, sin, cos, decay, add, scale: float, mode: int, need_lse: bool) -> torch.Tensor:
    if torch.compiler.is_compiling():
        if need_lse and add is None and fast_path.compiled_training_opaque_ops:
            return masa_attend_train(q, k, v, sin, cos, decay, scale, mode)[0]
        return masa_attend(q, k, v, sin, cos, decay, add, scale, mode, need_lse)[0]
    return _MasaAttend.apply(q, k, v, sin, cos, decay, add, scale, mode, need_lse)


def triton_supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the fused kernels handle these inputs (else the caller falls back to the reference)."""
    return (q.shape[-1] % 2 == 0 and q.shape[-1] <= MAX_HEAD_DIM and q.dtype in SUPPORTED_DTYPES
            and q.dtype == k.dtype == v.dtype
            and q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1)


def masa_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sin: torch.Tensor,
                cos: torch.Tensor, decay: torch.Tensor, scale: float, form: str,
                add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Fused MaSA on ``(b, h, w, n, d)`` inputs; returns ``(b, h, w, n, d)`` contiguous (+ ``add``).

    ``add`` (same shape, e.g. the LePE branch) is added inside the kernel when no gradient is
    needed, and by a separate addition otherwise.
    """
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k, v, add))
    fused_add = add if (add is not None and not grad) else None
    sin, cos = sin.float().contiguous(), cos.float().contiguous()
    decay = decay.float().contiguous()
    if form == "full":
        out = _attend_op(q, k, v, sin, cos, decay, fused_add, scale, MODE_FULL, grad)
    else:
        rows = _attend_op(q, k, v, sin, cos, decay, None, scale, MODE_ROW, grad)
        out = _attend_op(q, k, rows, sin, cos, decay, fused_add, scale, MODE_COL, grad)
    if add is not None and fused_add is None:
        out = out + add
    return out
