"""Checkpoints: safe reading, the released key layout, conversion and validation.

Three layouts are understood:

* released classification checkpoints (``patch_embed.*``, ``layers.{i}.*``, ``proj``, ``norm``,
  ``head``), usually wrapped under ``model`` and possibly ``model_ema``;
* released dense-prediction backbones (wrapped under ``state_dict``, ``extra_norms.{i}``, no head);
* this package's own layout (``stem``, ``stages``, ``head``, ``feature_norms``), bare or wrapped by
  the training loop, or converted to ``.safetensors`` by ``rmt convert``.

Reading never unpickles arbitrary objects: ``.safetensors`` files go through safetensors, anything
else through ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import logging
import re
import zipfile
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

_logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]

# released block sub-module -> ours
_BLOCK_RENAMES = (
    ("pos.conv.", "cpe."),
    ("retention_layer_norm.", "norm1."),
    ("retention.lepe.conv.", "attn.lepe."),
    ("retention.out_proj.", "attn.proj."),
    ("final_layer_norm.", "norm2."),
    ("ffn.fc1.", "mlp.fc1."),
    ("ffn.fc2.", "mlp.fc2."),
    ("ffn.dwconv.conv.", "mlp.dwconv."),
)
_WRAPPER_KEYS = ("state_dict_ema", "model_ema", "state_dict", "model", "module")
# top-level key prefixes of an RMT backbone, released or ours
_BACKBONE_ROOTS = ("patch_embed.", "layers.", "stem.", "stages.")


class CheckpointError(ValueError):
    """A checkpoint cannot be read or does not fit the model; the message says why."""


# ------------------------------------------------------------------------------------------------
# reading
# ------------------------------------------------------------------------------------------------

def read_checkpoint(path: str | Path) -> Tuple[Dict[str, Any], Dict[str, str]]:
    """Read a checkpoint file without unpickling arbitrary objects.

    Returns ``(object, metadata)``: the loaded object (a dict) and, for safetensors, its metadata.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path)), meta
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"checkpoint '{path}' is not a readable safetensors file ({e}); "
                                  "the file may be truncated: download or convert it again") from e
    obj = load_torch_file(path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a state dict")
    return obj, {}


def load_torch_file(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """``torch.load(path, weights_only=True)``, with errors that say what the file is.

    A file that is not a PyTorch file at all (neither the zip archive of ``torch.save`` nor its
    pre-1.6 pickle format) is called so before torch reads it; one that holds Python objects besides
    tensors and plain containers is refused by name, and the advice to load it unsafely that torch's
    own error gives is never passed on.
    """
    import pickle
    import warnings
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
    if not head:
        raise CheckpointError(f"checkpoint '{path}' is an empty file: download or copy it again")
    if not (head.startswith(b"PK") or head[:1] == b"\x80"):  # zip archive / pickle protocol 2+
        raise CheckpointError(
            f"'{path}' is not a checkpoint: PyTorch files are zip archives (or pickles, before PyTorch 1.6), "
            f"and this one starts with the bytes {head.hex(' ')}")
    try:
        with warnings.catch_warnings():  # torch warns about the pickle protocol of non-torch files
            warnings.simplefilter("ignore")
            return torch.load(str(path), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found:
            raise CheckpointError(
                f"checkpoint '{path}' holds a Python object ({found[1]}) besides tensors and plain containers; "
                "such objects are not loaded for safety (unpickling them can run any code). Save the weights "
                "alone where the file was made, e.g. torch.save(model.state_dict(), path)") from None
        raise CheckpointError(f"'{path}' is not a checkpoint: its content is not what torch.save writes "
                              "(or the file is damaged)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "unexpected end of file"
        raise CheckpointError(
            f"checkpoint '{path}' could not be read as a PyTorch file ({type(e).__name__}: {first}); it is "
            "probably truncated (an interrupted download or copy): download or copy it again") from None


def unwrap_state_dict(obj: Mapping[str, Any], prefer_ema: bool = True) -> StateDict:
    """Find the state dict inside a checkpoint object.

    Looks under ``model_ema``/``state_dict_ema`` (when ``prefer_ema``), ``state_dict``, ``model``
    or takes a bare dict; strips a ``module.`` prefix left by DataParallel/DDP.
    """
    order = _WRAPPER_KEYS if prefer_ema else _WRAPPER_KEYS[2:]
    for key in order:
        inner = obj.get(key)
        if isinstance(inner, Mapping) and inner and any(torch.is_tensor(v) for v in inner.values()):
            obj = inner
            break
    sd = {k: v for k, v in obj.items() if torch.is_tensor(v)}
    if not sd:
        raise CheckpointError("checkpoint holds no tensors under 'model', 'model_ema', 'state_dict' "
                              "or at top level")
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    if not any(k.startswith(_BACKBONE_ROOTS) for k in sd) and any(k.startswith("backbone.") for k in sd):
        # a whole mmdet/mmseg model: keep its backbone (necks and heads are not RMT weights)
        sd = {k[len("backbone."):]: v for k, v in sd.items() if k.startswith("backbone.")}
    return sd


# ------------------------------------------------------------------------------------------------
# layouts
# ------------------------------------------------------------------------------------------------

def is_released_layout(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("patch_embed.", "layers.")) for k in sd)


def released_to_ours(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Rename (and fuse q/k/v of) a released state dict into this package's layout."""
    out: StateDict = {}
    qkv: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if ".Relpos." in key:
            continue  # rotation/decay buffers are derived from the config
        new = key
        if key.startswith("patch_embed.proj."):
            new = "stem." + key[len("patch_embed.proj."):]
        elif key.startswith("extra_norms."):
            new = "feature_norms." + key[len("extra_norms."):]
        elif m := re.match(r"layers\.(\d+)\.downsample\.(reduction|norm)\.(.+)", key):
            i, part, rest = int(m[1]), m[2], m[3]
            new = f"stages.{i + 1}.downsample.{'conv' if part == 'reduction' else 'norm'}.{rest}"
        elif m := re.match(r"layers\.(\d+)\.blocks\.(\d+)\.(.+)", key):
            prefix, rest = f"stages.{m[1]}.blocks.{m[2]}.", m[3]
            if pm := re.match(r"retention\.([qkv])_proj\.(weight|bias)", rest):
                qkv.setdefault(f"{prefix}attn.qkv.{pm[2]}", {})[pm[1]] = value
                continue
            if rest in ("gamma_1", "gamma_2"):
                new, value = f"{prefix}ls{rest[-1]}.gamma", value.reshape(-1)
            else:
                for old_part, new_part in _BLOCK_RENAMES:
                    if rest.startswith(old_part):
                        rest = new_part + rest[len(old_part):]
                        break
                new = prefix + rest
        elif key.startswith(("proj.", "norm.")):
            new = "head." + key
        elif key.startswith("head."):
            new = "head.fc." + key[len("head."):]
        out[new] = value
    for key, parts in qkv.items():
        if set(parts) != {"q", "k", "v"}:
            raise CheckpointError(f"checkpoint has only {sorted(parts)} of the q/k/v projections for {key}")
        out[key] = torch.cat([parts["q"], parts["k"], parts["v"]], dim=0)
    return out


def ours_to_released(sd: Mapping[str, torch.Tensor], model: torch.nn.Module) -> StateDict:
    """Write a state dict of ours in the released layout (with the ``Relpos`` buffers).

    Classification models give the released classification layout; a model with
    ``feature_norms`` gives ``extra_norms.*`` as the dense-prediction backbones have.
    """
    from .ops.masa import head_decays, rotation_angles
    out: StateDict = {}
    inverse = [(new, old) for old, new in _BLOCK_RENAMES]
    for key, value in sd.items():
        new = key
        if key.startswith("stem."):
            new = "patch_embed.proj." + key[len("stem."):]
        elif key.startswith("feature_norms."):
            new = "extra_norms." + key[len("feature_norms."):]
        elif m := re.match(r"stages\.(\d+)\.downsample\.(conv|norm)\.(.+)", key):
            new = f"layers.{int(m[1]) - 1}.downsample.{'reduction' if m[2] == 'conv' else 'norm'}.{m[3]}"
        elif m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.+)", key):
            prefix, rest = f"layers.{m[1]}.blocks.{m[2]}.", m[3]
            if qm := re.match(r"attn\.qkv\.(weight|bias)", rest):
                for name, part in zip("qkv", value.chunk(3, dim=0)):
                    out[f"{prefix}retention.{name}_proj.{qm[1]}"] = part.clone()
                continue
            if lm := re.match(r"ls([12])\.gamma", rest):
                new, value = f"{prefix}gamma_{lm[1]}", value.reshape(1, 1, 1, -1)
            else:
                for ours, theirs in inverse:
                    if rest.startswith(ours):
                        rest = theirs + rest[len(ours):]
                        break
                new = prefix + rest
        elif key.startswith("head.fc."):
            new = "head." + key[len("head.fc."):]
        elif key.startswith(("head.proj.", "head.norm.")):
            new = key[len("head."):]
        out[new] = value
    for i, stage in enumerate(model.stages):
        out[f"layers.{i}.Relpos.angle"] = rotation_angles(stage.head_dim)
        out[f"layers.{i}.Relpos.decay"] = head_decays(stage.num_heads, stage.init_value, stage.heads_range)
    return out


# ------------------------------------------------------------------------------------------------
# architecture of a checkpoint, for errors and for `rmt convert`
# ------------------------------------------------------------------------------------------------

def describe_architecture(sd: Mapping[str, torch.Tensor]) -> Dict[str, Any]:
    """Widths, depths and head classes of a state dict in this package's layout."""
    depths: Dict[int, int] = {}
    widths: Dict[int, int] = {}
    for key, value in sd.items():
        if m := re.match(r"stages\.(\d+)\.blocks\.(\d+)\.norm1\.weight", key):
            i, j = int(m[1]), int(m[2])
            depths[i] = max(depths.get(i, 0), j + 1)
            widths[i] = value.shape[0]
    n = max(depths) + 1 if depths else 0
    fc = sd.get("head.fc.weight")
    return dict(embed_dims=tuple(widths.get(i, 0) for i in range(n)),
                depths=tuple(depths.get(i, 0) for i in range(n)),
                num_classes=int(fc.shape[0]) if fc is not None else 0,
                feature_norms=any(k.startswith("feature_norms.") for k in sd),
                aux_head="aux_head.weight" in sd)


def guess_variant(sd: Mapping[str, torch.Tensor]) -> Optional[str]:
    """The registered variant whose widths and depths match the state dict, if any."""
    from .model import MODEL_ARGS
    arch = describe_architecture(sd)
    for name, args in MODEL_ARGS.items():
        if tuple(args["embed_dims"]) == arch["embed_dims"] and tuple(args["depths"]) == arch["depths"]:
            return name
    return None


def _arch_text(arch: Mapping[str, Any]) -> str:
    return f"widths {list(arch['embed_dims'])}, depths {list(arch['depths'])}"


# ------------------------------------------------------------------------------------------------
# fitting a state dict to a model
# ------------------------------------------------------------------------------------------------

def _check_token_label_kind(sd: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                            fresh_aux_head: bool) -> None:
    """Refuse a token-label classifier (``aux_head``) loaded as a plain one and the reverse, naming which is which.

    A model without class heads (features, ``num_classes=0``) takes either; a plain checkpoint of
    another class count, or one without a classifier, or ``fresh_aux_head`` (training from a plain
    checkpoint) leaves the model's new aux head as initialised."""
    ckpt_aux, model_aux = "aux_head.weight" in sd, "aux_head.weight" in own
    if ckpt_aux == model_aux or "head.fc.weight" not in own:
        return
    variant = guess_variant(sd)
    if ckpt_aux:
        tagged = f"'{variant}.tl_in1k'" if variant in ("rmt_small", "rmt_base", "rmt_large") else \
            f"'{variant or 'rmt_*'}' with use_aux_head=True"
        raise CheckpointError(
            "checkpoint is a token-label classifier (RMT-S*/B*/L* kind, with aux_head), but the model is a "
            f"plain RMT classifier without the aux head; create {tagged} to keep the aux head (its eval "
            "logits add it), or num_classes=0 for the features")
    same_classes = "head.fc.weight" in sd and sd["head.fc.weight"].shape == own["head.fc.weight"].shape
    if same_classes and not fresh_aux_head:
        plain = f"'{variant}'" if variant else "the plain variant"
        raise CheckpointError(
            "checkpoint is a plain RMT classifier (no aux_head), but the model is a token-label classifier "
            f"whose eval logits add its aux head (the .tl_in1k tags, use_aux_head=True); create {plain} "
            "for this checkpoint")


def filter_state_dict(obj: Mapping[str, Any], model: torch.nn.Module, prefer_ema: bool = True,
                      fresh_aux_head: bool = False) -> StateDict:
    """Turn any supported checkpoint object into a state dict that loads strictly into ``model``.

    * converts the released layout;
    * a classifier of another size (or none) leaves the model's freshly initialised heads in place;
    * per-stage feature norms absent from the checkpoint start fresh, those the model lacks are dropped;
    * a token-label checkpoint (``aux_head``) for a plain classifier, or the reverse, raises
      :class:`CheckpointError` saying which is which (``fresh_aux_head=True`` lets a plain checkpoint
      start a token-label model, whose aux head then keeps its initial values);
    * anything else that does not fit raises :class:`CheckpointError` naming both architectures.
    """
    sd = unwrap_state_dict(obj, prefer_ema)
    if is_released_layout(sd):
        sd = released_to_ours(sd)
    own = model.state_dict()
    ckpt_arch, model_arch = describe_architecture(sd), describe_architecture(own)
    if (ckpt_arch["embed_dims"], ckpt_arch["depths"]) != (model_arch["embed_dims"], model_arch["depths"]):
        variant = guess_variant(sd)
        raise CheckpointError(
            f"checkpoint is {'an ' + variant if variant else 'a model'} with {_arch_text(ckpt_arch)}, "
            f"but the model has {_arch_text(model_arch)}; create the matching variant"
            + (f" ('{variant}')" if variant else ""))

    _check_token_label_kind(sd, own, fresh_aux_head)
    for prefix in ("head.fc.", "aux_head."):  # class heads of another size (or absent) start fresh
        head_keys = [k for k in own if k.startswith(prefix)]
        if head_keys and any(k not in sd or sd[k].shape != own[k].shape for k in head_keys):
            if prefix == "head.fc." and "head.fc.weight" in sd:
                _logger.info("classifier has %d classes in the checkpoint, %d in the model: re-initialised",
                             ckpt_arch["num_classes"], model.num_classes)
            for k in head_keys:
                sd[k] = own[k]
    for prefix, what in (("head.", "classifier head"), ("feature_norms.", "per-stage feature norms")):
        missing = [k for k in own if k.startswith(prefix) and k not in sd]
        if missing:
            _logger.warning("checkpoint has no %s: %d tensors keep their initial values", what, len(missing))
            sd.update({k: own[k] for k in missing})
    sd = {k: v for k, v in sd.items()
          if k in own or not k.startswith(("head.", "aux_head.", "feature_norms."))}

    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
             for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
            if items:
                parts.append(f"{len(items)} {label} (e.g. {', '.join(items[:3])})")
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(parts)
                              + " (a different mlp_ratio, head width or layer-scale setting?)")
    return {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in sd.items()}


def load_into(model: torch.nn.Module, path: str | Path, prefer_ema: bool = True,
              fresh_aux_head: bool = False) -> Dict[str, str]:
    """Read ``path`` and load it strictly into ``model``; returns the file's metadata
    (``fresh_aux_head``: see :func:`filter_state_dict`)."""
    obj, meta = read_checkpoint(path)
    try:
        sd = filter_state_dict(obj, model, prefer_ema, fresh_aux_head)
    except CheckpointError as e:
        raise CheckpointError(f"'{path}': {e}") from None
    model.load_state_dict(sd, strict=True)
    return meta


def save_safetensors(sd: Mapping[str, torch.Tensor], path: str | Path,
                     metadata: Optional[Mapping[str, str]] = None) -> None:
    """Write a state dict to ``.safetensors`` atomically (temporary file, then rename)."""
    from safetensors.torch import save_file
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in sd.items()}, str(tmp),
              metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)


def identify(obj: Mapping[str, Any], meta: Mapping[str, str], source: str | Path,
             model_name: Optional[str] = None, prefer_ema: bool = True
             ) -> Tuple[str, StateDict, Dict[str, Any]]:
    """``(variant, state dict in our layout, architecture)`` of a checkpoint object read from ``source``.

    The variant is ``model_name``, else the file's metadata, else recognised from the shapes.
    """
    sd = unwrap_state_dict(obj, prefer_ema)
    if is_released_layout(sd):
        sd = released_to_ours(sd)
    arch = describe_architecture(sd)
    name = model_name or meta.get("rmt_variant") or guess_variant(sd)
    if name is None:
        raise CheckpointError(f"'{source}': {_arch_text(arch)} match no registered RMT variant; "
                              "pass the model name explicitly")
    return name, sd, arch


def convert(src: str | Path, dst: str | Path, model_name: Optional[str] = None,
            prefer_ema: bool = True) -> Tuple[str, Dict[str, Any]]:
    """Convert any supported checkpoint to a ``.safetensors`` file in this package's layout.

    The variant is taken from ``model_name`` or recognised from the tensor shapes. Returns the
    variant name and the architecture description.
    """
    import timm
    from .token_label import aux_head_kwargs
    obj, meta = read_checkpoint(src)
    name, sd, arch = identify(obj, meta, src, model_name, prefer_ema)
    model = timm.create_model(name, num_classes=arch["num_classes"], feature_norms=arch["feature_norms"],
                              device="meta", **aux_head_kwargs(name, arch["aux_head"]))
    try:
        fitted = filter_state_dict(sd, model)
    except CheckpointError as e:
        raise CheckpointError(f"'{src}': {e}") from None
    if not arch["num_classes"]:
        fitted = {k: v for k, v in fitted.items() if not k.startswith("head.")}
    name = name.split(".")[0]
    meta = dict(meta, rmt_variant=name, num_classes=str(arch["num_classes"]),
                feature_norms=str(arch["feature_norms"]).lower(), aux_head=str(arch["aux_head"]).lower(),
                format="pt")
    save_safetensors(fitted, dst, meta)
    return name, arch
