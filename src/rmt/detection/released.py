"""Whole released detectors: mmdetection 2.x checkpoints of Mask R-CNN, Cascade Mask R-CNN and
RetinaNet converted tensor by tensor into this package's torchvision detectors, and back.

A released file holds ``state_dict`` with ``backbone.*`` (the RMT, released layout), ``neck.*``
(FPN), ``rpn_head.*`` and ``roi_head.*`` (two-stage) or ``bbox_head.*`` (RetinaNet), and usually
``meta`` (``CLASSES``, the config text). mmdetection 2.x puts the background class LAST in its
classifiers and has no background slot in its class-specific box regressors and mask logits;
torchvision has background at index 0. The conversion moves the background row first and
fills the background slots with zeros (RetinaNet's unused label 0: zero weights, prior bias).

Every tensor is accounted for: unknown tensors under a head prefix (``neck.``, ``rpn_head.``,
``roi_head.``, ``bbox_head.``) are an error, any other unused tensor is reported, and the
converted state dict must load strictly into the model.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from ..checkpoint import (CheckpointError, StateDict, describe_architecture, guess_variant, ours_to_released,
                          read_checkpoint, released_to_ours)

FAMILIES = {"mask_rcnn": "Mask R-CNN", "cascade_mask_rcnn": "Cascade Mask R-CNN", "retinanet": "RetinaNet"}
HEAD_PREFIXES = ("neck.", "rpn_head.", "roi_head.", "bbox_head.")
RETINANET_ANCHORS = 9
_BODY = "backbone.body.model."

# (released key template, our key template, class layout); {s} stage, {i} index, {p} parameter name
_TWO_STAGE = [
    ("neck.lateral_convs.{i}.conv.{p}", "backbone.fpn.inner_blocks.{i}.0.{p}", None),
    ("neck.fpn_convs.{i}.conv.{p}", "backbone.fpn.layer_blocks.{i}.0.{p}", None),
    ("rpn_head.rpn_conv.{p}", "rpn.head.conv.0.0.{p}", None),
    ("rpn_head.rpn_cls.{p}", "rpn.head.cls_logits.{p}", None),
    ("rpn_head.rpn_reg.{p}", "rpn.head.bbox_pred.{p}", None),
]
_RULES = {
    "mask_rcnn": _TWO_STAGE + [
        ("roi_head.bbox_head.shared_fcs.0.{p}", "roi_heads.box_head.fc6.{p}", None),
        ("roi_head.bbox_head.shared_fcs.1.{p}", "roi_heads.box_head.fc7.{p}", None),
        ("roi_head.bbox_head.fc_cls.{p}", "roi_heads.box_predictor.cls_score.{p}", "classifier"),
        ("roi_head.bbox_head.fc_reg.{p}", "roi_heads.box_predictor.bbox_pred.{p}", "regressor"),
        ("roi_head.mask_head.convs.{i}.conv.{p}", "roi_heads.mask_head.{i}.0.{p}", None),
        ("roi_head.mask_head.upsample.{p}", "roi_heads.mask_predictor.conv5_mask.{p}", None),
        ("roi_head.mask_head.conv_logits.{p}", "roi_heads.mask_predictor.mask_fcn_logits.{p}", "mask"),
    ],
    "cascade_mask_rcnn": _TWO_STAGE + [
        ("roi_head.bbox_head.{s}.shared_convs.{i}.conv.{p}", "roi_heads.box_heads.{s}.convs.{i}.0.{p}", None),
        ("roi_head.bbox_head.{s}.shared_convs.{i}.bn.{p}", "roi_heads.box_heads.{s}.convs.{i}.1.{p}", None),
        ("roi_head.bbox_head.{s}.shared_fcs.0.{p}", "roi_heads.box_heads.{s}.fc.{p}", None),
        ("roi_head.bbox_head.{s}.fc_cls.{p}", "roi_heads.box_heads.{s}.cls_score.{p}", "classifier"),
        ("roi_head.bbox_head.{s}.fc_reg.{p}", "roi_heads.box_heads.{s}.bbox_pred.{p}", "regressor"),
        ("roi_head.mask_head.{s}.convs.{i}.conv.{p}", "roi_heads.mask_heads.{s}.convs.{i}.0.{p}", None),
        ("roi_head.mask_head.{s}.upsample.{p}", "roi_heads.mask_heads.{s}.predictor.conv5_mask.{p}", None),
        ("roi_head.mask_head.{s}.conv_logits.{p}", "roi_heads.mask_heads.{s}.predictor.mask_fcn_logits.{p}", "mask"),
    ],
    "retinanet": [
        ("neck.fpn_convs.3.conv.{p}", "backbone.fpn.extra_blocks.p6.{p}", None),  # 'on_input' P6 and P7
        ("neck.fpn_convs.4.conv.{p}", "backbone.fpn.extra_blocks.p7.{p}", None),
        ("neck.lateral_convs.{i}.conv.{p}", "backbone.fpn.inner_blocks.{i}.0.{p}", None),
        ("neck.fpn_convs.{i}.conv.{p}", "backbone.fpn.layer_blocks.{i}.0.{p}", None),
        ("bbox_head.cls_convs.{i}.conv.{p}", "head.classification_head.conv.{i}.0.{p}", None),
        ("bbox_head.reg_convs.{i}.conv.{p}", "head.regression_head.conv.{i}.0.{p}", None),
        ("bbox_head.retina_cls.{p}", "head.classification_head.cls_logits.{p}", "anchor_classifier"),
        ("bbox_head.retina_reg.{p}", "head.regression_head.bbox_reg.{p}", None),
    ],
}


def _pattern(template: str) -> "re.Pattern[str]":
    regex = re.escape(template).replace(r"\{s\}", r"(?P<s>\d+)").replace(r"\{i\}", r"(?P<i>\d+)")
    return re.compile(regex.replace(r"\{p\}", r"(?P<p>[a-z_]+)") + "$")


def _rename(key: str, rules: List[Tuple[str, str, Optional[str]]], to_ours: bool) -> Optional[Tuple[str, Optional[str]]]:
    """The key in the other layout and the class layout to convert, or None when no rule matches."""
    for released, ours, layout in rules:
        source, target = (released, ours) if to_ours else (ours, released)
        if m := _pattern(source).match(key):
            return target.format(**m.groupdict()), layout
    return None


# class layouts: released (background last / absent) <-> ours (background first)
def _to_ours(layout: str, t: torch.Tensor, key: str) -> torch.Tensor:
    if layout == "classifier":
        return torch.cat([t[-1:], t[:-1]])
    if layout in ("regressor", "mask"):
        return torch.cat([t.new_zeros((4 if layout == "regressor" else 1, *t.shape[1:])), t])
    per_anchor = t.reshape(RETINANET_ANCHORS, -1, *t.shape[1:])  # (A, K, ...) -> (A, K + 1, ...)
    fill = per_anchor[:, :1].new_full(per_anchor[:, :1].shape, -math.log(99) if key.endswith("bias") else 0.0)
    return torch.cat([fill, per_anchor], 1).reshape(-1, *t.shape[1:])


def _to_released(layout: str, t: torch.Tensor) -> torch.Tensor:
    if layout == "classifier":
        return torch.cat([t[1:], t[:1]])
    if layout in ("regressor", "mask"):
        return t[4 if layout == "regressor" else 1:]
    return t.reshape(RETINANET_ANCHORS, -1, *t.shape[1:])[:, 1:].reshape(-1, *t.shape[1:])


@dataclass
class ReleasedDetector:
    """What a released file holds: family, sizes, backbone architecture and metadata."""
    detector: str
    num_classes: int
    stages: int
    fpn_channels: int
    box_head_size: int
    mask_head_channels: int
    variant: Optional[str]
    architecture: Dict[str, Any]
    attn_forms: Optional[str]
    classes: Optional[List[str]]
    meta: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        arch = f"widths {list(self.architecture['embed_dims'])}, depths {list(self.architecture['depths'])}"
        return f"{FAMILIES[self.detector]} with {self.variant or 'an RMT of ' + arch}"


def released_state_dict(obj: Mapping[str, Any]) -> Optional[StateDict]:
    """The state dict of a whole released mmdetection detector, or None for any other file."""
    sd = obj.get("state_dict", obj)
    if not isinstance(sd, Mapping):
        return None
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    if any(k.startswith("backbone.") for k in sd) and any(k.startswith(("neck.", "bbox_head.", "roi_head.")) for k in sd):
        return sd
    return None


def inspect_released(obj: Mapping[str, Any], source: str = "checkpoint") -> ReleasedDetector:
    """Family, class count, head sizes and backbone variant of a released detector file."""
    sd = released_state_dict(obj)
    if sd is None:
        raise CheckpointError(f"'{source}' is not a whole mmdetection detector (no backbone.* with neck.* and heads)")
    if "roi_head.bbox_head.0.fc_cls.weight" in sd:
        detector = "cascade_mask_rcnn"
        stages = 1 + max(int(m[1]) for k in sd if (m := re.match(r"roi_head\.bbox_head\.(\d+)\.", k)))
        cls, logits = sd["roi_head.bbox_head.0.fc_cls.weight"], sd.get("roi_head.mask_head.0.conv_logits.weight")
    elif "roi_head.bbox_head.fc_cls.weight" in sd:
        detector, stages = "mask_rcnn", 1
        cls, logits = sd["roi_head.bbox_head.fc_cls.weight"], sd.get("roi_head.mask_head.conv_logits.weight")
    elif "bbox_head.retina_cls.weight" in sd:
        detector, stages, logits = "retinanet", 0, None
        cls = sd["bbox_head.retina_cls.weight"]
    else:
        heads = sorted({k.split(".")[0] + "." + k.split(".")[1] for k in sd if k.startswith(HEAD_PREFIXES[1:])})
        raise CheckpointError(f"'{source}' is a detector this package cannot convert (heads {heads}); "
                              f"supported: {', '.join(FAMILIES.values())} of mmdetection 2.x")
    if detector != "retinanet" and logits is None:
        raise CheckpointError(f"'{source}' is a {FAMILIES[detector]} without mask heads (a Faster R-CNN style "
                              "detector), which this package does not build")
    num_classes = cls.shape[0] // RETINANET_ANCHORS if detector == "retinanet" else cls.shape[0] - 1
    backbone = released_to_ours({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    classes = list(meta["CLASSES"]) if isinstance(meta.get("CLASSES"), (list, tuple)) else None
    forms = None
    if isinstance(meta.get("config"), str) and (m := re.search(r"chunkwise_recurrents\s*=\s*\[([^\]]*)\]", meta["config"])):
        flags = [f.strip() for f in m[1].split(",") if f.strip()]
        forms = "".join("T" if f == "True" else "F" for f in flags) or None
    return ReleasedDetector(
        detector, num_classes, stages, sd["neck.lateral_convs.0.conv.weight"].shape[0],
        box_head_size=0 if detector == "retinanet" else cls.shape[1],
        mask_head_channels=0 if logits is None else logits.shape[1], variant=guess_variant(backbone),
        architecture=describe_architecture(backbone), attn_forms=forms, classes=classes, meta=dict(meta))


def released_to_detector(sd: Mapping[str, torch.Tensor], detector: str) -> Tuple[StateDict, List[str]]:
    """Released detector state dict -> our detector's (``backbone.body.model.*`` for the RMT) and the
    keys not used. Raises CheckpointError when a head tensor has no counterpart."""
    rules = _RULES[detector]
    out: StateDict = {}
    unused, backbone = [], {}
    for key, value in sd.items():
        if key.startswith("backbone."):
            backbone[key[len("backbone."):]] = value
            continue
        found = _rename(key, rules, to_ours=True)
        if found is None:
            unused.append(key)
            continue
        new, layout = found
        out[new] = _to_ours(layout, value, key) if layout else value
    bad = [k for k in unused if k.startswith(HEAD_PREFIXES)]
    if bad:
        raise CheckpointError(f"{len(bad)} head tensors of the {FAMILIES[detector]} file have no place in this "
                              f"package's model: {bad[:8]}{' ...' if len(bad) > 8 else ''}")
    out.update({_BODY + k: v for k, v in released_to_ours(backbone).items()})
    unused += [f"backbone.{k}" for k in backbone if ".Relpos." in k]  # recomputed from the config
    return out, unused


def detector_to_released(model: nn.Module, detector: str) -> StateDict:
    """Our detector's weights in the released mmdetection 2.x layout (``state_dict`` contents)."""
    rules = _RULES[detector]
    out: StateDict = {}
    body = {}
    for key, value in model.state_dict().items():
        if key.startswith(_BODY):
            body[key[len(_BODY):]] = value
            continue
        found = _rename(key, rules, to_ours=False)
        if found is None:
            raise CheckpointError(f"{key} has no place in the released {FAMILIES[detector]} layout")
        new, layout = found
        out[new] = _to_released(layout, value) if layout else value
    out.update({"backbone." + k: v for k, v in ours_to_released(body, model.backbone.rmt).items()})
    return out


def coco_classes() -> Tuple[List[str], List[int]]:
    """The 80 COCO category names and ids in id order (mmdetection's class order)."""
    from torchvision.models._meta import _COCO_CATEGORIES
    pairs = [(name, i) for i, name in enumerate(_COCO_CATEGORIES) if name not in ("__background__", "N/A")]
    return [n for n, _ in pairs], [i for _, i in pairs]


def load_released_detector(path: str | Path, build: Callable[..., nn.Module], detector: Optional[str] = None,
                           model_name: Optional[str] = None, backbone_kwargs: Optional[Dict[str, Any]] = None,
                           attn_forms: Optional[str] = None, verbose: bool = True
                           ) -> Tuple[nn.Module, ReleasedDetector]:
    """A released detector file converted into a model made by ``build(detector, model_name, num_classes,
    fpn_channels=..., box_head_size=..., mask_head_channels=..., attn_forms=..., backbone_kwargs=...)``.

    ``detector``/``model_name``, when given, must match the file (CheckpointError naming both);
    otherwise they are read from it. The MaSA forms come from ``attn_forms``, else the file's
    config text, else the released configs' (TTFF for RMT-T, TTTF otherwise).
    """
    obj, _ = read_checkpoint(path)
    info = inspect_released(obj, str(path))
    if detector is not None and detector != info.detector:
        raise CheckpointError(f"'{path}' holds a {info.describe()}, not a {FAMILIES.get(detector, detector)}: "
                              f"use --detector {info.detector} or another file")
    name = model_name or info.variant
    if name is None:
        raise CheckpointError(f"'{path}' holds a {info.describe()}, which is no registered variant: name it with "
                              "--model and --backbone-kwargs")
    forms = attn_forms or info.attn_forms or ("TTFF" if name == "rmt_tiny" else "TTTF")
    model = build(info.detector, name, info.num_classes, fpn_channels=info.fpn_channels,
                  box_head_size=info.box_head_size or 1024, mask_head_channels=info.mask_head_channels or 256,
                  attn_forms=forms, backbone_kwargs=dict(backbone_kwargs or {}, drop_path_rate=0.0))
    ours = describe_architecture({k[len(_BODY):]: v for k, v in model.state_dict().items() if k.startswith(_BODY)})
    if (ours["embed_dims"], ours["depths"]) != (info.architecture["embed_dims"], info.architecture["depths"]):
        raise CheckpointError(f"'{path}' holds a {info.describe()}, but the model is {name} (widths "
                              f"{list(ours['embed_dims'])}, depths {list(ours['depths'])}): drop --model or pick "
                              "the matching variant")
    sd, unused = released_to_detector(released_state_dict(obj), info.detector)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if missing or unexpected or wrong:
        raise CheckpointError(f"'{path}' does not fit the {info.describe()} built from it: missing {missing[:6]}, "
                              f"unexpected {unexpected[:6]}, shapes {wrong[:6]}")
    model.load_state_dict(sd, strict=True)
    info.attn_forms = forms
    if verbose and unused:
        relpos = [k for k in unused if ".Relpos." in k]
        other = [k for k in unused if ".Relpos." not in k]
        print(f"'{path}': {len(relpos)} Relpos buffers recomputed from the config"
              + (f"; not used: {other}" if other else ""))
    return model, info
