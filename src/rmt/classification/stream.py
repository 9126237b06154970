"""Streaming data: webdataset ``.tar`` shards (``KEY.jpg`` + ``KEY.cls`` per sample).

Why webdataset rather than Hugging Face datasets: shards are plain POSIX tar files that any tool
writes and any storage serves (local disk, NFS, HTTP, object stores through ``pipe:`` URLs),
reading them is sequential I/O with no index, no server and no cache directory, and it needs only
one small pure-Python package. timm's own streaming readers use the same format.

Training streams shards resampled with replacement, so every rank and worker always has data and
all ranks run the same number of steps per epoch (``--train-samples`` sets the epoch length).
Validation reads each shard once, split over ranks and workers. Class names come from
``classes.txt`` (one per line) beside the shards when there is one.
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader

from ..bad_images import SkippedImage, SkipReport, apply_transform, load_sample, read_error
from ..engine import DistInfo

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


def decode_image(sample: Dict[str, Any], where: str):
    """The PIL image of a shard sample; :class:`BadImageError` naming ``where`` when unreadable."""
    from PIL import Image
    key = next((k for k in IMAGE_KEYS if k in sample), None)
    try:
        if key is None:
            raise ValueError(f"no image entry among {sorted(k for k in sample if not k.startswith('__'))}")
        with Image.open(io.BytesIO(sample[key])) as f:
            return f.convert("RGB")
    except Exception as e:
        raise read_error(where, e) from None


def decode_and_batch(transform: Callable, batch_size: int, skip_bad: bool, partial: bool):
    """Pipeline stage: samples -> ``(images, labels, skipped samples)`` batches."""
    def load(sample: Dict[str, Any], where: str):
        image = apply_transform(transform, where, decode_image(sample, where))
        return image, int(sample["cls"].decode().strip() if isinstance(sample["cls"], bytes) else sample["cls"])

    def stage(src: Iterator[Dict[str, Any]]):
        images: List[torch.Tensor] = []
        labels: List[int] = []
        skipped: List[SkippedImage] = []
        for sample in src:
            where = f"{sample.get('__url__')}#{sample.get('__key__')}"  # SHARD#KEY
            out = load_sample(where, skip_bad, lambda: load(sample, where))
            if isinstance(out, SkippedImage):
                skipped.append(out)
                continue
            images.append(out[0])
            labels.append(out[1])
            if len(images) == batch_size:
                yield torch.stack(images), torch.tensor(labels), skipped
                images, labels, skipped = [], [], []
        if images and partial:
            yield torch.stack(images), torch.tensor(labels), skipped
    return stage


class StreamBatches:
    """Batches from a webdataset pipeline; ``batches_per_epoch`` fixed so that all ranks agree."""

    def __init__(self, pipeline, workers: int, batches_per_epoch: Optional[int], pin: bool):
        self.loader = DataLoader(pipeline, batch_size=None, num_workers=workers, pin_memory=pin,
                                 generator=torch.Generator().manual_seed(0))
        self.batches_per_epoch = batches_per_epoch
        self.skip, self.skipped = 0, SkipReport()

    @property
    def bad_images(self) -> int:
        return self.skipped.count

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        self.skip = skip_batches  # the stream is resampled: a resumed epoch only runs what is left

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.skip) if self.batches_per_epoch else 0

    def __iter__(self):
        limit = len(self) if self.batches_per_epoch else None
        for i, (images, labels, skipped) in enumerate(self.loader):
            self.skipped.add(skipped)
            if limit is not None and i >= limit:
                break
            yield images, labels


def class_names_for(pattern: str, num_classes: Optional[int]) -> List[str]:
    """Names from ``classes.txt`` beside local shards, else ``"0" .. "N-1"``."""
    import braceexpand
    first = next(iter(braceexpand.braceexpand(pattern.split("::")[0])))
    names_file = Path(first).parent / "classes.txt"
    if names_file.is_file():
        names = [line.strip() for line in names_file.read_text().splitlines() if line.strip()]
        if num_classes and num_classes != len(names):
            raise ValueError(f"'{names_file}' lists {len(names)} classes but --num-classes is {num_classes}")
        return names
    if not num_classes:
        raise ValueError(f"no classes.txt beside '{first}': write one (a class name per line) or pass --num-classes")
    return [str(i) for i in range(num_classes)]


def build_wds(cfg: Dict[str, Any], info: DistInfo, workers: int, train: bool = True):
    """The :class:`~.data.Data` of a webdataset source described by ``cfg``."""
    try:
        import webdataset as wds
    except ImportError:
        raise RuntimeError("--dataset wds needs the webdataset package: pip install 'rmt[stream]'") from None
    from .data import IMAGENET_MEAN, IMAGENET_STD, Data, eval_transform, resolve_spec, train_transform
    if not cfg["data"] or not cfg["val_data"]:
        raise ValueError("--dataset wds needs --data (training shards) and --val-data (validation shards), "
                         "e.g. --data 'shards/train-{000000..000127}.tar'")
    names = class_names_for(cfg["data"], cfg.get("num_classes"))
    spec = resolve_spec(cfg, names, False, IMAGENET_MEAN, IMAGENET_STD, 224, 0.9)
    skip = cfg["skip_bad_images"]
    pin = info.device.type == "cuda"
    tr = None
    if train:
        global_batch = cfg["batch_size"] * info.world_size
        per_epoch = cfg["train_samples"] // global_batch
        per_worker = math.ceil(per_epoch / max(workers, 1))
        tr_pipe = wds.DataPipeline(
            wds.ResampledShards(cfg["data"], seed=cfg["seed"], deterministic=True),
            wds.tarfile_to_samples(),
            wds.shuffle(2000, initial=500),
            decode_and_batch(train_transform(cfg, spec), cfg["batch_size"], skip, partial=False),
        ).with_epoch(nbatches=per_worker)
        tr = StreamBatches(tr_pipe, workers, per_epoch, pin)
    va_pipe = wds.DataPipeline(
        wds.SimpleShardList(cfg["val_data"]), wds.split_by_node, wds.split_by_worker, wds.tarfile_to_samples(),
        decode_and_batch(eval_transform(spec), cfg["batch_size"] * 2, skip, partial=True))
    va = StreamBatches(va_pipe, workers, None, pin)
    return Data(tr, va, spec, len(names), cfg["train_samples"] or 0, 0)
