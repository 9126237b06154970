"""COCO box and mask AP of torchvision detector outputs, through pycocotools' COCOeval."""
from __future__ import annotations

import contextlib
import io
from typing import Dict, Iterable, List, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

# names of COCOeval.stats[0:6]
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def masks_to_rles(masks: torch.Tensor, threshold: float = 0.5) -> List[Dict]:
    """``(n, 1, H, W)`` mask probabilities -> n COCO RLEs (``size``, ``counts`` as text)."""
    if not len(masks):
        return []
    binary = (masks[:, 0] >= threshold).cpu().numpy().astype(np.uint8)  # as mmdetection binarises
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    return [dict(size=[int(v) for v in r["size"]], counts=r["counts"].decode("ascii")) for r in rles]


def to_coco_results(output: Dict[str, torch.Tensor], image_id: int, cat_ids: Sequence[int],
                    mask_threshold: float = 0.5) -> List[Dict]:
    """One image's detections as COCO result dicts (``bbox`` XYWH, ``segmentation`` RLE if masks).

    ``output`` is a torchvision detector output: ``boxes (n, 4)`` XYXY, ``scores (n,)``,
    ``labels (n,)`` in ``1..K``, optionally ``masks (n, 1, H, W)`` probabilities.
    """
    boxes = output["boxes"].float().cpu()
    boxes[:, 2:] -= boxes[:, :2]
    scores = output["scores"].float().cpu().tolist()
    labels = output["labels"].cpu().tolist()
    rles = masks_to_rles(output["masks"], mask_threshold) if "masks" in output else []
    results = []
    for i, (box, score, label) in enumerate(zip(boxes.tolist(), scores, labels)):
        if not 1 <= label <= len(cat_ids):
            continue
        r = dict(image_id=int(image_id), category_id=int(cat_ids[label - 1]),
                 bbox=[round(v, 2) for v in box], score=round(float(score), 5))
        if rles:
            r["segmentation"] = rles[i]
        results.append(r)
    return results


def coco_evaluate(coco_gt: COCO, results: List[Dict], image_ids: Iterable[int],
                  iou_types: Sequence[str] = ("bbox", "segm")) -> Dict[str, float]:
    """COCO AP over ``image_ids`` for each IoU type; keys like ``bbox_AP``, ``segm_AP50``, in percent.

    A figure without ground truth (e.g. ``APl`` when no object is large) is None; no detections
    at all give zeros for the others.
    """
    image_ids = sorted(set(int(i) for i in image_ids))
    metrics: Dict[str, float] = {}
    for iou_type in iou_types:
        with contextlib.redirect_stdout(io.StringIO()):
            coco_dt = coco_gt.loadRes([dict(r) for r in results]) if results else _no_detections(coco_gt)
            ev = COCOeval(coco_gt, coco_dt, iouType=iou_type)
            ev.params.imgIds = image_ids
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        # COCOeval reports -1 where there is no ground truth (e.g. no large objects): None here
        metrics.update({f"{iou_type}_{n}": round(100 * float(v), 3) if v >= 0 else None
                        for n, v in zip(STAT_NAMES, ev.stats[:6])})
    return metrics


def _no_detections(coco_gt: COCO) -> COCO:
    """An empty result set (``loadRes`` cannot make one from an empty list)."""
    empty = COCO()
    empty.dataset = dict(images=list(coco_gt.dataset.get("images", [])),
                         categories=list(coco_gt.dataset.get("categories", [])), annotations=[])
    empty.createIndex()
    return empty


def format_metrics(metrics: Dict[str, float]) -> str:
    """A two-line table of AP figures per IoU type."""
    lines = []
    for iou_type in ("bbox", "segm"):
        if f"{iou_type}_AP" in metrics:
            figures = "  ".join(f"{n} " + ("  n/a" if metrics[f"{iou_type}_{n}"] is None
                                           else f"{metrics[f'{iou_type}_{n}']:5.1f}") for n in STAT_NAMES)
            lines.append(f"{'box ' if iou_type == 'bbox' else 'mask'}  {figures}")
    return "\n".join(lines)
