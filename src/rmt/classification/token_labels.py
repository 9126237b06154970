"""Training with token labels (``rmt train --token-label DIR``): dense targets and the token-label loss.

Per training image the data pipeline hands over, besides the image, its label map (the teacher's
top-k scores and classes on a coarse grid, :mod:`.label_maps`), the random-resized-crop box it drew
(top, left, height, width as fractions of the image) and whether it flipped the crop; both
pipelines do (per-image timm transforms in workers: :class:`TokenLabelDataset`; device-held
Fashion-MNIST: :class:`TokenLabelTensorBatches`). On the training device, per batch:

1. each map becomes a dense ``(classes, h, w)`` score map (the top-k scores at their classes, 0
   elsewhere, as the token labeling toolbox does);
2. RoIAlign (``torchvision.ops.roi_align``, ``aligned=True``) reads the crop box out of it at
   ``token_label_size x token_label_size`` (the dense targets) and at 1 x 1 (the crop's class
   target), then the flip is applied;
3. softmax over the classes, then label smoothing: ``(1 - s) * p + s / classes``.

The class target is the teacher's crop target (``token_label_target: teacher``, the released
recipe, which never reads the image's own label) or the image's label (``truth``), smoothed alike.
Targets go to the loss packed as one tensor ``(b, 1 + S*S, classes)`` (row 0 the class target), so
a CUDA-graph training step copies them like plain labels.

Loss (:class:`TokenLabelLoss`), with the model's train-mode output ``(logits, aux, box)``:
``lam' = 1 - (r2-r1)(c2-c1)/(h*w)``, class target ``lam' * t + (1 - lam') * t.flip(0)``,
``loss = 1.0 * CE(logits, that) + 0.5 * mean over tokens CE(aux token, its dense target)``.

Geometric RandAugment operations (rotate, shear, translate) move the image but not its map; use
``--aa none`` (or a policy without them) where that matters.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import Dataset

from . import label_maps
from .tensor_data import TensorBatches

CLS_WEIGHT = 1.0
DENSE_WEIGHT = 0.5
TARGETS = ("teacher", "truth")


class TokenTargets(NamedTuple):
    """What a token-label batch carries besides its images (collated field by field)."""
    labels: torch.Tensor   # (b,) int64
    maps: torch.Tensor     # (b, 2, k, h, w) float32: top-k scores, class indices
    boxes: torch.Tensor    # (b, 4) float32: crop top, left, height, width as fractions of the image
    flips: torch.Tensor    # (b,) bool: the crop was flipped left-right

    def to(self, device, non_blocking: bool = False) -> "TokenTargets":
        return TokenTargets(*(t.to(device, non_blocking=non_blocking) for t in self))


# ------------------------------------------------------------------------------------------------
# targets and loss
# ------------------------------------------------------------------------------------------------

def dense_score_maps(maps: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``(b, 2, k, h, w)`` top-k maps -> ``(b, classes, h, w)`` scores (0 where a class is not in the top k)."""
    scores, indices = maps[:, 0], maps[:, 1].long()
    full = scores.new_zeros(maps.shape[0], num_classes, *maps.shape[-2:])
    return full.scatter_(1, indices, scores)


def crop_targets(maps: torch.Tensor, boxes: torch.Tensor, flips: torch.Tensor, num_classes: int,
                 size: int, smoothing: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Soft targets of the crops: ``(class (b, classes), dense (b, size*size, classes))``.

    The crop box is RoI-aligned out of each dense score map (``aligned=True``: a map of ``h`` rows
    covers the image with row ``i`` centred at ``(i + 0.5) / h``), flipped where the image was,
    softmaxed over the classes and smoothed.
    """
    from torchvision.ops import roi_align
    full = dense_score_maps(maps.float(), num_classes)
    h, w = full.shape[-2:]
    top, left, height, width = boxes.float().unbind(1)
    rois = torch.stack([torch.arange(len(boxes), device=boxes.device, dtype=torch.float32),
                        left * w, top * h, (left + width) * w, (top + height) * h], dim=1)
    dense = roi_align(full, rois, (size, size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    dense = torch.where(flips.view(-1, 1, 1, 1), dense.flip(3), dense)
    crop = roi_align(full, rois, (1, 1), spatial_scale=1.0, sampling_ratio=-1, aligned=True).flatten(1)
    smooth = lambda p: p.softmax(dim=1) * (1.0 - smoothing) + smoothing / num_classes  # noqa: E731
    return smooth(crop), smooth(dense).flatten(2).transpose(1, 2)


def one_hot_targets(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    """Smoothed one-hot rows ``(b, classes)``."""
    return F.one_hot(labels, num_classes).float() * (1.0 - smoothing) + smoothing / num_classes


def soft_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-sum(target * log_softmax(logits))`` (in float32)."""
    return -(target * F.log_softmax(logits.float(), dim=-1)).sum(dim=-1).mean()


class TokenLabelLoss(nn.Module):
    """``cls_weight * CE(logits, mixed class target) + dense_weight * CE(aux tokens, dense targets)``
    (SPEC section 8) for ``outputs = (logits, aux (b, h*w, C), box)`` and packed ``targets (b, 1 + h*w, C)``."""

    def __init__(self, cls_weight: float = CLS_WEIGHT, dense_weight: float = DENSE_WEIGHT):
        super().__init__()
        self.cls_weight, self.dense_weight = cls_weight, dense_weight

    def forward(self, outputs, targets: torch.Tensor) -> torch.Tensor:
        if not isinstance(outputs, (tuple, list)) or len(outputs) != 3:
            raise ValueError("token-label training needs the model's train-mode (logits, aux, box) output: a "
                             "model with the aux head (use_aux_head=True) in train mode")
        logits, aux, box = outputs
        tokens = aux.shape[1]
        if targets.shape[1] != tokens + 1:
            raise ValueError(f"the model's aux head gives {tokens} tokens a image, the dense targets "
                             f"{targets.shape[1] - 1}: --token-label-size must be the final-stage grid side")
        r1, c1, r2, c2 = box.unbind()
        lam = 1.0 - ((r2 - r1) * (c2 - c1)).float() / tokens
        target = targets[:, 0]
        target = lam * target + (1.0 - lam) * target.flip(0)
        dense = soft_cross_entropy(aux.flatten(0, 1), targets[:, 1:].flatten(0, 1))
        return self.cls_weight * soft_cross_entropy(logits, target) + self.dense_weight * dense


class TokenLabeler:
    """Turns a batch's :class:`TokenTargets` into the packed soft targets on the training device."""

    def __init__(self, num_classes: int, size: int, smoothing: float, target: str = "teacher"):
        if target not in TARGETS:
            raise ValueError(f"token-label-target must be one of {TARGETS}, got {target!r}")
        self.num_classes, self.size, self.smoothing, self.target = num_classes, size, smoothing, target

    def __call__(self, batch: TokenTargets) -> torch.Tensor:
        crop, dense = crop_targets(batch.maps, batch.boxes, batch.flips, self.num_classes, self.size,
                                   self.smoothing)
        if self.target == "truth":
            crop = one_hot_targets(batch.labels, self.num_classes, self.smoothing)
        return torch.cat([crop.unsqueeze(1), dense], dim=1)


# ------------------------------------------------------------------------------------------------
# data: the crop box and flip of each image, with its map
# ------------------------------------------------------------------------------------------------

class _RecordedParams:
    """A transform's ``get_params`` that leaves the crop it drew, as fractions of the image, in ``box``."""

    def __init__(self, get_params):
        self.get_params, self.box = get_params, None

    def __call__(self, img, scale, ratio):
        i, j, h, w = self.get_params(img, scale, ratio)
        width, height = img.size
        self.box = (i / height, j / width, h / height, w / width)
        return i, j, h, w


class _RecordedFlip(torch.nn.Module):
    """torchvision's RandomHorizontalFlip (same random draw) that remembers whether it flipped."""

    def __init__(self, p: float):
        super().__init__()
        self.p, self.flipped = p, False

    def forward(self, img):
        from torchvision.transforms import functional as TF
        self.flipped = bool(torch.rand(1) < self.p)
        return TF.hflip(img) if self.flipped else img


class CropRecorder:
    """timm's training transform, unchanged in its numbers, that reports each call's crop box and flip.

    The random-resized crop must come before the flip (timm's order); ``last`` is
    ``(box (top, left, height, width), flipped)`` of the latest call.
    """

    def __init__(self, transform):
        from torchvision.transforms import RandomHorizontalFlip, RandomVerticalFlip
        from timm.data.transforms import RandomResizedCropAndInterpolation
        steps = list(transform.transforms)
        crops = [i for i, t in enumerate(steps) if isinstance(t, RandomResizedCropAndInterpolation)]
        if len(crops) != 1 or any(isinstance(t, RandomVerticalFlip) for t in steps):
            raise ValueError("token labels need a training transform with one random-resized crop and no "
                             "vertical flip")
        self.crop = steps[crops[0]]
        self.params = _RecordedParams(self.crop.get_params)
        self.crop.get_params = self.params
        self.flip = None
        for i, t in enumerate(steps):
            if isinstance(t, RandomHorizontalFlip):
                if i < crops[0]:
                    raise ValueError("token labels need the flip after the random-resized crop")
                self.flip = steps[i] = _RecordedFlip(t.p)
        transform.transforms = steps
        self.transform = transform

    def __call__(self, img):
        return self.transform(img)

    @property
    def last(self) -> Tuple[Tuple[float, float, float, float], bool]:
        return self.params.box, bool(self.flip is not None and self.flip.flipped)


class TokenLabelDataset(Dataset):
    """``(image, TokenTargets row)`` of a per-image data set whose training transform is timm's.

    ``maps`` reads image ``index``'s map: a callable ``index -> (2, k, h, w)`` (files read in the
    loader's worker processes, or rows of a stacked tensor). An unreadable image of a data set that
    skips them stays ``None``; a bad map always raises :class:`LabelMapError`.
    """

    def __init__(self, dataset: Dataset, maps):
        self.dataset, self.maps = dataset, maps
        self.recorder = CropRecorder(dataset.transform)
        dataset.transform = self.recorder

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = self.dataset[index]
        if item is None:
            return None
        image, label = item
        box, flipped = self.recorder.last
        return image, TokenTargets(torch.tensor(label, dtype=torch.long), self.maps(index),
                                   torch.tensor(box, dtype=torch.float32), torch.tensor(flipped))


class _FolderMaps:
    """Image ``index``'s map read from its file (picklable for worker processes)."""

    def __init__(self, pairs, num_classes: int):
        self.pairs, self.num_classes = pairs, num_classes

    def __call__(self, index: int) -> torch.Tensor:
        image, path = self.pairs[index]
        return label_maps.read_map(path, image, self.num_classes)


class _StackedMaps:
    def __init__(self, maps: torch.Tensor):
        self.maps = maps

    def __call__(self, index: int) -> torch.Tensor:
        return self.maps[index]


class TokenLabelTensorBatches(TensorBatches):
    """Device-held batches (:class:`.tensor_data.TensorBatches`) whose labels are :class:`TokenTargets`."""

    def __init__(self, *args, maps: torch.Tensor, **kwargs):
        super().__init__(*args, **kwargs)
        if len(maps) != self.num_samples:
            raise ValueError(f"{len(maps)} token-label maps for {self.num_samples} images")
        self.maps = maps.to(self.info.device)

    def _targets(self, idx: torch.Tensor, box: Optional[torch.Tensor]):
        return TokenTargets(self.labels[idx], self.maps[idx], box[:, :4], box[:, 4] < 0)


# ------------------------------------------------------------------------------------------------
# wiring into the data sets of rmt train
# ------------------------------------------------------------------------------------------------

def final_grid(input_size: int) -> int:
    """Side of the final-stage token grid of a square input (stride 32, ceil)."""
    return math.ceil(input_size / 32)


def check_options(cfg: Dict[str, Any]) -> None:
    """Raise ValueError for token-label options that cannot work (before any data is read)."""
    if cfg["dataset"] == "wds":
        raise ValueError("--token-label reads one map per image file or Fashion-MNIST index; webdataset "
                         "shards (--dataset wds) are not supported")
    if cfg["token_label_size"] < 1:
        raise ValueError("token-label-size must be at least 1")
    if cfg["token_label_target"] not in TARGETS:
        raise ValueError(f"token-label-target must be one of {TARGETS}, got {cfg['token_label_target']!r}")
    if not Path(cfg["token_label"]).is_dir():
        raise FileNotFoundError(f"token-label folder '{cfg['token_label']}' does not exist")
    grid = final_grid(cfg["input_size"])
    if cfg["token_label_size"] != grid:
        raise ValueError(f"--token-label-size {cfg['token_label_size']} must equal the model's final-stage grid, "
                         f"{grid}x{grid} at --input-size {cfg['input_size']} (stride 32): pass "
                         f"--token-label-size {grid}")


def folder_dataset(dataset, cfg: Dict[str, Any], num_classes: int, info) -> TokenLabelDataset:
    """An image folder's training set with its maps, checked before training starts: each process
    checks its share of the files (a failing process ends a torchrun job)."""
    pairs = label_maps.folder_pairs(dataset.samples, dataset.root, cfg["token_label"])
    label_maps.check_maps(pairs[info.rank::info.world_size], num_classes, read=cfg["token_label_check"],
                          workers=min(16, cfg.get("workers") or 8), progress=info.is_main)
    return TokenLabelDataset(dataset, _FolderMaps(pairs, num_classes))


def stacked_maps(cfg: Dict[str, Any], split: str, count: int, num_classes: int) -> torch.Tensor:
    """The checked maps ``(count, 2, k, h, w)`` of a split without image files (``DIR/SPLIT.pt``)."""
    return label_maps.read_packed(Path(cfg["token_label"]) / f"{split}.pt", count, num_classes)


def tensor_dataset(dataset, cfg: Dict[str, Any], split: str, num_classes: int) -> TokenLabelDataset:
    return TokenLabelDataset(dataset, _StackedMaps(stacked_maps(cfg, split, len(dataset), num_classes)))


def setup(cfg: Dict[str, Any], num_classes: int, model: nn.Module) -> Optional[TokenLabeler]:
    """The trainer's :class:`TokenLabeler` with ``--token-label``, else None; a model with the aux head
    is trained only with token labels (its train-mode output is the token-label triple)."""
    has_aux = getattr(model, "aux_head", None) is not None
    if not cfg.get("token_label"):
        if has_aux:
            raise ValueError("the model has the token-label aux head (use_aux_head): train it with --token-label "
                             "DIR (dense label maps, see `rmt token-labels make`), or without the aux head")
        return None
    check_options(cfg)
    if not has_aux:
        raise ValueError("--token-label needs a classifier with the aux head (num_classes > 0)")
    return TokenLabeler(num_classes, cfg["token_label_size"], cfg["smoothing"], cfg["token_label_target"])




def train_set(dataset, cfg: Dict[str, Any], info, split: str, num_classes: int):
    """``dataset`` (an image folder's or the idx files' per-image training set) with its token-label
    maps when ``cfg['token_label']`` is set, else unchanged."""
    if not cfg.get("token_label"):
        return dataset
    check_options(cfg)
    from .data import ImageFolderDataset
    if isinstance(dataset, ImageFolderDataset):
        return folder_dataset(dataset, cfg, num_classes, info)
    return tensor_dataset(dataset, cfg, split, num_classes)


def tensor_batches(cfg: Dict[str, Any], split: str, count: int, num_classes: int):
    """The device-held batch class for training and its extra arguments (the maps, with token labels)."""
    if not cfg.get("token_label"):
        return TensorBatches, {}
    check_options(cfg)
    return TokenLabelTensorBatches, dict(maps=stacked_maps(cfg, split, count, num_classes))
