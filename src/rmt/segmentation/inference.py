"""Test-time inference: keep-ratio test scale, whole-image or sliding-window, multi-scale + flip.

Everything maps one normalised image batch ``(b, 3, H, W)`` to class probabilities
``(b, classes, H, W)`` at the input's own size, as mmsegmentation evaluates: for every (scale,
flip) pair the image is resized, segmented, the logits resized back and soft-maxed, and the
probabilities averaged.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Sequence, Tuple

import torch
import torch.nn.functional as F

from .data import rescale_size

MODES = ("auto", "whole", "slide")
MS_RATIOS = (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)

Model = Callable[[torch.Tensor], torch.Tensor]


def window_starts(size: int, crop: int, stride: int) -> list:
    """Start offsets of the windows along one axis; the last window ends at the border."""
    n = max(size - crop + stride - 1, 0) // stride + 1
    return sorted({max(min(i * stride, size - crop), 0) for i in range(n)})


def slide_logits(model: Model, image: torch.Tensor, num_classes: int, crop: Tuple[int, int] = (512, 512),
                 stride: Tuple[int, int] = (341, 341), window_batch: int = 4) -> torch.Tensor:
    """Logits ``(b, classes, H, W)`` from overlapping ``crop`` windows ``stride`` apart.

    Overlaps are averaged; a side shorter than the crop is taken whole. Windows of one image run
    ``window_batch`` at a time.
    """
    b, _, h, w = image.shape
    ch, cw = min(crop[0], h), min(crop[1], w)
    boxes = [(y, x) for y in window_starts(h, ch, stride[0]) for x in window_starts(w, cw, stride[1])]
    out = image.new_zeros((b, num_classes, h, w), dtype=torch.float32)
    count = image.new_zeros((1, 1, h, w), dtype=torch.float32)
    for i in range(0, len(boxes), window_batch):
        group = boxes[i:i + window_batch]
        crops = torch.cat([image[..., y:y + ch, x:x + cw] for y, x in group])
        logits = model(crops).float().split(b)
        for (y, x), part in zip(group, logits):
            out[..., y:y + ch, x:x + cw] += part
            count[..., y:y + ch, x:x + cw] += 1
    return out / count


def choose_mode(mode: str, size: Tuple[int, int], crop: Tuple[int, int]) -> str:
    """``auto``: sliding window when the (resized) image has over four crops' worth of pixels."""
    if mode not in MODES:
        raise ValueError(f"unknown inference mode {mode!r}; choose from {', '.join(MODES)}")
    if mode != "auto":
        return mode
    return "slide" if size[0] * size[1] > 4 * crop[0] * crop[1] else "whole"


def predict_probs(model: Model, image: torch.Tensor, num_classes: int, *,
                  scale: Tuple[int, int] | None = (2048, 512), ratios: Sequence[float] = (1.0,),
                  flip: bool = False, mode: str = "auto", crop: Tuple[int, int] = (512, 512),
                  stride: Tuple[int, int] = (341, 341), amp: bool = False) -> torch.Tensor:
    """Class probabilities ``(b, classes, H, W)`` for normalised images ``(b, 3, H, W)``.

    Args:
        scale: test scale ``(long, short)`` the image is resized to, keeping its aspect ratio
            (ADE20K: 2048x512); ``None`` keeps the image's size.
        ratios: multiples of the test scale (``MS_RATIOS`` for the usual multi-scale test).
        flip: also run on horizontally flipped images.
        mode: ``whole``, ``slide`` or ``auto`` (see :func:`choose_mode`).
        amp: bfloat16 autocast.
    """
    h, w = image.shape[-2:]
    probs = None
    autocast = (torch.autocast(image.device.type, dtype=torch.bfloat16) if amp
                else contextlib.nullcontext())
    for ratio in ratios:
        size = rescale_size(h, w, (scale[0] * ratio, scale[1] * ratio)) if scale else \
            (max(int(h * ratio + 0.5), 1), max(int(w * ratio + 0.5), 1))
        resized = image if size == (h, w) else F.interpolate(image, size=size, mode="bilinear",
                                                             align_corners=False)
        run_mode = choose_mode(mode, size, crop)
        for flipped in ((False, True) if flip else (False,)):
            x = resized.flip(-1) if flipped else resized
            with autocast:
                logits = (slide_logits(model, x, num_classes, crop, stride) if run_mode == "slide"
                          else model(x)).float()
            if flipped:
                logits = logits.flip(-1)
            if logits.shape[-2:] != (h, w):
                logits = F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False)
            p = logits.softmax(1)
            probs = p if probs is None else probs + p
    return probs / (len(ratios) * (2 if flip else 1))
