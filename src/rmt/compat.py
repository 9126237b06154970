"""Workarounds for differences between the PyTorch versions this package supports (torch >= 2.6)."""
import torch


def is_exporting() -> bool:
    """Whether ``torch.export`` (or the ONNX exporter built on it) is tracing the caller, and not
    ``torch.compile``.

    Before torch 2.14, Dynamo replaced ``torch.compiler.is_exporting()`` by a constant ``True`` under
    ``torch.compile`` as well (pytorch/pytorch#176347), which would send compiled models down the
    export paths. The flag that ``torch.export`` sets while it traces is read here instead; Dynamo
    reads it as a constant of the trace (``False`` under ``torch.compile``).
    """
    return bool(getattr(torch.compiler, "_is_exporting_flag", False))
