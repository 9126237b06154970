"""What the fused kernels of :mod:`rmt.ops` share: whether Triton is installed, where its kernels can
run, and which model setting allows them."""
import functools
import inspect
import os
from typing import Optional

import torch

from ..compat import is_export_tracing
from ..config import fast_path

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it
    import triton
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
    always with ``"triton"`` (which also covers Triton's CPU interpreter); never with ``"auto"`` while
    an exporter traces the model (exported graphs take the plain ops)."""
    if impl == "triton":
        refuse_onnx_tracing()
        return True
    return impl == "auto" and not is_export_tracing() and x.is_cuda   # x last: a torch.fx Proxy stays one


@torch.jit.ignore
def refuse_onnx_tracing() -> None:
    """Raise while ``torch.onnx.export`` or ``torch.jit.trace`` traces a module set to ``"triton"``:
    the kernels have no ONNX form and a trace would not record them."""
    if torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
        raise RuntimeError(
            "masa_impl='triton' does not export to ONNX or trace with torch.jit.trace: the Triton kernels "
            "have no ONNX form. Use model.set_masa_impl('auto') (exports then take the reference ops) or "
            "rmt.export.export_onnx(model, path).")


def cpu_path_allowed(impl: str, x: torch.Tensor) -> bool:
    """Whether a module set to ``impl`` may take the CPU fast path for ``x`` (``"auto"`` or ``"cpu"``
    on a CPU tensor, except while an exporter traces the model; ``"reference"`` keeps the plain ops)."""
    return (impl == "auto" or impl == "cpu") and not is_export_tracing() and x.device.type == "cpu"


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for launch grids (``triton.cdiv`` goes through Triton's constexpr-function
    wrapper: about 2 us a call, a few calls per op)."""
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two ``>= n`` (1 for ``n <= 1``), as ``triton.next_power_of_2``."""
    return 1 if n <= 1 else 1 << (n - 1).bit_length()




class _NotKeyed(Exception):
    """An argument type the direct launcher does not key on: that launch goes through Triton."""


def _specialisation(a) -> tuple:
    """What Triton specialises a kernel argument on, or more (equal keys imply equal compiled
    kernels): a tensor's dtype and 16-byte alignment; an integer's being 1, its divisibility by 16
    and its integer width."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() & 15 == 0
    t = type(a)
    if t is int:
        return a == 1, a & 15 == 0, -2 ** 31 <= a < 2 ** 31, a >= 2 ** 63
    if t is float or t is bool or a is None:
        return t, a if t is bool else None
    raise _NotKeyed(t.__name__)


class DirectLauncher:
    """``launcher[grid](*args, **meta)`` for one ``@triton.jit`` kernel, as ``kernel[grid]`` would.

    ``kernel[grid](...)`` binds and specialises every argument, builds a cache key and looks the
    compiled kernel up on each call, then calls the compiled kernel with launch hooks. The first
    launch of each specialisation here goes through it (compiling if needed); later ones call the
    compiled kernel directly. ``args`` are the kernel's leading parameters, ``meta`` the remaining
    ones by name plus launch options (``num_warps``...); both key the cache, so meta values must be
    hashable. Launch hooks (Triton's profiler) and unkeyed argument types fall back to Triton.
    """

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.names = tuple(kernel.arg_names)
        self.defaults = {p.name: p.default for p in kernel.params
                         if p.default is not inspect.Parameter.empty}
        # constexpr parameters passed by position are keyed by value (the call sites pass them by
        # name, so the hot path checks only whether any position reaches the first of them)
        self.constexpr_positions = tuple(i for i, p in enumerate(kernel.params) if p.is_constexpr)
        self.first_constexpr = self.constexpr_positions[0] if self.constexpr_positions else len(self.names)
        self.compiled: dict = {}

    def __getitem__(self, grid):
        return functools.partial(self.launch, grid)

    def launch(self, grid, *args, **meta):
        if not fast_path.direct_launch or type(grid) is not tuple:  # a grid function: Triton evaluates it
            return self.kernel[grid](*args, **meta)
        try:
            constexprs = (tuple(args[i] for i in self.constexpr_positions if i < len(args))
                          if len(args) > self.first_constexpr else ())
            key = (torch.cuda.current_device(), tuple(meta.items()), constexprs, *map(_specialisation, args))
            entry = self.compiled.get(key)
        except (_NotKeyed, TypeError):  # TypeError: an unhashable meta value
            return self.kernel[grid](*args, **meta)
        if entry is None or _launch_hooks():
            compiled = self.kernel[grid](*args, **meta)
            if entry is None:
                self._remember(key, compiled, len(args), meta)
            return compiled
        compiled, tail = entry
        g0, g1, g2 = (*grid, 1, 1)[:3]
        compiled.run(g0, g1, g2, _raw_stream(key[0]), compiled.function, compiled.packed_metadata, None, None,
                     None, *args, *tail)
        return compiled

    def _remember(self, key: tuple, compiled, num_args: int, meta: dict) -> None:
        """Cache ``compiled`` for ``key`` when its remaining parameters are all fixed by ``meta`` (or
        defaults) and none of them is a tensor (whose address the key does not hold)."""
        tail = self.names[num_args:]
        if (compiled is None or hasattr(compiled, "result")  # asynchronous compilation: not cached
                or not all(n in meta or n in self.defaults for n in tail)
                or any(isinstance(v, torch.Tensor) for v in meta.values())):
            return
        compiled._init_handles()  # loads the module, so that ``function`` is set from here on
        self.compiled[key] = (compiled, tuple(meta[n] if n in meta else self.defaults[n] for n in tail))


def _launch_hooks() -> bool:
    """Whether Triton has launch hooks installed (its profiler); those launches go through Triton."""
    runtime = triton.knobs.runtime
    return bool(getattr(runtime.launch_enter_hook, "calls", runtime.launch_enter_hook)
                or getattr(runtime.launch_exit_hook, "calls", runtime.launch_exit_hook))


def _raw_stream(device: int) -> int:
    return torch._C._cuda_getCurrentRawStream(device)


_LAUNCHERS: dict = {}
# the Triton releases whose launch interface DirectLauncher follows (3.6 and 3.8 read and tested, 3.7
# between them); others launch through Triton's dispatch
_DIRECT_VERSIONS = ("3.6", "3.7", "3.8")
_DIRECT_USABLE = HAS_TRITON and not INTERPRET and triton.__version__.startswith(_DIRECT_VERSIONS)


def eager_launch(kernel):
    """The launcher of ``kernel`` in eager mode: a :class:`DirectLauncher` (one per kernel) on CUDA
    with a Triton release it was checked against, else the ``@triton.jit`` function itself; both are
    launched as ``launcher[grid](...)`` (under ``torch.compile`` the ops pass ``wrap_triton``)."""
    if not _DIRECT_USABLE:
        return kernel
    launcher = _LAUNCHERS.get(kernel)
    if launcher is None:
        launcher = _LAUNCHERS[kernel] = DirectLauncher(kernel)
    return launcher


def as_dtype(t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``t.to(dtype)``, without the call when ``t`` already has that dtype (or is ``None``): a training
    step passes hundreds of gradients through such casts, most of them no-ops that still cost a call."""
    return t.to(dtype) if t is not None and t.dtype != dtype else t


def unit_channel_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dimension has unit stride (what the kernels assume of their inputs),
    else a contiguous copy: the opaque ops make what they need instead of reading out of bounds."""
    return t if t.stride(-1) == 1 else t.contiguous()
