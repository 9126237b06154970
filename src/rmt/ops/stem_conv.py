"""The stem's first layers, convolution -> BatchNorm (eval) -> GELU, as one Triton kernel at inference.

RMT's stem opens with a 3x3 stride-2 convolution from the 3 image channels to 32-56 channels. cuDNN
has no fast kernel for 3 input channels in channels-last layout: on an H200 it took 480 us for a batch
of 256 at 224x224 (about a tenth of the memory bandwidth), PyTorch added the conv bias in another
280 us, and BatchNorm and GELU each made one more pass over the 112x112 output. :func:`conv_bn_gelu`
computes all four in one pass: each program owns 128 output pixels (consecutive in row-major order)
and every output channel, gathers each pixel's ``c_in x 3 x 3`` patch into a row, multiplies the rows
by the weight on the tensor cores (one ``tl.dot``, in the output's half dtype under autocast as
cuDNN would, in float32 otherwise), applies the bias, the BatchNorm's running statistics and the
exact GELU, and writes the channels-last result once.

It runs where no gradient is needed and the BatchNorm uses its running statistics (``eval()``);
training and everything else take the modules (cuDNN), which are also the oracle. Under
``torch.compile`` the kernel is a ``torch.library.triton_op``, so ``fullgraph=True`` holds.
"""
from typing import Optional

import torch
import torch.nn as nn

from ..config import fast_path
from .residual import hook_free
from .triton_support import HAS_TRITON, SUPPORTED_DTYPES, cdiv, eager_launch, next_power_of_2, triton_runs_on

if HAS_TRITON:
    import triton
    import triton.language as tl
    from torch.library import triton_op, wrap_triton

MAX_PATCH = 64          # c_in * k * k (image inputs): a program holds its pixels' patches whole
MAX_OUT_CHANNELS = 128  # one program holds every output channel of its pixels
BLOCK_PIXELS = 128      # output pixels per program on a GPU
# pixels per program in Triton's CPU interpreter, whose cost is per program and op, not per element
BLOCK_PIXELS_INTERPRETED = 4096


if HAS_TRITON:
    @triton.jit
    def _conv_bn_gelu_kernel(X, WT, B, BN_W, BN_B, BN_MEAN, BN_VAR, Y, eps,
                             H, W, HO, WO, COUT, x_sb, x_sc, x_sh, x_sw, w_so, w_si, w_sh, w_sw,
                             CIN: tl.constexpr, KS: tl.constexpr, STRIDE: tl.constexpr, PAD: tl.constexpr,
                             HAS_BIAS: tl.constexpr, GELU: tl.constexpr, HALF_DOT: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_CO: tl.constexpr, BLOCK_K: tl.constexpr):
        """Grid ``(b, cdiv(HO * WO, BLOCK_P))``: ``Y[b, p, :] = gelu(bn(conv(X) + B))`` for ``BLOCK_P``
        output pixels ``p`` (row-major over ``HO x WO``); ``Y`` contiguous ``(b, HO, WO, COUT)``.

        The convolution is one ``(BLOCK_P, BLOCK_K) @ (BLOCK_K, BLOCK_CO)`` product: each pixel's
        ``c_in x KS x KS`` patch gathered into a row (zero past the image and past ``c_in * KS * KS``),
        the weight as the matching columns; in the output's half dtype where ``HALF_DOT`` (as cuDNN
        under autocast), else in full float32."""
        eps = tl.cast(eps, tl.float32)  # torch.compile passes a Python float as float64
        b = tl.program_id(0)
        p = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        oh = p // WO
        ow = p % WO
        k = tl.arange(0, BLOCK_K)  # patch index: (ci, kh, kw) row-major, as the weight's layout
        ci = k // (KS * KS)
        kh = (k // KS) % KS
        kw = k % KS
        co = tl.arange(0, BLOCK_CO)
        mask_p = p < HO * WO
        mask_k = k < CIN * KS * KS
        mask_c = co < COUT
        ih = oh[:, None] * STRIDE + kh[None, :] - PAD
        iw = ow[:, None] * STRIDE + kw[None, :] - PAD
        inside = mask_p[:, None] & mask_k[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        patch = tl.load(X + b.to(tl.int64) * x_sb + ci[None, :] * x_sc + ih * x_sh + iw * x_sw, mask=inside, other=0.0)
        wk = tl.load(WT + co[None, :] * w_so + ci[:, None] * w_si + kh[:, None] * w_sh + kw[:, None] * w_sw,
                     mask=mask_k[:, None] & mask_c[None, :], other=0.0)
        if HALF_DOT:
            acc = tl.dot(patch.to(Y.dtype.element_ty), wk.to(Y.dtype.element_ty))
        else:
            acc = tl.dot(patch.to(tl.float32), wk.to(tl.float32), input_precision="ieee")
        if HAS_BIAS:
            acc += tl.load(B + co, mask=mask_c, other=0.0).to(tl.float32)[None, :]
        mean = tl.load(BN_MEAN + co, mask=mask_c, other=0.0).to(tl.float32)
        var = tl.load(BN_VAR + co, mask=mask_c, other=1.0).to(tl.float32)
        gamma = tl.load(BN_W + co, mask=mask_c, other=1.0).to(tl.float32)
        beta = tl.load(BN_B + co, mask=mask_c, other=0.0).to(tl.float32)
        y = (acc - mean[None, :]) * (gamma / tl.sqrt(var + eps))[None, :] + beta[None, :]
        if GELU:
            y = 0.5 * y * (1.0 + tl.math.erf(y * 0.7071067811865476))
        offs = (b.to(tl.int64) * HO * WO + p)[:, None] * COUT + co[None, :]
        tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask_p[:, None] & mask_c[None, :])


def _conv_bn_gelu(launch, x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  bn_weight: torch.Tensor, bn_bias: torch.Tensor, bn_mean: torch.Tensor, bn_var: torch.Tensor,
                  eps: float, stride: int, padding: int, gelu: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """The kernel on ``x`` ``(b, c_in, H, W)`` (any strides); returns ``(b, c_out, HO, WO)`` in
    channels-last memory format."""
    b, cin, h, w = x.shape
    cout, ks = weight.shape[0], weight.shape[-1]
    ho, wo = (h + 2 * padding - ks) // stride + 1, (w + 2 * padding - ks) // stride + 1
    y = torch.empty((b, ho, wo, cout), dtype=out_dtype, device=x.device)
    interpreted = x.device.type == "cpu"
    block_p = BLOCK_PIXELS_INTERPRETED if interpreted else BLOCK_PIXELS
    launch(_conv_bn_gelu_kernel)[(b, cdiv(ho * wo, block_p))](
        x, weight, bias if bias is not None else bn_bias, bn_weight, bn_bias, bn_mean, bn_var, y, eps,
        h, w, ho, wo, cout, x.stride(0), x.stride(1), x.stride(2), x.stride(3),
        weight.stride(0), weight.stride(1), weight.stride(2), weight.stride(3),
        CIN=cin, KS=ks, STRIDE=stride, PAD=padding, HAS_BIAS=bias is not None, GELU=gelu,
        # Triton's interpreter gets half-precision dot products wrong: float32 there
        HALF_DOT=out_dtype != torch.float32 and not interpreted,
        BLOCK_P=block_p, BLOCK_CO=max(16, next_power_of_2(cout)), BLOCK_K=max(16, next_power_of_2(cin * ks * ks)),
        num_warps=4)
    return y.permute(0, 3, 1, 2)


if HAS_TRITON:
    @triton_op("rmt::stem_conv_bn_gelu", mutates_args={})
    def conv_bn_gelu_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        bn_weight: torch.Tensor, bn_bias: torch.Tensor, bn_mean: torch.Tensor,
                        bn_var: torch.Tensor, eps: float, stride: int, padding: int, gelu: bool,
                        out_dtype: torch.dtype) -> torch.Tensor:
        """Graph-capturable form of :func:`_conv_bn_gelu` (inference only: no autograd formula)."""
        return _conv_bn_gelu(wrap_triton, x, weight, bias, bn_weight, bn_bias, bn_mean, bn_var, eps,
                             stride, padding, gelu, out_dtype)


@torch.jit.ignore
def fuses(x: torch.Tensor, conv: nn.Module, norm: nn.Module, act: nn.Module, allowed: bool) -> bool:
    """Whether :func:`conv_bn_gelu` takes ``conv -> norm [-> act]`` for ``x``: the switch and the
    model's setting (``allowed``) on, a tensor the kernel runs on, no gradient to record, plain
    hook-free modules of the expected kind (a square conv of at most :data:`MAX_PATCH` taps
    (``c_in * k * k``), an affine BatchNorm on its running statistics, an exact GELU)."""
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing():  # symbolic tracing: the modules
        return False
    if (not (fast_path.stem_kernel and allowed and HAS_TRITON) or not triton_runs_on(x) or x.dim() != 4
            or x.dtype not in SUPPORTED_DTYPES):
        return False
    if not (type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and type(act) in (nn.GELU, nn.Identity)):
        return False
    if not (hook_free(conv) and hook_free(norm) and hook_free(act)):
        return False
    if (conv.groups != 1 or conv.dilation != (1, 1) or conv.padding_mode != "zeros" or isinstance(conv.padding, str)
            or conv.stride[0] != conv.stride[1] or conv.padding[0] != conv.padding[1]
            or conv.kernel_size[0] != conv.kernel_size[1] or conv.in_channels * conv.kernel_size[0] ** 2 > MAX_PATCH
            or conv.out_channels > MAX_OUT_CHANNELS or x.shape[1] != conv.in_channels):
        return False
    if norm.training or norm.running_mean is None or norm.weight is None or norm.bias is None:
        return False
    if type(act) is nn.GELU and act.approximate != "none":
        return False
    params = [x, conv.weight, norm.weight, norm.bias] + ([conv.bias] if conv.bias is not None else [])
    return not (torch.is_grad_enabled() and any(t.requires_grad for t in params))


@torch.jit.ignore
def conv_bn_gelu(x: torch.Tensor, conv: nn.Conv2d, norm: nn.BatchNorm2d, gelu: bool) -> torch.Tensor:
    """``gelu(norm(conv(x)))`` (``gelu`` optional) as one kernel where :func:`fuses` said so; ``x``
    ``(b, c_in, H, W)`` -> ``(b, c_out, HO, WO)`` channels-last, in the autocast dtype under autocast
    (else in the dtype of ``x``), as the modules would return it."""
    device = x.device.type
    out_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
    args = (x, conv.weight, conv.bias, norm.weight, norm.bias, norm.running_mean, norm.running_var,
            float(norm.eps), conv.stride[0], conv.padding[0], gelu, out_dtype)
    if torch.compiler.is_compiling():
        return conv_bn_gelu_op(*args)
    return _conv_bn_gelu(eager_launch, *args)
