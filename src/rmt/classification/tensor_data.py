"""Small-image data sets held on the device and augmented a whole batch at a time.

For Fashion-MNIST-sized data the per-image PIL path costs more than the model on a GPU, and
worker processes compete with the model for a small CPU. Here the uint8 images live on the
training device; each batch is gathered, random-resized-cropped and flipped in one
``grid_sample`` (an affine map per image), normalised, replicated to 3 channels and given random erasing with timm's distribution, drawn for
the whole batch at once (:func:`batch_random_erase`; timm's ``RandomErasing`` loops over the images
in Python, which on a GPU costs more than the model's step). Evaluation is a plain resize with the
same sampling.
"""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ..engine import DistInfo


ERASE_MODES = ("const", "rand", "pixel")


def batch_random_erase(x: torch.Tensor, probability: float, mode: str = "pixel",
                       min_area: float = 0.02, max_area: float = 1 / 3, min_aspect: float = 0.3,
                       attempts: int = 10) -> torch.Tensor:
    """Random erasing of ``x`` ``(B, C, H, W)`` in place, every image at once; returns ``x``.

    The distribution of timm's ``RandomErasing`` (one box per image): with ``probability`` an image
    gets a box of area ``U(min_area, max_area) * H * W`` and log aspect ratio uniform in
    ``[log(min_aspect), -log(min_aspect)]``; of up to ``attempts`` draws the first box that fits
    is used, at a uniform position. The box is filled with zeros (``const``), one normal value
    per channel (``rand``) or per pixel (``pixel``). Draws come from the device's torch RNG.
    """
    b, c, h, w = x.shape
    dev = x.device
    area = torch.empty(b, attempts, device=dev).uniform_(min_area, max_area) * (h * w)
    log_r = math.log(min_aspect)
    aspect = torch.empty(b, attempts, device=dev).uniform_(log_r, -log_r).exp()
    bh = (area * aspect).sqrt().round()
    bw = (area / aspect).sqrt().round()
    fits = (bh < h) & (bw < w)
    first = fits.int().argmax(dim=1, keepdim=True)                  # first box that fits
    bh, bw = bh.gather(1, first).squeeze(1), bw.gather(1, first).squeeze(1)
    erase = (torch.rand(b, device=dev) < probability) & fits.any(dim=1)
    top = (torch.rand(b, device=dev) * (h - bh + 1)).floor()       # uniform in [0, h - bh]
    left = (torch.rand(b, device=dev) * (w - bw + 1)).floor()
    rows = torch.arange(h, device=dev).view(1, h, 1)
    cols = torch.arange(w, device=dev).view(1, 1, w)
    inside = ((rows >= top.view(b, 1, 1)) & (rows < (top + bh).view(b, 1, 1))
              & (cols >= left.view(b, 1, 1)) & (cols < (left + bw).view(b, 1, 1))
              & erase.view(b, 1, 1)).unsqueeze(1)                   # (B, 1, H, W)
    if mode == "pixel":
        fill = torch.randn_like(x)
    elif mode == "rand":
        fill = torch.randn(b, c, 1, 1, device=dev, dtype=x.dtype)
    else:
        fill = torch.zeros((), device=dev, dtype=x.dtype)
    return x.copy_(torch.where(inside, fill, x))


class TensorBatches:
    """Batches of ``(images (B, 3, S, S) float, labels (B,))`` on ``info.device``.

    ``images`` are ``(N, H, W)`` or ``(N, C, H, W)`` uint8. Training batches come in a shuffled order
    that depends on (seed, epoch) only; each rank takes every ``world``-th sample of it, and the
    last incomplete batch is dropped. Random augmentation draws from the global torch RNG of the
    device (saved and restored with checkpoints).
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int, spec, info: DistInfo,
                 seed: int, train: bool, scale: Sequence[float] = (1.0, 1.0),
                 ratio: Sequence[float] = (1.0, 1.0), hflip: float = 0.0, reprob: float = 0.0,
                 remode: str = "pixel"):
        if images.ndim == 3:
            images = images.unsqueeze(1)
        self.images = images.to(info.device)
        self.labels = labels.to(info.device)
        self.batch_size, self.info, self.seed, self.train = batch_size, info, seed, train
        self.size = spec.input_size
        self.mode = spec.interpolation
        channels = 3
        self.mean = torch.tensor(spec.mean[:channels], device=info.device).view(1, -1, 1, 1)
        self.std = torch.tensor(spec.std[:channels], device=info.device).view(1, -1, 1, 1)
        self.scale, self.log_ratio = tuple(scale), (math.log(ratio[0]), math.log(ratio[1]))
        self.hflip = hflip
        if remode not in ERASE_MODES:
            raise ValueError(f"random erasing mode {remode!r} not understood; use one of {ERASE_MODES}")
        self.reprob = reprob if train else 0.0
        self.remode = remode
        self.epoch, self.skip, self.bad_images = 0, 0, 0
        n = len(self.labels)
        if train:
            self.per_rank = n // info.world_size
            self.batches_per_epoch = self.per_rank // batch_size
        else:
            self.per_rank = len(range(info.rank, n, info.world_size))
            self.batches_per_epoch = math.ceil(self.per_rank / batch_size)
        self.num_samples = n

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.epoch, self.skip = epoch, skip_batches

    def __len__(self) -> int:
        return self.batches_per_epoch - (self.skip if self.train else 0)

    def _order(self) -> torch.Tensor:
        n, rank, world = len(self.labels), self.info.rank, self.info.world_size
        if not self.train:
            return torch.arange(rank, n, world)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(n, generator=g)[: self.per_rank * world][rank::world]

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = self._order().to(self.info.device)
        first = self.skip if self.train else 0
        for b in range(first, self.batches_per_epoch):
            idx = order[b * self.batch_size:(b + 1) * self.batch_size]
            x = self.images[idx].float().div_(255)
            x, box = self._augment(x) if self.train else (self._resize(x), None)
            if x.shape[1] == 1:  # grayscale: normalise, then replicate to the model's 3 channels
                x = ((x - self.mean[:, :1]) / self.std[:, :1]).expand(-1, 3, -1, -1).contiguous()
            else:
                x = (x - self.mean) / self.std
            if self.reprob > 0:
                x = batch_random_erase(x, self.reprob, self.remode)
            yield x, self._targets(idx, box)

    def _targets(self, idx: torch.Tensor, box: Optional[torch.Tensor]):
        """What a batch carries besides its images: the labels (token labels add their maps and boxes)."""
        return self.labels[idx]

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] == (self.size, self.size):
            return x
        return F.interpolate(x, size=(self.size, self.size), mode=self.mode,
                             align_corners=False if self.mode != "nearest" else None)

    def _augment(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Random-resized crop (area fraction in ``scale``, aspect ratio in ``ratio``) and flip; returns the
        images and each crop as ``(b, 5)``: top, left, height, width (fractions of the image), flip (-1 or 1)."""
        b, dev = x.shape[0], x.device
        area = torch.empty(b, device=dev).uniform_(*self.scale)
        aspect = torch.empty(b, device=dev).uniform_(*self.log_ratio).exp()
        w = (area * aspect).sqrt().clamp(max=1.0)  # crop width/height as fractions of the image side
        h = (area / aspect).sqrt().clamp(max=1.0)
        cx = (torch.rand(b, device=dev) * 2 - 1) * (1 - w)  # crop centre, normalised to [-1, 1]
        cy = (torch.rand(b, device=dev) * 2 - 1) * (1 - h)
        flip = torch.where(torch.rand(b, device=dev) < self.hflip, -1.0, 1.0)
        theta = torch.zeros(b, 2, 3, device=dev)
        theta[:, 0, 0], theta[:, 0, 2] = w * flip, cx
        theta[:, 1, 1], theta[:, 1, 2] = h, cy
        grid = F.affine_grid(theta, [b, x.shape[1], self.size, self.size], align_corners=False)
        box = torch.stack([(cy - h + 1) / 2, (cx - w + 1) / 2, h, w, flip], dim=1)
        return F.grid_sample(x, grid, mode=self.mode, padding_mode="border", align_corners=False), box
