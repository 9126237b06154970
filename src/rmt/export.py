"""Export to ONNX and to AOTInductor packages with dynamic batch and image size, and check the result.

Both exports go through ``torch.export`` with symbolic batch, height and width. The RMT model
computes its rotation tables and decays from the run-time grid size, which traces fine. While an
exporter traces (``torch.export``, ``torch.onnx.export`` with ``dynamo`` on or off, ``torch.jit.trace``)
the model takes the reference ops by itself (the Triton kernels and the CPU path's complex-number
rotation have no ONNX form; the reference gives the same numbers), whose full form runs in one block
so that no size is pinned to the example: users' own ``torch.onnx.export(model, x, f,
dynamic_axes=...)`` calls work from a batch-1 example too. :func:`exportable` also covers a model
set to ``masa_impl="triton"`` (an eval-mode copy on the reference ops).

Every export is checked against the original eager model: :func:`check_onnx` runs the file with
onnxruntime on CPU, :func:`check_pt2` loads the package, each at several batch/image sizes, and
reports ``max |exported - eager| / max |eager|`` per size.
"""
from __future__ import annotations

import copy
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Sequence, Tuple

import torch
import torch.nn as nn


__all__ = ["exportable", "export_program", "export_onnx", "export_pt2",
           "check_onnx", "check_pt2", "check_program", "CheckResult", "max_relative_error"]

MIN_EXPORT_SIDE = 33   # at 32 pixels the last RMT grid is 1x1, which torch.export treats as a constant
MAX_EXPORT_SIDE = 8192
MAX_EXPORT_BATCH = 4096
Size = Tuple[int, int, int]  # (batch, height, width)


def exportable(model: nn.Module) -> nn.Module:
    """An eval-mode copy of ``model`` on the reference (plain PyTorch) MaSA ops."""
    model = copy.deepcopy(model).eval()
    if hasattr(model, "set_masa_impl"):
        model.set_masa_impl("reference")
    return model


def _size_multiple(model: nn.Module) -> Tuple[int, int]:
    """Image sides must be multiples of the patch size for patch-embedding models without padding."""
    embed = getattr(model, "patch_embed", None)
    patch = getattr(embed, "patch_size", None)
    if patch is None or getattr(embed, "dynamic_img_pad", False):
        return 1, 1
    return tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)


def _dynamic_shapes(model: nn.Module) -> tuple:
    """Symbolic batch, height and width (as multiples of the patch size where the model needs it)."""
    dim = torch.export.Dim
    shapes = {0: dim("batch", min=1, max=MAX_EXPORT_BATCH)}
    for axis, name, multiple in ((2, "height", _size_multiple(model)[0]), (3, "width", _size_multiple(model)[1])):
        if multiple == 1:
            shapes[axis] = dim(name, min=MIN_EXPORT_SIDE, max=MAX_EXPORT_SIDE)
        else:
            units = dim(f"{name}_patches", min=-(-MIN_EXPORT_SIDE // multiple), max=MAX_EXPORT_SIDE // multiple)
            shapes[axis] = multiple * units
    return (shapes,)


def _example(model: nn.Module, size: Tuple[int, int]) -> torch.Tensor:
    in_chans = getattr(model, "in_chans", 3)
    return torch.randn(2, in_chans, *size)


def export_program(model: nn.Module, size: Tuple[int, int] = (224, 224)) -> torch.export.ExportedProgram:
    """``torch.export`` of ``exportable(model)`` with dynamic batch, height and width (example ``size``)."""
    with torch.no_grad():
        return torch.export.export(exportable(model), (_example(model, size),),
                                   dynamic_shapes=_dynamic_shapes(model))


def _write_atomically(path: Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_file)`` in a temporary folder beside ``path``, then move its files into place.

    An interrupted export leaves no half-written file under the final name. Files written next to
    the temporary file (ONNX external data) move along, keeping their names.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmpdir = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        write(tmpdir / path.name)
        for f in tmpdir.iterdir():
            os.replace(f, path.parent / f.name)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def export_onnx(model: nn.Module, path: str | Path, size: Tuple[int, int] = (224, 224),
                opset: int | None = None) -> Path:
    """Write ``model`` as ONNX with inputs ``image (batch, C, height, width)`` and output ``output``.

    Batch, height and width are dynamic (height and width >= 33). Uses the ``torch.export``-based
    exporter (``dynamo=True``) and its graph optimisation.
    """
    ep = export_program(model, size)
    program = torch.onnx.export(ep, dynamo=True, input_names=["image"], output_names=["output"],
                                opset_version=opset, verbose=False)
    return _write_atomically(Path(path), lambda tmp: program.save(str(tmp)))


def export_pt2(model: nn.Module, path: str | Path, size: Tuple[int, int] = (224, 224)) -> Path:
    """Compile ``model`` ahead of time with AOTInductor into a ``.pt2`` package for this machine's CPU.

    Load it with ``torch._inductor.aoti_load_package(path)``; it takes ``(batch, C, height, width)``
    images with height and width >= 33. Compiling needs a C++ compiler and takes minutes.
    """
    ep = export_program(model, size)
    return _write_atomically(Path(path), lambda tmp: torch._inductor.aoti_compile_and_package(
        ep, package_path=str(tmp)))


# ------------------------------------------------------------------------------------------------
# checks
# ------------------------------------------------------------------------------------------------

@dataclass
class CheckResult:
    """One comparison of an exported model with the eager model."""
    batch: int
    height: int
    width: int
    output_shape: Tuple[int, ...]
    max_rel_error: float
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.tolerance

    def line(self) -> str:
        verdict = "ok" if self.ok else f"FAILED (tolerance {self.tolerance:g})"
        return (f"  batch {self.batch}, {self.height}x{self.width}: output {tuple(self.output_shape)}, "
                f"max relative error {self.max_rel_error:.2e}  {verdict}")


def max_relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |out - ref| / max |ref|`` in float64 (the error relative to the output's scale)."""
    out, ref = out.double(), ref.double()
    return ((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def _compare(model: nn.Module, run: Callable[[torch.Tensor], torch.Tensor], sizes: Sequence[Size],
             tolerance: float, seed: int) -> List[CheckResult]:
    gen = torch.Generator().manual_seed(seed)
    in_chans = getattr(model, "in_chans", 3)
    results = []
    for b, h, w in sizes:
        x = torch.randn(b, in_chans, h, w, generator=gen)
        with torch.no_grad():
            ref = model.eval()(x)
            out = run(x)
        if tuple(out.shape) != tuple(ref.shape):
            raise RuntimeError(f"exported model gives shape {tuple(out.shape)} at batch {b}, {h}x{w}, "
                               f"eager model {tuple(ref.shape)}")
        results.append(CheckResult(b, h, w, tuple(ref.shape), max_relative_error(out, ref), tolerance))
    return results


def check_onnx(model: nn.Module, path: str | Path, sizes: Sequence[Size],
               tolerance: float = 1e-4, seed: int = 0) -> List[CheckResult]:
    """Run the ONNX file with onnxruntime (CPU) and ``model`` on the same random images of each size."""
    import onnxruntime as ort
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {name: x.numpy()})[0])

    return _compare(model, run, sizes, tolerance, seed)


def check_pt2(model: nn.Module, path: str | Path, sizes: Sequence[Size],
              tolerance: float = 1e-4, seed: int = 0) -> List[CheckResult]:
    """Load the AOTInductor package and compare it with ``model`` at each size."""
    compiled = torch._inductor.aoti_load_package(str(path))
    return _compare(model, compiled, sizes, tolerance, seed)


def check_program(model: nn.Module, program: torch.export.ExportedProgram, sizes: Sequence[Size],
                  tolerance: float = 1e-4, seed: int = 0) -> List[CheckResult]:
    """Compare an exported program (run by PyTorch) with ``model`` at each size."""
    return _compare(model, program.module(), sizes, tolerance, seed)
