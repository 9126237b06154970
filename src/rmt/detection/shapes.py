"""A small built-in detection dataset: coloured shapes on noisy backgrounds, in COCO format.

Three categories (circle, square, triangle), drawn in a few colours at random sizes, positions and
rotations, without overlaps, on a noisy background of random tint. Segmentations are the exact
polygons drawn (circles as 48-gons), boxes their bounds. The same seed gives the same files.

Layout written under ``root`` (what :func:`rmt.detection.data.find_split` reads)::

    root/train/000000.png ...       root/annotations/instances_train.json
    root/val/000000.png ...         root/annotations/instances_val.json
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
from PIL import Image, ImageDraw
from pycocotools import mask as mask_utils

CATEGORIES = ("circle", "square", "triangle")
COLOURS = ((220, 40, 40), (40, 170, 60), (40, 80, 220), (230, 200, 30))
_MARKER = ".rmt_shapes.json"  # records how the folder was generated


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> List[Tuple[float, float]]:
    """Vertices of a shape of circumradius ``r`` centred at ``(cx, cy)``, rotated by ``angle``."""
    n = {"circle": 48, "square": 4, "triangle": 3}[kind]
    start = angle + (math.pi / 4 if kind == "square" else -math.pi / 2)
    return [(cx + r * math.cos(start + 2 * math.pi * i / n), cy + r * math.sin(start + 2 * math.pi * i / n))
            for i in range(n)]


def render_image(rng: np.random.Generator, size: int, max_objects: int = 4
                 ) -> Tuple[np.ndarray, List[Dict]]:
    """One ``(size, size, 3)`` uint8 image and its objects (``category``, ``polygon``)."""
    tint = rng.uniform(60, 190, size=3)
    noise = rng.normal(0, 22, size=(size, size, 3))
    image = Image.fromarray(np.clip(tint + noise, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    objects, placed = [], []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):  # rejection-sample a spot that overlaps nothing drawn so far
            r = float(rng.uniform(0.06, 0.2)) * size
            cx, cy = (float(v) for v in rng.uniform(r + 1, size - r - 1, size=2))
            if all(math.hypot(cx - px, cy - py) > r + pr + 2 for px, py, pr in placed):
                break
        else:
            continue
        kind = CATEGORIES[int(rng.integers(len(CATEGORIES)))]
        poly = _polygon(kind, cx, cy, r, float(rng.uniform(0, 2 * math.pi)))
        draw.polygon(poly, fill=tuple(COLOURS[int(rng.integers(len(COLOURS)))]))
        placed.append((cx, cy, r))
        objects.append(dict(category=kind, polygon=poly))
    return np.asarray(image), objects


def _write_split(root: Path, split: str, count: int, size: int, rng: np.random.Generator) -> Path:
    img_dir = root / split
    img_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(count):
        pixels, objects = render_image(rng, size)
        name = f"{i:06d}.png"
        Image.fromarray(pixels).save(img_dir / name)
        images.append(dict(id=i + 1, file_name=name, height=size, width=size))
        for obj in objects:
            flat = [round(c, 2) for xy in obj["polygon"] for c in xy]
            rle = mask_utils.frPyObjects([flat], size, size)[0]
            x, y, w, h = (float(v) for v in mask_utils.toBbox(rle))
            annotations.append(dict(
                id=len(annotations) + 1, image_id=i + 1, category_id=CATEGORIES.index(obj["category"]) + 1,
                segmentation=[flat], area=float(mask_utils.area(rle)), bbox=[x, y, w, h], iscrowd=0))
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = ann_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(dict(
        info=dict(description="rmt built-in shapes dataset"),
        images=images, annotations=annotations,
        categories=[dict(id=i + 1, name=n, supercategory="shape") for i, n in enumerate(CATEGORIES)])))
    tmp.replace(ann_file)
    return ann_file


def write_shapes_dataset(root: str | Path, num_train: int = 300, num_val: int = 60, image_size: int = 256,
                         seed: int = 0) -> Path:
    """Write the shapes dataset under ``root`` (skipped when the same one is already there)."""
    root = Path(root)
    if image_size < 64:
        raise ValueError(f"shapes images must be at least 64 pixels, got {image_size}")
    spec = dict(num_train=num_train, num_val=num_val, image_size=image_size, seed=seed)
    marker = root / _MARKER
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return root
    rng = np.random.default_rng(seed)
    _write_split(root, "train", num_train, image_size, rng)
    _write_split(root, "val", num_val, image_size, rng)
    marker.write_text(json.dumps(spec))
    return root

