"""Trained segmentation models: saving and loading them, evaluating mIoU, predicting files.

A trained model travels with its description (``spec``: variant, head, decoder, classes, label
convention, training scale and crop), so ``rmt segment eval`` and ``predict`` need no flags to
rebuild it. Files are a training checkpoint (``last.pt``, with optimizer state), a
``.safetensors`` file whose metadata holds the spec as JSON, or a released mmsegmentation
segmentor (:mod:`.released`), whose spec also carries its config's test settings.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch.utils.data import DataLoader, Subset
from tqdm.auto import tqdm

from ..engine import DistInfo
from ..engine.distributed import all_reduce_sum
from .data import IGNORE_INDEX, SegmentationFolder, list_images, normalize, read_image
from .inference import predict_probs
from .metrics import confusion_matrix, scores
from .models import build_segmenter
from .visualize import palette, save_prediction

SPEC_KEYS = ("model", "head", "decoder", "num_classes", "aux_head", "backbone_kwargs", "class_names",
             "reduce_zero_label", "scale", "crop_size")

# smp-decoder files written before the auxiliary head became FCNHead
_LEGACY_AUX_KEYS = (("aux_head.conv.0.", "aux_head.convs.0.conv."), ("aux_head.conv.1.", "aux_head.convs.0.bn."),
                    ("aux_head.classifier.", "aux_head.conv_seg."))


def save_weights(model: torch.nn.Module, spec: Mapping[str, Any], path: str | Path,
                 extra: Optional[Mapping[str, Any]] = None) -> Path:
    """Write the model's weights to ``.safetensors`` (atomically) with ``spec`` in its metadata."""
    from ..checkpoint import save_safetensors
    meta = {"rmt_segmenter": json.dumps(dict(spec))}
    meta.update({k: json.dumps(v) for k, v in (extra or {}).items()})
    save_safetensors(model.state_dict(), path, meta)
    return Path(path)


def load_trained(path: str | Path, device: str | torch.device = "cpu", *, model: Optional[str] = None,
                 head: Optional[str] = None, log=print) -> Tuple[torch.nn.Module, Dict[str, Any]]:
    """Rebuild a trained segmentation model from a training checkpoint, a ``.safetensors`` file or a
    released mmsegmentation checkpoint.

    ``model`` / ``head``, when given, must match the file (the error names both). Returns
    ``(model in eval mode on device, spec)``.
    """
    from ..checkpoint import read_checkpoint
    from .released import is_released_segmentor, load_released, whole_state_dict
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist")
    obj, meta = read_checkpoint(path)
    if "rmt_segmenter" in meta:
        spec, state = json.loads(meta["rmt_segmenter"]), obj
    elif path.suffix != ".safetensors" and isinstance(obj.get("segmenter"), dict) and "model" in obj:
        spec, state = obj["segmenter"], obj["model"]
    elif is_released_segmentor(whole_state_dict(obj)):
        return load_released(obj, str(path), device, model=model, head=head, log=log)
    else:
        raise ValueError(f"'{path}' is neither a model of 'rmt segment train' (no model description) nor "
                         "a released mmsegmentation segmentor (no backbone.* and decode_head.* tensors); "
                         "for a backbone checkpoint use --pretrained with train")
    spec = dict(spec, decoder=spec.get("decoder", "smp"))  # files without it predate the mmseg decoder
    for key, value in (("model", model), ("head", head)):
        if value is not None and spec[key] != value:
            raise ValueError(f"'{path}' is {spec['head']} on {spec['model']}, but --{key} {value} was asked; "
                             f"use --model {spec['model']} --head {spec['head']} or another file")
    if spec["decoder"] == "smp":
        state = {_legacy_key(k): v for k, v in state.items()}
    net = build_segmenter(spec["model"], spec["head"], spec["num_classes"], decoder=spec["decoder"],
                          aux_head=spec["aux_head"], backbone_kwargs=spec.get("backbone_kwargs"),
                          head_channels=spec.get("head_channels"))
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"'{path}' does not fit the model it describes: {len(missing)} missing, "
                         f"{len(unexpected)} unexpected tensors (e.g. {(missing + unexpected)[:3]})")
    return net.to(device).eval(), spec


def _legacy_key(key: str) -> str:
    for old, new in _LEGACY_AUX_KEYS:
        if key.startswith(old):
            return new + key[len(old):]
    return key


@torch.no_grad()
def evaluate(model: torch.nn.Module, dataset: SegmentationFolder, num_classes: int, dist: DistInfo, *,
             class_names: Optional[Sequence[str]] = None, scale: Optional[Tuple[int, int]] = (2048, 512),
             ratios: Sequence[float] = (1.0,), flip: bool = False, mode: str = "auto",
             crop: Tuple[int, int] = (512, 512), stride: Tuple[int, int] = (341, 341), amp: bool = False,
             workers: int = 2, max_images: Optional[int] = None, desc: str = "eval") -> Dict[str, Any]:
    """mIoU and per-class IoU of ``model`` on ``dataset`` (images sharded over the ranks).

    ``dataset`` yields normalised images at their own size and labels at the same size (see
    :class:`~.data.EvalTransform`); the prediction is compared at the label's size.
    """
    was_training = model.training
    model.eval()
    count = len(dataset) if max_images is None else min(max_images, len(dataset))
    shard = Subset(dataset, list(range(dist.rank, count, dist.world_size)))
    # its own generator: evaluating leaves the global RNG (dropout, drop path) untouched
    loader = DataLoader(shard, batch_size=1, num_workers=workers, pin_memory=dist.device.type == "cuda",
                        generator=torch.Generator())
    cm = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=dist.device)
    for image, label in tqdm(loader, desc=desc, disable=not dist.is_main, leave=False, dynamic_ncols=True):
        image, label = image.to(dist.device, non_blocking=True), label.to(dist.device, non_blocking=True)
        probs = predict_probs(model, image, num_classes, scale=scale, ratios=ratios, flip=flip, mode=mode,
                              crop=crop, stride=stride, amp=amp)
        cm += confusion_matrix(probs.argmax(1), label, num_classes, IGNORE_INDEX)
    model.train(was_training)
    cm = all_reduce_sum(cm)
    result = scores(cm, class_names)
    result["images"] = count
    return result


@torch.no_grad()
def predict_files(model: torch.nn.Module, spec: Mapping[str, Any], inputs: Sequence[str], out_dir: str | Path, *,
                  device: torch.device, scale: Optional[Tuple[int, int]], ratios: Sequence[float] = (1.0,),
                  flip: bool = False, mode: str = "auto", crop: Tuple[int, int] = (512, 512),
                  stride: Tuple[int, int] = (341, 341), amp: bool = False, alpha: float = 0.5,
                  legend: bool = True, show_progress: bool = True) -> List[Tuple[Path, Path]]:
    """Segment image files; write ``NAME_overlay.png`` and ``NAME_mask.png`` for each into ``out_dir``."""
    files = list_images(inputs)
    names = spec.get("class_names") or [f"class_{i}" for i in range(spec["num_classes"])]
    colours = palette(len(names))
    offset = 1 if spec.get("reduce_zero_label") else 0
    written = []
    for path in tqdm(files, desc="predict", disable=not show_progress, dynamic_ncols=True):
        try:
            image = read_image(path)
        except OSError as e:
            raise ValueError(f"'{path}' could not be read as an image ({e})") from None
        probs = predict_probs(model, normalize(image)[None].to(device), spec["num_classes"], scale=scale,
                              ratios=ratios, flip=flip, mode=mode, crop=crop, stride=stride, amp=amp)
        pred = probs.argmax(1)[0].cpu()
        written.append(save_prediction(image, pred, out_dir, path.stem, names, alpha=alpha,
                                       label_offset=offset, legend=legend, colours=colours))
    return written
