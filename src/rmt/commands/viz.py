"""Pictures (PNG) of what MaSA does.

  decay      each stage's per-head decay pattern around a query position: the attention weights
             with zero q and k, computed by running the MaSA operator itself, for the full form and
             the decomposed form's effective 2-D weights (equal here: the decay factorises)
  attention  the attention of one query token in a chosen stage/block, per head, over the image;
             the decomposed form shows its effective 2-D weights (row pass, then column pass)
  cam        a Grad-CAM style class activation map (methods of the grad-cam package)

Query positions are fractions of the image (or grid) height and width: 0.5,0.5 is the centre,
0,0 the top-left corner. Images are prepared as the model's eval transform does (resize,
centre crop, normalise); the pictures show exactly the crop the model sees.

examples:
  rmt viz decay rmt_tiny --out decay.png
  rmt viz decay rmt_small --query 0.2,0.7 --size 512 --log
  rmt viz attention rmt_small cat.jpg --checkpoint rmt_small.safetensors --stage 2 --query 0.4,0.5
  rmt viz attention rmt_tiny cat.jpg --checkpoint rmt_tiny.safetensors --stage 1 --head 0 --head 3
  rmt viz cam rmt_small cat.jpg --checkpoint rmt_small.safetensors --class 281 --method gradcam++
"""
from __future__ import annotations

import argparse
import sys
from typing import Tuple

SUBCOMMANDS = ("decay", "attention", "cam")


def _fractions(text: str) -> Tuple[float, float]:
    try:
        y, x = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not Y,X (fractions, e.g. 0.5,0.5)") from None
    if not (0 <= y <= 1 and 0 <= x <= 1):
        raise argparse.ArgumentTypeError(f"{text!r}: Y and X must be fractions in [0, 1]")
    return y, x


def _common(p: argparse.ArgumentParser, image: bool) -> None:
    p.add_argument("model", help="model name, e.g. rmt_tiny" + ("" if image else " (an RMT variant)"))
    if image:
        p.add_argument("image", help="image file (any format Pillow reads)")
        p.add_argument("--checkpoint", default=None, help="trained weights (random weights without)")
    p.add_argument("--size", default=None,
                   help="model input size N or HxW (default: the model's, 224)" if image
                   else "image size N or HxW that sets each stage's grid (default 224)")
    p.add_argument("--out", default=None, help="output PNG (default: <subcommand>_<model>.png)")
    p.add_argument("--model-args", default=None,
                   help='extra timm.create_model arguments as JSON, e.g. \'{"attn_forms": "TTTT"}\'')
    p.add_argument("--debug", action="store_true", help="show full tracebacks")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="what", metavar="WHAT")
    d = sub.add_parser("decay", help="per-head decay pattern of each stage (both forms)")
    _common(d, image=False)
    d.add_argument("--query", type=_fractions, default=(0.5, 0.5), help="query position Y,X (default 0.5,0.5)")
    d.add_argument("--forms", choices=("both", "full", "decomposed", "model"), default="both",
                   help="which form(s) to draw: both (default), one, or each stage's own")
    d.add_argument("--log", action="store_true", help="logarithmic colour scale (shows the diamond contours)")

    a = sub.add_parser("attention", help="attention of a query token over the image")
    _common(a, image=True)
    a.add_argument("--stage", type=int, default=2, help="stage 0..3 (default 2, stride 16)")
    a.add_argument("--block", type=int, default=-1, help="block within the stage (default: last)")
    a.add_argument("--head", type=int, action="append", default=None,
                   help="head to draw (repeatable; default: every head and their mean)")
    a.add_argument("--query", type=_fractions, default=(0.5, 0.5), help="query position Y,X (default 0.5,0.5)")
    a.add_argument("--forms", default=None, help="MaSA forms per stage, e.g. TTFF (default: the model's)")

    c = sub.add_parser("cam", help="Grad-CAM style class activation map")
    _common(c, image=True)
    c.add_argument("--class", dest="target_class", type=int, default=None,
                   help="class index (default: the predicted class)")
    c.add_argument("--stage", type=int, default=-1, help="stage (RMT/Swin) or block (DeiT) to read, default last")
    c.add_argument("--method", default="gradcam", help="gradcam (default), gradcam++, xgradcam, layercam, "
                                                       "eigencam or hirescam")
    p.set_defaults(what=None)


def run(args: argparse.Namespace) -> int:
    if args.what is None:
        print("rmt viz: choose what to draw: " + ", ".join(SUBCOMMANDS) + " (rmt viz WHAT --help)",
              file=sys.stderr)
        return 2
    return {"decay": _decay, "attention": _attention, "cam": _cam}[args.what](args)


def _size(args: argparse.Namespace):
    from ..info import parse_size
    return parse_size(args.size) if args.size else None


def _model(args: argparse.Namespace, warn: bool = True):
    from pathlib import Path
    from ..loading import create_model, parse_model_args
    if getattr(args, "image", None) and not Path(args.image).is_file():
        raise FileNotFoundError(f"image '{args.image}' does not exist")
    return create_model(args.model, getattr(args, "checkpoint", None), warn=warn,
                        **parse_model_args(args.model_args))


def _rmt_model(args: argparse.Namespace, warn: bool = True):
    from ..model import RMT
    name = args.model
    model = _model(args, warn)
    if not isinstance(model, RMT):
        raise ValueError(f"this picture needs an RMT variant (rmt_tiny/small/base/large), got {name}")
    return model


def _decay(args: argparse.Namespace) -> int:
    from ..visualize import decay_patterns, plot_decay_patterns
    model = _rmt_model(args, warn=False)   # the decay depends on the configuration only
    size = _size(args) or (224, 224)
    if args.forms == "model":
        patterns = []
        for i, form in enumerate(model.attention_forms):
            patterns += [p for p in decay_patterns(model, size, args.query, (form,)) if p["stage"] == i]
    else:
        forms = ("full", "decomposed") if args.forms == "both" else (args.forms,)
        patterns = decay_patterns(model, size, args.query, forms)
    for p in patterns:
        h, w = p["grid"]
        print(f"stage {p['stage']} {p['form']:<10} grid {h}x{w}, query token {p['query']}, "
              f"weight on the query itself per head: "
              + " ".join(f"{v:.3f}" for v in p["weights"][:, p["query"][0], p["query"][1]].tolist()))
    if args.forms == "both":
        diff = max((a["weights"] - b["weights"]).abs().max().item()
                   for a, b in zip(patterns[0::2], patterns[1::2]))
        print(f"decomposed vs full effective weights with zero q/k: max difference {diff:.1e}")
    out = args.out or f"decay_{args.model}.png"
    plot_decay_patterns(patterns, out, log_scale=args.log,
                        title=f"{args.model}: MaSA weights with zero q/k (decay only) around query "
                              f"{args.query[0]:g},{args.query[1]:g} at {size[0]}x{size[1]}; γ = exp(λ)")
    print(f"wrote {out}")
    return 0


def _attention(args: argparse.Namespace) -> int:
    from ..visualize import attention_maps, load_image, plot_attention
    model = _rmt_model(args)
    if args.forms:
        model.set_attention_form(args.forms)
    if not -len(model.stages) <= args.stage < len(model.stages):
        raise ValueError(f"--stage {args.stage} is outside 0..{len(model.stages) - 1}")
    stage = args.stage % len(model.stages)
    image, picture = load_image(args.image, model, _size(args))
    maps = attention_maps(model, image, stage, args.block, args.query)
    h, w = maps["grid"]
    out = args.out or f"attention_{args.model}.png"
    plot_attention(picture, maps, out, args.head,
                   title=f"{args.model} stage {stage} block {args.block % len(model.stages[stage].blocks)} "
                         f"({maps['form']} MaSA, {h}x{w} tokens): attention of token {maps['query']}")
    print(f"stage {stage}, {maps['form']} form, grid {h}x{w}, query token {maps['query']}")
    print(f"wrote {out}")
    return 0


def _cam(args: argparse.Namespace) -> int:
    from ..visualize import class_activation_map, load_image, plot_cam
    model = _model(args)
    image, picture = load_image(args.image, model, _size(args))
    cam, target, probs = class_activation_map(model, image, args.target_class, args.stage, args.method)
    names = _class_names(probs.numel())
    top = probs.topk(min(5, probs.numel()))
    print("top classes: " + ", ".join(f"{names(int(i))} {float(p):.1%}" for p, i in zip(*top)))
    out = args.out or f"cam_{args.model}.png"
    plot_cam(picture, cam, out, title=f"{args.model} {args.method}: class {names(target)} "
                                      f"(p = {float(probs[target]):.1%})")
    print(f"class {names(target)}; wrote {out}")
    return 0


def _class_names(num_classes: int):
    """Index -> 'index (name)' for ImageNet-1k classifiers, else the bare index."""
    if num_classes == 1000:
        try:
            from timm.data import ImageNetInfo
            info = ImageNetInfo()
            return lambda i: f"{i} ({info.index_to_description(i)})"
        except Exception:  # names are a convenience: fall back to indices
            pass
    return str
