"""What the fused kernels of :mod:`rmt.ops` share: whether Triton is installed, where its kernels can
run, and which model setting allows them."""
import os
from typing import Optional

import torch

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it
    import triton  # noqa: F401
    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    HAS_TRITON = False

# Triton's interpreter runs the kernels on CPU tensors (slowly): how they are tested without a GPU
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def triton_runs_on(x: torch.Tensor) -> bool:
    """Whether a Triton kernel can take ``x`` here: a non-empty CUDA tensor, or a CPU one under
    ``TRITON_INTERPRET=1`` (an empty input would mean an empty launch grid: the reference handles it)."""
    return HAS_TRITON and (x.is_cuda or (INTERPRET and x.device.type == "cpu")) and x.numel() > 0


def fused_allowed(impl: str, x: torch.Tensor) -> bool:
    """Whether a module set to ``impl`` may use fused kernels for ``x``: with ``"auto"`` on CUDA,
    always with ``"triton"`` (which also covers Triton's CPU interpreter)."""
    return impl == "triton" or (impl == "auto" and x.is_cuda)


def cpu_path_allowed(impl: str, x: torch.Tensor) -> bool:
    """Whether a module set to ``impl`` may take the CPU fast path for ``x`` (``"auto"`` or ``"cpu"``
    on a CPU tensor; ``"reference"`` keeps the plain ops)."""
    return (impl == "auto" or impl == "cpu") and x.device.type == "cpu"


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids (``triton.cdiv`` goes through Triton's constexpr-function
    wrapper: about 2 us a call, a few calls per op)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``), as ``triton.next_power_of_2``."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def eager_launch(kernel):
    """The launcher of ``kernel`` in eager mode: the ``@triton.jit`` function itself, launched as
    ``kernel[grid](...)`` (under ``torch.compile`` the ops pass ``wrap_triton`` instead).

    Caching the compiled kernel per specialisation and calling it directly measured slower than
    Triton's own dispatch (Triton 3.6, ``benchmarks/launch_overhead.py``), so there is no cache here.
    """
    return kernel


def as_dtype(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t.to(dtype)``, without the call when ``t`` already has that dtype (or is ``None``): a training
    step passes hundreds of gradients through such casts, most of them no-ops that still cost a call."""
    return t.to(dtype) if t is not None and t.dtype != dtype else t
