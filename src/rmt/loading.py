"""Create a registered model by name and load a checkpoint into it, for commands taking MODEL --checkpoint.

The classifier size (and, for RMT, the per-stage feature norms) are read from the checkpoint, so a
model fine-tuned on 10 classes loads as a 10-class model. Without a checkpoint the model keeps its
random initial weights and a warning says so.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import torch.nn as nn

from .checkpoint import (CheckpointError, describe_architecture, filter_state_dict, is_released_layout,
                         read_checkpoint, released_to_ours, unwrap_state_dict)

RANDOM_WEIGHTS_WARNING = ("warning: no --checkpoint given, the model has random weights: "
                          "the result shows the structure, not what a trained model does")


def parse_model_args(text: Optional[str]) -> Dict[str, Any]:
    """The JSON object of a ``--model-args`` option (extra ``timm.create_model`` arguments)."""
    if not text:
        return {}
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--model-args is not valid JSON ({e})") from None
    if not isinstance(args, dict):
        raise ValueError(f"--model-args must be a JSON object like '{{\"depths\": [1, 1, 1, 1]}}', got {text!r}")
    return args


def known_models() -> list:
    """Model names these commands accept: the RMT variants and the MaSA plug-in models."""
    import timm
    return sorted(timm.list_models("rmt_*"))


def _known_tag(name: str) -> bool:
    from timm.models import get_pretrained_cfg
    try:
        return get_pretrained_cfg(name, allow_unregistered=False) is not None
    except RuntimeError:
        return False


def create_model(name: str, checkpoint: Optional[str | Path] = None, warn: bool = True,
                 **kwargs: Any) -> nn.Module:
    """``timm.create_model(name, **kwargs)`` with the weights of ``checkpoint`` (any supported layout), in eval mode.

    Raises ValueError for an unknown name and :class:`CheckpointError` for a file that does not fit.
    """
    import timm
    from .model import RMT
    from .token_label import aux_head_kwargs
    if name.split(".")[0] not in known_models() or ("." in name and not _known_tag(name)):
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(known_models())} "
                         "(or a pretrained tag such as rmt_small.tl_in1k)")
    if checkpoint is None:
        if warn:
            print(RANDOM_WEIGHTS_WARNING, file=sys.stderr)
        return timm.create_model(name, **kwargs).eval()

    obj, _ = read_checkpoint(checkpoint)
    sd = unwrap_state_dict(obj)
    probe = timm.create_model(name, device="meta", **kwargs)
    if isinstance(probe, RMT):
        arch = describe_architecture(released_to_ours(sd) if is_released_layout(sd) else sd)
        kwargs.setdefault("num_classes", arch["num_classes"])
        kwargs.setdefault("feature_norms", arch["feature_norms"])
        for key, value in aux_head_kwargs(name, arch["aux_head"]).items():  # token-label checkpoints
            kwargs.setdefault(key, value)
        model = timm.create_model(name, **kwargs)
        try:
            model.load_state_dict(filter_state_dict(obj, model), strict=True)
        except CheckpointError as e:
            raise CheckpointError(f"'{checkpoint}': {e}") from None
        return model.eval()

    classifier = probe.pretrained_cfg.get("classifier", "head")
    if f"{classifier}.weight" in sd:
        kwargs.setdefault("num_classes", sd[f"{classifier}.weight"].shape[0])
    model = timm.create_model(name, **kwargs)
    try:
        result = model.load_state_dict(sd, strict=False)
    except RuntimeError as e:  # shape mismatches
        raise CheckpointError(f"'{checkpoint}' does not fit {name}: {str(e).splitlines()[-1].strip()}") from None
    if result.missing_keys or result.unexpected_keys:
        parts = [f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})"
                 for label, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys))
                 if keys]
        raise CheckpointError(f"'{checkpoint}' does not fit {name}: " + "; ".join(parts))
    return model.eval()
