"""Released mmsegmentation segmentors of RMT, loaded whole, with their test-time settings.

A released checkpoint (mmsegmentation 0.x, e.g. ``RMT_Uper_s_2x``) holds ``backbone.*`` (the
released RMT layout with ``extra_norms.{i}``), ``decode_head.*``, ``auxiliary_head.*`` (UperNet) or
``neck.*`` (Semantic FPN) under ``state_dict``, and usually ``meta`` with the training config as
text and the class names. :func:`load_released` recognises the head, the variant and the number of
classes from the tensors, builds the matching :class:`~.models.EncoderDecoder` and loads every
tensor: the backbone through the released-to-ours conversion, the heads as they are (our heads
use mmsegmentation's names). The MaSA ``Relpos`` buffers are not weights; they are checked against
the variant's. A head tensor left over, or one missing, is an error; any other leftover is reported.

Test settings come from the config in ``meta`` (``test_cfg``: whole or slide with crop and
stride; the test pipeline's ``img_scale``, ratios and flip; ``reduce_zero_label``), else from the
released RMT configs, which all test ADE20K in whole-image mode at 2048x512 (keep ratio), single
scale, no flip, with ``reduce_zero_label``.
"""
from __future__ import annotations

import ast
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..checkpoint import (CheckpointError, StateDict, describe_architecture, guess_variant,
                          ours_to_released, released_to_ours)
from .data import ADE20K_CLASSES
from .models import EncoderDecoder, build_segmenter

HEAD_PREFIXES = ("decode_head.", "auxiliary_head.", "neck.")
HEAD_NAMES = {"fpn": "Semantic FPN", "upernet": "UperNet"}

# what every released RMT segmentation config says (configs/RMT/RMT_{FPN,Uper}_*.py)
RELEASED_TEST = dict(test_mode="whole", scale=[2048, 512], crop_size=[512, 512], stride=[341, 341],
                     ratios=[1.0], flip=False, reduce_zero_label=True)


# ------------------------------------------------------------------------------------------------
# recognising a released segmentor
# ------------------------------------------------------------------------------------------------

def whole_state_dict(obj: Mapping[str, Any]) -> StateDict:
    """Every tensor of a checkpoint object (under ``state_dict`` when present), ``module.`` stripped."""
    inner = obj.get("state_dict")
    sd = inner if isinstance(inner, Mapping) else obj
    sd = {k: v for k, v in sd.items() if torch.is_tensor(v)}
    if sd and all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def is_released_segmentor(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith("decode_head.") for k in sd) and any(k.startswith("backbone.") for k in sd)


def describe_released(sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """``dict(head, model, num_classes, aux_head, arch)`` of a released segmentor's state dict."""
    if "decode_head.psp_modules.0.1.conv.weight" in sd:
        head = "upernet"
    elif "decode_head.scale_heads.0.0.conv.weight" in sd and "neck.lateral_convs.0.conv.weight" in sd:
        head = "fpn"
    else:
        found = sorted({".".join(k.split(".")[:2]) for k in sd if k.startswith(HEAD_PREFIXES)})
        raise CheckpointError(f"the decode head is neither UperNet's UPerHead nor Semantic FPN's FPNHead "
                              f"(it holds {', '.join(found[:6])}); only those two are supported")
    if "decode_head.conv_seg.weight" not in sd:
        raise CheckpointError("the checkpoint has no decode_head.conv_seg (the classifier)")
    backbone = released_to_ours({k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")})
    aux = "auxiliary_head.conv_seg.weight" in sd
    channels = dict(decode=int(sd["decode_head.conv_seg.weight"].shape[1]))
    if aux:
        channels["aux"] = int(sd["auxiliary_head.conv_seg.weight"].shape[1])
    if head == "fpn":
        channels["neck"] = int(sd["neck.lateral_convs.0.conv.weight"].shape[0])
    return dict(head=head, model=guess_variant(backbone), aux_head=aux, head_channels=channels,
                num_classes=int(sd["decode_head.conv_seg.weight"].shape[0]), arch=describe_architecture(backbone))


def _name(info: Mapping[str, Any]) -> str:
    return f"{HEAD_NAMES[info['head']]} on {info['model']} ({info['num_classes']} classes)"


# ------------------------------------------------------------------------------------------------
# converting
# ------------------------------------------------------------------------------------------------

def _check_relpos(backbone_sd: Mapping[str, torch.Tensor], model: nn.Module) -> None:
    """The released ``layers.{i}.Relpos.{angle,decay}`` buffers must be the variant's own."""
    from ..ops.masa import head_decays, rotation_angles
    for i, stage in enumerate(model.stages):
        want = {"angle": rotation_angles(stage.head_dim),
                "decay": head_decays(stage.num_heads, stage.init_value, stage.heads_range)}
        for name, value in want.items():
            got = backbone_sd.get(f"layers.{i}.Relpos.{name}")
            if got is not None and (got.shape != value.shape or not torch.allclose(got.float(), value, atol=1e-6)):
                raise CheckpointError(
                    f"backbone.layers.{i}.Relpos.{name} differs from the registered variant's: the file's "
                    "backbone has other init_values, heads_ranges or head counts")


def released_to_segmentor_state(sd: Mapping[str, torch.Tensor], model: EncoderDecoder) -> Tuple[StateDict, list]:
    """A released segmentor state dict in ``model``'s layout, and the keys it did not use.

    Raises :class:`CheckpointError` for a missing tensor, a wrong shape or a leftover head tensor.
    """
    prefix = "backbone."
    backbone_sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    _check_relpos(backbone_sd, model.backbone)
    out = {prefix + k: v for k, v in released_to_ours(backbone_sd).items()}
    out.update({k: v for k, v in sd.items() if not k.startswith(prefix)})
    own = model.state_dict()
    missing = [k for k in own if k not in out]
    wrong = [f"{k} {tuple(out[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in out
             and out[k].shape != own[k].shape]
    leftover = [k for k in out if k not in own]
    head_left = [k for k in leftover if k.startswith(HEAD_PREFIXES)]
    problems = [f"{len(items)} {label} (e.g. {', '.join(items[:3])})" for label, items in
                (("missing", missing), ("with another shape", wrong), ("unused head tensors", head_left))
                if items]
    if problems:
        raise CheckpointError("the checkpoint does not fit the segmentor: " + "; ".join(problems))
    unused = [k for k in leftover if not k.startswith(HEAD_PREFIXES)]
    return {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in out.items() if k in own}, unused


def segmentor_to_released(model: EncoderDecoder) -> StateDict:
    """``model``'s state dict in the released mmsegmentation layout (backbone in the released RMT
    layout under ``backbone.``, with its ``Relpos`` buffers; heads and neck as they are)."""
    sd = model.state_dict()
    prefix = "backbone."
    backbone = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    out = {prefix + k: v for k, v in ours_to_released(backbone, model.backbone).items()}
    out.update({k: v for k, v in sd.items() if not k.startswith(prefix)})
    return out


# ------------------------------------------------------------------------------------------------
# test settings from the config text in the checkpoint
# ------------------------------------------------------------------------------------------------

def _literal(node: ast.AST) -> Any:
    """Value of a config expression made of literals and ``dict(...)`` calls (anything else: ValueError)."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "dict" and not node.args:
        return {kw.arg: _literal(kw.value) for kw in node.keywords if kw.arg is not None}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def parse_config_text(text: str) -> Dict[str, Any]:
    """Top-level assignments of an mmcv config dump (``Config.pretty_text``), without executing it.

    Values that are not literals or ``dict(...)`` calls are skipped.
    """
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return {}
    out: Dict[str, Any] = {}
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            try:
                out[stmt.targets[0].id] = _literal(stmt.value)
            except (ValueError, TypeError, SyntaxError):
                pass
    return out


def _find(pipeline: Any, type_name: str) -> Optional[dict]:
    """The first ``dict(type=type_name, ...)`` in a (nested) pipeline list."""
    for step in pipeline if isinstance(pipeline, list) else []:
        if isinstance(step, dict):
            if step.get("type") == type_name:
                return step
            found = _find(step.get("transforms"), type_name)
            if found is not None:
                return found
    return None


def _pair(value: Any) -> Optional[list]:
    if isinstance(value, int):
        return [value, value]
    if isinstance(value, list) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return list(value)
    return None


def config_test_settings(cfg: Mapping[str, Any]) -> Dict[str, Any]:
    """Test-time settings of a parsed config, over :data:`RELEASED_TEST` for what it does not say."""
    out = dict(RELEASED_TEST)
    test_cfg = (cfg.get("model") or {}).get("test_cfg") or cfg.get("test_cfg") or {}
    if test_cfg.get("mode") in ("whole", "slide"):
        out["test_mode"] = test_cfg["mode"]
    for key in ("crop_size", "stride"):
        if _pair(test_cfg.get(key)):
            out[key] = _pair(test_cfg[key])
    data = cfg.get("data") or {}
    test = data.get("test") or {}
    pipeline = test.get("pipeline") or cfg.get("test_pipeline")
    aug = _find(pipeline, "MultiScaleFlipAug")
    if aug is not None:
        scale = aug.get("img_scale")
        if isinstance(scale, list) and len(scale) == 1 and isinstance(scale[0], list):
            scale = scale[0]
        if _pair(scale):
            out["scale"] = sorted(_pair(scale), reverse=True)
        if isinstance(aug.get("img_ratios"), (list, float, int)):
            ratios = aug["img_ratios"]
            out["ratios"] = [float(r) for r in (ratios if isinstance(ratios, list) else [ratios])]
        out["flip"] = bool(aug.get("flip", False))
    resize_step = _find(pipeline, "Resize")
    if resize_step is not None and resize_step.get("keep_ratio") is False:
        raise CheckpointError("the config's test pipeline resizes without keeping the aspect ratio, "
                              "which this package does not reproduce")
    if "reduce_zero_label" in test:
        out["reduce_zero_label"] = bool(test["reduce_zero_label"])
    elif test.get("type") == "ADE20KDataset":
        out["reduce_zero_label"] = True
    return out


def _backbone_kwargs(cfg: Mapping[str, Any], model: str) -> Dict[str, Any]:
    """MaSA forms from the config's ``chunkwise_recurrents`` where they differ from the variant's."""
    from ..inputs import normalize_forms
    from ..model import MODEL_ARGS
    recurrents = ((cfg.get("model") or {}).get("backbone") or {}).get("chunkwise_recurrents")
    if not isinstance(recurrents, list) or not all(isinstance(r, bool) for r in recurrents):
        return {}
    forms = "".join("T" if r else "F" for r in recurrents)
    default = normalize_forms(MODEL_ARGS[model]["attn_forms"], len(recurrents))
    return {} if normalize_forms(forms, len(recurrents)) == default else {"attn_forms": forms}


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------

def load_released(obj: Mapping[str, Any], source: str, device: str | torch.device = "cpu", *,
                  model: Optional[str] = None, head: Optional[str] = None,
                  log=print) -> Tuple[EncoderDecoder, Dict[str, Any]]:
    """Build and load a released segmentor from a checkpoint object read from ``source``.

    ``model`` / ``head``, when given, must match what the checkpoint is (the error names both).
    Returns ``(model in eval mode on device, spec)``; the spec carries the test settings.
    """
    sd = whole_state_dict(obj)
    try:
        info = describe_released(sd)
    except CheckpointError as e:
        raise CheckpointError(f"'{source}': {e}") from None
    if info["model"] is None:
        arch = info["arch"]
        raise CheckpointError(f"'{source}': the backbone (widths {list(arch['embed_dims'])}, depths "
                              f"{list(arch['depths'])}) matches no registered RMT variant")
    asked = {k: v for k, v in (("model", model), ("head", head)) if v is not None}
    if any(info[k] != v for k, v in asked.items()):
        wanted = ", ".join(f"--{k} {v}" for k, v in asked.items())
        raise CheckpointError(f"'{source}' is a released {_name(info)}, but {wanted} was asked; "
                              f"use --model {info['model']} --head {info['head']} or another checkpoint")
    meta = obj.get("meta") if isinstance(obj.get("meta"), Mapping) else {}
    cfg = parse_config_text(meta["config"]) if isinstance(meta.get("config"), str) else {}
    settings = config_test_settings(cfg)
    if not cfg:
        log(f"'{source}' holds no config: testing as the released RMT configs do (whole image, "
            f"{settings['scale'][0]}x{settings['scale'][1]} keeping the aspect ratio, ADE20K labels)")
    backbone_kwargs = _backbone_kwargs(cfg, info["model"])
    net = build_segmenter(info["model"], info["head"], info["num_classes"], aux_head=info["aux_head"],
                          backbone_kwargs=backbone_kwargs, head_channels=info["head_channels"])
    try:
        state, unused = released_to_segmentor_state(sd, net)
    except CheckpointError as e:
        raise CheckpointError(f"'{source}' ({_name(info)}): {e}") from None
    net.load_state_dict(state, strict=True)
    if unused:
        log(f"'{source}': {len(unused)} tensors not used: {', '.join(unused[:8])}")
    classes = meta.get("CLASSES")
    if isinstance(classes, Sequence) and len(classes) == info["num_classes"]:
        class_names = [str(c) for c in classes]
    elif info["num_classes"] == len(ADE20K_CLASSES):
        class_names = list(ADE20K_CLASSES)
    else:
        class_names = [f"class_{i}" for i in range(info["num_classes"])]
    spec = dict(model=info["model"], head=info["head"], num_classes=info["num_classes"],
                aux_head=info["aux_head"], backbone_kwargs=backbone_kwargs, head_channels=info["head_channels"],
                class_names=class_names, decoder="mmseg", released=True, **settings)
    return net.to(device).eval(), spec
