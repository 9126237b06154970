"""timm's RandAugment / AutoAugment / AugMix ops, made to run under current Pillow and to name a failing op.

timm keeps ``0`` to ``4`` bits in its posterize ops: ``PosterizeIncreasing`` keeps 0 bits at the top
of the magnitude range (reached by the paper's ``rand-m9-mstd0.5-inc1`` whenever the magnitude noise
draws 10 or more: 2% of its draws), and ``Posterize`` keeps 0 bits below magnitude 2.5 (in the
AutoAugment policies). Pillow 13 refuses 0 bits (``ValueError: bits must be between or equal to 1
and 8``), where every earlier Pillow applied its lookup table and returned an all-black image. timm
has no fix (its ``posterize`` still passes the 0 on, in 1.0.31 and on its main branch), so
:func:`prepare_auto_augment` swaps in :func:`posterize`, which gives what Pillow gave before 13: the
augmentation the paper was trained with, unchanged.

It also wraps every op so that an error names it (``RandAugment op PosterizeIncreasing(0,)``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from ..bad_images import StepError


def posterize(img, bits_to_keep: int, **kwargs):
    """timm's posterize, and for 0 bits the all-zero image every Pillow before 13 returned."""
    from timm.data.auto_augment import posterize as timm_posterize
    if bits_to_keep <= 0:
        return img.point([0] * 256 * len(img.getbands()))
    return timm_posterize(img, bits_to_keep, **kwargs)


class NamedOp:
    """An op function whose errors are raised as :class:`StepError` naming the op and its arguments."""

    def __init__(self, name: str, fn: Callable):
        self.name, self.fn = name, fn

    def __call__(self, img, *args, **kwargs):
        try:
            return self.fn(img, *args, **kwargs)
        except Exception as e:
            raise StepError(f"{self.name}{tuple(args)}", e) from e


def augment_ops(transform: Any) -> Iterator[Any]:
    """Every timm ``AugmentOp`` inside ``transform`` (a Compose, RandAugment, AutoAugment or AugMix)."""
    from timm.data.auto_augment import AugmentOp
    if isinstance(transform, AugmentOp):
        yield transform
        return
    if isinstance(transform, (list, tuple)):  # AutoAugment's sub-policies
        for item in transform:
            yield from augment_ops(item)
        return
    for attr in ("transforms", "ops", "policy"):
        inner = getattr(transform, attr, None)
        if isinstance(inner, (list, tuple)):
            yield from augment_ops(inner)


def prepare_auto_augment(transform: Any) -> Any:
    """Give the posterize ops of ``transform`` the 0-bit case and name every op in errors (in place)."""
    for op in augment_ops(transform):
        if not isinstance(op.aug_fn, NamedOp):
            fn = posterize if op.name.startswith("Posterize") else op.aug_fn
            op.aug_fn = NamedOp(op.name, fn)
    return transform
