"""Keep the memory of freed CPU tensors in the process for the next op (glibc's malloc).

PyTorch allocates CPU tensors with ``malloc``. glibc serves blocks above its mmap threshold (128 KiB,
raised dynamically up to 32 MiB) with fresh ``mmap`` calls and returns them to the system on ``free``,
and trims the heap's free top above 128 KiB. RMT's activations at batch 8 are 5-25 MB each, so on CPU
almost every op's output arrived as new pages, each zeroed by the kernel on its first touch. Raising both
thresholds keeps that memory in the heap, where the next op's output reuses it: RMT-S fp32 CPU inference
(2 threads, batch 8) went from a median of 13.3 to 15.8 img/s in five alternating runs of each setting
(BENCHMARKS.md, CPU section). The process keeps its peak heap size instead of returning freed memory.

The ``rmt`` commands call :func:`keep_freed_memory` when they run the model on CPU; in your own
program call it once at start-up. It is a process-wide setting of the C library, not of PyTorch.
"""
import ctypes
import sys

# mallopt parameters of glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
DEFAULT_THRESHOLD = 1 << 30


def keep_freed_memory(threshold_bytes: int = DEFAULT_THRESHOLD) -> bool:
    """Set glibc's mmap and trim thresholds to ``threshold_bytes`` (1 GiB by default): blocks below it
    come from the heap and freed memory below it stays there. Returns whether glibc accepted both
    (``False`` on other C libraries and systems, where nothing changes)."""
    if not 0 < threshold_bytes < 2 ** 31:
        raise ValueError(f"threshold_bytes must be between 1 and 2**31 - 1 (mallopt takes an int), "
                         f"got {threshold_bytes}")
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, threshold_bytes)) and bool(mallopt(_M_TRIM_THRESHOLD, threshold_bytes))
