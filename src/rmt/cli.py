"""The ``rmt`` command line: one sub-command per task.

Each sub-command lives in its own module exposing ``add_arguments(parser)`` and ``run(args)``;
this file only wires them up, so ``rmt --help`` and ``rmt CMD --help`` stay fast and uniform.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# name -> (module, one-line help)
COMMANDS = {
    "info": ("rmt.commands.info", "parameters, MACs, feature channels and MaSA forms of a variant"),
    "convert": ("rmt.commands.convert", "convert a released or trained checkpoint to .safetensors"),
    "train": ("rmt.commands.train", "train a classifier (one process, or many under torchrun)"),
    "token-labels": ("rmt.commands.token_labels", "dense label maps for token labeling from a trained teacher"),
    "eval": ("rmt.commands.eval", "top-1/top-5 and confusion matrix of a checkpoint on a data set"),
    "predict": ("rmt.commands.predict", "top-k labels of images with a trained checkpoint"),
    "benchmark": ("rmt.commands.benchmark", "throughput and memory beside timm peers, numerics checks"),
    "segment": ("rmt.commands.segment", "semantic segmentation (Semantic FPN, UperNet): train, eval, predict"),
    "export": ("rmt.commands.export", "ONNX / AOTInductor export with dynamic sizes, checked against PyTorch"),
    "viz": ("rmt.commands.viz", "PNG pictures: MaSA decay patterns, attention maps, Grad-CAM"),
    "detect": ("rmt.commands.detect", "object detection / instance segmentation: train, eval, predict"),
}


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    parser = argparse.ArgumentParser(
        prog="rmt", description="RMT vision backbones: models, training, dense prediction, export.")
    parser.add_argument("--version", action="version", version=f"rmt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = sub.add_parser(name, help=help_text, description=(mod.__doc__ or help_text).strip(),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_module=mod)
    return parser


def runs_on_cpu(args: argparse.Namespace) -> bool:
    """Whether a command's models run on the CPU: ``--device cpu``, or no CUDA device and no other
    device asked for (commands without ``--device`` pick CUDA when there is one)."""
    device = getattr(args, "device", None)
    if device:
        return str(device).split(":")[0] == "cpu"
    import torch
    return not torch.cuda.is_available()


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "_module", None):
        parser.print_help()
        return 2
    if runs_on_cpu(args):
        from .host_memory import keep_freed_memory
        keep_freed_memory()  # large CPU tensors reuse freed heap memory instead of fresh pages
    try:
        return int(args._module.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"rmt {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
