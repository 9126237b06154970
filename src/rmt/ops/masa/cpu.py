"""MaSA for CPU: the reference math with fewer passes over memory.

Differences from :mod:`.naive` (same results up to float rounding):

* the rotation is one complex multiplication on the strided projection views (no stack, negate,
  concatenate or extra copies);
* the decay bias is added in place to the logits, and the rotated q/k are permuted as views;
* the full form uses the same blocked rows as the reference, so memory stays bounded;
* rows of 8-15 keys are padded to 16 (zero keys and values, ``-inf`` bias): PyTorch's CPU softmax
  does not vectorise rows shorter than its vectors, and took 1.4 ms for the 14-key rows of RMT-S's
  stage 3 at batch 8 against 0.12 ms padded (two cores); the whole decomposed pass went from 4.5 to
  2.3 ms (8 keys: 4.9 -> 3.0 ms, and 22.8 -> 19.2 ms with its backward at batch 128). Other rows
  are left alone: padding 56 or 28 keys to 64 or 32 made the softmax 15-20% faster but the pass
  slower (22 -> 31 ms, 4.3 -> 5.3 ms), and padding 4 keys to 16 slowed the pass by 15-35%;
* at inference the decomposed form takes the images in groups whose logits of one axis fit in
  ``rmt.config.fast_path.cpu_chunk_logit_bytes`` (stage 1 of RMT-S: one image, 2.8 MB), so the product, the bias, the
  softmax and the second product find them in the cache: on a 2-vCPU AMD EPYC one axis of stage 1
  at batch 8 took 11.0 against 14.2 ms, RMT-S 9.80 against 9.09 img/s (medians of 6 alternating
  runs). On an Intel Xeon, chunks of rows had been slower.
"""
from typing import Optional

import torch
import torch.nn.functional as F

from ...config import fast_path
from .naive import (_distance_1d, axis_attention, full_form_row_blocks, masa_decomposed_reference,
                    masa_full_reference)



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


def _key_padding(n: int) -> int:
    """How many keys to append to a row of ``n`` keys: up to 16 for rows of 8-15 keys (see the module
    notes; none with ``fast_path.cpu_pad_keys`` off)."""
    return 16 - n if fast_path.cpu_pad_keys and 8 <= n < 16 else 0


def _pad_keys(x: torch.Tensor, pad: int) -> torch.Tensor:
    """Append ``pad`` zero rows on the key axis (-2) of ``x`` ``(..., keys, d)``."""
    return F.pad(x, (0, 0, 0, pad)) if pad else x


def _axis_bias(decay: torch.Tensor, n: int, pad: int, device: torch.device) -> torch.Tensor:
    """Decay bias ``(heads, 1, n, n + pad)`` of one axis; the padded keys get ``-inf``."""
    bias = (decay[:, None, None] * _distance_1d(n, device))[:, None]
    return F.pad(bias, (0, pad), value=float("-inf")) if pad else bias


def _axis_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """:func:`.naive.axis_attention` with the bias added to the logits in place (eager mode)."""
    if torch.compiler.is_compiling():
        return axis_attention(q, k, v, bias)
    logits = q @ k.transpose(-1, -2)
    logits.add_(bias)
    return torch.softmax(logits, dim=-1).to(v.dtype) @ v


def _image_group(b: int, n: int, h: int, w: int, keys: int, element_size: int) -> int:
    """How many images the decomposed form takes at once (``fast_path.cpu_chunk_logit_bytes``), for rows
    of at most ``keys`` keys (padding included): all of them while training, under
    ``torch.compile`` or with chunking off."""
    per_image = n * h * w * keys * element_size
    limit = fast_path.cpu_chunk_logit_bytes
    if (limit <= 0 or torch.is_grad_enabled() or torch.compiler.is_compiling()
            or per_image * b <= limit):
        return b
    return max(1, limit // per_image)


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
        pad_w, pad_h = _key_padding(w), _key_padding(h)
        bias_w = _axis_bias(decay, w, pad_w, q.device)[None]
        bias_h = _axis_bias(decay, h, pad_h, q.device)[None]
        group = max(1, _image_group(b, n, h, w, max(w + pad_w, h + pad_h), q.element_size()))
        parts = []
        for i in (range(0, b, group) if b > group else (0,)):   # an empty batch: one empty group
            qi, ki, vi = qr[i:i + group], kr[i:i + group], vv[i:i + group]
            # along rows: logits (group, n, h, w, w + pad); then along columns: (group, n, w, h, h + pad)
            rows = _axis_attention(qi, _pad_keys(ki, pad_w), _pad_keys(vi, pad_w), bias_w)
            parts.append(_axis_attention(qi.transpose(2, 3), _pad_keys(ki.transpose(2, 3), pad_h),
                                         _pad_keys(rows.transpose(2, 3), pad_h), bias_h))  # (., n, w, h, d)
        out = (parts[0] if len(parts) == 1 else torch.cat(parts)).permute(0, 3, 2, 1, 4)  # (b, h, w, n, d)
    else:
        L = h * w
        pad = _key_padding(L)
        qf = qr.reshape(b, n, L, d)
        kf = _pad_keys(kr.reshape(b, n, L, d), pad)
        vf = _pad_keys(vv.reshape(b, n, L, vv.shape[-1]), pad)
        outs = []
        for start, stop, dist in full_form_row_blocks(b, h, w, n, max_logits, q.device):
            logits = qf[:, :, start:stop] @ kf.transpose(-1, -2)       # (b, n, rows, L + pad)
            bias = decay[:, None, None] * dist
            logits.add_(F.pad(bias, (0, pad), value=float("-inf")) if pad else bias)
            outs.append(torch.softmax(logits, dim=-1).to(dtype) @ vf)
        out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)).view(b, n, h, w, vv.shape[-1])
        out = out.permute(0, 2, 3, 1, 4)
    if add is None:
        return out.contiguous()
    if torch.is_grad_enabled() and (out.requires_grad or add.requires_grad):
        return (out + add).contiguous()
    # one pass: permuted read + add into a contiguous result (out= is not differentiable)
    return torch.add(add, out, out=torch.empty_like(add, memory_format=torch.contiguous_format))
