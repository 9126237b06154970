"""Top-k class labels of image files with a trained classifier checkpoint.

The class names, input size and normalisation come from the checkpoint written by rmt train
(EMA weights when present); released ImageNet checkpoints print class indices.

examples:
  rmt predict runs/demo/best.pth shoe.png shirt.png
  rmt predict runs/demo/best.pth images/ --top-k 3 --json
  rmt predict runs/demo/best.pth images/ --skip-bad-images   # name unreadable files, predict the rest
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint file (.pth from rmt train, released .pth, or .safetensors)")
    p.add_argument("images", nargs="+", help="image files, or folders of images")
    p.add_argument("--top-k", type=int, default=5, help="labels per image (default 5)")
    p.add_argument("--model", default=None, help="variant, for released files (default: recognised from shapes)")
    p.add_argument("--no-ema", action="store_true", help="use the trained weights, not the EMA")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--skip-bad-images", action="store_true",
                   help="skip unreadable images (named on stderr, an 'error' record in the JSON) and predict the rest")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def run(args: argparse.Namespace) -> int:
    import json
    import sys

    from ..classification.predict import load_classifier, predict
    from ..images import list_images
    if args.top_k < 1:
        raise ValueError("--top-k must be at least 1")
    paths = list_images(args.images)
    clf = load_classifier(args.checkpoint, args.model, prefer_ema=not args.no_ema, device=args.device)
    results = predict(clf, paths, args.top_k, skip_bad=args.skip_bad_images)
    skipped = [r for r in results if "error" in r]
    for r in skipped:
        print(f"skipped: {r['error']}", file=sys.stderr)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            if "top" in r:
                labels = ", ".join(f"{t['label']} {100 * t['probability']:.1f}%" for t in r["top"])
                print(f"{r['image']}: {labels}")
    if skipped:
        print(f"{len(skipped)} of {len(results)} images skipped", file=sys.stderr)
    return 1 if len(skipped) == len(results) else 0
