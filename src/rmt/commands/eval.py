"""Top-1/top-5 accuracy of a classifier checkpoint on a data set, with a confusion-matrix PNG for
up to 100 classes and the figures in a JSON file.

Checkpoints written by rmt train know their data set, input size, normalisation and class names;
the EMA weights are used when present (--no-ema for the trained weights). Released or converted
RMT checkpoints are evaluated with ImageNet preprocessing (224 px, crop 0.9, bicubic) on an
ImageFolder tree. Runs under torchrun too (each rank takes a share of the images).

examples:
  rmt eval runs/demo/last.pth                                  # its own validation/test set
  rmt eval runs/demo/best.pth --no-ema --split test
  rmt eval RMT-S.pth --model rmt_small --data /data/imagenet   # released checkpoint, DATA/val
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="checkpoint file (.pth from rmt train, released .pth, or .safetensors)")
    p.add_argument("--model", default=None, help="variant, for released files (default: recognised from shapes)")
    p.add_argument("--no-ema", action="store_true", help="evaluate the trained weights, not the EMA")
    p.add_argument("--dataset", default=None, help="folder, fashion-mnist or wds (default: the run's)")
    p.add_argument("--data", default=None, help="data location (default: the run's)")
    p.add_argument("--split", default=None, help="split/sub-folder to evaluate (default: the run's validation split)")
    p.add_argument("--subset", type=int, default=None, help="evaluate the first N images only")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="data-loading processes")
    p.add_argument("--input-size", type=int, default=None, help="override the image size")
    p.add_argument("--crop-pct", type=float, default=None, help="override the centre-crop fraction")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--amp", default="auto", help="bf16, fp16, none or auto (bf16 on CUDA)")
    p.add_argument("--skip-bad-images", action="store_true", help="count and skip unreadable images")
    p.add_argument("--cuda-graph", action="store_true",
                   help="replay the forward pass from a CUDA graph per batch shape (CUDA only): no launch "
                        "cost on the CPU, for hosts slower than the GPU")
    p.add_argument("--out", default=None, help="folder for the PNG and JSON (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def run(args: argparse.Namespace) -> int:
    from ..classification.evaluate import run_eval
    return run_eval(args)
