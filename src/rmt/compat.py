"""Workarounds for differences between the PyTorch versions this package supports (torch >= 2.6)."""
import torch


@torch.jit.ignore
def is_exporting() -> bool:
    """Whether ``torch.export`` (or the ONNX exporter built on it) is tracing the caller, and not
    ``torch.compile``.

    Before torch 2.14, Dynamo replaced ``torch.compiler.is_exporting()`` by a constant ``True`` under
    ``torch.compile`` as well (pytorch/pytorch#176347), which would send compiled models down the
    export paths. The flag that ``torch.export`` sets while it traces is read here instead; Dynamo
    reads it as a constant of the trace (``False`` under ``torch.compile``).
    """
    return bool(getattr(torch.compiler, "_is_exporting_flag", False))


@torch.jit.ignore
def is_export_tracing() -> bool:
    """Whether an exporter is tracing the caller: ``torch.export`` (and ``torch.onnx.export(...,
    dynamo=True)`` built on it) or ``torch.jit.trace`` (which ``torch.onnx.export(..., dynamo=False)``
    uses). Exported graphs take the plain reference ops, whose sizes stay symbolic."""
    return is_exporting() or torch.jit.is_tracing()


def nchw_for_conv(x: torch.Tensor) -> torch.Tensor:
    """``(b, h, w, c)`` tokens as the NCHW input of a convolution: a permuted view, or while
    ``torch.export`` traces a contiguous copy. Choosing the memory format of a convolution on the
    channels-last view guards a symbolic batch (to 1 from a batch-1 example), which would pin an
    exported program's batch."""
    x = x.permute(0, 3, 1, 2)
    return x.contiguous() if is_exporting() else x
