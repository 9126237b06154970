"""Export a model to ONNX (or an AOTInductor .pt2 package) with dynamic batch and image size, then
check the file against the PyTorch model at two image sizes and print the result.

The exported model takes images (batch, 3, height, width) of any batch and any height/width of at
least 33 pixels, in the MaSA forms the model has (--forms to choose them). The check runs random
images through the exported file (onnxruntime on CPU for ONNX) and the eager model, and reports
max |exported - eager| / max |eager| per size; the command fails if it exceeds --tolerance.

Without --checkpoint the model has random weights (a warning says so).

examples:
  rmt export rmt_small --checkpoint rmt_small.safetensors              # -> rmt_small.onnx
  rmt export rmt_tiny --checkpoint run/best.pth --forms TTTF --size 512x640 --out tiny.onnx
  rmt export rmt_tiny --checkpoint rmt_tiny.safetensors --format pt2   # AOTInductor, compiles minutes
"""
from __future__ import annotations

import argparse
import sys
import time


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", help="model name: rmt_tiny/small/base/large, a token-label tag (rmt_small.tl_in1k, "
                                 "...: the ONNX output is the fused eval logits), rmt_deit_small, rmt_swin_tiny")
    p.add_argument("--checkpoint", default=None, help="weights to export (any layout rmt reads)")
    p.add_argument("--format", choices=("onnx", "pt2"), default="onnx",
                   help="onnx (default) or pt2 (torch.export + AOTInductor package for this CPU)")
    p.add_argument("--out", default=None, help="output file (default: MODEL.onnx / MODEL.pt2)")
    p.add_argument("--forms", default=None,
                   help="RMT MaSA form per stage, e.g. TTTF (T = decomposed, F = full), 'full' or "
                        "'decomposed' (default: the model's own)")
    p.add_argument("--size", default="224", help="example image size N or HxW used while exporting "
                                                  "and for the first check (default 224)")
    p.add_argument("--check-size", default=None,
                   help="second check size HxW, run with batch 2 (default: a non-square size near --size)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="largest accepted relative error")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--model-args", default=None,
                   help='extra timm.create_model arguments as JSON, e.g. \'{"depths": [1, 1, 1, 1]}\'')
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def run(args: argparse.Namespace) -> int:
    from ..export import MIN_EXPORT_SIDE, check_onnx, check_pt2, export_onnx, export_pt2
    from ..info import parse_size
    from ..loading import create_model, parse_model_args

    size = parse_size(args.size)
    check_size = (parse_size(args.check_size) if args.check_size
                  else (size[0] - 32 if size[0] > 64 else size[0] + 32, size[1] + 32))
    if min(size + check_size) < MIN_EXPORT_SIDE:
        raise ValueError(f"export and check sizes must be at least {MIN_EXPORT_SIDE} pixels per side, "
                         f"got {size} and {check_size}")
    model_args = parse_model_args(args.model_args)
    if args.format == "onnx":
        try:
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as e:
            raise RuntimeError(f"ONNX export needs the 'export' extra ({e.name} is missing): "
                               "pip install 'rmt[export]'") from None

    model = create_model(args.model, args.checkpoint, **model_args)
    if args.forms:
        if not hasattr(model, "set_attention_form"):
            raise ValueError(f"--forms applies to RMT models; {args.model} sets its forms with --model-args")
        model.set_attention_form(args.forms)
    out = args.out or f"{args.model}.{args.format}"
    forms = getattr(model, "attention_forms", None)
    print(f"exporting {args.model}" + (f" (MaSA forms {', '.join(forms)})" if forms else "")
          + f" to {args.format} with dynamic batch/height/width, example {size[0]}x{size[1]} ...",
          flush=True)
    start = time.perf_counter()
    if args.format == "onnx":
        path = export_onnx(model, out, size, args.opset)
    else:
        print("compiling with AOTInductor (a C++ build, several minutes) ...", flush=True)
        path = export_pt2(model, out, size)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB) in {time.perf_counter() - start:.0f}s")

    sizes = [(1, *size), (2, *check_size)]
    check = check_onnx if args.format == "onnx" else check_pt2
    runner = "onnxruntime (CPU)" if args.format == "onnx" else "the AOTInductor package"
    print(f"check against PyTorch with {runner}:")
    results = check(model, path, sizes, args.tolerance)
    for r in results:
        print(r.line())
    if all(r.ok for r in results):
        print("check passed")
        return 0
    print(f"check FAILED: the exported model differs from PyTorch by more than {args.tolerance:g} "
          f"(the file is kept at {path} for inspection)", file=sys.stderr)
    return 1
