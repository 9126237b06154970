"""Checks of what users hand the model: image tensors and attention-form specifications."""
from typing import Sequence, Tuple, Union

import torch

from .ops.masa import FORMS

MIN_INPUT_SIZE = 32
FormSpec = Union[str, Sequence[str]]


@torch.jit.ignore
def check_image(x: torch.Tensor, in_chans: int) -> None:
    """Raise ValueError unless ``x`` is ``(b, in_chans, H, W)`` with ``H, W >= MIN_INPUT_SIZE``."""
    if x.ndim != 4 or x.shape[1] != in_chans:
        raise ValueError(
            f"RMT expects images of shape (batch, {in_chans}, height, width), got {tuple(x.shape)}; "
            f"convert the images to {in_chans} channels or create the model with a matching in_chans")
    if x.shape[-2] < MIN_INPUT_SIZE or x.shape[-1] < MIN_INPUT_SIZE:
        raise ValueError(
            f"RMT needs inputs of at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels (output stride 32), "
            f"got {x.shape[-2]}x{x.shape[-1]}; resize or pad the image")


def normalize_forms(forms: FormSpec, num_stages: int) -> Tuple[str, ...]:
    """Accept ``"full"``, ``"decomposed"``, a per-stage sequence, or a string like ``"TTFF"``."""
    if isinstance(forms, str):
        if forms in FORMS:
            return (forms,) * num_stages
        if len(forms) == num_stages and set(forms) <= {"T", "F"}:
            return tuple("decomposed" if f == "T" else "full" for f in forms)
        raise ValueError(
            f"attention form {forms!r} not understood: use 'decomposed', 'full', a string of "
            f"{num_stages} letters T/F (T = decomposed), or a sequence of {num_stages} forms")
    forms = tuple(forms)
    if len(forms) != num_stages or any(f not in FORMS for f in forms):
        raise ValueError(f"expected {num_stages} attention forms from {FORMS}, got {forms!r}")
    return forms
