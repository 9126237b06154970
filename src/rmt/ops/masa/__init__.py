"""MaSA operators: one entry point, :func:`masa`, that dispatches to an implementation.

Implementations (``impl``):

* ``"reference"`` - :mod:`.naive`, plain PyTorch on any device; the correctness oracle.
* ``"triton"``    - :mod:`.triton_masa`, fused Triton kernels (CUDA; CPU under ``TRITON_INTERPRET=1``).
* ``"cpu"``       - :mod:`.cpu`, the reference math reorganised for CPU speed.
* ``"auto"``      - Triton on CUDA when the inputs are supported, ``"cpu"`` on CPU, else reference.

While an exporter traces the model (``torch.export``, ``torch.onnx.export``, ``torch.jit.trace``),
``"auto"`` and ``"cpu"`` run the reference, whose ops have ONNX forms and keep sizes symbolic.
"""
from typing import Optional

import torch

from ...compat import is_export_tracing
from ..triton_support import HAS_TRITON, refuse_onnx_tracing, triton_runs_on
from .cpu import masa_cpu
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
IMPLS = ("auto", "reference", "triton", "cpu")

if HAS_TRITON:
    from .triton_masa import masa_triton, triton_supports


def triton_available(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    """Whether the fused Triton kernels can run on these inputs here."""
    return triton_runs_on(q) and triton_supports(q, k, v)


def masa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sin: torch.Tensor,
                   cos: torch.Tensor, decay: torch.Tensor, scale: float, form: str,
                   add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The reference implementation behind the common signature (see :func:`masa`)."""
    if form == "decomposed":
        out = masa_decomposed_reference(q, k, v, sin, cos, decay, scale)
    elif form == "full":
        out = masa_full_reference(q, k, v, sin, cos, decay, scale)
    else:
        raise ValueError("unknown MaSA form '" + form + "'; expected 'decomposed' or 'full'")
    return out if add is None else out + add


@torch.jit.ignore
def masa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
         decay: torch.Tensor, scale: float, form: str, impl: str = "auto",
         add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Manhattan self-attention on ``(b, h, w, n, d)`` inputs; returns ``(b, h, w, n, d)`` (+ ``add``).

    ``sin``/``cos``: rotation tables ``(h, w, d)``; ``decay``: per-head lambda ``(n,)``; ``scale``
    multiplies k before the rotation; ``form`` is ``"decomposed"`` or ``"full"``; ``add`` is an
    optional tensor of the output's shape added to the result (fused where possible).
    """
    if form not in FORMS:
        raise ValueError("unknown MaSA form '" + form + "'; expected 'decomposed' or 'full'")
    if impl in ("auto", "cpu") and is_export_tracing():
        impl = "reference"
    elif impl == "triton":
        refuse_onnx_tracing()
    if impl == "auto":
        if q.is_cuda:
            impl = "triton" if triton_available(q, k, v) else "reference"
        else:
            impl = "cpu" if q.device.type == "cpu" else "reference"
    if impl == "triton" and q.numel() == 0:
        impl = "reference"  # an empty batch: nothing to launch
    if impl == "triton":
        if not triton_available(q, k, v):
            raise RuntimeError(
                "the Triton MaSA kernels need CUDA tensors (or TRITON_INTERPRET=1), Triton installed, "
                f"an even head width up to 128 and fp32/bf16/fp16 inputs; got device "
                f"{q.device}, head width {q.shape[-1]}, dtype {q.dtype}. Use impl='reference'.")
        return masa_triton(q, k, v, sin, cos, decay, scale, form, add)
    if impl == "cpu":
        return masa_cpu(q, k, v, sin, cos, decay, scale, form, add)
    if impl == "reference":
        return masa_reference(q, k, v, sin, cos, decay, scale, form, add)
    raise ValueError(f"unknown MaSA implementation {impl!r}; expected one of {IMPLS}")


__all__ = [
    "FORMS", "IMPLS", "HAS_TRITON", "masa", "masa_reference", "masa_decomposed_reference",
    "masa_full_reference", "rotate", "rotation_angles", "rotation_tables", "head_decays",
    "default_scale", "triton_available",
]
