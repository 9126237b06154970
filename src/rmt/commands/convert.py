"""Convert a checkpoint (released RMT classification or dense-prediction file, or one written by
``rmt train``) into a ``.safetensors`` file in this package's layout, which loads with
``model.load_state_dict(safetensors.torch.load_file(OUT))`` and needs no conversion.

The variant is recognised from the tensor shapes unless --model is given. EMA weights are taken
when the file has them, unless --no-ema. Nothing is unpickled beyond tensors and plain containers.

example:
  rmt convert rmt_small_released.pth rmt_small.safetensors
"""
from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", help="input checkpoint (.pth/.pt/.bin/.safetensors)")
    p.add_argument("dst", help="output .safetensors file")
    p.add_argument("--model", default=None, help="variant name (default: recognised from shapes)")
    p.add_argument("--no-ema", action="store_true", help="take the non-EMA weights when both exist")


def run(args: argparse.Namespace) -> int:
    from ..checkpoint import convert
    if not args.dst.endswith(".safetensors"):
        raise ValueError(f"output must end in .safetensors, got {args.dst!r}")
    name, arch = convert(args.src, args.dst, args.model, prefer_ema=not args.no_ema)
    kind = (f"classifier with {arch['num_classes']} classes" if arch["num_classes"]
            else "backbone without head") + (" and the token-label aux head" if arch.get("aux_head") else "")
    norms = ", per-stage feature norms" if arch["feature_norms"] else ""
    print(f"wrote {args.dst}: {name} ({kind}{norms})")
    return 0
