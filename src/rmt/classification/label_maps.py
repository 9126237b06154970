"""Dense label maps of token labeling on disk: the format of the token labeling toolbox (``tlt``).

One map per training image: a tensor ``(2, k, h, w)`` saved with ``torch.save`` (float16 in the
published maps), ``[0]`` the teacher's top-k class scores (logits, no softmax) and ``[1]`` their
class indices, on a coarse ``h x w`` grid over the whole image (row-major, image orientation).
The published ImageNet maps (NFNet-F6) are ``(2, 5, 15, 15)``.

Where the maps live:

* image folders (``DATA/train/CLASS/NAME.JPEG``): ``DIR/CLASS/NAME.pt``, the image's path below the
  split folder with everything from the first dot of the file name replaced by ``.pt`` (the
  published maps' naming);
* data sets without image files (Fashion-MNIST's idx files): the maps of a split stacked in one
  file ``DIR/SPLIT.pt`` of shape ``(N, 2, k, h, w)``, image ``i``'s map at ``[i]``.

Reading never unpickles objects (``torch.load(weights_only=True)``); a missing or malformed file
raises :class:`LabelMapError` naming the image and the file.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable, List, Optional, Sequence, Tuple

import torch

from .data import BadImageError

__all__ = ["LabelMapError", "map_path", "read_map", "write_map", "read_packed", "write_packed",
           "check_maps", "validate_map"]


class LabelMapError(BadImageError):
    """A token-label map that is missing or malformed; the message names the image and the file."""


def map_path(label_root: str | Path, image_path: str | Path, image_root: str | Path) -> Path:
    """``label_root/CLASS/NAME.pt`` for the image ``image_root/CLASS/NAME.ext``."""
    rel = Path(os.path.relpath(image_path, image_root))
    return Path(label_root) / rel.parent / (rel.name.split(".")[0] + ".pt")


def validate_map(value, num_classes: Optional[int], where: str) -> torch.Tensor:
    """``value`` as a float32 ``(2, k, h, w)`` map, or :class:`LabelMapError` (``where`` names image and file)."""
    if not torch.is_tensor(value):
        raise LabelMapError(f"{where} holds a {type(value).__name__}, not a (2, k, h, w) tensor of top-k scores "
                            "and class indices")
    if value.ndim != 4 or value.shape[0] != 2 or min(value.shape) < 1:
        raise LabelMapError(f"{where} has shape {tuple(value.shape)}, not (2, k, h, w): top-k scores and class "
                            "indices on an h x w grid")
    value = value.float()
    scores, indices = value[0], value[1]
    if not torch.isfinite(scores).all():
        raise LabelMapError(f"{where} holds non-finite scores")
    if not (indices == indices.round()).all() or indices.min() < 0 or (
            num_classes is not None and indices.max() >= num_classes):
        top = f" in [0, {num_classes})" if num_classes is not None else ""
        raise LabelMapError(f"{where} holds class indices that are not whole numbers{top} "
                            f"(found {indices.min().item():g} .. {indices.max().item():g})")
    return value


def _describe(image: str, path: Path) -> str:
    return f"cannot read image '{image}': its token-label map '{path}'"


def read_map(path: str | Path, image: str, num_classes: Optional[int] = None) -> torch.Tensor:
    """The float32 map ``(2, k, h, w)`` of ``image`` stored at ``path``."""
    path = Path(path)
    where = _describe(image, path)
    if not path.is_file():
        raise LabelMapError(f"{where} does not exist; make the maps with `rmt token-labels make` or point "
                            "--token-label at the folder that holds them")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle of other objects, not a torch file at all
        raise LabelMapError(f"{where} is not a readable torch file ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''}); write it again") from None
    return validate_map(value, num_classes, where)


def _atomic_save(value, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(value, tmp)
    tmp.replace(path)


def encode(scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """``(2, k, h, w)`` from top-k ``scores`` and ``indices`` ``(k, h, w)``: float16 as the published maps
    (whose class indices are exact up to 2048), float32 for more classes."""
    dtype = torch.float16 if int(indices.max()) < 2048 else torch.float32
    return torch.stack([scores.to(dtype), indices.to(dtype)]).cpu()


def write_map(path: str | Path, scores: torch.Tensor, indices: torch.Tensor) -> None:
    """Write one image's map atomically (a temporary file, then a rename)."""
    _atomic_save(encode(scores, indices).contiguous(), Path(path))


def write_packed(path: str | Path, maps: torch.Tensor) -> None:
    """Write the stacked maps ``(N, 2, k, h, w)`` of a split atomically."""
    _atomic_save(maps.contiguous(), Path(path))


def read_packed(path: str | Path, count: int, num_classes: Optional[int] = None,
                names: str = "image") -> torch.Tensor:
    """The stacked float32 maps ``(count, 2, k, h, w)`` of a split (the file may hold more: the first ``count``)."""
    path = Path(path)
    if not path.is_file():
        raise LabelMapError(f"cannot read the {names}s' token-label maps: '{path}' does not exist; make them with "
                            "`rmt token-labels make` or point --token-label at the folder that holds them")
    try:
        value = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise LabelMapError(f"cannot read the {names}s' token-label maps: '{path}' is not a readable torch file "
                            f"({type(e).__name__}); write it again") from None
    if not torch.is_tensor(value) or value.ndim != 5 or value.shape[1] != 2:
        shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
        raise LabelMapError(f"cannot read the {names}s' token-label maps: '{path}' holds {shape}, not "
                            "(N, 2, k, h, w) stacked maps")
    if value.shape[0] < count:
        raise LabelMapError(f"cannot read {names} {value.shape[0]}: '{path}' holds maps of {value.shape[0]} "
                            f"images, the split has {count}")
    value = value[:count].float()
    bad = ~torch.isfinite(value[:, 0]).flatten(1).all(1)
    idx = value[:, 1]
    bad |= ((idx != idx.round()) | (idx < 0) | (idx >= (num_classes or float("inf")))).flatten(1).any(1)
    if bad.any():
        i = int(bad.nonzero()[0])
        validate_map(value[i], num_classes, f"cannot read {names} {i}: its token-label map in '{path}'")
    return value


def check_maps(pairs: Sequence[Tuple[str, Path]], num_classes: Optional[int], read: bool = True,
               workers: int = 8, progress: bool = True) -> Tuple[int, ...]:
    """Check the maps of ``(image, map file)`` pairs before training: every file exists, and (``read``)
    holds a valid map of one common shape. Returns that shape ``(2, k, h, w)`` (of the first map when
    not ``read``). Raises :class:`LabelMapError` naming the first bad image and file and the count."""
    from tqdm import tqdm
    if not pairs:
        return ()
    missing = [(image, path) for image, path in tqdm(pairs, desc="token-label maps: exist", unit="file",
                                                     disable=not progress, mininterval=1.0) if not path.is_file()]
    if missing:
        image, path = missing[0]
        more = f" ({len(missing)} of {len(pairs)} maps are missing)" if len(missing) > 1 else ""
        raise LabelMapError(f"{_describe(image, path)} does not exist{more}; make the maps with "
                            "`rmt token-labels make` or point --token-label at the folder that holds them")
    first = read_map(pairs[0][1], pairs[0][0], num_classes)
    shape = tuple(first.shape)
    if not read:
        return shape

    def one(pair):
        image, path = pair
        try:
            m = read_map(path, image, num_classes)
        except LabelMapError as e:
            return str(e)
        if tuple(m.shape) != shape:
            return (f"{_describe(image, path)} has shape {tuple(m.shape)}, the first map '{pairs[0][1]}' "
                    f"{shape}: all maps must share k and the grid")
        return None

    with ThreadPoolExecutor(max(1, workers)) as pool:
        errors = [e for e in tqdm(pool.map(one, pairs, chunksize=64), total=len(pairs), disable=not progress,
                                  desc="token-label maps: read", unit="file", mininterval=1.0) if e]
    if errors:
        more = f" ({len(errors)} of {len(pairs)} maps are bad)" if len(errors) > 1 else ""
        raise LabelMapError(errors[0] + more)
    return shape


def folder_pairs(samples: Iterable[Tuple[str, int]], image_root: str | Path,
                 label_root: str | Path) -> List[Tuple[str, Path]]:
    """``(image, map file)`` of every ``(image path, class)`` sample of an image folder."""
    return [(str(p), map_path(label_root, p, image_root)) for p, _ in samples]
