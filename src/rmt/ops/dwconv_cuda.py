"""The forward depthwise convolution as a CUDA kernel compiled at run time (NVRTC), beside the Triton one.

``y = [x +] dwconv(x) + b`` on channels-last tokens ``(b, h, w, c)``, the operation of
:func:`rmt.ops.dwconv._forward` without GELU. Each thread owns ``CPT`` channels of ``COLS``
consecutive token columns and walks down ``rows_per_block`` rows, ``ROWS`` at a time: it loads each
input row once for all its columns (``COLS + k - 1`` vectors, converted to float32 once) and shifts
it in registers, which takes about half the instructions of the Triton kernel (whose tiles load each
shifted row again). Compiled by ``torch.cuda._compile_kernel`` (NVRTC) once per specialisation and
device. Not wired into the model: at RMT-S's shapes on an H200 its best tiles take 7.27 ms per batch
of 256 in isolation against the Triton kernel's 8.51, but inside the model 5.29 against 5.08 ms for
the same calls (BENCHMARKS.md, run V).
"""
import functools
from typing import Optional, Tuple

import torch

from .triton_support import cdiv

# False: the Triton kernel for every forward depthwise convolution (benchmarks compare the two)
CUDA_KERNEL = True

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_INT_MAX = 2 ** 31 - 1
MAX_THREADS = 256   # threads per block (the kernel's launch bound)
ROWS = 4            # output rows per thread
CHANNELS = 2        # channels per thread in 16-bit dtypes (one 32-bit load), 1 in float32

_SOURCE = r"""
#define P (KS / 2)
#if DT == 0
#define ESIZE 4
#else
#define ESIZE 2
#endif
#define NW (CPT * ESIZE / 4)   // 32-bit words per thread's channels (1, 2 or 4)

__device__ __forceinline__ float half_to_float(unsigned short h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

// CPT channels at p (aligned to their size) as floats
__device__ __forceinline__ void load_vec(const char* p, float* out) {
    unsigned int w[NW];
#if NW == 1
    w[0] = __ldg(reinterpret_cast<const unsigned int*>(p));
#elif NW == 2
    const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
    w[0] = u.x; w[1] = u.y;
#else
    const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = u.x; w[1] = u.y; w[2] = u.z; w[3] = u.w;
#endif
#pragma unroll
    for (int k = 0; k < NW; ++k) {
#if DT == 0
        out[k] = __uint_as_float(w[k]);
#elif DT == 1
        out[2 * k] = __uint_as_float(w[k] << 16);
        out[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
#else
        out[2 * k] = half_to_float((unsigned short)(w[k] & 0xffffu));
        out[2 * k + 1] = half_to_float((unsigned short)(w[k] >> 16));
#endif
    }
}

// CPT floats rounded to the element type, stored at p (aligned to their size)
__device__ __forceinline__ void store_vec(char* p, const float* v) {
    unsigned int w[NW];
#pragma unroll
    for (int k = 0; k < NW; ++k) {
#if DT == 0
        w[k] = __float_as_uint(v[k]);
#elif DT == 1
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(w[k]) : "f"(v[2 * k + 1]), "f"(v[2 * k]));
#else
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(w[k]) : "f"(v[2 * k + 1]), "f"(v[2 * k]));
#endif
    }
#if NW == 1
    *reinterpret_cast<unsigned int*>(p) = w[0];
#elif NW == 2
    *reinterpret_cast<uint2*>(p) = make_uint2(w[0], w[1]);
#else
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
#endif
}

// one weight or bias value of element type WDT as a float
__device__ __forceinline__ float load_param(const void* base, long long i) {
#if WDT == 0
    return __ldg(reinterpret_cast<const float*>(base) + i);
#elif WDT == 1
    return __uint_as_float(((unsigned int)__ldg(reinterpret_cast<const unsigned short*>(base) + i)) << 16);
#else
    return half_to_float(__ldg(reinterpret_cast<const unsigned short*>(base) + i));
#endif
}

// grid (b * row_blocks, column tiles, channel chunks), block nvc * tw threads: thread t owns the CPT
// channels number t % nvc of its chunk at the COLS consecutive columns of group t / nvc of its tile, and
// the block's rows_per_block output rows, ROWS at a time. Each input row is loaded once for all its
// columns (COLS + KS - 1 vectors, converted to float once) and shifted in registers; the weights and
// bias live in registers
extern "C" __global__ void __launch_bounds__(MAXT) rmt_dwconv_nhwc(
        const char* __restrict__ x, const void* __restrict__ wt, const void* __restrict__ bias,
        char* __restrict__ y, int H, int W, int C, int x_sb, int x_sh, int x_sw,
        int w_sc, int w_sh, int w_sw, int row_blocks, int nvc, int tw, int rows_per_block) {
    const int v = threadIdx.x % nvc;
    const int col0 = (blockIdx.y * tw + threadIdx.x / nvc) * COLS;
    const int c0 = (blockIdx.z * nvc + v) * CPT;
    if ((int)threadIdx.x >= nvc * tw || col0 >= W || c0 >= C) return;
    const int b = blockIdx.x / row_blocks;
    const int r_begin = (blockIdx.x % row_blocks) * rows_per_block;
    const int r_end = min(H, r_begin + rows_per_block);
    float wr[KS * KS][CPT];
#pragma unroll
    for (int tap = 0; tap < KS * KS; ++tap)
#pragma unroll
        for (int k = 0; k < CPT; ++k)
            wr[tap][k] = load_param(wt, (long long)(c0 + k) * w_sc + (tap / KS) * w_sh + (tap % KS) * w_sw);
    float bk[CPT];
#pragma unroll
    for (int k = 0; k < CPT; ++k) {
#if HAS_BIAS
        bk[k] = load_param(bias, c0 + k);
#else
        bk[k] = 0.f;
#endif
    }
    // the input columns col0 - P .. col0 + COLS - 1 + P: byte offsets and whether they are inside
    bool col_in[COLS + KS - 1];
    long long col_off[COLS + KS - 1];
#pragma unroll
    for (int j = 0; j < COLS + KS - 1; ++j) {
        const int cc = col0 + j - P;
        col_in[j] = cc >= 0 && cc < W;
        col_off[j] = (long long)cc * x_sw * ESIZE;
    }
    const char* xb = x + ((long long)b * x_sb + c0) * ESIZE;
    for (int r0 = r_begin; r0 < r_end; r0 += ROWS) {
        float acc[ROWS][COLS][CPT];
#pragma unroll
        for (int o = 0; o < ROWS; ++o)
#pragma unroll
            for (int j = 0; j < COLS; ++j)
#pragma unroll
                for (int k = 0; k < CPT; ++k) acc[o][j][k] = bk[k];
#pragma unroll
        for (int i = 0; i < ROWS + KS - 1; ++i) {
            const int r = r0 + i - P;
            if (r < 0 || r >= H) continue;
            const char* xr = xb + (long long)r * x_sh * ESIZE;
            float xin[COLS + KS - 1][CPT];
#pragma unroll
            for (int j = 0; j < COLS + KS - 1; ++j) {
                if (col_in[j]) {
                    load_vec(xr + col_off[j], xin[j]);
                } else {
#pragma unroll
                    for (int k = 0; k < CPT; ++k) xin[j][k] = 0.f;
                }
            }
#pragma unroll
            for (int o = 0; o < ROWS; ++o) {
                const int dy = i - o;
                if (dy < 0 || dy >= KS) continue;
#pragma unroll
                for (int j = 0; j < COLS; ++j) {
#pragma unroll
                    for (int dx = 0; dx < KS; ++dx) {
#pragma unroll
                        for (int k = 0; k < CPT; ++k)
                            acc[o][j][k] = fmaf(xin[j + dx][k], wr[dy * KS + dx][k], acc[o][j][k]);
                    }
#if RESIDUAL
                    if (dy == P) {
#pragma unroll
                        for (int k = 0; k < CPT; ++k) acc[o][j][k] += xin[j + P][k];
                    }
#endif
                }
            }
        }
        char* yr = y + ((((long long)b * H + r0) * W + col0) * C + c0) * ESIZE;
#pragma unroll
        for (int o = 0; o < ROWS; ++o) {
            if (r0 + o < r_end) {
#pragma unroll
                for (int j = 0; j < COLS; ++j) {
                    if (col0 + j < W) store_vec(yr + ((long long)o * W + j) * C * ESIZE, acc[o][j]);
                }
            }
        }
    }
}"""


@functools.lru_cache(maxsize=None)
def _kernel(device_index: int, dtype_code: int, weight_code: int, ks: int, residual: bool, has_bias: bool,
            rows: int, max_threads: int, cpt: int, cols: int):
    """The compiled kernel for one specialisation on one device (NVRTC, cached for the process)."""
    defines = (f"#define DT {dtype_code}\n#define WDT {weight_code}\n#define KS {ks}\n"
               f"#define RESIDUAL {int(residual)}\n#define HAS_BIAS {int(has_bias)}\n"
               f"#define ROWS {rows}\n#define MAXT {max_threads}\n#define CPT {cpt}\n#define COLS {cols}\n")
    with torch.cuda.device(device_index):
        major, minor = torch.cuda.get_device_capability(device_index)
        return torch.cuda._compile_kernel(defines + _SOURCE, "rmt_dwconv_nhwc", f"{major}{minor}",
                                          nvcc_options=["--use_fast_math"])


@functools.lru_cache(maxsize=None)
def _nvrtc_available() -> bool:
    """Whether this PyTorch can compile CUDA source at run time (its NVRTC library loads)."""
    try:
        from torch.cuda._utils import _get_gpu_rtc_library
        _get_gpu_rtc_library()
        return hasattr(torch.cuda, "_compile_kernel")
    except (ImportError, OSError, RuntimeError):
        return False


def channels_per_thread(x: torch.Tensor, cpt: Optional[int] = None) -> int:
    """Channels per thread for ``x``'s dtype: ``cpt`` or :data:`CHANNELS` (16-bit) / 1 (float32)."""
    return cpt or (CHANNELS if x.element_size() == 2 else 1)


def cuda_dwconv_supported(x: torch.Tensor, weight: torch.Tensor, cpt: Optional[int] = None) -> bool:
    """Whether the CUDA kernel takes ``x`` ``(b, h, w, c)`` and ``weight`` ``(c, 1, k, k)``: a CUDA tensor
    of a supported dtype on a device of compute capability 8.0 or newer, whose channel groups of
    :func:`channels_per_thread` are aligned to their size (unit channel stride; ``c`` and the other
    strides multiples of it)."""
    if not (CUDA_KERNEL and x.is_cuda and x.dtype in _DTYPE_CODES and weight.dtype in _DTYPE_CODES
            and x.dim() == 4 and x.numel() > 0 and x.stride(-1) == 1):
        return False
    n = channels_per_thread(x, cpt)
    if (x.shape[-1] % n or any(s % n for s in x.stride()[:3]) or x.data_ptr() % (n * x.element_size())
            or max(x.stride()[:3]) > _INT_MAX or max(weight.stride()) > _INT_MAX):
        return False
    return torch.cuda.get_device_capability(x.device)[0] >= 8 and _nvrtc_available()


def launch_config(h: int, w: int, c: int, cpt: int, rows_per_block: int, max_threads: int = MAX_THREADS,
                  chunk: int = 32) -> Tuple[Tuple[int, int, int], int, int, int]:
    """``(grid without the batch factor, threads, nvc, tw)`` for ``(h, w, c)`` tokens: channel chunks of
    at most ``chunk`` threads' channels, split evenly, and token columns per block so that a block has
    at most ``max_threads`` threads, split evenly over the row's tiles."""
    nv = c // cpt
    chunks = cdiv(nv, chunk)
    nvc = cdiv(nv, chunks)
    tiles = cdiv(w * nvc, max_threads)
    tw = cdiv(w, tiles)
    while tw * nvc > max_threads:
        tiles += 1
        tw = cdiv(w, tiles)
    return (cdiv(h, rows_per_block), cdiv(w, tw), cdiv(nv, nvc)), nvc * tw, nvc, tw


def dwconv_forward_cuda(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: bool,
                        rows: int = ROWS, max_threads: int = MAX_THREADS, cpt: Optional[int] = None,
                        chunk: int = 32, rows_per_block: Optional[int] = None, cols: int = 4) -> torch.Tensor:
    """``[x +] dwconv(x) + bias``: ``x`` ``(b, h, w, c)`` (see :func:`cuda_dwconv_supported`), ``weight``
    ``(c, 1, k, k)`` with odd ``k``, ``bias`` ``(c,)`` or None; returns a contiguous ``(b, h, w, c)``
    tensor of ``x``'s dtype (accumulated in float32)."""
    b, h, w, c = x.shape
    ks = weight.shape[-1]
    cpt = channels_per_thread(x, cpt)
    rows_per_block = min(h, rows_per_block or h)
    rows_per_block = cdiv(rows_per_block, rows) * rows
    (row_blocks, col_tiles, chunks), threads, nvc, tw = launch_config(h, cdiv(w, cols), c, cpt, rows_per_block,
                                                                      max_threads, chunk)
    kernel = _kernel(x.device.index if x.device.index is not None else torch.cuda.current_device(),
                     _DTYPE_CODES[x.dtype], _DTYPE_CODES[weight.dtype], ks, residual, bias is not None,
                     rows, max_threads, cpt, cols)
    y = torch.empty((b, h, w, c), dtype=x.dtype, device=x.device)
    if bias is not None and bias.dtype != weight.dtype:
        bias = bias.to(weight.dtype)
    kernel(grid=(b * row_blocks, col_tiles, chunks), block=(threads, 1, 1),
           args=[x, weight, bias if bias is not None else weight, y, h, w, c, x.stride(0), x.stride(1),
                 x.stride(2), weight.stride(0), weight.stride(2), weight.stride(3), row_blocks, nvc, tw,
                 rows_per_block])
    return y
