"""Loading a classifier for inference (from ``rmt train`` checkpoints, released or converted files)
and predicting the classes of image files.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from .data import DataSpec, eval_transform


@dataclass
class Classifier:
    model: torch.nn.Module
    spec: DataSpec
    config: Dict[str, Any]  # the training config (ours) or the defaults (released checkpoints)
    variant: str
    weights: str  # "EMA" or "model"
    trained_by_us: bool


def load_classifier(path: str | Path, model_name: Optional[str] = None, prefer_ema: bool = True,
                    device: str | torch.device = "cpu") -> Classifier:
    """A model in eval mode with the input spec its checkpoint was trained with.

    Our checkpoints carry the architecture, class names and normalisation; released or converted
    files get the variant from ``model_name``, the safetensors metadata or the tensor shapes, and
    ImageNet preprocessing (224 px, crop 0.9, bicubic).
    """
    from ..checkpoint import CheckpointError, filter_state_dict, identify, read_checkpoint
    from .config import DEFAULTS
    from ..token_label import TOKEN_LABEL_TAGS, aux_head_kwargs
    from .run_state import build_model
    obj, meta = read_checkpoint(path)
    has_ema = any(k in obj for k in ("model_ema", "state_dict_ema"))
    weights = "EMA" if prefer_ema and has_ema else "model"
    if "config" in obj and "data_spec" in obj:
        cfg = dict(DEFAULTS, **obj["config"])
        if model_name and model_name != cfg["model"]:
            raise ValueError(f"'{path}' was trained as {cfg['model']}, not {model_name}")
        spec = DataSpec.from_dict(obj["data_spec"])
        model = build_model(cfg, int(obj["num_classes"]), drop_path_rate=0.0)
        ours = True
    else:
        name, sd, arch = identify(obj, meta, path, model_name, prefer_ema)
        if not arch["num_classes"]:
            raise CheckpointError(f"'{path}' has no classifier head (a backbone checkpoint); it cannot classify")
        base, _, tag = name.partition(".")
        cfg = dict(DEFAULTS, model=base)
        spec = DataSpec(class_names=[str(i) for i in range(arch["num_classes"])])
        # the checkpoint decides whether the model has the aux head, unless a tag names the kind
        aux = dict(use_aux_head=tag in TOKEN_LABEL_TAGS) if tag else aux_head_kwargs(base, arch["aux_head"])
        model = build_model(cfg, arch["num_classes"], drop_path_rate=0.0, **aux)
        ours = False
    try:
        model.load_state_dict(filter_state_dict(obj, model, prefer_ema), strict=True)
    except CheckpointError as e:
        raise CheckpointError(f"'{path}': {e}") from None
    model.to(device).eval()
    return Classifier(model, spec, cfg, cfg["model"], weights, ours)


def load_images(paths: Sequence[str | Path], spec: DataSpec) -> torch.Tensor:
    """Images ``(N, 3, S, S)`` prepared as the model's validation data was (see :func:`load_image`)."""
    transform = None if spec.pipeline == "tensor" else eval_transform(spec)
    return torch.stack([load_image(p, spec, transform) for p in paths])


def load_image(path: str | Path, spec: DataSpec, transform=None) -> torch.Tensor:
    """One image ``(3, S, S)``; ValueError naming the file when it cannot be read.

    Models trained on device-held small images (``spec.pipeline == "tensor"``, ``transform`` None)
    see a plain resize of the grayscale image; the others ``transform``, timm's evaluation
    transform (resize, centre crop, normalise).
    """
    from PIL import Image
    try:
        with Image.open(path) as f:
            img = f.convert("L" if spec.grayscale else "RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image '{path}' does not exist") from None
    except Exception as e:
        raise ValueError(f"cannot read image '{path}' ({type(e).__name__}: {e})") from None
    if spec.grayscale:
        img = img.convert("RGB") if transform is not None else img
    if transform is not None:
        return transform(img)
    x = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(1, 1, img.height, img.width)
    x = x.float().div_(255)
    if x.shape[-2:] != (spec.input_size, spec.input_size):
        mode = spec.interpolation
        x = F.interpolate(x, size=(spec.input_size, spec.input_size), mode=mode,
                          align_corners=False if mode != "nearest" else None)
    x = ((x - spec.mean[0]) / spec.std[0]).expand(-1, 3, -1, -1)
    return x[0]


@torch.no_grad()
def predict(classifier: Classifier, paths: Sequence[str | Path], top_k: int = 5,
            batch_size: int = 64, skip_bad: bool = False) -> List[Dict[str, Any]]:
    """Top-k ``(label, index, probability)`` per image, in the order of ``paths``.

    An unreadable image raises ValueError naming it; with ``skip_bad`` it gets a record
    ``{"image": ..., "error": ...}`` instead and the others are predicted.
    """
    device = next(classifier.model.parameters()).device
    spec = classifier.spec
    transform = None if spec.pipeline == "tensor" else eval_transform(spec)
    names = spec.class_names
    k = min(top_k, len(names))
    results: List[Dict[str, Any]] = []
    for start in range(0, len(paths), batch_size):
        chunk, images, slots = list(paths[start:start + batch_size]), [], []
        for p in chunk:
            try:
                images.append(load_image(p, spec, transform))
            except ValueError as e:
                if not skip_bad:
                    raise ValueError(f"{e}; pass --skip-bad-images to predict the other images") from None
                results.append({"image": str(p), "error": str(e)})
                continue
            slots.append(len(results))
            results.append({"image": str(p)})
        if not images:
            continue
        top = classifier.model(torch.stack(images).to(device)).float().softmax(dim=1).topk(k, dim=1)
        for slot, values, indices in zip(slots, top.values.tolist(), top.indices.tolist()):
            results[slot]["top"] = [{"label": names[i], "index": i, "probability": v}
                                    for v, i in zip(values, indices)]
    return results
