"""A small built-in segmentation dataset: random shapes on textured backgrounds, ADE20K layout.

Five shape classes (disc, square, triangle, ring, bar) plus the background, each drawn with a
class-typical colour and texture; the one-pixel rim of every shape is labelled 0 ("unlabelled",
as ADE20K's "other") so the dataset is read with ``reduce_zero_label`` exactly like ADE20K. The
same seed gives the same files on every machine, so the whole pipeline runs offline and
reproducibly.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Tuple, Union

import numpy as np
from PIL import Image

from .data import META_FILE

SYNTHETIC_CLASSES = ("background", "disc", "square", "triangle", "ring", "bar")
# typical hue of each class (background first); instances jitter around it
_HUES = (0.0, 0.02, 0.33, 0.6, 0.13, 0.8)
VERSION = 1


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    import colorsys
    return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), dtype=np.float32)


def _texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Stripes of a random frequency and direction plus noise, in [0, 1], ``(h, w)``."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.05, 0.4)
    stripes = 0.5 + 0.5 * np.sin(freq * (xx * np.cos(angle) + yy * np.sin(angle)) + rng.uniform(0, 6.3))
    return np.clip(0.7 * stripes + 0.3 * rng.random((h, w), dtype=np.float32), 0, 1)


def _shape_mask(rng: np.random.Generator, kind: str, h: int, w: int) -> np.ndarray:
    """Boolean ``(h, w)`` mask of one randomly placed, sized and rotated shape."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r = rng.uniform(0.1, 0.25) * min(h, w)
    cy, cx = rng.uniform(r, h - r), rng.uniform(r, w - r)
    a = rng.uniform(0, np.pi)
    u = (xx - cx) * np.cos(a) + (yy - cy) * np.sin(a)
    v = -(xx - cx) * np.sin(a) + (yy - cy) * np.cos(a)
    dist = np.hypot(u, v)
    if kind == "disc":
        return dist <= r
    if kind == "square":
        return np.maximum(np.abs(u), np.abs(v)) <= 0.8 * r
    if kind == "triangle":
        corners = [(r * np.cos(t), r * np.sin(t)) for t in (np.pi / 2, np.pi / 2 + 2.094, np.pi / 2 + 4.189)]
        inside = np.ones((h, w), dtype=bool)
        for (x0, y0), (x1, y1) in zip(corners, corners[1:] + corners[:1]):
            inside &= (x1 - x0) * (v - y0) - (y1 - y0) * (u - x0) >= 0
        return inside
    if kind == "ring":
        return (dist <= r) & (dist >= 0.55 * r)
    if kind == "bar":
        return (np.abs(u) <= 1.6 * r) & (np.abs(v) <= 0.3 * r)
    raise ValueError(kind)


def _rim(mask: np.ndarray) -> np.ndarray:
    """Pixels of ``mask`` with a 4-neighbour outside it."""
    inner = mask.copy()
    inner[1:, :] &= mask[:-1, :]
    inner[:-1, :] &= mask[1:, :]
    inner[:, 1:] &= mask[:, :-1]
    inner[:, :-1] &= mask[:, 1:]
    return mask & ~inner


def make_sample(rng: np.random.Generator, size: Tuple[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    """One image ``(h, w, 3)`` uint8 and its label map ``(h, w)`` uint8 (0 rim, 1 background, 2.. shapes)."""
    h, w = size
    colour = _hsv_to_rgb(_HUES[0] + rng.uniform(0, 1), rng.uniform(0.0, 0.25), rng.uniform(0.35, 0.65))
    image = _texture(rng, h, w)[..., None] * 0.5 * colour + 0.5 * colour
    label = np.ones((h, w), dtype=np.uint8)
    for _ in range(int(rng.integers(1, 5))):
        cls = int(rng.integers(1, len(SYNTHETIC_CLASSES)))
        mask = _shape_mask(rng, SYNTHETIC_CLASSES[cls], h, w)
        colour = _hsv_to_rgb(_HUES[cls] + rng.uniform(-0.04, 0.04), rng.uniform(0.55, 1.0), rng.uniform(0.6, 1.0))
        shade = 0.75 + 0.25 * _texture(rng, h, w)[..., None]
        image = np.where(mask[..., None], shade * colour, image)
        label[mask] = cls + 1
        label[_rim(mask)] = 0
    image = image + rng.normal(0, 0.03, image.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8), label


def make_synthetic_dataset(root: Union[str, Path], num_train: int = 240, num_val: int = 40,
                           size: Tuple[int, int] = (128, 160), seed: int = 0) -> Path:
    """Write the dataset to ``root`` in ADE20K layout (JPEG images, PNG labels, ``dataset.json``).

    An existing, complete dataset of the same parameters is left as it is. ``size`` is (h, w).
    """
    root = Path(root)
    meta = dict(name="rmt-synthetic-shapes", version=VERSION, classes=list(SYNTHETIC_CLASSES),
                reduce_zero_label=True, scale=[max(size) * 2, min(size)], crop_size=min(size),
                num_train=num_train, num_val=num_val, size=list(size), seed=seed)
    meta_path = root / META_FILE
    if meta_path.is_file():
        try:
            if json.loads(meta_path.read_text()) == meta:
                return root
        except json.JSONDecodeError:
            pass
    rng = np.random.default_rng(seed)
    for split, count in (("training", num_train), ("validation", num_val)):
        image_dir, label_dir = root / "images" / split, root / "annotations" / split
        image_dir.mkdir(parents=True, exist_ok=True)
        label_dir.mkdir(parents=True, exist_ok=True)
        for i in range(count):
            image, label = make_sample(rng, size)
            name = f"shapes_{split[:3]}_{i:05d}"
            Image.fromarray(image).save(image_dir / f"{name}.jpg", quality=95)
            Image.fromarray(label).save(label_dir / f"{name}.png")
    # written last: its presence marks a complete dataset
    tmp = meta_path.with_name(META_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(meta_path)
    return root
