"""One RMT block at inference on the fast path, its residual additions folded into other passes.

Module by module, each of a block's two residual additions is a pass of its own over the token
tensor (read two, write one), and under autocast each of its four Linear layers casts its weight and
bias in a launch of its own. Under ``torch.compile`` Inductor fuses the first addition into the
LayerNorm after it, but not the second: the next op is the next block's depthwise-conv kernel, which
it cannot see into. :func:`block_infer` computes the same block as::

    x1      = x + cpe(x)
    q, k, v = split(qkv(norm1(x1)))
    s       = x1 + proj(masa(q, k, v) + lepe(v))
    x2, y   = s + fc2.bias, norm2(s)                  (one pass: rmt.ops.layernorm.add_layer_norm)
    x2     += fc2.weight @ (g + dwconv(g)),  g = gelu(fc1(y))   (the GEMM adds into x2: beta = 1)

so the second addition happens inside fc2's GEMM, which reads ``x2`` as its accumulator instead of
writing a separate output. Under ``torch.compile`` the Linear weights are cast in one concatenation,
which Inductor turns into one kernel (in eager mode autocast's own casts cost less host time). Per
RMT-S forward that removes 58 element-wise passes (29 under compile) and, compiled, about 200
launches. Used by ``RMTBlock.forward`` without gradients on the fast path, for blocks without layer
scale and with drop path inactive; the modules are the oracle (``tests/test_block_infer.py``).
"""
from typing import Sequence

import torch
import torch.nn.functional as F

from ..compat import is_exporting
from ..config import fast_path
from ..norm import layer_norm
from .block import BlockSpec, block_input_fits, cast_together
from .dwconv import dwconv_nhwc
from .layernorm import add_layer_norm
from .linear import gelu_epilogue_applies, linear_gelu
from .masa import masa
from .triton_support import fused_allowed, triton_runs_on



def _accumulate_linear(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """``out += x @ weight.T`` in place for ``out`` ``(..., n)`` (contiguous), ``x`` ``(..., k)`` and
    ``weight`` ``(n, k)``, all of one dtype: one GEMM that reads ``out`` as its accumulator."""
    out.view(-1, out.shape[-1]).addmm_(x.reshape(-1, x.shape[-1]), weight.t())


@torch.library.custom_op("rmt::accumulate_linear_", mutates_args={"out"})
def accumulate_linear_(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """:func:`_accumulate_linear` as an op ``torch.compile`` keeps in place (Inductor writes the
    accumulator's producer into a buffer of its own and hands that buffer to the GEMM)."""
    _accumulate_linear(out, x, weight)


@accumulate_linear_.register_fake
def _(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    return None


def inference_applies(x: torch.Tensor, impl: str, head_dim: int, form: str) -> bool:
    """Whether a block set to ``impl`` runs ``x`` ``(b, h, w, c)`` through :func:`block_infer`: no
    gradients to record (the caller checks its parameters), the fused kernels allowed for ``x``
    (CUDA, or CPU under Triton's interpreter), an input the kernels take (:func:`block_input_fits`)."""
    if (not (fast_path.fused_inference_block and fused_allowed(impl, x) and triton_runs_on(x)) or x.requires_grad
            or is_exporting()):   # an exported graph keeps the modules' plain ops
        return False
    return block_input_fits(x, head_dim, form)


def block_infer(x: torch.Tensor, spec: BlockSpec, params: Sequence[torch.Tensor], impl: str) -> torch.Tensor:
    """The block above on ``x`` ``(b, h, w, c)`` without autograd, in the autocast dtype under autocast
    (else the dtype of ``x``); ``params`` are the 18 weights and biases in the order of
    :func:`rmt.ops.block.block_forward`, ``impl`` the MaSA implementation. Returns ``(b, h, w, c)``."""
    (cpe_w, cpe_b, n1_w, n1_b, qkv_w, qkv_b, lepe_w, lepe_b, proj_w, proj_b, n2_w, n2_b,
     fc1_w, fc1_b, dw_w, dw_b, fc2_w, fc2_b) = params
    device = x.device.type
    dt = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    b, h, w, c = x.shape
    n = spec.num_heads
    compiling = torch.compiler.is_compiling()
    if compiling:  # one fused cast kernel (eagerly, autocast's casts inside F.linear cost less host time)
        wq, bq, wp, bp, w1, b1, w2 = cast_together((qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w), dt)
    else:
        wq, bq, wp, bp, w1, b1, w2 = qkv_w, qkv_b, proj_w, proj_b, fc1_w, fc1_b, fc2_w.to(dt)
    # intermediates are released as soon as they are used up (the modules release them on return),
    # so that the FFN's wide tensors do not meet the attention's in memory
    x1 = dwconv_nhwc(x.to(dt), cpe_w, cpe_b, True, True)
    y1 = layer_norm(x1, [c], n1_w, n1_b, spec.eps1, True)
    q, k, v = F.linear(y1, wq, bq).split(c, dim=-1)
    del y1
    lepe = dwconv_nhwc(v, lepe_w, lepe_b, False, True)
    shape = (b, h, w, n, c // n)
    o = masa(q.view(shape), k.view(shape), v.view(shape), spec.sin, spec.cos, spec.decay, spec.scale,
             spec.form, impl, lepe.reshape(shape)).view(b, h, w, c)
    del q, k, v, lepe
    x2, y2 = add_layer_norm(x1, F.linear(o, wp, bp), fc2_b, n2_w, n2_b, spec.eps2)
    del x1, o
    if gelu_epilogue_applies(y2, w1, b1):
        u = dwconv_nhwc(linear_gelu(y2, w1, b1, True), dw_w, dw_b, True, True, False)
    else:
        u = dwconv_nhwc(F.linear(y2, w1, b1), dw_w, dw_b, True, True, True)
    del y2
    if compiling:
        accumulate_linear_(x2, u, w2)
    else:
        _accumulate_linear(x2, u, w2)
    return x2
