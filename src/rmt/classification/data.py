"""Training and validation batches for classification, from three sources:

* ``folder``: an ImageFolder tree (``DATA/train/CLASS/*.jpg``, ``DATA/val/CLASS/*.jpg``), per-image
  timm transforms in DataLoader workers;
* ``fashion-mnist``: the idx files, either through the same per-image path or held on the device
  and augmented a whole batch at a time (:mod:`.tensor_data`);
* ``wds``: webdataset ``.tar`` shards streamed from disk or a URL (:mod:`.stream`).

Every source yields ``(images (B, 3, S, S) float, labels (B,) int64)`` and has ``set_epoch(epoch,
skip)`` so that a resumed run sees exactly the batches an uninterrupted one would: the sample order
depends only on (seed, epoch), and each sample's augmentation is drawn from its own seed
(seed, epoch, rank, position), whatever worker process loads it.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from . import fashion_mnist
from ..bad_images import (BadImageError, SkipReport, apply_transform, bad_image_message,  # noqa: F401
                          drop_skipped, load_sample, read_error)
from ..engine import DistInfo

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class DataSpec:
    """What a model needs to know about its inputs; stored in every checkpoint for eval/predict."""
    input_size: int = 224
    mean: List[float] = field(default_factory=lambda: list(IMAGENET_MEAN))
    std: List[float] = field(default_factory=lambda: list(IMAGENET_STD))
    crop_pct: float = 0.9
    interpolation: str = "bicubic"
    grayscale: bool = False
    class_names: List[str] = field(default_factory=list)
    pipeline: str = "loader"  # "tensor": validation images were plainly resized on the device

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "DataSpec":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


# ------------------------------------------------------------------------------------------------
# data sets
# ------------------------------------------------------------------------------------------------

class ImageFolderDataset(Dataset):
    """Images under ``root/CLASS/...`` with class indices in sorted (natural) order of folder names.

    A file that cannot be read or transformed raises :class:`BadImageError` naming it, the step and
    the cause, or yields a :class:`SkippedImage` when ``skip_bad`` (the collate function counts and
    drops those).
    """

    def __init__(self, root: str | Path, transform=None, skip_bad: bool = False,
                 class_to_idx: Optional[Dict[str, int]] = None):
        from timm.data.readers.reader_image_folder import find_images_and_targets
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder '{self.root}' does not exist")
        self.samples, self.class_to_idx = find_images_and_targets(str(self.root), class_to_idx=class_to_idx)
        if not self.samples:
            raise FileNotFoundError(f"no images found under '{self.root}' (expected {self.root}/CLASS/*.jpg)")
        self.class_names = [c for c, _ in sorted(self.class_to_idx.items(), key=lambda kv: kv[1])]
        self.transform = transform
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, target = self.samples[index]
        return load_sample(path, self.skip_bad, lambda: (self._load(path), target))

    def _load(self, path: str):
        from PIL import Image
        try:
            with Image.open(path) as f:
                img = f.convert("RGB")
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
            raise read_error(path, e) from None
        return apply_transform(self.transform, path, img) if self.transform else img


class TensorImageDataset(Dataset):
    """Per-image access to in-memory uint8 images ``(N, H, W)`` as RGB PIL images (loader pipeline)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform=None, skip_bad: bool = False):
        self.images, self.labels, self.transform, self.skip_bad = images.numpy(), labels, transform, skip_bad

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        from PIL import Image
        img = Image.fromarray(self.images[index], mode="L").convert("RGB")
        name = f"#{index}"
        return load_sample(name, self.skip_bad, lambda: (
            apply_transform(self.transform, name, img) if self.transform else img, int(self.labels[index])))


class SeededSamples(Dataset):
    """Wraps a data set so that each ``(index, seed)`` item seeds Python, NumPy and torch first:
    random transforms then depend only on the sample's seed, not on the worker that runs them."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: Tuple[int, int]):
        import random
        index, seed = item
        in_main = torch.utils.data.get_worker_info() is None
        if in_main:  # without worker processes, leave the training loop's random streams untouched
            saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            random.seed(seed)
            np.random.seed(seed % 2**32)
            torch.manual_seed(seed)
            return self.dataset[index]
        finally:
            if in_main:
                random.setstate(saved[0])
                np.random.set_state(saved[1])
                torch.set_rng_state(saved[2])


def sample_seed(seed: int, epoch: int, rank: int, position: int) -> int:
    """A 63-bit seed for one sample, a pure function of its arguments (Python's int-tuple hash)."""
    return hash((seed, epoch, rank, position)) & (2**63 - 1)


class EpochIndices(Sampler):
    """This rank's ``(index, seed)`` pairs of an epoch, optionally starting after ``skip`` of them."""

    def __init__(self, sampler: Sampler, seed: int, rank: int):
        self.sampler, self.seed, self.rank = sampler, seed, rank
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)

    def __iter__(self):
        for position, index in enumerate(self.sampler):
            if position >= self.skip:
                yield int(index), sample_seed(self.seed, self.epoch, self.rank, position)


class ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``, no padding: each sample is validated exactly once."""

    def __init__(self, n: int, rank: int, world: int):
        self.indices = list(range(rank, n, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self):
        return iter(self.indices)


class EpochSeededShuffle(Sampler):
    """A shuffled shard of ``range(n)`` whose order depends on (seed, epoch) only (drop-last padding
    as torch's DistributedSampler)."""

    def __init__(self, n: int, rank: int, world: int, seed: int):
        self.n, self.rank, self.world, self.seed, self.epoch = n, rank, world, seed, 0
        self.per_rank = math.ceil(n / world)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist()
        order += order[: self.per_rank * self.world - self.n]
        return iter(order[self.rank::self.world])


def collate_skipping_bad(batch: Sequence[Any]):
    """Default collate of the good samples, plus the :class:`SkippedImage` markers of the others."""
    good, skipped = drop_skipped(batch)
    if not good:
        return None, None, skipped
    images, labels = default_collate(good)
    return images, labels, skipped


class LoaderBatches:
    """Batches from a map-style data set through a DataLoader; ``skipped`` counts and names skipped images."""

    def __init__(self, dataset: Dataset, batch_size: int, workers: int, train: bool, info: DistInfo,
                 seed: int, aug_repeats: int = 0, even_batches: bool = False):
        self.train, self.even_batches, self.skipped = train, even_batches, SkipReport()
        if train:
            if aug_repeats > 0:
                from timm.data.distributed_sampler import RepeatAugSampler
                base = RepeatAugSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                        num_repeats=aug_repeats)
            else:
                base = EpochSeededShuffle(len(dataset), info.rank, info.world_size, seed)
            self.sampler = EpochIndices(base, seed, info.rank)
            data = SeededSamples(dataset)
        else:
            self.sampler = ShardSampler(len(dataset), info.rank, info.world_size)
            data = dataset
        self.loader = DataLoader(
            data, batch_size=batch_size, sampler=self.sampler, num_workers=workers,
            collate_fn=collate_skipping_bad, drop_last=train, pin_memory=info.device.type == "cuda",
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(seed),
            prefetch_factor=4 if workers > 0 else None)
        self.batches_per_epoch = len(self.sampler) // batch_size if train else math.ceil(
            len(self.sampler) / batch_size)
        self.num_samples = len(dataset)

    @property
    def bad_images(self) -> int:
        return self.skipped.count

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        if self.train:
            self.sampler.set_epoch(epoch, skip_batches * self.loader.batch_size)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, skipped in self.loader:
            self.skipped.add(skipped)
            if images is None:
                continue
            if self.even_batches and len(images) % 2:  # mixup pairs samples: drop one after skipped files
                images, labels = images[:-1], labels[:-1]
                if not len(images):
                    continue
            yield images, labels


# ------------------------------------------------------------------------------------------------
# building
# ------------------------------------------------------------------------------------------------

@dataclass
class Data:
    train: Any
    val: Any
    spec: DataSpec
    num_classes: int
    train_size: int
    val_size: int


def default_workers(info: DistInfo) -> int:
    per_rank = (os.cpu_count() or 1) // max(int(os.environ.get("LOCAL_WORLD_SIZE", "1")), 1)
    return max(min(8, per_rank), 0)


def resolve_spec(cfg: Dict[str, Any], class_names: List[str], grayscale: bool,
                 mean: Sequence[float], std: Sequence[float], input_size: int, crop_pct: float) -> DataSpec:
    """Fill the data-dependent defaults into ``cfg`` (so the saved config is complete) and return the spec."""
    for key, value in (("input_size", input_size), ("crop_pct", crop_pct),
                       ("mean", list(mean)), ("std", list(std))):
        if cfg.get(key) is None:
            cfg[key] = value
    three = lambda v: [float(x) for x in (v * 3 if len(v) == 1 else v)]  # noqa: E731
    cfg["mean"], cfg["std"] = three(cfg["mean"]), three(cfg["std"])
    return DataSpec(input_size=cfg["input_size"], mean=cfg["mean"], std=cfg["std"], crop_pct=cfg["crop_pct"],
                    interpolation=cfg["interpolation"], grayscale=grayscale, class_names=list(class_names))


def train_transform(cfg: Dict[str, Any], spec: DataSpec):
    """timm's training transform: random-resized crop, flip, RandAugment, normalise, random erasing
    (RandAugment's ops prepared by :func:`.augment.prepare_auto_augment`)."""
    from timm.data import create_transform
    from .augment import prepare_auto_augment
    aa = cfg["aa"] if cfg["aa"] and cfg["aa"].lower() != "none" else None
    return prepare_auto_augment(create_transform(
        spec.input_size, is_training=True, scale=tuple(cfg["scale"]), ratio=tuple(cfg["ratio"]),
        hflip=cfg["hflip"], color_jitter=cfg["color_jitter"], auto_augment=aa,
        interpolation=spec.interpolation, mean=tuple(spec.mean), std=tuple(spec.std),
        re_prob=cfg["reprob"], re_mode=cfg["remode"], re_count=1))


def eval_transform(spec: DataSpec):
    """timm's evaluation transform: resize to ``input_size / crop_pct``, centre crop, normalise."""
    from timm.data import create_transform
    return create_transform(spec.input_size, is_training=False, interpolation=spec.interpolation,
                            mean=tuple(spec.mean), std=tuple(spec.std), crop_pct=spec.crop_pct)


def _subset(dataset: Dataset, n: Optional[int]) -> Dataset:
    if n and n < len(dataset):
        return torch.utils.data.Subset(dataset, range(n))
    return dataset


def _split_dir(root: Path, split: str, fallbacks: Sequence[str] = ()) -> Path:
    for name in (split, *fallbacks):
        if (root / name).is_dir():
            return root / name
    raise FileNotFoundError(f"no '{split}' folder under '{root}' (expected {root}/{split}/CLASS/*.jpg; "
                            "choose another with --train-split/--val-split)")


def uses_tensor_pipeline(cfg: Dict[str, Any]) -> bool:
    no_aa = not cfg["aa"] or cfg["aa"].lower() == "none"
    if cfg["pipeline"] == "tensor":
        if cfg["dataset"] != "fashion-mnist":
            raise ValueError("--pipeline tensor is for fashion-mnist; use --pipeline loader for this data set")
        if not no_aa:
            raise ValueError("--pipeline tensor does not run RandAugment: pass --aa none or --pipeline loader")
        return True
    return cfg["pipeline"] == "auto" and cfg["dataset"] == "fashion-mnist" and no_aa


def build_data(cfg: Dict[str, Any], info: DistInfo, train: bool = True) -> Data:
    """Training and validation batches described by ``cfg`` (``train=False``: validation only)."""
    from . import token_labels  # training sets with their token-label maps, when --token-label is set
    workers = cfg["workers"] if cfg["workers"] is not None else default_workers(info)
    mix = cfg["mixup"] > 0 or cfg["cutmix"] > 0
    val_bs = cfg["batch_size"] * 2
    if cfg["dataset"] == "fashion-mnist":
        root = cfg["data"] or fashion_mnist.DEFAULT_DIR
        val_split = cfg["val_split"] or "test"
        spec = resolve_spec(cfg, fashion_mnist.CLASS_NAMES, True, [fashion_mnist.MEAN], [fashion_mnist.STD],
                            32, 1.0)
        tr_x, tr_y = fashion_mnist.load_split(root, cfg["train_split"]) if train else (None, None)
        va_x, va_y = fashion_mnist.load_split(root, val_split)
        if cfg["train_subset"] and train:
            tr_x, tr_y = tr_x[: cfg["train_subset"]], tr_y[: cfg["train_subset"]]
        if cfg["val_subset"]:
            va_x, va_y = va_x[: cfg["val_subset"]], va_y[: cfg["val_subset"]]
        classes = len(spec.class_names)
        if uses_tensor_pipeline(cfg):
            from .tensor_data import TensorBatches
            spec.pipeline = "tensor"
            batches, extra = token_labels.tensor_batches(cfg, cfg["train_split"], len(tr_y), classes) if train \
                else (None, {})
            tr = batches(tr_x, tr_y, cfg["batch_size"], spec, info, cfg["seed"], train=True,
                         scale=cfg["scale"], ratio=cfg["ratio"], hflip=cfg["hflip"],
                         reprob=cfg["reprob"], remode=cfg["remode"], **extra) if train else None
            va = TensorBatches(va_x, va_y, val_bs, spec, info, cfg["seed"], train=False)
        else:
            tr = LoaderBatches(token_labels.train_set(TensorImageDataset(tr_x, tr_y, train_transform(cfg, spec),
                                                                         cfg["skip_bad_images"]),
                                                      cfg, info, cfg["train_split"], classes), cfg["batch_size"],
                               workers, True, info, cfg["seed"], cfg["aug_repeats"], mix) if train else None
            va = LoaderBatches(TensorImageDataset(va_x, va_y, eval_transform(spec)), val_bs, workers, False,
                               info, cfg["seed"])
        return Data(tr, va, spec, len(spec.class_names), len(tr_y) if train else 0, len(va_y))

    if cfg["dataset"] == "wds":
        from .stream import build_wds
        return build_wds(cfg, info, workers, train)

    if not cfg["data"]:
        raise ValueError("--data DIR is required for --dataset folder (an ImageFolder tree)")
    root = Path(cfg["data"])
    if not root.is_dir():
        raise FileNotFoundError(f"data folder '{root}' does not exist")
    val_dir = _split_dir(root, cfg["val_split"] or "val", () if cfg["val_split"] else ("validation", "test"))
    first = ImageFolderDataset(_split_dir(root, cfg["train_split"]) if train else val_dir,
                               skip_bad=cfg["skip_bad_images"])
    spec = resolve_spec(cfg, first.class_names, False, IMAGENET_MEAN, IMAGENET_STD, 224, 0.9)
    tr = None
    if train:
        first.transform = train_transform(cfg, spec)
        train_set = token_labels.train_set(first, cfg, info, cfg["train_split"], len(spec.class_names))
        tr = LoaderBatches(_subset(train_set, cfg["train_subset"]), cfg["batch_size"], workers, True, info,
                           cfg["seed"], cfg["aug_repeats"], mix)
        val_ds = ImageFolderDataset(val_dir, eval_transform(spec), cfg["skip_bad_images"], first.class_to_idx)
    else:
        val_ds = first
        val_ds.transform = eval_transform(spec)
    va = LoaderBatches(_subset(val_ds, cfg["val_subset"]), val_bs, workers, False, info, cfg["seed"])
    # (not ``if tr``: the truth value of batches is their number, 0 when the batch exceeds the set)
    return Data(tr, va, spec, len(spec.class_names), len(tr.loader.dataset) if tr is not None else 0,
                len(va.loader.dataset))
