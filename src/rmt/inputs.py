"""Checks of what users hand the model: image tensors and attention-form specifications."""
from typing import Optional, Sequence, Tuple, Union

import torch

from .ops.masa import FORMS

MIN_INPUT_SIZE = 32
FormSpec = Union[str, Sequence[str]]


@torch.jit.ignore
def check_image(x: torch.Tensor, in_chans: int, weight: Optional[torch.Tensor] = None) -> None:
    """Raise ValueError unless ``x`` is ``(b, in_chans, H, W)`` with ``H, W >= MIN_INPUT_SIZE``, of the
    floating-point type of ``weight`` (the first layer's; under autocast: any it casts, not float64).

    (The weight itself is passed, not its dtype: TorchScript would hand a dtype over as a number.)
    """
    weight_dtype = weight.dtype if weight is not None else None
    expected = f"RMT expects images of shape (batch, {in_chans}, height, width), got {tuple(x.shape)}"
    if x.ndim == 3 and x.shape[0] == in_chans:
        raise ValueError(f"{expected}: one image without a batch dimension; add one with x.unsqueeze(0) "
                         "(or stack several images)")
    if x.ndim == 4 and x.shape[1] != in_chans and x.shape[-1] == in_chans:
        raise ValueError(f"{expected}: channels last; use x.permute(0, 3, 1, 2)")
    if x.ndim != 4:
        raise ValueError(f"{expected}: a batch of images has 4 dimensions")
    if x.shape[1] != in_chans:
        raise ValueError(f"{expected}; convert the images to {in_chans} channels or create the model with "
                         "a matching in_chans")
    if not x.is_floating_point():
        raise ValueError(
            f"RMT takes floating-point images, got {x.dtype}: convert them, e.g. x.float() / 255 for 8-bit "
            "pixels, then normalise with the model's mean and std (its pretrained_cfg)")
    castable = x.dtype != torch.float64  # what autocast casts
    if weight_dtype is not None and x.dtype != weight_dtype and not (castable and torch.is_autocast_enabled(x.device.type)):
        raise ValueError(f"the images are {x.dtype} but the model's weights are {weight_dtype}: convert the images "
                         f"with x.to({weight_dtype})" + (" (or run under torch.autocast)" if castable else ""))
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
