"""Run a trained detector on image files: PNGs with drawn boxes/masks and a JSON of detections."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
from PIL import Image, UnidentifiedImageError
from torchvision.transforms.v2.functional import pil_to_tensor
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks
from tqdm import tqdm

from .evaluation import masks_to_rles
from .models import lower_score_threshold

# distinct colours, one per class (cycled)
PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
           "#fabed4", "#469990", "#dcbeff", "#9a6324", "#800000", "#aaffc3", "#808000", "#000075"]


def draw_detections(image: torch.Tensor, det: Dict[str, torch.Tensor], classes: Sequence[str],
                    mask_threshold: float = 0.5) -> torch.Tensor:
    """``uint8 (3, H, W)`` image with the masks (if any), boxes and ``class score`` labels drawn."""
    labels = det["labels"].tolist()
    colours = [PALETTE[(lab - 1) % len(PALETTE)] for lab in labels]
    if "masks" in det and len(labels):
        image = draw_segmentation_masks(image, det["masks"][:, 0] >= mask_threshold, alpha=0.45, colors=colours)
    if len(labels):
        names = [f"{classes[lab - 1] if 1 <= lab <= len(classes) else lab} {s:.2f}"
                 for lab, s in zip(labels, det["scores"].tolist())]
        image = draw_bounding_boxes(image, det["boxes"], labels=names, colors=colours, width=2)
    return image


def detections_to_json(det: Dict[str, torch.Tensor], classes: Sequence[str], cat_ids: Sequence[int],
                       mask_threshold: float = 0.5) -> List[Dict]:
    """Detections as plain dicts: class name, COCO category id, score, XYXY box, mask as COCO RLE."""
    out = []
    rles = masks_to_rles(det["masks"], mask_threshold) if "masks" in det else []
    for i, (box, score, label) in enumerate(zip(det["boxes"].tolist(), det["scores"].tolist(),
                                                det["labels"].tolist())):
        d = dict(label=classes[label - 1], category_id=int(cat_ids[label - 1]), score=round(score, 4),
                 box_xyxy=[round(v, 1) for v in box])
        if rles:
            d["mask_rle"] = rles[i]
        out.append(d)
    return out


@torch.no_grad()
def predict_images(model: nn.Module, paths: Sequence[Path], out_dir: str | Path, classes: Sequence[str],
                   cat_ids: Sequence[int], device: torch.device, score_threshold: float = 0.5,
                   amp: bool = False) -> Path:
    """Write ``out_dir/<stem>.png`` per image and ``out_dir/detections.json``; returns the JSON path.

    Unreadable images are reported in the JSON (``error``) and skipped; the others still run.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.eval()
    lower_score_threshold(model, score_threshold)
    records = []
    for path in tqdm(paths, desc="predict", unit="img", disable=len(paths) < 2):
        try:
            with Image.open(path) as pil:
                image = pil_to_tensor(pil.convert("RGB"))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            print(f"skipping '{path}': not a readable image ({str(e).splitlines()[0]})")
            records.append(dict(image=str(path), error=f"unreadable image: {e}"))
            continue
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
            det = model([image.to(device).float().div_(255)])[0]
        det = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in det.items()}
        keep = det["scores"] >= score_threshold
        det = {k: v[keep] for k, v in det.items()}
        drawn = draw_detections(image, det, classes)
        png = out_dir / f"{path.stem}.png"
        if png.exists() and png.resolve() == path.resolve():
            png = out_dir / f"{path.stem}_pred.png"
        Image.fromarray(drawn.permute(1, 2, 0).numpy()).save(png)
        records.append(dict(image=str(path), output=str(png), height=image.shape[1], width=image.shape[2],
                            detections=detections_to_json(det, classes, cat_ids)))
    json_path = out_dir / "detections.json"
    tmp = json_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(records, indent=1))
    tmp.replace(json_path)
    return json_path
