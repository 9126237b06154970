"""Colour palettes, overlays and label-map files for predictions."""
from __future__ import annotations

import colorsys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw


def palette(num_classes: int) -> np.ndarray:
    """``(num_classes, 3)`` uint8 colours, well spread (golden-ratio hue steps, three brightness levels)."""
    colours = [colorsys.hsv_to_rgb((i * 0.618033988749895) % 1.0, 0.65 + 0.35 * ((i // 3) % 2),
                                   (1.0, 0.8, 0.6)[i % 3]) for i in range(num_classes)]
    return (np.array(colours).reshape(-1, 3) * 255).round().astype(np.uint8)


def overlay(image: torch.Tensor, pred: torch.Tensor, colours: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Blend class colours over an image: uint8 ``(3, H, W)`` + int ``(H, W)`` -> uint8 ``(H, W, 3)``."""
    rgb = image.permute(1, 2, 0).cpu().numpy().astype(np.float32)
    colour = colours[pred.cpu().numpy()].astype(np.float32)
    return ((1 - alpha) * rgb + alpha * colour).round().clip(0, 255).astype(np.uint8)


def add_legend(picture: np.ndarray, class_ids: Sequence[int], names: Sequence[str],
               colours: np.ndarray) -> np.ndarray:
    """Append a strip below ``picture`` naming the classes in ``class_ids`` with their colours."""
    if not len(class_ids):
        return picture
    h, w, _ = picture.shape
    row_h, pad = 14, 4
    entries = [(int(c), str(names[c]) if c < len(names) else f"class_{c}") for c in class_ids]
    # lay the entries out in rows that fit the picture's width
    rows, line, used = [], [], 0
    for cid, name in entries:
        need = 14 + 6 * len(name) + 10
        if line and used + need > w:
            rows.append(line)
            line, used = [], 0
        line.append((cid, name))
        used += need
    rows.append(line)
    strip = Image.new("RGB", (w, pad + row_h * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(strip)
    for r, line in enumerate(rows):
        x, y = pad, pad + r * row_h
        for cid, name in line:
            draw.rectangle([x, y, x + 10, y + 10], fill=tuple(int(v) for v in colours[cid]), outline=(0, 0, 0))
            draw.text((x + 14, y - 1), name, fill=(0, 0, 0))
            x += 14 + 6 * len(name) + 10
    return np.concatenate([picture, np.array(strip)], axis=0)


def save_prediction(image: torch.Tensor, pred: torch.Tensor, out_dir: str | Path, stem: str,
                    names: Sequence[str], alpha: float = 0.5, label_offset: int = 0,
                    legend: bool = True, colours: Optional[np.ndarray] = None) -> tuple:
    """Write ``STEM_overlay.png`` (colour overlay, with a legend strip) and ``STEM_mask.png``.

    The mask holds class ids plus ``label_offset`` (1 for datasets read with reduce_zero_label, so
    the file uses the dataset's own ids). Returns both paths.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    colours = palette(len(names)) if colours is None else colours
    picture = overlay(image, pred, colours, alpha)
    if legend:
        present = torch.unique(pred).tolist()
        picture = add_legend(picture, present, names, colours)
    overlay_path, mask_path = out_dir / f"{stem}_overlay.png", out_dir / f"{stem}_mask.png"
    Image.fromarray(picture).save(overlay_path)
    ids = pred.cpu().numpy().astype(np.int64) + label_offset
    Image.fromarray(ids.astype(np.uint8 if ids.max(initial=0) < 256 else np.uint16)).save(mask_path)
    return overlay_path, mask_path
