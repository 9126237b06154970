"""Object detection and instance segmentation with RMT backbones on torchvision detectors
(Mask R-CNN, Cascade Mask R-CNN, RetinaNet, FCOS), on COCO-format data (an image folder and an
instances JSON).

  train    train a detector. --recipe NAME trains a released config (rmt detect recipes lists
           them); without one, the released recipe of the detector, variant and schedule gives
           the defaults (e.g. Mask R-CNN RMT-T 1x: AdamW lr 4e-4 at batch 16 scaled linearly,
           weight decay 0.05, drop path 0.1, 12 epochs, LR x0.1 after epochs 8 and 11, 500
           warm-up iterations; 3x: 36 epochs, multi-scale training and the random-crop policy).
           Writes OUT/last.pth (atomic; --resume continues exactly), OUT/log.jsonl and
           OUT/curves.png, and prints COCO box/mask AP. Multi-GPU with torchrun; bf16 on CUDA.
  eval     COCO box (and mask) AP of a trained checkpoint or a released mmdetection detector
  predict  PNGs with drawn boxes/masks and detections.json for image files or folders
  recipes  the released recipes with the paper's AP
  shapes   write the built-in shapes dataset (COCO format) to a folder

--data ROOT reads ROOT/annotations/instances_{train,val}[2017].json and images in
ROOT/{train,val}[2017]/; --data shapes generates the built-in dataset under OUT/shapes_data.

examples:
  rmt detect train --data shapes --out runs/shapes --shapes-size 256 --min-size 256 --max-size 256 \\
      --epochs 12 --batch-size 4 --lr 1e-3 --warmup-iters 50 --device cpu
  torchrun --nproc_per_node 8 -m rmt detect train --data /data/coco --recipe casrcnn_m_3x \\
      --pretrained RMT-B.pth --out runs/casrcnn_m_3x
  rmt detect train --resume runs/casrcnn_m_3x/last.pth
  rmt detect eval runs/shapes/last.pth
  rmt detect eval released_cascade_rmt_b.pth --data /data/coco     # a released mmdetection file
  rmt detect predict runs/shapes/last.pth photos/ --out predictions --score-threshold 0.5
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Dict

# train options whose values make up the run's settings (rmt.detection.config.TrainConfig)
_JSON_OPTIONS = ("backbone_kwargs", "detector_kwargs")


def add_arguments(p: argparse.ArgumentParser) -> None:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, add, help_text in (("train", _add_train, "train a detector"),
                                 ("eval", _add_eval, "COCO AP of a trained checkpoint"),
                                 ("predict", _add_predict, "draw and save detections for images"),
                                 ("recipes", lambda p: None, "list the released training recipes"),
                                 ("shapes", _add_shapes, "write the built-in shapes dataset")):
        add(sub.add_parser(name, help=help_text, description=__doc__, parents=[common],
                           formatter_class=argparse.RawDescriptionHelpFormatter))


def _add_train(p: argparse.ArgumentParser) -> None:
    # every default is None: only options given explicitly enter the settings (see merge_config)
    d = p.add_argument_group("data")
    d.add_argument("--data", help="COCO-style root folder, or 'shapes' for the built-in dataset")
    for split in ("train", "val"):
        d.add_argument(f"--{split}-images", help=f"{split} image folder (overrides --data)")
        d.add_argument(f"--{split}-ann", help=f"{split} instances JSON (overrides --data)")
    d.add_argument("--shapes-size", type=int, help="image size of the built-in dataset (default 256)")
    d.add_argument("--recipe", help="a released config (rmt detect recipes), e.g. maskrcnn_s_1x or casrcnn_m_3x; "
                                    "it sets detector, model, schedule, lr, weight decay, drop path, MaSA forms")
    m = p.add_argument_group("model")
    m.add_argument("--detector", help="mask_rcnn (default), cascade_mask_rcnn, retinanet or fcos")
    m.add_argument("--model", help="rmt_tiny (default), rmt_small, rmt_base, rmt_large")
    m.add_argument("--pretrained", help="backbone checkpoint: ImageNet (ours/released) or a detection "
                                        "checkpoint (released mmdet layout or ours)")
    m.add_argument("--backbone-kwargs", help="JSON of extra timm.create_model arguments, e.g. "
                                             "'{\"drop_path_rate\": 0.2}'")
    m.add_argument("--detector-kwargs", help="JSON of extra torchvision detector arguments, e.g. "
                                             "'{\"box_batch_size_per_image\": 256}'")
    m.add_argument("--attn-forms", help="MaSA form per stage (T = decomposed, F = full; default: the recipe's, "
                                        "TTFF for rmt_tiny and TTTF otherwise)")
    m.add_argument("--drop-path", type=float, help="backbone drop path (default: the recipe's, 0.1/0.15/0.4/0.5 "
                                                   "for T/S/B/L)")
    m.add_argument("--frozen-stages", type=int, help="-1 (default) trains all; 0 freezes the stem; "
                                                     "k also stages 0..k-1")
    m.add_argument("--bn", choices=("sync", "batch", "frozen"),
                   help="backbone BatchNorm: sync (default; SyncBatchNorm under multi-GPU), batch, frozen")
    m.add_argument("--fpn-channels", type=int, help="FPN width (default 256)")
    m.add_argument("--mask-head-channels", type=int, help="mask head conv width (default 256)")
    m.add_argument("--box-head-size", type=int, help="box head FC width (default 1024)")
    s = p.add_argument_group("schedule")
    s.add_argument("--schedule", choices=("1x", "3x"), help="1x (default: 12 epochs) or 3x (36, multi-scale)")
    s.add_argument("--epochs", type=int, help="override the schedule's length (LR steps scale along)")
    s.add_argument("--milestones", type=int, nargs="+", help="epochs after which the LR drops x0.1")
    s.add_argument("--multiscale", action=argparse.BooleanOptionalAction,
                   help="shorter side drawn from 0.6x..1x --min-size per image (default: on for 3x)")
    s.add_argument("--crop", action=argparse.BooleanOptionalAction,
                   help="the 3x random-crop policy on half of the images (default: on for 3x)")
    s.add_argument("--lr", type=float, help="peak LR (default: the recipe's, 4e-4 or 2e-4, x total batch / 16)")
    s.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: the recipe's, 0.05; "
                                                      "RetinaNet 1e-4)")
    s.add_argument("--warmup-iters", type=int, help="linear warm-up iterations (default 500)")
    s.add_argument("--batch-size", type=int, help="images per process (default 2)")
    s.add_argument("--min-size", type=int, help="shorter image side (default 800; shapes: its image size)")
    s.add_argument("--max-size", type=int, help="longer image side limit (default 1333; shapes: its image size)")
    s.add_argument("--clip-grad", type=float, help="clip the gradient norm (default off)")
    s.add_argument("--seed", type=int, help="seed (default 0)")
    r = p.add_argument_group("run")
    r.add_argument("--out", help="output folder (default runs/detect)")
    r.add_argument("--resume", help="continue the run saved in this last.pth (its settings are kept)")
    r.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    r.add_argument("--amp", choices=("bf16", "none"), help="bf16 autocast (default: bf16 on CUDA)")
    r.add_argument("--workers", type=int, help="data loader processes per GPU (default 4)")
    r.add_argument("--log-every", type=int, help="iterations between log lines (default 20)")
    r.add_argument("--save-every", type=int, help="iterations between checkpoints (default 500; 0: epochs only)")
    r.add_argument("--eval-every", type=int, help="epochs between evaluations (default 1; 0: at the end)")
    r.add_argument("--max-steps", type=int, help="stop after this many iterations (checkpoint kept)")
    r.add_argument("--skip-bad-images", action="store_true", default=None,
                   help="count, name and skip training images that cannot be loaded (default: stop, after "
                        "saving a checkpoint to resume from)")


def _add_common_inference(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="last.pth written by 'rmt detect train', or a released mmdetection 2.x "
                                      "Mask R-CNN / Cascade Mask R-CNN / RetinaNet file")
    p.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    p.add_argument("--amp", choices=("bf16", "none"), help="bf16 autocast (default: bf16 on CUDA)")
    p.add_argument("--min-size", type=int, help="shorter image side (default: the training setting; released: 800)")
    p.add_argument("--max-size", type=int, help="longer side limit (default: the training setting; released: 1333)")
    r = p.add_argument_group("released files (read from the file when not given)")
    r.add_argument("--detector", help="expected detector: the file must be one (mask_rcnn, cascade_mask_rcnn, retinanet)")
    r.add_argument("--model", help="expected RMT variant (needed for a backbone that is no registered variant)")
    r.add_argument("--backbone-kwargs", help="JSON of timm.create_model arguments for such a backbone")
    r.add_argument("--attn-forms", help="MaSA forms (default: the file's config, else TTFF for rmt_tiny, TTTF)")


def _add_eval(p: argparse.ArgumentParser) -> None:
    _add_common_inference(p)
    p.add_argument("--data", help="COCO-style root (default: the training run's)")
    p.add_argument("--split", default="val", help="split under --data (default val)")
    p.add_argument("--images", help="image folder (overrides --data)")
    p.add_argument("--ann", help="instances JSON (overrides --data)")
    p.add_argument("--batch-size", type=int, help="images per batch (default 2; released files 1, as mmdetection "
                                                  "tests: RMT features depend on the padding)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-images", type=int, help="evaluate the first N images only")
    p.add_argument("--json", help="also write the metrics to this JSON file")


def _add_predict(p: argparse.ArgumentParser) -> None:
    _add_common_inference(p)
    p.add_argument("inputs", nargs="+", help="image files and/or folders of images")
    p.add_argument("--out", default="predictions", help="output folder (default predictions)")
    p.add_argument("--score-threshold", type=float, default=0.5, help="keep detections scoring at least this")


def _add_shapes(p: argparse.ArgumentParser) -> None:
    p.add_argument("root", help="folder to write (train/, val/, annotations/)")
    p.add_argument("--train", type=int, default=300, help="training images (default 300)")
    p.add_argument("--val", type=int, default=60, help="validation images (default 60)")
    p.add_argument("--size", type=int, default=256, help="image size (default 256)")
    p.add_argument("--seed", type=int, default=0)


def run(args: argparse.Namespace) -> int:
    return {"train": _run_train, "eval": _run_eval, "predict": _run_predict, "shapes": _run_shapes,
            "recipes": _run_recipes}[args.action](args)


def _run_recipes(args: argparse.Namespace) -> int:
    from ..detection.recipes import recipes_table
    print("released detection recipes (AdamW; lr at a total batch of 16; paper AP on COCO val2017):\n")
    print(recipes_table())
    return 0


def _explicit_settings(args: argparse.Namespace) -> Dict[str, Any]:
    from dataclasses import fields

    from ..detection.config import TrainConfig
    names = {f.name for f in fields(TrainConfig)}
    explicit = {k: v for k, v in vars(args).items() if k in names and v is not None}
    for key in _JSON_OPTIONS:
        if key in explicit:
            explicit[key] = _json_object(explicit[key], key)
    return explicit


def _json_object(text: str, key: str) -> Dict[str, Any]:
    """The JSON object given to option ``--key`` (ValueError naming the option otherwise)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--{key.replace('_', '-')} must be a JSON object, got {text!r} ({e})")
    if not isinstance(value, dict):
        raise ValueError(f"--{key.replace('_', '-')} must be a JSON object like '{{\"a\": 1}}'")
    return value


def _run_train(args: argparse.Namespace) -> int:
    from ..detection.engine import train
    train(_explicit_settings(args), resume=args.resume)
    return 0


def _amp(choice, device) -> bool:
    return (choice or ("bf16" if device.type == "cuda" else "none")) == "bf16"


def _run_eval(args: argparse.Namespace) -> int:
    from ..detection.data import CocoInstances, find_split
    from ..detection.engine import evaluate, load_detector, resolve_split
    from ..engine import cleanup_distributed, setup_distributed
    from ..detection.evaluation import format_metrics
    from ..detection.models import detector_has_masks
    info = setup_distributed(args.device)
    try:
        model, meta = load_detector(args.checkpoint, info.device, args.min_size, args.max_size,
                                    **_released_options(args))
        cfg = meta["config"]
        if args.images and args.ann:
            images, ann = Path(args.images), Path(args.ann)
        elif args.data:
            images, ann = find_split(args.data, args.split)
            images, ann = Path(args.images or images), Path(args.ann or ann)
        else:
            images, ann = resolve_split(cfg, "val")
        dataset = CocoInstances(images, ann, train=False, with_masks=False)
        if dataset.cat_ids != list(meta["cat_ids"]):
            raise ValueError(f"'{ann}' has categories {dataset.class_names}, the checkpoint {meta['classes']}")
        batch = args.batch_size or (1 if meta["released"] else 2)
        metrics = evaluate(model, dataset, info, _amp(args.amp, info.device), detector_has_masks(cfg.detector),
                           batch, args.workers, args.max_images)
        if info.is_main:
            source = "released" if meta["released"] else f"step {meta['step']}"
            print(f"{cfg.detector} {cfg.model} (epoch {meta['epoch']}, {source}) on "
                  f"{metrics['num_images']} images of {ann}:\n{format_metrics(metrics)}")
            if args.json:
                Path(args.json).write_text(json.dumps(metrics, indent=1))
    finally:
        cleanup_distributed()
    return 0


def _run_predict(args: argparse.Namespace) -> int:
    import torch
    from ..detection.engine import load_detector
    from ..detection.predict import predict_images
    from ..images import list_images
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    paths = list_images(args.inputs)
    model, meta = load_detector(args.checkpoint, device, args.min_size, args.max_size, **_released_options(args))
    json_path = predict_images(model, paths, args.out, meta["classes"], meta["cat_ids"], device,
                               args.score_threshold, _amp(args.amp, device))
    print(f"wrote {len(paths)} images with detections to {args.out}/ and {json_path}")
    return 0


def _released_options(args: argparse.Namespace) -> Dict[str, Any]:
    kwargs = _json_object(args.backbone_kwargs, "backbone_kwargs") if args.backbone_kwargs else None
    return dict(detector=args.detector, model_name=args.model, backbone_kwargs=kwargs, attn_forms=args.attn_forms)


def _run_shapes(args: argparse.Namespace) -> int:
    from ..detection.shapes import write_shapes_dataset
    root = write_shapes_dataset(args.root, args.train, args.val, args.size, args.seed)
    print(f"wrote the shapes dataset to {root}/ ({args.train} train, {args.val} val images of {args.size} px)")
    return 0
