"""Reference Manhattan Self-Attention (MaSA): the plain PyTorch oracle and the CPU path.

Every tensor that enters or leaves the public functions here uses the token layout of the model:
``q, k, v`` are ``(b, h, w, n, d)`` views of the projections (any strides), the output is a
contiguous ``(b, h, w, n, d)`` tensor, so ``out.view(b, h, w, n * d)`` is the concatenated heads.

The math follows the specification exactly (section 3):

* ``k`` is scaled by ``d ** -0.5`` before the rotation;
* the rotation uses the row-major token index ``p = r * w + s`` of the current grid;
* the decay ``lambda_j * distance`` is an additive bias on the logits before the softmax;
* the "full" form attends over all ``h * w`` tokens with the Manhattan distance, the "decomposed"
  form attends along each row and then along each column, feeding only ``v`` from the first pass
  into the second.

Fast kernels elsewhere in this package are tested against these functions.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from ...compat import is_export_tracing, is_exporting


def rotation_angles(head_dim: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Per-channel rotation frequencies ``[t0, t0, t1, t1, ...]`` of length ``head_dim`` (float32).

    ``t_m = 10000 ** -(m / (head_dim/2 - 1))`` for ``m = 0 .. head_dim/2 - 1``.
    """
    if head_dim % 2:
        raise ValueError(f"MaSA head width must be even for the rotation, got {head_dim}")
    half = head_dim // 2
    theta = 1.0 / (10000 ** torch.linspace(0, 1, half, dtype=torch.float32, device=device))
    return theta.unsqueeze(-1).repeat(1, 2).flatten()


def head_decays(num_heads: int, init_value: float, heads_range: float,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """Per-head decay ``lambda_j = log(1 - 2 ** (-init_value - heads_range * j / n))``, shape ``(n,)``."""
    j = torch.arange(num_heads, dtype=torch.float32, device=device)
    return torch.log(1 - 2 ** (-init_value - heads_range * j / num_heads))


def rotation_tables(h: int, w: int, head_dim: int,
                    device: Optional[torch.device] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(sin, cos)`` of ``p * angle`` for every token of an ``h x w`` grid, each ``(h, w, head_dim)`` float32."""
    angle = rotation_angles(head_dim, device)
    index = torch.arange(h * w, dtype=torch.float32, device=device)
    phase = index[:, None] * angle[None, :]
    return torch.sin(phase).view(h, w, head_dim), torch.cos(phase).view(h, w, head_dim)


def rotate(x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs ``(2i, 2i+1)`` of ``x`` (..., d) by the angles whose sin/cos are given.

    ``out_2i = x_2i cos - x_2i+1 sin``, ``out_2i+1 = x_2i+1 cos + x_2i sin``.
    """
    x1 = x[..., 0::2]
    x2 = x[..., 1::2]
    swapped = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * cos + swapped * sin


def _distance_1d(n: int, device: torch.device) -> torch.Tensor:
    """``|i - j|`` for ``i, j < n`` as float32, shape ``(n, n)``."""
    idx = torch.arange(n, device=device)
    return (idx[:, None] - idx[None, :]).abs().to(torch.float32)


def grid_coordinates(h: int, w: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Row and column of every token of an ``h x w`` grid in row-major order, each ``(h * w,)``.

    Built by broadcasting rather than ``//`` and ``%``, which keeps sizes symbolic under export.
    """
    rows = torch.arange(h, device=device).view(h, 1).expand(h, w).reshape(-1)
    cols = torch.arange(w, device=device).view(1, w).expand(h, w).reshape(-1)
    return rows, cols


def full_form_row_blocks(b: int, h: int, w: int, n: int, max_logits: int, device: torch.device
                         ) -> List[Tuple[int, int, torch.Tensor]]:
    """Query-row blocks ``(start, stop, manhattan distance (rows, h*w) float32)`` of the full form.

    Each block holds at most ``max_logits`` logits over the batch and heads; while an exporter traces
    (``torch.export`` or ``torch.jit.trace``) there is one block, so that no Python arithmetic pins
    the symbolic sizes.
    """
    L = h * w
    rows, cols = grid_coordinates(h, w, device)
    if is_export_tracing():
        bounds = [(0, L)]
    else:
        block = max(1, min(L, max_logits // max(1, b * n * L)))
        bounds = [(start, min(L, start + block)) for start in range(0, L, block)]
    return [(start, stop, ((rows[start:stop, None] - rows[None, :]).abs()
                           + (cols[start:stop, None] - cols[None, :]).abs()).to(torch.float32))
            for start, stop in bounds]


def _rotate_qk(q: torch.Tensor, k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
               scale: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Scale k, rotate q and k; inputs ``(b, h, w, n, d)``, tables ``(h, w, d)``; outputs ``(b, n, h, w, d)``."""
    q = q.permute(0, 3, 1, 2, 4)
    k = k.permute(0, 3, 1, 2, 4) * scale
    return rotate(q, sin, cos), rotate(k, sin, cos)


def axis_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``softmax(q @ k^T + bias) @ v`` for ``q``/``k``/``v`` ``(b, n, s, rows, d)`` (``k``/``v`` with their
    own row count) and ``bias`` broadcasting to the logits ``(b, n, s, rows, keys)``.

    Under ``torch.compile`` the two leading axes are merged first, so that the chain is 4-D: Inductor's
    attention-fusion pass also matches it in 5-D and then fails to build its 4-D replacement
    ("Attempting to permute a tensor of rank 5, but received a permutation of length 4", torch 2.14).
    ``torch.export`` keeps the 5-D chain: merging and splitting a symbolic batch with the heads
    would guard the batch to the example's 1 (broadcasting against the bias's leading 1) and the
    grid sizes (splitting the merged axis again).
    """
    if torch.compiler.is_compiling() and not is_exporting() and q.dim() == 5:
        b, n = torch.broadcast_shapes(q.shape[:2], k.shape[:2], v.shape[:2], bias.shape[:2])
        q, k, v, bias = (t.expand(b, n, *t.shape[2:]).reshape(b * n, *t.shape[2:]) for t in (q, k, v, bias))
        out = axis_attention(q, k, v, bias)
        return out.view(b, n, *out.shape[1:])
    return torch.softmax(q @ k.transpose(-1, -2) + bias, dim=-1).to(v.dtype) @ v


def masa_decomposed_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                              sin: torch.Tensor, cos: torch.Tensor, decay: torch.Tensor,
                              scale: float) -> torch.Tensor:
    """Decomposed MaSA: attention along rows, then along columns.

    Args:
        q, k, v: ``(b, h, w, n, d)``.
        sin, cos: rotation tables ``(h, w, d)`` (float32).
        decay: per-head ``lambda`` ``(n,)`` (float32, negative).
        scale: multiplier applied to ``k`` before the rotation.
    Returns:
        ``(b, h, w, n, d)`` contiguous.
    """
    b, h, w, n, d = q.shape
    qr, kr = _rotate_qk(q, k, sin, cos, scale)              # (b, n, h, w, d)
    v = v.permute(0, 3, 1, 2, 4)                             # (b, n, h, w, d)
    bias_w = decay[:, None, None] * _distance_1d(w, q.device)  # (n, w, w)
    bias_h = decay[:, None, None] * _distance_1d(h, q.device)  # (n, h, h)

    v = axis_attention(qr, kr, v, bias_w[None, :, None])            # along rows: (b, n, h, w, d)
    out = axis_attention(qr.transpose(2, 3), kr.transpose(2, 3), v.transpose(2, 3),
                         bias_h[None, :, None])                     # along columns: (b, n, w, h, d)
    return out.permute(0, 3, 2, 1, 4).contiguous()


def masa_full_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        sin: torch.Tensor, cos: torch.Tensor, decay: torch.Tensor,
                        scale: float, max_logits: int = 1 << 24) -> torch.Tensor:
    """Full MaSA over all ``h * w`` tokens with a Manhattan-distance decay.

    Same arguments and result layout as :func:`masa_decomposed_reference`. Query rows are processed
    in blocks of at most ``max_logits`` logits, which bounds memory at large inputs; each row's
    softmax is independent, so the blocking does not change the result.
    """
    b, h, w, n, d = q.shape
    L = h * w
    qr, kr = _rotate_qk(q, k, sin, cos, scale)
    qr = qr.reshape(b, n, L, d)
    kr = kr.reshape(b, n, L, d)
    v = v.permute(0, 3, 1, 2, 4).reshape(b, n, L, v.shape[-1])
    outs = []
    for start, stop, dist in full_form_row_blocks(b, h, w, n, max_logits, q.device):
        bias = decay[:, None, None] * dist                              # (n, rows, L)
        logits = qr[:, :, start:stop] @ kr.transpose(-1, -2) + bias     # (b, n, rows, L)
        outs.append(torch.softmax(logits, dim=-1).to(v.dtype) @ v)
    out = outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)         # (b, n, L, d)
    return out.view(b, n, h, w, v.shape[-1]).permute(0, 2, 3, 1, 4).contiguous()


def default_scale(head_dim: int) -> float:
    """The key scale of the specification, ``head_dim ** -0.5``."""
    return head_dim ** -0.5
