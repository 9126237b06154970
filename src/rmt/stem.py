"""RMT's convolutional layers: the stem (four 3x3 convs with BatchNorm) and the downsampling between stages.

At inference, with each BatchNorm on its running statistics, two things save passes over memory:

* the stem's first conv, its BatchNorm and GELU run as one Triton kernel on the fast path
  (:mod:`rmt.ops.stem_conv`; the model's ``masa_impl`` decides, as for the other kernels);
* every other conv's bias moves into its BatchNorm's shift (:func:`conv_norm`): ``bn(conv(x) + b)``
  is ``bn(conv(x))`` with ``b * gamma / sqrt(var + eps)`` added to ``beta``. PyTorch adds a
  conv bias to a channels-last output in a pass of its own, with a kernel that is not vectorised
  (0.69 ms of GPU time for RMT-S's six such layers at batch 256 on an H200, 2.9% of a batch).

In training (BatchNorm on batch statistics) the conv bias is left out too, since the batch mean
absorbs it: ``bn(conv(x) + b)`` equals ``bn(conv(x))``, and the gradient of ``b`` is exactly zero
(the gradients of a batch-normalised input sum to zero over each channel). The bias still takes
part, with that zero gradient (so optimizers and DDP see it as used), and the running mean gets
``momentum * b`` added, as it would have. This saves the bias pass in the forward and a reduction
over the output gradient in the backward (about 1 ms of an RMT-S step at batch 128 on an H200).
"""
import weakref
from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import fast_path
from .compat import nchw_for_conv
from .ops import stem_conv
from .ops.residual import hook_free
from .ops.triton_support import fused_allowed



def _foldable(x: torch.Tensor, conv: nn.Module, norm: nn.Module) -> bool:
    """What both folds need: eager PyTorch on CUDA (not ``torch.compile``, whose generated kernel adds
    the bias with the norm anyway, nor a tracer; on CPU oneDNN adds the bias inside the conv), both
    plain hook-free modules, a bias to fold."""
    if isinstance(x, torch.fx.Proxy) or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return (fast_path.fold_conv_bias and x.device.type in fast_path.fold_conv_bias_devices
            and type(conv) is nn.Conv2d and type(norm) is nn.BatchNorm2d and conv.bias is not None
            and conv.padding_mode == "zeros" and hook_free(conv) and hook_free(norm))


def _on_running_statistics(norm: nn.Module) -> bool:
    return not norm.training and norm.running_mean is not None and norm.running_var is not None


def _on_batch_statistics(norm: nn.Module) -> bool:
    return norm.training and norm.momentum is not None and norm.momentum < 1.0


def folds_bias(x: torch.Tensor, conv: nn.Module, norm: nn.Module) -> bool:
    """Whether :func:`conv_norm` folds the bias of ``conv`` into ``norm`` for ``x``: :func:`_foldable`
    and the norm on its running statistics."""
    return _foldable(x, conv, norm) and _on_running_statistics(norm)


def folds_bias_in_training(x: torch.Tensor, conv: nn.Module, norm: nn.Module) -> bool:
    """Whether :func:`conv_norm` leaves the bias of ``conv`` out while ``norm`` normalises with batch
    statistics: :func:`_foldable`, the norm in training mode with a fixed ``momentum`` below 1."""
    return _foldable(x, conv, norm) and _on_batch_statistics(norm)


def _conv_norm_batch_statistics(x: torch.Tensor, conv: nn.Module, norm: nn.Module) -> torch.Tensor:
    """``norm(conv(x))`` in training mode without the conv bias (see the module docstring)."""
    y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    # the bias enters with weight zero: its gradient is the exact one, zeros
    shift = conv.bias * 0.0 if norm.bias is None else torch.add(norm.bias, conv.bias, alpha=0.0)
    if norm.track_running_stats and norm.num_batches_tracked is not None:
        norm.num_batches_tracked.add_(1)
    if norm.running_mean is not None:
        # the running mean of conv(x) + b, as BatchNorm would keep it: (1 - m) * r + m * (mean + b) is
        # the update below of r + b * m / (1 - m). Through ``.data``, as the norm's own update: autograd
        # saves the running mean with each forward pass, and a version bump would fail their backward
        norm.running_mean.data.add_(conv.bias.detach().to(norm.running_mean.dtype),
                                    alpha=norm.momentum / (1.0 - norm.momentum))
    return F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, shift, True, norm.momentum, norm.eps)


# norm -> (its inputs (detached: their storage stays alive, so no new tensor takes their address),
# their versions, the shift): inference computes each shift once
_SHIFTS: "weakref.WeakKeyDictionary[nn.Module, Tuple[tuple, tuple, torch.Tensor]]" = weakref.WeakKeyDictionary()


def _shift(conv: nn.Module, norm: nn.Module) -> torch.Tensor:
    """``beta + b * gamma / sqrt(running_var + eps)``, the BatchNorm shift that absorbs the conv bias
    ``b``; cached while no gradient is recorded and none of its inputs changed (four launches saved)."""
    inputs = (conv.bias, norm.running_var, norm.weight, norm.bias)
    record = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    versions = tuple(None if t is None else (t.data_ptr(), t._version, t.dtype) for t in inputs) + (norm.eps,)
    cached = None if record else _SHIFTS.get(norm)
    if cached is not None and cached[1] == versions:
        return cached[2]
    scale = torch.rsqrt(norm.running_var + norm.eps)
    if norm.weight is not None:
        scale = scale * norm.weight
    shift = conv.bias * scale if norm.bias is None else torch.addcmul(norm.bias, conv.bias, scale)
    if not record:
        _SHIFTS[norm] = (tuple(None if t is None else t.detach() for t in inputs), versions, shift.detach())
    return shift


def conv_norm(x: torch.Tensor, conv: nn.Module, norm: nn.Module) -> torch.Tensor:
    """``norm(conv(x))``; where :func:`folds_bias`, the conv without its bias and the bias moved into
    the BatchNorm's shift (differentiable in every parameter), so no pass over the output adds it.
    ``x`` NCHW (any memory format). In training mode (batch statistics) the bias is left out where
    :func:`folds_bias_in_training`."""
    if not _foldable(x, conv, norm):
        return norm(conv(x))
    if not _on_running_statistics(norm):
        return _conv_norm_batch_statistics(x, conv, norm) if _on_batch_statistics(norm) else norm(conv(x))
    y = F.conv2d(x, conv.weight, None, conv.stride, conv.padding, conv.dilation, conv.groups)
    return F.batch_norm(y, norm.running_mean, norm.running_var, norm.weight, _shift(conv, norm),
                        False, 0.0, norm.eps)


class Stem(nn.Sequential):
    """Four 3x3 convs (strides 2, 1, 2, 1) with BatchNorm; ``(b, 3, H, W) -> (b, c, H/4, W/4)``.

    Indices match the released ``patch_embed.proj`` Sequential (0,1,3,4,6,7,9,10 hold weights).
    """

    def __init__(self, in_chans: int, out_chans: int, impl: str = "auto", device=None, dtype=None):
        dd = dict(device=device, dtype=dtype)
        mid = out_chans // 2
        super().__init__(
            nn.Conv2d(in_chans, mid, 3, 2, 1, **dd), nn.BatchNorm2d(mid, **dd), nn.GELU(),
            nn.Conv2d(mid, mid, 3, 1, 1, **dd), nn.BatchNorm2d(mid, **dd), nn.GELU(),
            nn.Conv2d(mid, out_chans, 3, 2, 1, **dd), nn.BatchNorm2d(out_chans, **dd), nn.GELU(),
            nn.Conv2d(out_chans, out_chans, 3, 1, 1, **dd), nn.BatchNorm2d(out_chans, **dd),
        )
        self.impl = impl

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            for layer in self:
                x = layer(x)
            return x
        return self._forward(x)

    @torch.jit.ignore
    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = list(self)
        i = 0
        if stem_conv.fuses(x, layers[0], layers[1], layers[2], fused_allowed(self.impl, x)):
            x = stem_conv.conv_bn_gelu(x, layers[0], layers[1], type(layers[2]) is nn.GELU)
            i = 3
        while i < len(layers):
            if i + 1 < len(layers) and isinstance(layers[i], nn.Conv2d):  # conv, BatchNorm: folded where it can
                x = conv_norm(x, layers[i], layers[i + 1])
                i += 2
            else:
                x = layers[i](x)
                i += 1
        return x


class Downsample(nn.Module):
    """Conv3x3 stride 2 + BatchNorm between stages; ``(b, h, w, c_in) -> (b, ceil(h/2), ceil(w/2), c_out)``."""

    def __init__(self, in_chs: int, out_chs: int, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.conv = nn.Conv2d(in_chs, out_chs, 3, 2, 1, **dd)
        self.norm = nn.BatchNorm2d(out_chs, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return self.norm(self.conv(x.permute(0, 3, 1, 2))).permute(0, 2, 3, 1)
        return self._conv_norm(nchw_for_conv(x)).permute(0, 2, 3, 1)

    @torch.jit.ignore
    def _conv_norm(self, x: torch.Tensor) -> torch.Tensor:
        return conv_norm(x, self.conv, self.norm)
