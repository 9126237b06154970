"""Semantic segmentation with RMT backbones: Semantic FPN or UperNet on ADE20K-layout data.

  train    train (or resume) with the paper's recipe for the head; torchrun for several GPUs
  eval     mIoU and per-class IoU of a trained or released model, single-scale or multi-scale + flip
  predict  colour overlays and label maps for image files

The decoders are mmsegmentation's (--decoder mmseg, the default: the released architecture, whose
checkpoints eval and predict load whole) or segmentation_models_pytorch's (--decoder smp).

Datasets use the ADE20K layout (images/{training,validation}/NAME.jpg and
annotations/{training,validation}/NAME.png, 255 = ignore); --data synthetic writes a small
built-in dataset of shapes to OUT/data and uses it.

examples:
  rmt segment train --data synthetic --model rmt_tiny --head fpn --iters 200 --batch-size 8 \\
      --lr 1e-3 --eval-interval 50 --out runs/seg-demo
  torchrun --nproc_per_node 8 -m rmt segment train --data ADEChallengeData2016 \\
      --model rmt_small --head upernet --pretrained RMT-S.pth --out runs/upernet-s
  rmt segment train --out runs/upernet-s --resume
  rmt segment eval runs/upernet-s/best.safetensors --data ADEChallengeData2016 --ms --flip
  rmt segment predict runs/seg-demo/best.safetensors photo.jpg photos/ --out predictions
  rmt segment eval RMT_Uper_s_2x.pth --data ADEChallengeData2016      # a released segmentor, whole
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path


def _add_inference_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("inference (defaults: a released file's config, else the training settings)")
    g.add_argument("--model", default=None, help="fail unless the file is this RMT variant")
    g.add_argument("--head", choices=("fpn", "upernet"), default=None, help="fail unless the file has this head")
    g.add_argument("--mode", choices=("auto", "whole", "slide"), default=None,
                   help="whole image, sliding window, or auto: sliding window when the resized image "
                        "has more than four crops' worth of pixels (default: the config's mode for a "
                        "released checkpoint, else auto)")
    g.add_argument("--scale", default=None,
                   help="test scale LONGxSHORT the image is resized into, keeping its aspect ratio "
                        "(default: the training or config scale, 2048x512 for ADE20K); 'none' keeps sizes")
    g.add_argument("--crop-size", default=None, help="sliding-window size N or HxW (default: training crop)")
    g.add_argument("--stride", default=None, help="sliding-window stride N or HxW (default: the config's, "
                                                  "else 2/3 of the crop)")
    g.add_argument("--ms", action="store_true", help="multi-scale test: ratios 0.5,0.75,1.0,1.25,1.5,1.75")
    g.add_argument("--ratios", default=None, help="comma-separated scale ratios (implies multi-scale)")
    g.add_argument("--flip", action="store_true", help="also run on horizontally flipped images")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast (auto: on CUDA only)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    t = sub.add_parser("train", help="train or resume a segmentation model",
                       description="Train Semantic FPN or UperNet with the paper's recipe (defaults below); "
                                   "run under torchrun for several GPUs (--batch-size is the total).")
    t.add_argument("--data", default=None,
                   help="ADE20K-layout dataset folder, or 'synthetic' (required unless --resume)")
    t.add_argument("--out", default="runs/segment", help="output folder (default runs/segment)")
    t.add_argument("--model", default="rmt_small", help="rmt_tiny, rmt_small, rmt_base or rmt_large")
    t.add_argument("--head", choices=("fpn", "upernet"), default="upernet",
                   help="fpn: Semantic FPN, 80k recipe; upernet: 160k recipe (default)")
    t.add_argument("--decoder", choices=("mmseg", "smp"), default="mmseg",
                   help="mmseg: mmsegmentation's FPN/UperNet as released (default); smp: "
                        "segmentation_models_pytorch's")
    t.add_argument("--pretrained", default=None,
                   help="backbone checkpoint: ours, a released classification file or a released "
                        "segmentation/detection file (mmseg/mmdet layout)")
    t.add_argument("--classes", default=None,
                   help="'ade20k', a .json list or a text file of class names (default: the dataset's "
                        "dataset.json, else ADE20K's 150)")
    t.add_argument("--reduce-zero-label", action=argparse.BooleanOptionalAction, default=None,
                   help="label 0 is 'other' (ignored) and classes start at 1, as in ADE20K "
                        "(default: dataset.json, else on)")
    t.add_argument("--iters", type=int, default=None, help="iterations (default 80000 fpn, 160000 upernet)")
    t.add_argument("--batch-size", type=int, default=16, help="total batch over all processes (default 16)")
    t.add_argument("--lr", type=float, default=None, help="peak learning rate (default 1e-4 fpn, 6e-5 upernet)")
    t.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 1e-4 fpn, 0.01 upernet)")
    t.add_argument("--warmup-iters", type=int, default=None, help="linear warm-up (default 0 fpn, 1500 upernet)")
    t.add_argument("--aux-weight", type=float, default=None,
                   help="auxiliary FCN head loss weight; 0 = no auxiliary head (default 0 fpn, 0.4 upernet)")
    t.add_argument("--crop-size", default=None, help="training crop N or HxW (default 512, or dataset.json)")
    t.add_argument("--scale", default=None, help="resize scale LONGxSHORT before the 0.5-2.0 random ratio "
                                                 "(default 2048x512, or dataset.json)")
    t.add_argument("--drop-path", type=float, default=None, help="backbone drop-path rate (default: the variant's)")
    t.add_argument("--backbone-kwargs", default=None,
                   help="JSON of extra timm.create_model arguments, e.g. '{\"attn_forms\": \"TTTT\"}'")
    t.add_argument("--grad-checkpointing", action="store_true", help="trade compute for backbone memory")
    t.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="bf16 autocast (auto: on CUDA only)")
    t.add_argument("--eval-interval", type=int, default=None, help="evaluate every N iterations "
                                                                   "(default 4000 fpn, 8000 upernet)")
    t.add_argument("--checkpoint-interval", type=int, default=1000, help="write OUT/last.pt every N iterations")
    t.add_argument("--log-interval", type=int, default=50, help="log every N iterations")
    t.add_argument("--workers", type=int, default=4, help="data-loading processes per GPU")
    t.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue OUT/last.pt (or the checkpoint given) exactly where it stopped")
    t.add_argument("--stop-after", type=int, default=None,
                   help="stop after N iterations of this run, saving a checkpoint (e.g. to fit a job limit)")
    t.add_argument("--skip-bad-images", action="store_true",
                   help="count, name and skip training pairs that cannot be loaded (default: stop, after "
                        "saving a checkpoint to resume from)")
    t.add_argument("--debug", action="store_true", help="show full tracebacks")

    e = sub.add_parser("eval", help="mIoU and per-class IoU of a trained or released model",
                       description="Evaluate a model written by 'rmt segment train' (last.pt, best.safetensors "
                                   "or model.safetensors) or a released mmsegmentation segmentor "
                                   "(RMT_FPN_*, RMT_Uper_*), tested as its config says; several GPUs with "
                                   "torchrun.")
    e.add_argument("checkpoint", help="trained model file or released segmentor checkpoint")
    e.add_argument("--data", required=True, help="ADE20K-layout dataset folder")
    e.add_argument("--split", default="validation", help="split to evaluate (default validation)")
    e.add_argument("--out", default=None, help="write metrics.json and per_class_iou.png here")
    e.add_argument("--workers", type=int, default=2)
    e.add_argument("--max-images", type=int, default=None, help="evaluate only the first N images")
    e.add_argument("--debug", action="store_true", help="show full tracebacks")
    _add_inference_arguments(e)

    r = sub.add_parser("predict", help="colour overlays and label maps for images",
                       description="Write NAME_overlay.png (colour overlay with a legend) and NAME_mask.png "
                                   "(class ids in the dataset's convention) for every image.")
    r.add_argument("checkpoint", help="trained model file or released segmentor checkpoint")
    r.add_argument("inputs", nargs="+", help="image files or folders of images")
    r.add_argument("--out", default="predictions", help="output folder (default predictions)")
    r.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    r.add_argument("--no-legend", action="store_true", help="no class legend under the overlay")
    r.add_argument("--debug", action="store_true", help="show full tracebacks")
    _add_inference_arguments(r)


def _inference_options(args: argparse.Namespace, spec: dict) -> dict:
    """Test settings: the flags, else the spec's (a released config's or the training run's)."""
    from ..segmentation.data import parse_size
    from ..segmentation.inference import MS_RATIOS
    if args.scale is not None and args.scale.lower() == "none":
        scale = None
    else:
        scale = parse_size(args.scale) if args.scale else tuple(spec.get("scale") or (2048, 512))
    crop = parse_size(args.crop_size) if args.crop_size else tuple(spec.get("crop_size") or (512, 512))
    if args.stride:
        stride = parse_size(args.stride)
    elif spec.get("stride") and not args.crop_size:
        stride = tuple(spec["stride"])
    else:
        stride = (max(crop[0] * 2 // 3, 1), max(crop[1] * 2 // 3, 1))
    if args.ratios:
        try:
            ratios = tuple(float(r) for r in args.ratios.split(","))
        except ValueError:
            raise ValueError(f"--ratios {args.ratios!r} must be comma-separated numbers") from None
    else:
        ratios = MS_RATIOS if args.ms else tuple(spec.get("ratios") or (1.0,))
    mode = args.mode or spec.get("test_mode", "auto")
    flip = args.flip or bool(spec.get("flip"))
    return dict(scale=scale, crop=crop, stride=stride, ratios=ratios, flip=flip, mode=mode)


def _describe_settings(spec: dict, opts: dict) -> str:
    scale = "original size" if opts["scale"] is None else f"{opts['scale'][0]}x{opts['scale'][1]} (keep ratio)"
    window = (f", crop {opts['crop'][0]}x{opts['crop'][1]} stride {opts['stride'][0]}x{opts['stride'][1]}"
              if opts["mode"] != "whole" else "")
    ratios = opts["ratios"]
    test = "multi-scale " + ",".join(f"{r:g}" for r in ratios) if len(ratios) > 1 else "single-scale"
    source = "released " if spec.get("released") else ""
    return (f"{source}{spec['head']} on {spec['model']} ({spec.get('decoder', 'smp')} decoder): "
            f"mode {opts['mode']}{window}, scale {scale}, {test}{' + flip' if opts['flip'] else ''}")


def _amp(precision: str, device) -> bool:
    return precision == "bf16" or (precision == "auto" and device.type == "cuda")


def run_train(args: argparse.Namespace) -> int:
    from ..segmentation.data import parse_size
    from ..segmentation.engine import TrainConfig, train
    if args.data is None and args.resume is None:
        raise ValueError("--data is required (a dataset folder or 'synthetic') unless resuming with --resume")
    try:
        backbone_kwargs = json.loads(args.backbone_kwargs) if args.backbone_kwargs else {}
    except json.JSONDecodeError as e:
        raise ValueError(f"--backbone-kwargs is not valid JSON ({e})") from None
    cfg = TrainConfig(
        data=args.data or "", out=args.out, model=args.model, head=args.head, decoder=args.decoder,
        pretrained=args.pretrained,
        classes=args.classes, reduce_zero_label=args.reduce_zero_label, iterations=args.iters,
        batch_size=args.batch_size, lr=args.lr, weight_decay=args.weight_decay,
        warmup_iters=args.warmup_iters, aux_weight=args.aux_weight,
        crop_size=parse_size(args.crop_size) if args.crop_size else None,
        scale=parse_size(args.scale) if args.scale else None, drop_path_rate=args.drop_path,
        backbone_kwargs=backbone_kwargs, grad_checkpointing=args.grad_checkpointing,
        precision=args.precision, eval_interval=args.eval_interval,
        checkpoint_interval=args.checkpoint_interval, log_interval=args.log_interval,
        workers=args.workers, device=args.device, seed=args.seed, resume=args.resume,
        stop_after=args.stop_after, skip_bad_images=args.skip_bad_images)
    result = train(cfg)
    if result and int(os.environ.get("RANK", "0")) == 0:
        from ..segmentation.metrics import format_scores
        print(format_scores(result))
        print(f"outputs in {args.out}: last.pt, best.safetensors, log.jsonl, curves.png, per_class_iou.png")
    return 0


def run_eval(args: argparse.Namespace) -> int:
    from ..engine import cleanup_distributed, setup_distributed
    from ..segmentation.data import EvalTransform, SegmentationFolder
    from ..segmentation.evaluation import evaluate, load_trained
    from ..segmentation.metrics import format_scores, plot_per_class
    dist = setup_distributed(args.device)
    try:
        model, spec = load_trained(args.checkpoint, dist.device, model=args.model, head=args.head,
                                   log=print if dist.is_main else (lambda *a: None))
        opts = _inference_options(args, spec)
        if dist.is_main:
            print(_describe_settings(spec, opts))
        dataset = SegmentationFolder(args.data, args.split, EvalTransform(), spec["reduce_zero_label"])
        result = evaluate(model, dataset, spec["num_classes"], dist, class_names=spec["class_names"],
                          amp=_amp(args.precision, dist.device), workers=args.workers,
                          max_images=args.max_images, **opts)
    finally:
        cleanup_distributed()
    if dist.is_main:
        print(format_scores(result))
        print(f"{result['images']} images; {_describe_settings(spec, opts)}")
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            result["settings"] = {k: (list(v) if isinstance(v, tuple) else v) for k, v in opts.items()}
            result["checkpoint"] = str(args.checkpoint)
            (out / "metrics.json").write_text(json.dumps(result, indent=2))
            plot_per_class(result, out / "per_class_iou.png", title=Path(args.checkpoint).name)
            print(f"wrote {out / 'metrics.json'} and {out / 'per_class_iou.png'}")
    return 0


def run_predict(args: argparse.Namespace) -> int:
    import torch
    from ..segmentation.evaluation import load_trained, predict_files
    if not 0.0 <= args.alpha <= 1.0:
        raise ValueError(f"--alpha must be between 0 and 1, got {args.alpha}")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, spec = load_trained(args.checkpoint, device, model=args.model, head=args.head)
    opts = _inference_options(args, spec)
    print(_describe_settings(spec, opts))
    written = predict_files(model, spec, args.inputs, args.out, device=device,
                            amp=_amp(args.precision, device), alpha=args.alpha,
                            legend=not args.no_legend, **opts)
    print(f"wrote {len(written)} overlays and label maps to {args.out}")
    return 0


def run(args: argparse.Namespace) -> int:
    return {"train": run_train, "eval": run_eval, "predict": run_predict}[args.action](args)
