"""MaSA for CPU: the reference math with fewer passes over memory.

Differences from :mod:`.naive` (same results up to float rounding):

* the rotation is one complex multiplication on the strided projection views (no stack, negate,
  concatenate or extra copies);
* the decay bias is added in place to the logits, and the rotated q/k are permuted as views;
* the full form uses the same blocked rows as the reference, so memory stays bounded.
"""
from typing import Optional

import torch

from .naive import _distance_1d, full_form_row_blocks, masa_decomposed_reference, masa_full_reference


def _rotate_complex(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """Rotate ``x * scale`` ``(b, h, w, n, d)`` (any strides with even channel pairs) -> contiguous ``(b, n, h, w, d)``.

    One pass: a complex multiplication (by the phase times ``scale``) whose output is written
    directly in head-major order.
    """
    if x.stride(-1) != 1 or any(s % 2 for s in x.stride()[:-1]):
        x = x.contiguous()
    b, h, w, n, d = x.shape
    pairs = torch.view_as_complex(x.unflatten(-1, (-1, 2))).permute(0, 3, 1, 2, 4)   # (b, n, h, w, d/2)
    phase = torch.complex(cos[..., 0::2], sin[..., 0::2]).to(pairs.dtype)            # (h, w, d/2)
    if scale != 1.0:
        phase = phase * scale
    if torch.is_grad_enabled() and x.requires_grad:   # out= is not differentiable
        out = (pairs * phase).contiguous()
    else:
        out = torch.empty((b, n, h, w, d // 2), dtype=pairs.dtype, device=x.device)
        torch.mul(pairs, phase, out=out)
    return torch.view_as_real(out).flatten(-2)


def masa_cpu(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
             decay: torch.Tensor, scale: float, form: str, add: Optional[torch.Tensor] = None,
             max_logits: int = 1 << 24) -> torch.Tensor:
    """Same contract as :func:`rmt.ops.masa.masa` with ``impl="reference"``; returns ``(b, h, w, n, d)``."""
    if not (q.dtype == k.dtype == v.dtype == torch.float32):
        ref = masa_decomposed_reference if form == "decomposed" else masa_full_reference
        out = ref(q, k, v, sin, cos, decay, scale)
        return out if add is None else out + add
    b, h, w, n, d = q.shape
    dtype = v.dtype
    qr = _rotate_complex(q, sin, cos).to(dtype)
    kr = _rotate_complex(k, sin, cos, scale).to(dtype)
    vv = v.permute(0, 3, 1, 2, 4)                                       # (b, n, h, w, d)
    if form == "decomposed":
        logits = qr @ kr.transpose(-1, -2)                              # (b, n, h, w, w)
        logits.add_((decay[:, None, None] * _distance_1d(w, q.device))[None, :, None])
        rows = torch.softmax(logits, dim=-1).to(dtype) @ vv             # (b, n, h, w, d)
        qh, kh = qr.transpose(2, 3), kr.transpose(2, 3)                 # (b, n, w, h, d)
        logits = qh @ kh.transpose(-1, -2)                              # (b, n, w, h, h)
        logits.add_((decay[:, None, None] * _distance_1d(h, q.device))[None, :, None])
        out = torch.softmax(logits, dim=-1).to(dtype) @ rows.transpose(2, 3)  # (b, n, w, h, d)
        out = out.permute(0, 3, 2, 1, 4)
    else:
        L = h * w
        qf, kf, vf = qr.reshape(b, n, L, d), kr.reshape(b, n, L, d), vv.reshape(b, n, L, vv.shape[-1])
        outs = []
        for start, stop, dist in full_form_row_blocks(b, h, w, n, max_logits, q.device):
            logits = qf[:, :, start:stop] @ kf.transpose(-1, -2)       # (b, n, rows, L)
            logits.add_(decay[:, None, None] * dist)
            outs.append(torch.softmax(logits, dim=-1).to(dtype) @ vf)
        out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).view(b, n, h, w, vv.shape[-1])
        out = out.permute(0, 2, 3, 1, 4)
    if add is None:
        return out.contiguous()
    if torch.is_grad_enabled() and (out.requires_grad or add.requires_grad):
        return (out + add).contiguous()
    # one pass: permuted read + add into a contiguous result (out= is not differentiable)
    return torch.add(add, out, out=torch.empty_like(add, memory_format=torch.contiguous_format))
