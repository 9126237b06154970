"""Every knob of ``rmt train``: one table gives the command-line flags, the YAML keys and the defaults.

The defaults are the paper's ImageNet-1k recipe (SPEC section 5). Precedence, lowest first:
defaults < YAML file (``--config``) < the run being resumed < flags given on the command line.
The resolved configuration is saved as ``config.yaml`` in the run directory and inside every
checkpoint.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

# (name, default, type, help); type is int/float/str/bool, or ("list", elem) for a fixed-length list
Option = Tuple[str, Any, Any, str]

OPTIONS: Dict[str, List[Option]] = {
    "model": [
        ("model", "rmt_tiny", str, "variant: rmt_tiny, rmt_small, rmt_base or rmt_large"),
        ("pretrained", None, str, "initialise from a checkpoint (ours, released or converted); the head is "
                                  "re-initialised when the class count differs"),
        ("model_kwargs", None, "json", "extra architecture arguments as a JSON object, e.g. "
                                       "'{\"depths\": [1, 1, 2, 1]}' (a mapping in YAML)"),
        ("num_classes", None, int, "number of classes (default: from the data set)"),
        ("drop_path", None, float, "stochastic depth rate (default: the variant's own, 0.1/0.15/0.4/0.5)"),
        ("attn_forms", None, str, "MaSA form per stage, e.g. TTFF (T = decomposed, F = full), or full/decomposed"),
        ("grad_checkpointing", False, bool, "recompute activations in the backward pass to save memory"),
        ("channels_last", False, bool, "channels-last memory format for images and convolutions"),
        ("compile", False, bool, "torch.compile the model"),
        ("block_graphs", None, bool, "replay each RMT block's training kernels from CUDA graphs "
                                     "(model.set_block_graphs): most of --cuda-graph's gain in an otherwise "
                                     "eager step, with other batch shapes run eagerly; CUDA only (default: on "
                                     "where it applies: CUDA without --fsdp, --cuda-graph, --compile or "
                                     "--grad-checkpointing)"),
        ("cuda_graph", False, bool, "capture the whole training step in a CUDA graph and replay it: no launch "
                                    "cost on the CPU (CUDA devices, one process or DDP, batches of one shape, "
                                    "AdamW, bf16 or fp32, no accumulation)"),
    ],
    "data": [
        ("dataset", "folder", str, "folder (ImageFolder tree: DATA/train/CLASS/img, DATA/val/CLASS/img), "
                                   "fashion-mnist (idx files) or wds (webdataset .tar shards)"),
        ("data", None, str, "data location: the folder tree, the Fashion-MNIST folder (default: where Debian's "
                            "dataset-fashion-mnist installs it) or a wds shard pattern for training, "
                            "e.g. 'shards/train-{000000..000099}.tar'"),
        ("val_data", None, str, "wds only: shard pattern of the validation set"),
        ("train_split", "train", str, "sub-folder / split used for training"),
        ("val_split", None, str, "sub-folder / split used for validation (default: val, or test for fashion-mnist)"),
        ("train_samples", None, int, "wds only: number of training samples per epoch (sets the schedule length)"),
        ("train_subset", None, int, "train on the first N samples only (quick experiments, tests)"),
        ("val_subset", None, int, "validate on the first N samples only"),
        ("input_size", None, int, "image side in pixels (default 224; 32 for fashion-mnist)"),
        ("crop_pct", None, float, "evaluation centre-crop fraction (default 0.9 for photos, 1.0 for fashion-mnist)"),
        ("interpolation", "bicubic", str, "resize interpolation: bicubic, bilinear or nearest"),
        ("mean", None, ("list", float), "normalisation mean, 3 values (default: the data set's)"),
        ("std", None, ("list", float), "normalisation std, 3 values (default: the data set's)"),
        ("pipeline", "auto", str, "loader (per-image timm transforms in worker processes) or tensor (fashion-"
                                  "mnist held on the device, augmented per batch); auto: tensor when fashion-mnist "
                                  "is trained without RandAugment"),
        ("workers", None, int, "data-loading worker processes per rank (default: min(8, CPUs per rank))"),
        ("skip_bad_images", False, bool, "count, name and skip images that cannot be read or augmented "
                                         "(default: stop, after saving a checkpoint to resume from)"),
    ],
    "augmentation": [
        ("aa", "rand-m9-mstd0.5-inc1", str, "timm auto-augment policy ('none' to disable)"),
        ("scale", [0.08, 1.0], ("list", float), "random-resized-crop area range"),
        ("ratio", [0.75, 1.3333333], ("list", float), "random-resized-crop aspect-ratio range"),
        ("hflip", 0.5, float, "horizontal flip probability"),
        ("color_jitter", 0.4, float, "colour jitter strength (loader pipeline)"),
        ("reprob", 0.25, float, "random erasing probability"),
        ("remode", "pixel", str, "random erasing fill: pixel, rand or const"),
        ("mixup", 0.8, float, "mixup alpha (0 disables)"),
        ("cutmix", 1.0, float, "cutmix alpha (0 disables)"),
        ("mixup_prob", 1.0, float, "probability of applying mixup or cutmix to a batch"),
        ("mixup_switch_prob", 0.5, float, "probability of cutmix instead of mixup when both are on"),
        ("smoothing", 0.1, float, "label smoothing"),
        ("aug_repeats", 3, int, "repeated augmentation: each image seen this many times per epoch, spread "
                                "over ranks (0 disables)"),
    ],
    "token labels": [
        ("token_label", None, str, "folder of dense label maps (token labeling, docs/token-labels.md): DIR/CLASS/NAME.pt "
                                   "per training image, or DIR/SPLIT.pt for fashion-mnist; trains the model with its "
                                   "aux head and MixToken, and turns mixup and cutmix off"),
        ("token_label_size", 7, int, "side of the dense target grid: the model's final-stage grid (input-size / 32)"),
        ("token_label_target", "teacher", str, "class target: teacher (the map read over the crop, the released "
                                               "recipe) or truth (the image's own label)"),
        ("token_label_check", True, bool, "read every label map before the first step (--no-token-label-check: "
                                          "only check that each file exists; a bad map then stops the run when met)"),
    ],
    "optimization": [
        ("epochs", 300, float, "epochs of the schedule (a fraction cuts the last epoch short)"),
        ("batch_size", 128, int, "images per step per process (global batch = this x processes x accum_steps)"),
        ("accum_steps", 1, int, "gradient accumulation steps per optimizer step"),
        ("opt", "adamw", str, "timm optimizer name"),
        ("lr", None, float, "peak learning rate (default: lr_base x global batch / lr_base_size)"),
        ("lr_base", 1e-3, float, "learning rate at a global batch of lr_base_size"),
        ("lr_base_size", 1024, int, "global batch size that lr_base refers to"),
        ("weight_decay", 0.05, float, "weight decay (not applied to norms, biases and layer scale)"),
        ("opt_eps", 1e-8, float, "optimizer epsilon"),
        ("momentum", 0.9, float, "momentum (SGD-type optimizers)"),
        ("clip_grad", None, float, "clip the gradient norm to this value"),
        ("sched", "cosine", str, "timm scheduler name (cosine, step, poly, ...), stepped every update"),
        ("warmup_epochs", 5.0, float, "linear warm-up length in epochs (fractions allowed)"),
        ("warmup_lr", 1e-6, float, "learning rate at the start of warm-up"),
        ("min_lr", 1e-5, float, "learning rate at the end of the cosine"),
        ("model_ema", True, bool, "keep an exponential moving average of the weights (reported accuracy)"),
        ("ema_decay", 0.99996, float, "EMA decay per optimizer step"),
        ("ema_warmup", False, bool, "ramp the EMA decay up from 0 (useful for short schedules)"),
        ("amp", "auto", str, "mixed precision: bf16, fp16 or none; auto = bf16 on CUDA, none on CPU"),
    ],
    "distributed": [
        ("device", None, str, "cuda or cpu (default: cuda when available)"),
        ("dist_backend", None, str, "process-group backend (default: nccl on CUDA, gloo on CPU)"),
        ("fsdp", False, bool, "shard parameters, gradients and optimizer state with FSDP2 instead of DDP"),
        ("sync_bn", False, bool, "synchronise BatchNorm statistics across processes (CUDA)"),
    ],
    "run": [
        ("output", "runs", str, "folder that holds run directories"),
        ("name", None, str, "run directory name (default: MODEL-DATASET-TIMESTAMP)"),
        ("seed", 0, int, "random seed (each rank adds its rank)"),
        ("checkpoint_every", 500, int, "also write last.pth every N optimizer steps (0: only each epoch)"),
        ("log_interval", 20, int, "optimizer steps between log lines (and loss checks)"),
        ("max_steps", None, int, "stop after this many optimizer steps in total (schedule unchanged)"),
        ("time_budget", None, float, "minutes for the whole run: after a few timed steps the schedule is set to "
                                     "the number of epochs (at most --epochs) that fits, validation included"),
        ("threads", None, int, "torch CPU threads per process"),
        ("eval_ema_only", False, bool, "validate only the EMA weights each epoch (halves validation time)"),
    ],
}

DEFAULTS: Dict[str, Any] = {name: default for group in OPTIONS.values() for name, default, _, _ in group}
_TYPES: Dict[str, Any] = {name: typ for group in OPTIONS.values() for name, _, typ, _ in group}


def add_arguments(p: argparse.ArgumentParser) -> None:
    """One flag per option (``--batch-size``, ``--no-model-ema``...); unset flags stay absent."""
    p.add_argument("--config", default=None, help="YAML file of options (keys as below, - or _)")
    p.add_argument("--resume", default=None,
                   help="continue a run: its directory (takes last.pth) or a checkpoint file")
    for group, options in OPTIONS.items():
        g = p.add_argument_group(group)
        for name, default, typ, help_text in options:
            flag = "--" + name.replace("_", "-")
            shown = "" if default is None else f" (default: {default})"
            if typ is bool:
                g.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                               help=help_text + shown)
            elif typ == "json":
                g.add_argument(flag, default=argparse.SUPPRESS, help=help_text + shown)
            elif isinstance(typ, tuple):
                g.add_argument(flag, type=typ[1], nargs="+", default=argparse.SUPPRESS, help=help_text + shown)
            else:
                g.add_argument(flag, type=typ, default=argparse.SUPPRESS, help=help_text + shown)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _coerce(name: str, value: Any, source: str) -> Any:
    typ = _TYPES[name]
    if value is None:
        return None
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() not in ("true", "false", "yes", "no", "1", "0"):
                    raise ValueError
                return value.lower() in ("true", "yes", "1")
            return bool(value)
        if typ == "json":
            import json
            value = json.loads(value) if isinstance(value, str) else value
            if not isinstance(value, dict):
                raise ValueError
            return value
        if isinstance(typ, tuple):
            values = value if isinstance(value, (list, tuple)) else [value]
            return [typ[1](v) for v in values]
        if typ is str and isinstance(value, str) and value.lower() in ("none", "null", ""):
            return None
        return typ(value)
    except (TypeError, ValueError):
        kind = "a JSON object" if typ == "json" else getattr(typ, "__name__", "a list")
        raise ValueError(f"{source}: option '{name}' must be {kind}, "
                         f"got {value!r}") from None


def read_yaml(path: str | Path) -> Dict[str, Any]:
    """Options from a YAML mapping; unknown keys are an error that names them."""
    import yaml
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file '{path}' does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:  # the parser's message says where, in lines of its own
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ValueError(f"config file '{path}' is not valid YAML{at}: {problem}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file '{path}' must hold a mapping of option: value")
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in DEFAULTS:
            raise ValueError(f"config file '{path}': unknown option '{key}' (see rmt train --help)")
        out[name] = _coerce(name, value, f"config file '{path}'")
    return out


def resolve(cli: Dict[str, Any], resumed: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Merge defaults, ``cli['config']`` YAML, a resumed run's config and explicit flags."""
    cfg = dict(DEFAULTS)
    explicit = set(cli)
    if cli.get("config"):
        yaml_options = read_yaml(cli["config"])
        explicit |= set(yaml_options)
        cfg.update(yaml_options)
    if resumed:
        cfg.update({k: v for k, v in resumed.items() if k in DEFAULTS})
    cfg.update({k: _coerce(k, v, "command line") for k, v in cli.items() if k in DEFAULTS})
    cfg["amp"] = cfg["amp"] or "none"
    if cfg["token_label"]:  # MixToken takes the place of mixup and cutmix (the released recipe)
        for key in ("mixup", "cutmix"):
            if cfg[key] > 0 and key in explicit:
                raise ValueError(f"--token-label trains with MixToken instead of mixup and cutmix (the released "
                                 f"recipe): drop --{key} {cfg[key]:g} or set it to 0")
            cfg[key] = 0.0
    validate(cfg)
    return cfg


def validate(cfg: Dict[str, Any]) -> None:
    """Raise ValueError naming the option for values that cannot work."""
    checks = [
        (cfg["dataset"] in ("folder", "fashion-mnist", "wds"), "dataset must be folder, fashion-mnist or wds"),
        (cfg["pipeline"] in ("auto", "loader", "tensor"), "pipeline must be auto, loader or tensor"),
        (cfg["amp"] in ("auto", "bf16", "fp16", "none"), "amp must be auto, bf16, fp16 or none"),
        (cfg["epochs"] > 0, "epochs must be positive"),
        (cfg["batch_size"] >= 1, "batch-size must be at least 1"),
        (cfg["accum_steps"] >= 1, "accum-steps must be at least 1"),
        (cfg["input_size"] is None or cfg["input_size"] >= 32,
         "input-size must be at least 32 (RMT's output stride)"),
        (len(cfg["scale"]) == 2 and len(cfg["ratio"]) == 2, "scale and ratio take two values each"),
        (cfg["mean"] is None or len(cfg["mean"]) in (1, 3), "mean takes 1 or 3 values"),
        (cfg["std"] is None or len(cfg["std"]) in (1, 3), "std takes 1 or 3 values"),
        (cfg["interpolation"] in ("bicubic", "bilinear", "nearest"), "interpolation must be bicubic, bilinear or nearest"),
        (cfg["log_interval"] >= 1, "log-interval must be at least 1"),
        (not (cfg["dataset"] == "wds" and not cfg["train_samples"]),
         "--dataset wds needs --train-samples (samples per epoch) to size the schedule"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)
    if (cfg["mixup"] > 0 or cfg["cutmix"] > 0) and cfg["batch_size"] % 2:
        raise ValueError("mixup/cutmix need an even --batch-size")


def to_yaml(cfg: Dict[str, Any]) -> str:
    """The configuration as YAML, grouped as in ``rmt train --help``; loads again with ``--config``."""
    import json
    parts = []
    for group, options in OPTIONS.items():
        # JSON values are YAML flow values: one readable line per option
        parts.append(f"# {group}\n" + "".join(f"{name}: {json.dumps(cfg.get(name))}\n" for name, _, _, _ in options))
    extra = {k: v for k, v in cfg.items() if k not in DEFAULTS}
    if extra:  # facts of the run, as comments so that the file loads again with --config
        parts.append("# run facts\n" + "".join(f"# {k}: {json.dumps(v)}\n" for k, v in extra.items()))
    return "\n".join(parts)
