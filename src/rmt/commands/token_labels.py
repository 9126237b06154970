"""Dense label maps for token labeling (docs/token-labels.md).

``make`` writes the top-5 per-token labels of a trained classifier (the teacher) for every training
image, in the token labeling toolbox's format, so that `rmt train --token-label OUT` can train a
token-label model without the published NFNet maps. The teacher's tokens are read by its aux head
when it has one, else by its classifier head applied per token.

examples:
  rmt token-labels make runs/teacher/best.pth /data/imagenet maps/        # DATA/train/CLASS/*.JPEG
  rmt token-labels make runs/fm/last.pth /usr/share/datasets/fashion-mnist fm-maps/ --dataset fashion-mnist
  rmt train --data /data/imagenet --token-label maps/ --model rmt_small
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    make = sub.add_parser("make", help="write the label maps of a data set's training split from a teacher",
                          description="Write dense top-k label maps of DATA's training split, computed by the "
                                      "teacher checkpoint, into OUT.")
    make.add_argument("teacher", help="teacher checkpoint: any classifier checkpoint rmt reads (rmt train, "
                                      "released or converted)")
    make.add_argument("data", help="data: an ImageFolder root (DATA/SPLIT/CLASS/img) or the Fashion-MNIST folder")
    make.add_argument("out", help="output folder of the maps")
    make.add_argument("--dataset", default="folder", help="folder (default) or fashion-mnist")
    make.add_argument("--split", default="train", help="split to label (default: train)")
    make.add_argument("--input-size", type=int, default=None,
                      help="image side the teacher sees (default: its training input size); the map grid is "
                           "this / 32")
    make.add_argument("--top-k", type=int, default=5, help="classes kept per token (default 5)")
    make.add_argument("--batch-size", type=int, default=128)
    make.add_argument("--workers", type=int, default=None,
                      help="data-loading processes for image folders (default: up to 4)")
    make.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    make.add_argument("--amp", default="auto", help="bf16, fp16, none or auto (bf16 on CUDA)")
    make.add_argument("--no-ema", action="store_true", help="use the teacher's trained weights, not its EMA")
    make.add_argument("--overwrite", action="store_true", help="write maps that already exist again")
    make.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def run(args: argparse.Namespace) -> int:
    from ..classification.make_token_labels import make_token_labels
    if args.top_k < 1:
        raise ValueError("--top-k must be at least 1")
    facts = make_token_labels(args.teacher, args.data, args.out, dataset=args.dataset, split=args.split,
                              input_size=args.input_size, top_k=args.top_k, batch_size=args.batch_size,
                              device=args.device, amp=args.amp, workers=args.workers, overwrite=args.overwrite,
                              prefer_ema=not args.no_ema)
    grid = "x".join(map(str, facts["grid"])) if facts["grid"] else "unchanged"
    top1 = facts["teacher_top1_on_split"]
    print(f"wrote {facts['images_written']} label maps (top-{facts['top_k']}, grid {grid}, teacher's {facts['head']}) "
          f"to {args.out}" + (f"; teacher top-1 on {facts['split']}: {top1:.2f}%" if top1 is not None else ""))
    return 0
