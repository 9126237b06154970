"""What the fused kernels of :mod:`rmt.ops` share: whether Triton is installed, where its kernels can
run, and which model setting allows them."""
import os

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


# --- eager launches ------------------------------------------------------------------------------
# Launching through ``kernel[grid](...)`` binds and specialises every argument, builds a cache key
# and looks the compiled kernel up on each call: tens of microseconds of Python per launch, which
# an eager training step (about 800 Triton launches for RMT-S) pays on the CPU while the GPU waits.
# ``eager_launch(kernel)[grid](...)`` does the same launch, but remembers the compiled kernel per
# specialisation and calls it directly the next time. False: every launch goes through Triton's
# dispatch (``benchmarks/training_step.py`` switch ``jitlaunch``).
FAST_LAUNCH = True


class _Unsupported(Exception):
    pass


def _arg_key(a):
    """What Triton specialises a kernel argument on (a superset: equal keys, equal specialisations)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(a, bool):
        return "b", a
    if isinstance(a, int):
        return "i", a == 1, a % 16 == 0, -2 ** 31 <= a < 2 ** 31, a >= 2 ** 63
    if isinstance(a, float):
        return "f"
    if a is None:
        return None
    raise _Unsupported(type(a).__name__)


class _CachedLauncher:
    """``launcher[grid](*args, **meta)`` for one ``@triton.jit`` kernel: the first launch of each
    specialisation goes through Triton (compiling if needed), later ones straight to the compiled
    kernel, with the arguments and hooks Triton itself would pass. ``args`` are the kernel's leading
    parameters, ``meta`` its remaining (constexpr) parameters by name plus launch options."""

    def __init__(self, kernel) -> None:
        self.kernel = kernel
        self.names = tuple(kernel.arg_names)
        self.compiled: dict = {}
        self.usable = hasattr(triton, "knobs")  # the launch hooks live there since Triton 3.4

    def __getitem__(self, grid):
        return lambda *args, **meta: self.launch(grid, args, meta)

    def launch(self, grid, args, meta) -> None:
        if not (FAST_LAUNCH and self.usable) or INTERPRET:
            self.kernel[grid](*args, **meta)
            return
        try:
            key = (torch.cuda.current_device(), tuple(map(_arg_key, args)), tuple(meta.items()))
        except _Unsupported:
            self.kernel[grid](*args, **meta)
            return
        entry = self.compiled.get(key)
        if entry is None:
            compiled = self.kernel[grid](*args, **meta)
            tail = self.names[len(args):]
            if compiled is not None and all(n in meta for n in tail):
                if hasattr(compiled, "_init_handles"):
                    compiled._init_handles()  # loads the module: ``function`` is set from here on
                self.compiled[key] = (compiled, tail)
            return
        compiled, tail = entry
        values = args + tuple(meta[n] for n in tail)
        g0, g1, g2 = (tuple(grid) + (1, 1))[:3]
        stream = torch.cuda.current_stream().cuda_stream
        runtime = triton.knobs.runtime
        compiled.run(g0, g1, g2, stream, compiled.function, compiled.packed_metadata,
                     compiled.launch_metadata(grid, stream, *values),
                     runtime.launch_enter_hook, runtime.launch_exit_hook, *values)


_LAUNCHERS: dict = {}


def eager_launch(kernel) -> _CachedLauncher:
    """The launcher of ``kernel`` for eager mode (see :data:`FAST_LAUNCH`); one per kernel."""
    launcher = _LAUNCHERS.get(kernel)
    if launcher is None:
        launcher = _LAUNCHERS[kernel] = _CachedLauncher(kernel)
    return launcher
