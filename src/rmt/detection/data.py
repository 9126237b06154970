"""COCO-format instance datasets for torchvision detectors, and the samplers that feed them.

A dataset is a folder of images and an ``instances`` JSON (COCO format). Images come out as
``uint8 (3, H, W)`` tensors (converted to float on the device) and targets as torchvision expects:
``boxes (n, 4)`` float XYXY in pixels, ``labels (n,)`` int64 in ``1..K`` (categories sorted by id),
``masks (n, H, W)`` uint8 when asked for, and ``image_id``.

Training drops crowd regions and boxes under one pixel, and images left without objects, as the
mmdetection recipes do. The horizontal flip, and the random crop of the 3x recipes (``crop``: with
probability 1/2, resize to a shorter side of 400/500/600, cut a random crop of 384-600 pixels a
side, keep the boxes left with an area; the detector then resizes to its multi-scale sizes), are
functions of ``(seed, epoch, index)``, so a resumed run sees exactly the data the uninterrupted
one would have.
"""
from __future__ import annotations

import contextlib
import io
import math
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from pycocotools import mask as mask_utils
from torch.utils.data import Dataset, Sampler
from torchvision import tv_tensors
from torchvision.datasets import CocoDetection
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ..bad_images import SkippedImage, drop_skipped, load_sample, read_error
from .numerics import released_size

Target = Dict[str, torch.Tensor]


def find_split(root: str | Path, split: str) -> Tuple[Path, Path]:
    """Image folder and annotation file of ``split`` under a COCO-style ``root``.

    Looks for ``annotations/instances_{split}.json`` (or ``..._{split}2017.json``) and images in
    ``{split}/``, ``{split}2017/`` or ``images/{split}/``.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder '{root}' does not exist")
    anns = [root / "annotations" / f"instances_{s}.json" for s in (split, f"{split}2017")]
    ann = next((a for a in anns if a.is_file()), None)
    imgs = [root / split, root / f"{split}2017", root / "images" / split]
    img_dir = next((d for d in imgs if d.is_dir()), None)
    if ann is None or img_dir is None:
        raise FileNotFoundError(
            f"no COCO '{split}' split under '{root}': expected {anns[0].relative_to(root)} and an image "
            f"folder {split}/ (or the *2017 names of COCO); pass --{split}-ann and --{split}-images "
            "to name them explicitly")
    return img_dir, ann


class CocoInstances(Dataset):
    """Images and instance targets of a COCO-format dataset.

    Args:
        image_dir: folder the ``file_name`` entries are relative to.
        ann_file: instances JSON.
        train: drop crowd/degenerate objects and empty images, and flip half of the images.
        with_masks: decode segmentations into ``masks`` (Mask R-CNN).
        hflip_prob: probability of a horizontal flip in training.
        seed: seed of the flips and crops.
        crop: ``(shorter sides, (min crop side, max crop side))`` of the 3x recipes' crop policy,
            e.g. ``((400, 500, 600), (384, 600))``, applied to half of the training images; None: off.
        crop_max_size: longer-side limit of the resize before the crop.
        skip_bad: return a :class:`~rmt.bad_images.SkippedImage` for an image that cannot be read
            or prepared (:func:`collate_train` drops it); otherwise raise a BadImageError naming it.
    """

    def __init__(self, image_dir: str | Path, ann_file: str | Path, train: bool = False,
                 with_masks: bool = True, hflip_prob: float = 0.5, seed: int = 0,
                 crop: Optional[Tuple[Sequence[int], Tuple[int, int]]] = None, crop_max_size: int = 1333,
                 skip_bad: bool = False):
        ann_file = Path(ann_file)
        if not ann_file.is_file():
            raise FileNotFoundError(f"annotation file '{ann_file}' does not exist")
        if not Path(image_dir).is_dir():
            raise FileNotFoundError(f"image folder '{image_dir}' does not exist")
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
            try:
                self.base = CocoDetection(str(image_dir), str(ann_file))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"'{ann_file}' is not a COCO instances file ({type(e).__name__}: {e})") from e
        self.coco = self.base.coco
        self.cat_ids: List[int] = sorted(self.coco.getCatIds())
        if not self.cat_ids:
            raise ValueError(f"'{ann_file}' defines no categories")
        self.label_of_cat = {c: i + 1 for i, c in enumerate(self.cat_ids)}
        self.class_names = [self.coco.cats[c]["name"] for c in self.cat_ids]
        self.train = train
        self.with_masks = with_masks
        self.hflip_prob = hflip_prob if train else 0.0
        self.seed = seed
        self.skip_bad = skip_bad
        self.crop = crop if train else None
        self.crop_max_size = crop_max_size
        self.epoch = 0
        self.ids: List[int] = list(self.base.ids)
        self._base_index = {image_id: i for i, image_id in enumerate(self.ids)}
        if train:
            self.ids = [i for i in self.ids if self._annotations(i)]
            if not self.ids:
                raise ValueError(f"'{ann_file}' has no image with a usable (non-crowd) object to train on")

    def __len__(self) -> int:
        return len(self.ids)

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose flips ``__getitem__`` applies (call before building the loader iterator)."""
        self.epoch = epoch

    def _annotations(self, image_id: int) -> List[Dict[str, Any]]:
        anns = self.coco.imgToAnns.get(image_id, [])
        if self.train:
            anns = [a for a in anns if not a.get("iscrowd", 0) and a["bbox"][2] >= 1 and a["bbox"][3] >= 1]
        return anns

    def _generator(self, index: int, stream: int) -> torch.Generator:
        """Random numbers of one image in one epoch (stream 0: flip, 1: crop)."""
        return torch.Generator().manual_seed(((self.seed * 1_000_003 + self.epoch) * 10_000_019 + index) * 2 + stream)

    def _flip(self, index: int) -> bool:
        if self.hflip_prob <= 0:
            return False
        return bool(torch.rand((), generator=self._generator(index, 0)) < self.hflip_prob)

    def _random_crop(self, index: int, image: torch.Tensor, boxes: torch.Tensor, labels: torch.Tensor,
                     masks: Optional[torch.Tensor]):
        """The 3x recipes' second policy (half of the images): resize, random crop, drop emptied boxes."""
        g = self._generator(index, 1)
        if torch.rand((), generator=g) >= 0.5:
            return image, boxes, labels, masks

        def draw(low: int, high: int) -> int:  # uniform integer in [low, high]
            return int(torch.randint(low, high + 1, (), generator=g))

        sides, (low, high) = self.crop
        h, w = image.shape[-2:]
        nh, nw = released_size(h, w, sides[draw(0, len(sides) - 1)], self.crop_max_size)
        image = TF.resize(image, [nh, nw], antialias=False)
        boxes = boxes * torch.tensor([nw / w, nh / h, nw / w, nh / h])
        if masks is not None and len(masks):
            masks = TF.resize(masks, [nh, nw], interpolation=InterpolationMode.NEAREST)
        elif masks is not None:
            masks = masks.new_zeros((0, nh, nw))
        ch, cw = draw(min(nh, low), min(nh, high)), draw(min(nw, low), min(nw, high))
        y0, x0 = draw(0, nh - ch), draw(0, nw - cw)
        image = image[:, y0:y0 + ch, x0:x0 + cw]
        boxes = boxes - torch.tensor([x0, y0, x0, y0], dtype=boxes.dtype)
        boxes[:, 0::2].clamp_(0, cw)
        boxes[:, 1::2].clamp_(0, ch)
        keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
        masks = masks[keep][:, y0:y0 + ch, x0:x0 + cw] if masks is not None else None
        return image, boxes[keep], labels[keep], masks

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Target]:
        image_id = self.ids[index]
        name = str(Path(self.base.root) / self.coco.imgs[image_id]["file_name"])
        return load_sample(name, self.skip_bad, lambda: self._load(index, name))

    def _load(self, index: int, name: str) -> Tuple[torch.Tensor, Target]:
        image_id = self.ids[index]
        try:
            image = TF.pil_to_tensor(self.base[self._base_index[image_id]][0])
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
            raise read_error(name, e) from None
        h, w = image.shape[-2:]
        anns = self._annotations(image_id)
        boxes = torch.tensor([a["bbox"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        boxes[:, 2:] += boxes[:, :2]
        boxes[:, 0::2].clamp_(0, w)
        boxes[:, 1::2].clamp_(0, h)
        labels = torch.tensor([self.label_of_cat[a["category_id"]] for a in anns], dtype=torch.int64)
        masks = None
        if self.with_masks:
            masks = torch.from_numpy(np.stack([self._mask(a, h, w) for a in anns])
                                     if anns else np.zeros((0, h, w), np.uint8))
        if self.train:  # clamping can leave boxes of zero width at the image border
            keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
            boxes, labels = boxes[keep], labels[keep]
            masks = masks[keep] if masks is not None else None
        if self._flip(index):
            image = TF.horizontal_flip_image(image)
            boxes = TF.horizontal_flip_bounding_boxes(boxes, tv_tensors.BoundingBoxFormat.XYXY, (h, w))
            masks = TF.horizontal_flip_mask(masks) if masks is not None else None
        if self.crop is not None:
            image, boxes, labels, masks = self._random_crop(index, image, boxes, labels, masks)
        target: Target = {"boxes": boxes, "labels": labels, "image_id": torch.tensor(image_id)}
        if masks is not None:
            target["masks"] = masks
        return image, target

    def _mask(self, ann: Dict[str, Any], h: int, w: int) -> np.ndarray:
        segm = ann.get("segmentation")
        if not segm:  # boxes-only annotation: the box is the mask
            x, y, bw, bh = ann["bbox"]
            segm = [[x, y, x + bw, y, x + bw, y + bh, x, y + bh]]
        if isinstance(segm, list):
            rle = mask_utils.merge(mask_utils.frPyObjects(segm, h, w))
        elif isinstance(segm.get("counts"), list):
            rle = mask_utils.frPyObjects(segm, h, w)
        else:
            rle = segm
        return mask_utils.decode(rle).astype(np.uint8)


def collate(batch: Sequence[Tuple[torch.Tensor, Target]]) -> Tuple[List[torch.Tensor], List[Target]]:
    """Keep images of different sizes as lists (torchvision detectors batch them themselves)."""
    images, targets = zip(*batch)
    return list(images), list(targets)


def collate_train(batch: Sequence[Any]) -> Tuple[List[torch.Tensor], List[Target], List[SkippedImage]]:
    """:func:`collate` of the samples that loaded, and the :class:`SkippedImage` markers of the others."""
    good, skipped = drop_skipped(batch)
    images, targets = collate(good) if good else ([], [])
    return images, targets, skipped


class TrainSampler(Sampler[int]):
    """Shuffled indices of one rank for one epoch, resumable in the middle of the epoch.

    Every rank gets the same number of indices (the permutation is padded by wrapping around),
    so DDP ranks run the same number of steps. The order depends only on ``(seed, epoch)``, and
    step ``k`` of rank ``r`` takes the ``r``-th slice of the ``k``-th global batch of that order:
    ``W`` processes at batch ``B`` see the same images per step as one process at batch ``W * B``.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.size, self.batch_size = size, batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.epoch, self.skip = 0, 0
        self.per_rank = math.ceil(size / (batch_size * world_size)) * batch_size

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Select the epoch, starting after its first ``skip_batches`` batches (resume)."""
        self.epoch, self.skip = epoch, skip_batches * self.batch_size

    def batches_per_epoch(self) -> int:
        return self.per_rank // self.batch_size

    def indices(self) -> List[int]:
        g = torch.Generator().manual_seed(self.seed * 7_919 + self.epoch)
        order = torch.randperm(self.size, generator=g).tolist()
        total = self.per_rank * self.world_size
        order = (order * math.ceil(total / self.size))[:total]
        global_batch = self.batch_size * self.world_size
        return [i for start in range(self.rank * self.batch_size, total, global_batch)
                for i in order[start:start + self.batch_size]]

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.skip:])

    def __len__(self) -> int:
        return self.per_rank - self.skip


def shard_indices(size: int, rank: int = 0, world_size: int = 1, limit: Optional[int] = None) -> List[int]:
    """Indices ``rank, rank + world, ...`` of the first ``limit`` items (evaluation: no padding)."""
    n = size if limit is None else min(size, limit)
    return list(range(rank, n, world_size))
