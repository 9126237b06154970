"""Segmentation metrics from a confusion matrix: mIoU, per-class IoU and accuracy, pixel accuracy.

As in mmsegmentation: counts are summed over the whole dataset first; a class that neither
occurs in the labels nor is predicted has IoU NaN and is left out of the mean.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

import torch

from ..engine.metrics_log import save_figure
from .data import IGNORE_INDEX


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """``(num_classes, num_classes)`` int64 counts, rows = label, columns = prediction.

    ``pred`` and ``target`` are integer tensors of the same shape; pixels labelled
    ``ignore_index`` (or outside ``[0, num_classes)``) are not counted.
    """
    if pred.shape != target.shape:
        raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)} differ in shape")
    valid = (target != ignore_index) & (target >= 0) & (target < num_classes)
    index = target[valid].long() * num_classes + pred[valid].long()
    return torch.bincount(index, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def scores(confusion: torch.Tensor, class_names: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """mIoU, mAcc, aAcc (percent) and per-class IoU/Acc from a confusion matrix."""
    cm = confusion.double().cpu()
    tp = cm.diag()
    label_count, pred_count = cm.sum(1), cm.sum(0)
    union = label_count + pred_count - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    acc = torch.where(label_count > 0, tp / label_count.clamp_min(1), torch.full_like(tp, float("nan")))
    names = list(class_names) if class_names is not None else [f"class_{i}" for i in range(len(tp))]
    if len(names) != len(tp):
        raise ValueError(f"{len(names)} class names for {len(tp)} classes")

    def pct(x: torch.Tensor) -> float:
        return round(float(x) * 100, 4) if not math.isnan(float(x)) else float("nan")

    total = cm.sum()
    return {
        "mIoU": pct(iou.nanmean()) if not torch.isnan(iou).all() else float("nan"),
        "mAcc": pct(acc.nanmean()) if not torch.isnan(acc).all() else float("nan"),
        "aAcc": pct(tp.sum() / total) if total > 0 else float("nan"),
        "pixels": int(total),
        "per_class": [{"class": n, "IoU": pct(i), "Acc": pct(a), "pixels": int(c)}
                      for n, i, a, c in zip(names, iou, acc, label_count)],
    }


def format_scores(result: Dict[str, Any]) -> str:
    """A per-class table followed by the summary line."""
    width = max([len("class")] + [len(r["class"]) for r in result["per_class"]])
    lines = [f"{'class':<{width}}  {'IoU':>7}  {'Acc':>7}", "-" * (width + 18)]
    for r in result["per_class"]:
        lines.append(f"{r['class']:<{width}}  {r['IoU']:>7.2f}  {r['Acc']:>7.2f}")
    lines.append(f"mIoU {result['mIoU']:.2f}  mAcc {result['mAcc']:.2f}  aAcc {result['aAcc']:.2f}")
    return "\n".join(lines)


def plot_per_class(result: Dict[str, Any], out_png: str | Path, title: str = "") -> Path:
    """Horizontal bar chart of per-class IoU (classes absent from the data are left out)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["per_class"] if not math.isnan(r["IoU"])]
    fig, ax = plt.subplots(figsize=(7, max(2.5, 0.22 * len(rows) + 1)))
    ax.barh([r["class"] for r in rows][::-1], [r["IoU"] for r in rows][::-1], color="tab:blue")
    ax.axvline(result["mIoU"], color="tab:red", linestyle="--", label=f"mIoU {result['mIoU']:.2f}")
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.tick_params(axis="y", labelsize=7 if len(rows) > 40 else 9)
    ax.legend(loc="lower right")
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, out_png)
