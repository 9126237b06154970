"""GPU benchmark: Mask R-CNN and Cascade Mask R-CNN at 1333x800 on RMT, ConvNeXt-T and ResNet-50 FPNs.

Every backbone sits under the same torchvision FPN and the same detector (this package's
``build_detector``: Mask R-CNN, or Cascade Mask R-CNN with its 4conv1fc heads), built in the same
process. ConvNeXt-T and ResNet-50 are timm's ``convnext_tiny`` / ``resnet50`` (features of
strides 4-32, BatchNorm trainable like RMT's). Weights are random.

Training: batch 2 (one GPU of the paper's 8x2 recipe), bf16 autocast, forward with 10 random boxes
and masks per image + backward + AdamW step. Inference: batch 2, bf16 autocast, forward only (RPN,
box and mask heads, post-processing, mask pasting). RMT runs the detection MaSA forms (TTTF) with
the default (fastest available) MaSA implementation. The detection heads' cost depends a little
on how many boxes survive, so treat inference figures as indicative.

Prints one Markdown table (images/s, s per step, peak memory) and writes JSON. Without CUDA it
prints why and exits 0; ``--smoke`` runs everything on the CPU at a tiny size (narrow RMT, few
proposals, one step) to check the script. About 3-4 minutes on one H100.

    python benchmarks/detection.py                                   # the full table
    python benchmarks/detection.py --smoke                           # CPU check, ~1 minute
    python benchmarks/detection.py --models rmt_base --detectors retinanet
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
import torchvision

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # run from a checkout too

from rmt.benchmark import time_step, environment, save_rows  # noqa: E402  (median of CUDA-event timings)
from rmt.detection.models import DETECTORS, build_detector  # noqa: E402

MODELS = ("rmt_tiny", "rmt_small", "convnext_tiny", "resnet50")
DETECTOR_NAMES = ("mask_rcnn", "cascade_mask_rcnn")
# --smoke: a narrow RMT and light heads, so that every combination runs on a CPU in seconds
SMOKE_RMT = dict(embed_dims=(16, 32, 64, 128), depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8))
SMOKE_HEADS = dict(rpn_pre_nms_top_n_train=200, rpn_post_nms_top_n_train=100, rpn_pre_nms_top_n_test=200,
                   rpn_post_nms_top_n_test=100, box_batch_size_per_image=64, fpn_channels=32, mask_head_channels=32,
                   box_head_size=64)


def _peak_mib(device: torch.device) -> Optional[float]:
    return round(torch.cuda.max_memory_allocated(device) / 2**20) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def synthetic_batch(batch: int, height: int, width: int, objects: int, num_classes: int,
                    device: torch.device) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """``batch`` random images in [0, 1] with ``objects`` random boxes, labels and box-shaped masks each."""
    g = torch.Generator().manual_seed(0)
    images, targets = [], []
    for _ in range(batch):
        xy = torch.rand(objects, 2, generator=g) * torch.tensor([width * 0.8, height * 0.8])
        wh = (torch.rand(objects, 2, generator=g) * 0.3 + 0.05) * torch.tensor([width, height])
        boxes = torch.cat([xy, (xy + wh).minimum(torch.tensor([width - 1.0, height - 1.0]))], 1)
        masks = torch.zeros(objects, height, width, dtype=torch.uint8)
        for m, (x0, y0, x1, y1) in zip(masks, boxes.round().long().tolist()):
            m[y0:y1, x0:x1] = 1
        images.append(torch.rand(3, height, width, generator=g).to(device))
        targets.append(dict(boxes=boxes.to(device), masks=masks.to(device),
                            labels=torch.randint(1, num_classes + 1, (objects,), generator=g).to(device)))
    return images, targets


def bench_one(model_name: str, detector: str, device: torch.device, height: int, width: int, batch: int,
              steps: int, warmup: int, amp: bool = True, num_classes: int = 80, masa_impl: str = "auto",
              backbone_kwargs: Optional[Dict[str, Any]] = None,
              detector_kwargs: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Training and inference throughput of one detector; returns a result row."""
    torch.manual_seed(0)
    is_rmt = model_name.startswith("rmt")
    kwargs = dict(backbone_kwargs or {}, masa_impl=masa_impl, drop_path_rate=0.0) if is_rmt else {}
    model = build_detector(detector, model_name, num_classes, min_size=min(height, width),
                           max_size=max(height, width), attn_forms="TTTF", backbone_kwargs=kwargs,
                           **(detector_kwargs or {})).to(device)
    params = sum(p.numel() for p in model.parameters())
    backbone_params = sum(p.numel() for p in model.backbone.body.parameters())
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4,
                                  weight_decay=0.05, fused=device.type == "cuda")
    images, targets = synthetic_batch(batch, height, width, 10, num_classes, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def train_step() -> None:
        with autocast:
            losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    row: Dict[str, Any] = dict(
        model=model_name, detector=detector, size=f"{width}x{height}", batch=batch,
        params_m=round(params / 1e6, 2), backbone_params_m=round(backbone_params / 1e6, 2),
        precision="bf16" if amp else "fp32", masa_impl=masa_impl if is_rmt else "-", attn_forms="".join(
            "T" if f == "decomposed" else "F" for f in model.backbone.rmt.attention_forms) if is_rmt else "-")
    _reset_peak(device)
    model.train()
    train_s = time_step(train_step, device, warmup, steps)
    row.update(train_img_s=round(batch / train_s, 2), train_s_step=round(train_s, 3),
               train_peak_mib=_peak_mib(device))

    del optimizer
    _reset_peak(device)
    model.eval()
    with torch.inference_mode(), autocast:
        infer_s = time_step(lambda: model(images), device, warmup, steps)
        detections = sum(len(o["boxes"]) for o in model(images)) / batch
    row.update(infer_img_s=round(batch / infer_s, 2), infer_ms=round(1000 * infer_s, 1),
               infer_peak_mib=_peak_mib(device), detections_per_img=round(detections, 1))
    del model
    return row


def format_table(rows: List[Dict[str, Any]]) -> str:
    head = ("| model | detector | size | batch | params (M) | backbone (M) | precision | train img/s | train s/step | "
            "train peak MiB | infer img/s | infer ms/batch | infer peak MiB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    keys = ("model", "detector", "size", "batch", "params_m", "backbone_params_m", "precision", "train_img_s",
            "train_s_step", "train_peak_mib", "infer_img_s", "infer_ms", "infer_peak_mib")
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(k, r.get("note", "-"))) for k in keys) + " |")
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), help=f"backbones (default {' '.join(MODELS)})")
    p.add_argument("--detectors", nargs="+", default=list(DETECTOR_NAMES), choices=DETECTORS,
                   help=f"detectors (default {' '.join(DETECTOR_NAMES)})")
    p.add_argument("--size", default="1333x800", help="WxH of the input images (default 1333x800)")
    p.add_argument("--batch", type=int, default=2, help="images per step (default 2, per GPU in the paper)")
    p.add_argument("--steps", type=int, default=10, help="timed iterations (default 10)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--fp32", action="store_true", help="no bf16 autocast")
    p.add_argument("--masa-impl", default="auto", help="MaSA implementation (default auto: the fastest available)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--backbone-kwargs", default=None, help="JSON of timm.create_model arguments for RMT")
    p.add_argument("--smoke", action="store_true", help="CPU, 128x96, fp32, one step, narrow RMT, light heads")
    p.add_argument("--json", default="benchmarks/results/detection.json", help="output JSON path")
    args = p.parse_args(argv)
    detector_kwargs = None
    if args.smoke:
        args.device, args.size, args.fp32, args.steps, args.warmup = "cpu", "128x96", True, 1, 0
        detector_kwargs = SMOKE_HEADS
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("detection benchmark skipped: no CUDA device (it measures GPU throughput; --smoke checks it on CPU)")
        return 0
    device = torch.device(args.device)
    width, height = (int(v) for v in args.size.lower().split("x"))
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        # no cudnn.benchmark: the mask heads see a different number of ROIs every training step,
        # and cuDNN would search algorithms again for each new shape
    kwargs = json.loads(args.backbone_kwargs) if args.backbone_kwargs else (SMOKE_RMT if args.smoke else None)
    rows = []
    print(format_table([]))
    for detector in args.detectors:
        for name in args.models:
            try:
                rows.append(bench_one(name, detector, device, height, width, args.batch, args.steps, args.warmup,
                                      amp=not args.fp32, masa_impl=args.masa_impl, backbone_kwargs=kwargs,
                                      detector_kwargs=detector_kwargs if "rcnn" in detector else None))
            except torch.OutOfMemoryError:
                rows.append(dict(model=name, detector=detector, size=f"{width}x{height}", batch=args.batch,
                                 note="out of memory"))
                torch.cuda.empty_cache()
            print(format_table(rows[-1:]).splitlines()[-1], flush=True)
    env = dict(environment(device), torchvision=torchvision.__version__)
    print(f"\n{env['device']}, torch {env['torch']}, torchvision {env['torchvision']}, timm {env['timm']}\n")
    print(format_table(rows))
    save_rows(args.json, env, vars(args), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
