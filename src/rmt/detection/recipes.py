"""The released detection training recipes, by their config names, and the defaults they imply.

Each :class:`Recipe` is one config of the released mmdetection code (``detect/configs/RMT/`` of
github qhfan/RMT): detector, variant (``t``/``s``/``m``/``l`` = RMT-T/S/B/L), AdamW learning rate
at a total batch of 16, weight decay, drop path, schedule, augmentation, the MaSA forms its
backbone ran (``chunkwise_recurrents``: the T configs run stage 2 in the full form), and the COCO
val2017 AP the paper reports for it (None where the paper gives none).

``rmt detect train --recipe maskrcnn_s_1x`` trains one; without ``--recipe`` the recipe matching
the detector, variant and schedule supplies the defaults (:func:`default_recipe`), and for
combinations the authors did not release (e.g. Cascade with RMT-T, FCOS) the closest values:
the variant's drop path, lr 2e-4 for RMT-L and 4e-4 otherwise, the detector family's weight decay.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

VARIANTS = {"t": "rmt_tiny", "s": "rmt_small", "m": "rmt_base", "l": "rmt_large"}
# drop path of each variant in every released detection config
DROP_PATH = {"rmt_tiny": 0.1, "rmt_small": 0.15, "rmt_base": 0.4, "rmt_large": 0.5}
_FAMILY = {"maskrcnn": "mask_rcnn", "retinanet": "retinanet", "casrcnn": "cascade_mask_rcnn"}
_SCHEDULES = {"1x": (12, (8, 11)), "3x": (36, (27, 33))}


@dataclass(frozen=True)
class Recipe:
    """One released detection config."""
    name: str
    detector: str
    model: str
    lr: float                    # AdamW at a total batch of 16
    weight_decay: float
    drop_path: float
    schedule: str                # "1x" (12 epochs, steps 8, 11) or "3x" (36 epochs, steps 27, 33)
    attn_forms: str              # MaSA form per stage (T decomposed, F full)
    box_ap: Optional[float] = None   # paper, COCO val2017
    mask_ap: Optional[float] = None

    @property
    def epochs(self) -> int:
        return _SCHEDULES[self.schedule][0]

    @property
    def milestones(self) -> Tuple[int, ...]:
        return _SCHEDULES[self.schedule][1]

    @property
    def crop(self) -> bool:
        """The 3x pipeline: multi-scale resize or resize + random crop + multi-scale resize."""
        return self.schedule == "3x"


def _recipe(name: str, lr: float, box_ap: Optional[float], mask_ap: Optional[float] = None) -> Recipe:
    family, variant, schedule = name.split("_")
    model = VARIANTS[variant]
    detector = _FAMILY[family]
    return Recipe(name, detector, model, lr, 1e-4 if detector == "retinanet" else 0.05, DROP_PATH[model],
                  schedule, "TTFF" if variant == "t" else "TTTF", box_ap, mask_ap)


RECIPES: Dict[str, Recipe] = {r.name: r for r in (
    _recipe("maskrcnn_t_1x", 4e-4, 47.1, 42.6),
    _recipe("maskrcnn_s_1x", 4e-4, 49.0, 43.9),
    _recipe("maskrcnn_m_1x", 4e-4, 51.1, 45.5),
    _recipe("maskrcnn_l_1x", 2e-4, 51.6, 45.9),
    _recipe("maskrcnn_s_3x", 4e-4, 50.7, 44.9),
    _recipe("maskrcnn_m_3x", 2e-4, 52.2, 46.1),
    _recipe("maskrcnn_l_3x", 2e-4, None, None),
    _recipe("retinanet_t_1x", 4e-4, 45.1),
    _recipe("retinanet_s_1x", 4e-4, 47.8),
    _recipe("retinanet_m_1x", 4e-4, 49.1),
    _recipe("retinanet_l_1x", 2e-4, 49.4),
    _recipe("casrcnn_s_3x", 4e-4, 53.2, 46.1),
    _recipe("casrcnn_m_3x", 2e-4, 54.5, 47.2),
)}


def get_recipe(name: str) -> Recipe:
    """The released recipe ``name``; ValueError listing the names otherwise."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; the released ones are {', '.join(RECIPES)}")
    return RECIPES[name]


def default_recipe(detector: str, model: str, schedule: str) -> Recipe:
    """The released recipe of ``detector`` + ``model`` + ``schedule``, or the closest values.

    Unreleased combinations take the variant's drop path, lr 2e-4 for RMT-L (4e-4 otherwise),
    weight decay 1e-4 for RetinaNet/FCOS (0.05 otherwise) and the TTTF forms; their name is "".
    """
    for recipe in RECIPES.values():
        if (recipe.detector, recipe.model, recipe.schedule) == (detector, model, schedule):
            return recipe
    if schedule not in _SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(_SCHEDULES)}, got {schedule!r}")
    one_stage = detector in ("retinanet", "fcos")
    return Recipe("", detector, model, 2e-4 if model == "rmt_large" else 4e-4, 1e-4 if one_stage else 0.05,
                  DROP_PATH.get(model, 0.1), schedule, "TTTF")


def recipes_table() -> str:
    """A Markdown table of the recipes with the paper's AP."""
    rows = ["| recipe | detector | backbone | lr | weight decay | drop path | epochs (LR steps) | augmentation "
            "| MaSA forms | paper box AP | paper mask AP |", "|" + "---|" * 11]
    for r in RECIPES.values():
        aug = "flip, multi-scale or crop + multi-scale" if r.crop else "flip"
        rows.append(f"| `{r.name}` | {r.detector} | {r.model} | {r.lr:g} | {r.weight_decay:g} | {r.drop_path:g} | "
                    f"{r.epochs} ({', '.join(map(str, r.milestones))}) | {aug} | {r.attn_forms} | "
                    f"{r.box_ap if r.box_ap is not None else '-'} | {r.mask_ap if r.mask_ap is not None else '-'} |")
    return "\n".join(rows)
