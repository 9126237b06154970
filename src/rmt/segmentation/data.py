"""ADE20K-layout segmentation datasets and the paper's training augmentation.

Layout (as ADEChallengeData2016)::

    ROOT/images/training/NAME.jpg        ROOT/annotations/training/NAME.png
    ROOT/images/validation/NAME.jpg      ROOT/annotations/validation/NAME.png
    ROOT/dataset.json                    optional: class names, reduce_zero_label, scale, crop_size

Label maps are single-channel (or palette) PNGs of class ids; 255 is ignored. ADE20K stores
"other" as 0 and its 150 classes as 1..150: ``reduce_zero_label`` maps 0 to 255 and shifts the rest
down by one. Images come out as normalised float tensors ``(3, H, W)`` and labels as int64 ``(H, W)``.

Augmentation is seeded per sample (the sampler hands out ``(index, seed)`` pairs), so a run
resumed from a checkpoint sees exactly the images it would have seen without the interruption,
whatever the number of loader workers.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import Dataset

from ..bad_images import apply_transform, drop_skipped, load_sample, read_error
from ..images import IMAGE_SUFFIXES, list_images  # noqa: F401  (list_images re-exported)

IGNORE_INDEX = 255
SPLITS = ("training", "validation")
META_FILE = "dataset.json"

ADE20K_CLASSES = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper",
    "fireplace", "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table",
    "pillow", "screen door", "stairway", "river", "bridge", "bookcase", "blind", "coffee table",
    "toilet", "flower", "book", "hill", "bench", "countertop", "stove", "palm", "kitchen island",
    "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel", "bus", "towel", "light",
    "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman",
    "bottle", "buffet", "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy",
    "washer", "plaything", "swimming pool", "stool", "barrel", "basket", "waterfall", "tent", "bag",
    "minibike", "cradle", "oven", "ball", "food", "step", "tank", "trade name", "microwave", "pot",
    "animal", "bicycle", "lake", "dishwasher", "screen", "blanket", "sculpture", "hood", "sconce",
    "vase", "traffic light", "tray", "ashcan", "fan", "pier", "crt screen", "plate", "monitor",
    "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)


# ------------------------------------------------------------------------------------------------
# dataset description
# ------------------------------------------------------------------------------------------------

def read_dataset_meta(root: Union[str, Path]) -> Dict[str, Any]:
    """``ROOT/dataset.json`` as a dict (empty when absent)."""
    path = Path(root) / META_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"'{path}' is not valid JSON ({e}); fix or delete it") from None


def read_class_names(spec: Optional[str], root: Optional[Union[str, Path]] = None) -> Tuple[str, ...]:
    """Class names from ``spec``: ``"ade20k"``, a ``.json`` list or a text file (one per line).

    Without ``spec`` the dataset's ``dataset.json`` decides, else ADE20K's 150 classes.
    """
    if spec is None:
        meta = read_dataset_meta(root) if root is not None else {}
        return tuple(meta["classes"]) if "classes" in meta else ADE20K_CLASSES
    if spec.lower() == "ade20k":
        return ADE20K_CLASSES
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"class list '{spec}' does not exist; give 'ade20k', a .json list "
                                "or a text file with one class name per line")
    if path.suffix == ".json":
        names = json.loads(path.read_text())
        names = names["classes"] if isinstance(names, dict) else names
    else:
        names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ValueError(f"class list '{spec}' is empty")
    return tuple(str(n) for n in names)


def parse_size(text: Union[str, int, Sequence[int]]) -> Tuple[int, int]:
    """``"512"`` -> (512, 512); ``"2048x512"`` -> (2048, 512)."""
    if isinstance(text, int):
        return text, text
    if not isinstance(text, str):
        a, b = text
        return int(a), int(b)
    parts = text.lower().split("x")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"size {text!r} must be N or AxB, e.g. 512 or 2048x512") from None
    if len(values) not in (1, 2) or min(values) <= 0:
        raise ValueError(f"size {text!r} must be N or AxB with positive numbers")
    return (values[0], values[0]) if len(values) == 1 else (values[0], values[1])


def rescale_size(h: int, w: int, scale: Tuple[int, int]) -> Tuple[int, int]:
    """Keep-ratio size fitting ``scale = (long, short)``: the long side at most ``long`` and the
    short side at most ``short``, whichever binds (mmseg's ``Resize(img_scale=..., keep_ratio=True)``)."""
    factor = min(max(scale) / max(h, w), min(scale) / min(h, w))
    return max(int(h * factor + 0.5), 1), max(int(w * factor + 0.5), 1)


# ------------------------------------------------------------------------------------------------
# the dataset
# ------------------------------------------------------------------------------------------------

def read_image(path: Union[str, Path]) -> torch.Tensor:
    """RGB image as uint8 ``(3, H, W)``."""
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


def read_label(path: Union[str, Path]) -> torch.Tensor:
    """Label map as int64 ``(H, W)``: grey values, or palette indices for palette PNGs."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(f"label map '{path}' has mode {im.mode}; expected a single-channel or "
                             "palette PNG of class ids")
        return torch.from_numpy(np.array(im).astype(np.int64))


def reduce_zero_label(label: torch.Tensor) -> torch.Tensor:
    """0 -> 255 (ignored), k -> k-1 for the rest; 255 stays 255."""
    out = label - 1
    out[(label == 0) | (label == IGNORE_INDEX)] = IGNORE_INDEX
    return out


class SegmentationFolder(Dataset):
    """Image/label pairs of one split of an ADE20K-layout folder.

    ``dataset[i]`` or ``dataset[(i, seed)]`` returns ``(image, label)``: with a transform, the
    transform's output (seeded with ``seed`` when given); without, uint8 ``(3, H, W)`` and int64
    ``(H, W)``. A pair that cannot be read or transformed raises a BadImageError naming the image,
    the step and the cause, or, with ``skip_bad``, comes back as a
    :class:`~rmt.bad_images.SkippedImage` (:func:`collate_skipping_bad` drops it).
    """

    def __init__(self, root: Union[str, Path], split: str = "training", transform=None,
                 reduce_zero_label: bool = False, skip_bad: bool = False):
        self.root = Path(root)
        image_dir, label_dir = self.root / "images" / split, self.root / "annotations" / split
        for d in (image_dir, label_dir):
            if not d.is_dir():
                raise FileNotFoundError(
                    f"'{d}' does not exist; a dataset folder needs images/{split}/ and "
                    f"annotations/{split}/ (ADE20K layout)")
        images = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in '{image_dir}'")
        missing = [p.name for p in images if not (label_dir / (p.stem + ".png")).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{len(missing)} of {len(images)} images in '{image_dir}' have no label map "
                f"annotations/{split}/NAME.png (e.g. {', '.join(missing[:3])})")
        self.images = images
        self.labels = [label_dir / (p.stem + ".png") for p in images]
        self.split = split
        self.transform = transform
        self.reduce_zero_label = reduce_zero_label
        self.skip_bad = skip_bad

    def __len__(self) -> int:
        return len(self.images)

    def load(self, index: int) -> Tuple[torch.Tensor, torch.Tensor]:
        try:
            image = read_image(self.images[index])
        except Exception as e:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
            raise read_error(str(self.images[index]), e) from None
        try:
            label = read_label(self.labels[index])
        except Exception as e:
            raise read_error(str(self.labels[index]), e) from None
        if image.shape[-2:] != label.shape:
            raise ValueError(f"'{self.images[index]}' is {tuple(image.shape[-2:])} but its label map "
                             f"is {tuple(label.shape)}")
        return image, reduce_zero_label(label) if self.reduce_zero_label else label

    def __getitem__(self, item):
        index, seed = item if isinstance(item, tuple) else (item, None)
        return load_sample(str(self.images[index]), self.skip_bad, lambda: self._sample(index, seed))

    def _sample(self, index: int, seed: Optional[int]):
        image, label = self.load(index)
        if self.transform is None:
            return image, label
        name = str(self.images[index])
        if seed is None:
            return apply_transform(self.transform, name, image, label)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return apply_transform(self.transform, name, image, label)


def collate_skipping_bad(batch: Sequence[Any]) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], List[Any]]:
    """Stacked images and labels of the pairs that loaded (None when none did), and the
    :class:`~rmt.bad_images.SkippedImage` markers of the others."""
    good, skipped = drop_skipped(batch)
    if not good:
        return None, None, skipped
    images, labels = torch.utils.data.default_collate(good)
    return images, labels, skipped


# ------------------------------------------------------------------------------------------------
# transforms
# ------------------------------------------------------------------------------------------------

def normalize(image: torch.Tensor, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """uint8 ``(3, H, W)`` -> float ``(3, H, W)`` normalised with the ImageNet statistics."""
    return TF.normalize(image.float() / 255.0, list(mean), list(std))


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * torch.rand(()).item()


def photometric_distortion(image: torch.Tensor) -> torch.Tensor:
    """mmseg's PhotoMetricDistortion on uint8 ``(3, H, W)``: each with probability 0.5, brightness
    +-32, contrast x0.5-1.5 (before or after the colour ops), saturation x0.5-1.5, hue +-18 degrees."""
    x = image.float()
    if torch.rand(()) < 0.5:
        x = (x + _uniform(-32, 32)).clamp(0, 255)
    contrast_first = bool(torch.rand(()) < 0.5)

    def contrast(t):
        return (t * _uniform(0.5, 1.5)).clamp(0, 255) if torch.rand(()) < 0.5 else t

    if contrast_first:
        x = contrast(x)
    if torch.rand(()) < 0.5:
        x = TF.adjust_saturation(x / 255.0, _uniform(0.5, 1.5)) * 255.0
    if torch.rand(()) < 0.5:
        x = TF.adjust_hue(x / 255.0, _uniform(-18, 18) / 360.0) * 255.0
    if not contrast_first:
        x = contrast(x)
    return x.round().clamp(0, 255).to(torch.uint8)


class TrainTransform:
    """The paper's ADE20K training pipeline: ``(uint8 image, label) -> (float (3,c,c), int64 (c,c))``.

    Random keep-ratio resize to ``scale`` x U(ratio_range) (default (2048, 512) x 0.5-2.0), random
    crop ``crop_size`` in which no class covers more than ``cat_max_ratio`` (10 tries), horizontal
    flip (p 0.5), photometric distortion, normalisation, padding to the crop size (label 255).
    """

    def __init__(self, crop_size: Tuple[int, int] = (512, 512), scale: Tuple[int, int] = (2048, 512),
                 ratio_range: Tuple[float, float] = (0.5, 2.0), cat_max_ratio: float = 0.75,
                 flip_prob: float = 0.5, photometric: bool = True):
        self.crop_size, self.scale, self.ratio_range = tuple(crop_size), tuple(scale), tuple(ratio_range)
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric

    def random_crop_box(self, label: torch.Tensor) -> Tuple[int, int, int, int]:
        ch, cw = self.crop_size
        h, w = label.shape
        box = (0, 0, min(ch, h), min(cw, w))
        for _ in range(10):
            top = int(torch.randint(0, max(h - ch, 0) + 1, ()))
            left = int(torch.randint(0, max(w - cw, 0) + 1, ()))
            box = (top, left, min(ch, h), min(cw, w))
            if self.cat_max_ratio >= 1:
                break
            crop = label[top:top + ch, left:left + cw]
            counts = torch.bincount(crop[crop != IGNORE_INDEX].flatten())
            counts = counts[counts > 0]
            if len(counts) > 1 and counts.max() / counts.sum() < self.cat_max_ratio:
                break
        return box

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        ratio = _uniform(*self.ratio_range)
        size = rescale_size(*label.shape, (self.scale[0] * ratio, self.scale[1] * ratio))
        image = TF.resize(image, list(size), interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        label = TF.resize(label[None], list(size), interpolation=TF.InterpolationMode.NEAREST)[0]
        top, left, h, w = self.random_crop_box(label)
        image, label = image[:, top:top + h, left:left + w], label[top:top + h, left:left + w]
        if torch.rand(()) < self.flip_prob:
            image, label = image.flip(-1), label.flip(-1)
        if self.photometric:
            image = photometric_distortion(image)
        image = normalize(image)
        pad_h, pad_w = self.crop_size[0] - h, self.crop_size[1] - w
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=IGNORE_INDEX)
        return image.contiguous(), label.contiguous()


class EvalTransform:
    """Normalisation only: resizing for the test scale happens in :mod:`.inference`, and metrics
    are computed against the label map at its original size."""

    def __call__(self, image: torch.Tensor, label: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return normalize(image), label


