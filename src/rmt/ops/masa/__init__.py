"""MaSA operators: one entry point, :func:`masa`, that dispatches to an implementation.

Implementations (``impl``):

* ``"reference"`` - :mod:`rmt.ops.masa.naive`, plain PyTorch, any device; the correctness oracle.
* ``"auto"`` - the fastest implementation available for the inputs' device, else the reference.
"""
from __future__ import annotations

import torch

from .naive import (
    default_scale,
    head_decays,
    masa_decomposed_reference,
    masa_full_reference,
    rotate,
    rotation_angles,
    rotation_tables,
)

FORMS = ("decomposed", "full")
IMPLS = ("auto", "reference")


def masa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
         decay: torch.Tensor, scale: float, form: str, impl: str = "auto") -> torch.Tensor:
    """Manhattan self-attention on ``(b, h, w, n, d)`` inputs; returns ``(b, h, w, n, d)`` contiguous.

    ``form`` is ``"decomposed"`` or ``"full"``; ``impl`` one of :data:`IMPLS`.
    """
    if form == "decomposed":
        return masa_decomposed_reference(q, k, v, sin, cos, decay, scale)
    if form == "full":
        return masa_full_reference(q, k, v, sin, cos, decay, scale)
    raise ValueError("unknown MaSA form '" + form + "'; expected 'decomposed' or 'full'")


__all__ = [
    "FORMS", "IMPLS", "masa", "masa_decomposed_reference", "masa_full_reference", "rotate",
    "rotation_angles", "rotation_tables", "head_decays", "default_scale",
]
