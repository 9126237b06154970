"""One RMT block in training as a single autograd node, forward and backward written out.

Module by module, a block's training step goes through about ten Python ``autograd.Function``
applications and a dozen module calls, and the ops of different modules cannot share work.
:class:`_Block` runs the same kernels (the Triton depthwise convolutions, LayerNorms and MaSA passes
of :mod:`rmt.ops`, cuBLAS GEMMs) in the same order with the same saved tensors from one ``forward``
and one ``backward``, which lets the backward add each residual gradient inside the LayerNorm
kernel (two element-wise passes fewer per block) and cast the block's weights in two launches
instead of eight. Measured on an H200 (BENCHMARKS.md, run K): the GPU time of an RMT-S step fell
by 1.3%; the host time of an eager step did not measurably change (it is spent in the launches
themselves, not in the Python around them). The block is::

    x1  = x + cpe(x)                              (depthwise 3x3 with its bias)
    q, k, v = split(qkv(norm1(x1)))
    x2  = x1 + scale1 * proj(masa(q, k, v) + lepe(v))
    out = x2 + scale2 * fc2(g + dwconv(g)),  g = gelu(fc1(norm2(x2)))

where ``scale1``/``scale2`` are the drop-path masks times the layer scales (or ``None``), made by the
caller with autograd so that their own gradients flow. :func:`block_train` is used only on the fast
path in eager training (see ``RMTBlock.forward``); the module-by-module composition is the oracle
(``tests/test_block.py`` compares outputs and every gradient).
"""
from typing import List, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F

from ..config import fast_path
from . import dwconv, layernorm
from .ffn import ffn_tail_backward, ffn_tail_forward
from .linear import linear_backward
from .residual import scaled_add
from .masa.triton_masa import MAX_HEAD_DIM, attention_backward, attention_forward
from .triton_support import SUPPORTED_DTYPES, as_dtype, eager_launch, fused_allowed, triton_runs_on



class BlockSpec(NamedTuple):
    """What a block's computation needs besides tensors with gradients."""
    sin: torch.Tensor
    cos: torch.Tensor
    decay: torch.Tensor
    num_heads: int
    scale: float
    form: str
    eps1: float
    eps2: float


def _residual_backward(grad: torch.Tensor, branch: Optional[torch.Tensor], scale: Optional[torch.Tensor],
                       branch_dtype: torch.dtype, need_scale: bool):
    """Gradients of ``x + scale * branch`` for the branch (in ``branch_dtype``) and for ``scale``
    (summed to its shape), as autograd computes them for ``torch.addcmul`` (:func:`scaled_add`)."""
    if scale is None:
        return as_dtype(grad, branch_dtype), None
    grad_scale = as_dtype((grad * branch).sum_to_size(scale.shape), scale.dtype) if need_scale else None
    return scaled_add(None, grad, scale, dtype=branch_dtype), grad_scale


def _norm_backward(grad_y: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, mean: torch.Tensor,
                   rstd: torch.Tensor, residual: torch.Tensor, dtype: torch.dtype):
    """``(dx + residual, dweight, dbias)`` of the LayerNorm of ``x`` ``(b, h, w, c)``, the sum in ``dtype``:
    added inside the norm's kernel when all three dtypes agree (a layer scale can promote the residual
    stream to float32; then the sum is taken in float32 after the kernel, as autograd would)."""
    shape, c = x.shape, x.shape[-1]
    if residual.dtype == x.dtype == dtype:
        dx, dw, db = layernorm._backward(grad_y.reshape(-1, c), x.view(-1, c), weight, mean, rstd,
                                         residual=residual.contiguous().view(-1, c))
    else:
        dx, dw, db = layernorm._backward(grad_y.reshape(-1, c), x.view(-1, c), weight, mean, rstd)
        dx = dx.to(dtype) + residual.reshape(-1, c).to(dtype)
    return dx.view(shape), dw, db


class BlockState(NamedTuple):
    """What :func:`block_forward` keeps for :func:`block_backward`."""
    saved: tuple            # tensors (or None), in the order block_backward unpacks them
    dtypes: tuple           # x1, a1, x2, f and parameter dtypes
    need_scales: tuple      # whether the gradients of scale1 / scale2 are wanted


def block_forward(x: torch.Tensor, scale1: Optional[torch.Tensor], scale2: Optional[torch.Tensor],
                  spec: BlockSpec, params: Sequence[torch.Tensor], needs: Sequence[bool],
                  out: Optional[torch.Tensor] = None):
    """The block on ``x`` ``(b, h, w, c)`` without autograd: ``(out, BlockState)``. ``needs`` says which
    of ``(x, scale1, scale2, spec, *params)`` want a gradient (``ctx.needs_input_grad``); the output is
    written into ``out`` where given (of the dtype :func:`output_dtype` names)."""
    (cpe_w, cpe_b, n1_w, n1_b, qkv_w, qkv_b, lepe_w, lepe_b, proj_w, proj_b, n2_w, n2_b,
     fc1_w, fc1_b, dw_w, dw_b, fc2_w, fc2_b) = params
    b, h, w, c = x.shape
    dt = x.dtype
    n = spec.num_heads
    x1 = dwconv._forward(eager_launch, x, cpe_w, cpe_b, True, False)
    y1, mean1, rstd1 = layernorm._forward(x1.view(-1, c), n1_w, n1_b, spec.eps1, dt)
    wq, bq, wp, bp, w1, b1, w2, b2 = cast_together((qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w, fc2_b), dt)
    qkv = F.linear(y1.view(b, h, w, c), wq, bq)
    q, k, v = qkv.split(c, dim=-1)
    lepe = dwconv._forward(eager_launch, v, lepe_w, lepe_b, False, False)
    shape = (b, h, w, n, c // n)
    attn, state = attention_forward(q.view(shape), k.view(shape), v.view(shape), spec.sin, spec.cos,
                                    spec.decay, spec.scale, spec.form)
    o = attn.view(b, h, w, c) + lepe
    a1 = F.linear(o, wp, bp)
    x2 = x1 + a1 if scale1 is None else scaled_add(x1, a1, scale1)
    x2n = as_dtype(x2, dt)  # what the LayerNorm normalises (x2 is float32 when a layer scale promoted it)
    y2, mean2, rstd2 = layernorm._forward(x2n.view(-1, c), n2_w, n2_b, spec.eps2, dt)
    a = F.linear(y2.view(b, h, w, c), w1, b1)
    f = ffn_tail_forward(a, dw_w, dw_b, w2, b2)
    if scale2 is None:
        out = torch.add(x2, f, out=out)
    else:
        out = scaled_add(x2, f, scale2, out=out)

    need1 = scale1 is not None and needs[1]
    need2 = scale2 is not None and needs[2]
    saved = (x, x1, y1, mean1, rstd1, qkv, o, a1 if need1 else None, x2n, y2, mean2, rstd2, a,
             f if need2 else None, scale1, scale2, wq, wp, w1, w2, cpe_w, n1_w, lepe_w, n2_w, dw_w, dw_b, *state)
    return out, BlockState(saved, (x1.dtype, a1.dtype, x2.dtype, f.dtype, qkv_w.dtype), (need1, need2))


def output_dtype(x: torch.Tensor, scale1: Optional[torch.Tensor], scale2: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype of :func:`block_forward`'s output: ``x``'s, promoted by the scales (a float32 layer scale)."""
    dtype = x.dtype
    for scale in (scale1, scale2):
        if scale is not None:
            dtype = torch.promote_types(dtype, scale.dtype)
    return dtype


def block_backward(state: BlockState, spec: BlockSpec, needs: Sequence[bool], grad: torch.Tensor) -> tuple:
    """Gradients of :func:`block_forward` for ``grad`` (of ``out``): one per input of
    ``(x, scale1, scale2, spec, *params)``, ``None`` where not wanted."""
    (x, x1, y1, mean1, rstd1, qkv, o, a1, x2n, y2, mean2, rstd2, a, f, scale1, scale2,
     wq, wp, w1, w2, cpe_w, n1_w, lepe_w, n2_w, dw_w, dw_b, *attn_state) = state.saved
    x1_dtype, a1_dtype, x2_dtype, f_dtype, pdt = state.dtypes
    b, h, w, c = x.shape
    n = spec.num_heads

    # FFN branch: out = x2 + scale2 * fc2(g + dwconv(g) + b), g = gelu(fc1(norm2(x2)))
    grad = grad.contiguous()
    g_f, g_scale2 = _residual_backward(grad, f, scale2, f_dtype, state.need_scales[1])
    g_a, g_dw_w, g_dw_b, g_fc2_w, g_fc2_b = ffn_tail_backward(
        g_f, a, dw_w, dw_b, w2, pdt, pdt, True, needs[18], needs[19], needs[20], needs[21])
    g_y2, g_fc1_w, g_fc1_b = linear_backward(g_a, y2, w1, pdt, pdt, True, needs[16], needs[17])
    g_x2, g_n2_w, g_n2_b = _norm_backward(g_y2, x2n, n2_w, mean2, rstd2, grad, x2_dtype)

    # attention branch: x2 = x1 + scale1 * proj(masa(q, k, v) + lepe(v))
    g_a1, g_scale1 = _residual_backward(g_x2, a1, scale1, a1_dtype, state.need_scales[0])
    g_o, g_proj_w, g_proj_b = linear_backward(g_a1, o, wp, pdt, pdt, True, needs[12], needs[13])
    g_o = g_o.contiguous()
    q, k, v = qkv.split(c, dim=-1)
    shape = (b, h, w, n, c // n)
    # the MaSA kernels write dq, dk and dv straight into the slices of qkv's gradient, and the LePE
    # input gradient is added to the dv slice in place (no concatenation, no separate additions)
    g_qkv = torch.empty((b, h, w, 3 * c), dtype=qkv.dtype, device=qkv.device)
    dq, dk, dv = g_qkv.split(c, dim=-1)
    attention_backward(g_o.view(shape), q.view(shape), k.view(shape), v.view(shape), tuple(attn_state),
                       spec.sin, spec.cos, spec.decay, spec.scale, spec.form,
                       (dq.view(shape), dk.view(shape), dv.view(shape)))
    _, g_lepe_w, g_lepe_b = dwconv._backward(eager_launch, g_o, v, lepe_w, False, False, True,
                                             needs[10], needs[11], add_to=dv)
    g_y1, g_qkv_w, g_qkv_b = linear_backward(g_qkv, y1.view(b, h, w, c), wq, pdt, pdt, True,
                                             needs[8], needs[9])
    g_x1, g_n1_w, g_n1_b = _norm_backward(g_y1, x1, n1_w, mean1, rstd1, g_x2, x1_dtype)

    # x1 = x + cpe(x)
    g_x, g_cpe_w, g_cpe_b = dwconv._backward(eager_launch, g_x1, x, cpe_w, True, False, needs[0],
                                             needs[4], needs[5])
    return (g_x, g_scale1, g_scale2, None, as_dtype(g_cpe_w, pdt), as_dtype(g_cpe_b, pdt), as_dtype(g_n1_w, pdt),
            as_dtype(g_n1_b, pdt), g_qkv_w, g_qkv_b, as_dtype(g_lepe_w, pdt), as_dtype(g_lepe_b, pdt), g_proj_w,
            g_proj_b, as_dtype(g_n2_w, pdt), as_dtype(g_n2_b, pdt), g_fc1_w, g_fc1_b, g_dw_w, g_dw_b, g_fc2_w,
            g_fc2_b)


class _Block(torch.autograd.Function):
    """The block run eagerly; ``graphs`` (a :class:`rmt.ops.block_graphs.BlockGraphs` or ``None``)
    counts the backward passes, which compile the kernels its capture needs."""

    @staticmethod
    def forward(ctx, x, scale1, scale2, spec: BlockSpec, graphs, *params):
        needs = ctx.needs_input_grad[:4] + ctx.needs_input_grad[5:]
        out, state = block_forward(x, scale1, scale2, spec, params, needs)
        ctx.save_for_backward(*state.saved)
        ctx.spec, ctx.graphs, ctx.needs = spec, graphs, needs
        ctx.state = state._replace(saved=())
        return out

    @staticmethod
    def backward(ctx, grad):
        grads = block_backward(ctx.state._replace(saved=ctx.saved_tensors), ctx.spec, ctx.needs, grad)
        if ctx.graphs is not None:
            ctx.graphs.eager_backwards += 1
        return (*grads[:4], None, *grads[4:])


def kernels_apply(x: torch.Tensor, impl: str, head_dim: int, form: str) -> bool:
    """Whether a block set to ``impl`` trains ``x`` ``(b, h, w, c)`` through :func:`block_train`: eager
    mode with gradients, the fused kernels allowed and switched on for training, a tensor they take
    (CUDA, or CPU under Triton's interpreter; unit channel stride; a supported compute dtype)."""
    if (not (fast_path.fused_training_block and torch.is_grad_enabled() and fused_allowed(impl, x) and triton_runs_on(x))
            or torch.compiler.is_compiling()):
        return False
    if not (fast_path.dwconv_kernels and fast_path.dwconv_training_kernels and fast_path.layernorm_kernels
            and fast_path.layernorm_training_kernels):
        return False
    return block_input_fits(x, head_dim, form)


def block_input_fits(x: torch.Tensor, head_dim: int, form: str) -> bool:
    """Whether the fused block kernels take ``x`` ``(b, h, w, c)`` as it is: unit channel stride, a
    supported compute dtype (the autocast dtype under autocast, else that of ``x``), head width and
    channels within the kernels' limits, a known attention form."""
    autocast = torch.is_autocast_enabled(x.device.type)
    dtype = torch.get_autocast_dtype(x.device.type) if autocast else x.dtype
    return (x.dim() == 4 and x.stride(-1) == 1 and dtype in SUPPORTED_DTYPES and (autocast or dtype == x.dtype)
            and head_dim <= MAX_HEAD_DIM and x.shape[-1] <= layernorm.MAX_CHANNELS and form in ("decomposed", "full"))


def cast_together(params: Sequence[torch.Tensor], dtype: torch.dtype) -> List[torch.Tensor]:
    """``[p.to(dtype) for p in params]`` in two launches (one concatenation, one cast) instead of one
    per tensor; the results are views of one buffer."""
    if all(p.dtype == dtype for p in params):
        return list(params)
    flat = torch.cat([p.reshape(-1) for p in params]).to(dtype)
    return [t.view(p.shape) for t, p in zip(flat.split([p.numel() for p in params]), params)]


def block_train(x: torch.Tensor, scale1: Optional[torch.Tensor], scale2: Optional[torch.Tensor],
                spec: BlockSpec, params: Sequence[torch.Tensor], graphs=None) -> torch.Tensor:
    """The block above on ``x`` ``(b, h, w, c)`` (in the compute dtype, unit channel stride) with one
    autograd node; ``params`` are the 18 weights and biases in the order of :func:`block_forward`
    (cpe, norm1, qkv, lepe, proj, norm2, fc1, dwconv, fc2). Returns ``(b, h, w, c)``. With ``graphs``
    (:mod:`rmt.ops.block_graphs`) the node replays the block's CUDA graphs where they apply."""
    if graphs is not None:
        out = graphs.run(x, scale1, scale2, spec, params)
        if out is not None:
            return out
    return _Block.apply(x, scale1, scale2, spec, graphs, *params)
