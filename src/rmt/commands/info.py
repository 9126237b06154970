"""Print parameters, multiply-accumulates (MACs) at an image size, feature channels and strides,
and the MaSA form of each stage.

MACs count convolutions, linear layers and the attention matrix products (not normalisation,
softmax or element-wise ops), on the meta device, so any size is instant.

examples:
  rmt info rmt_small
  rmt info rmt_small.tl_in1k            # RMT-S*, with the token-label aux head
  rmt info rmt_tiny --size 800x1333 --forms TTTF
  rmt info all
"""
from __future__ import annotations

import argparse
import json


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="rmt_tiny, rmt_small, rmt_base, rmt_large, the token-label models "
                                 "rmt_small.tl_in1k, rmt_base.tl_in1k, rmt_large.tl_in1k, or 'all'")
    p.add_argument("--size", default="224", help="image size N or HxW (default 224)")
    p.add_argument("--forms", default=None,
                   help="MaSA form per stage, e.g. TTTF (T = decomposed, F = full), "
                        "'full' or 'decomposed' (default: the variant's own)")
    p.add_argument("--num-classes", type=int, default=1000)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: argparse.Namespace) -> int:
    import rmt
    from ..info import format_summary, parse_size, summarize
    from ..token_label import token_label_names
    known = list(rmt.VARIANTS) + token_label_names()
    names = known if args.model == "all" else [args.model]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown model {unknown[0]!r}; choose from {', '.join(known)} or 'all'")
    size = parse_size(args.size)
    out = [summarize(n, size, args.forms, args.num_classes) for n in names]
    if args.json:
        print(json.dumps(out if len(out) > 1 else out[0], indent=2))
    else:
        print("\n\n".join(format_summary(s) for s in out))
    return 0
