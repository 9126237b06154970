"""Settings of a detection training run, their defaults (the released recipes) and resume rules.

A run is fully described by a :class:`TrainConfig`, stored in every checkpoint. Settings left
unset come from the named ``recipe`` or, without one, from the released recipe of the detector,
variant and schedule (:func:`rmt.detection.recipes.default_recipe`). Resuming takes the
checkpoint's settings; only the fields in :data:`RUN_FIELDS` (where and how fast the run executes,
not what it computes) may change on the command line.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, List, Optional, Tuple

from .recipes import default_recipe, get_recipe


@dataclass(frozen=True)
class Schedule:
    """An mmdetection-style schedule: ``epochs``, LR x0.1 after the ``milestones`` epochs."""
    epochs: int
    milestones: Tuple[int, ...]
    multiscale: bool


SCHEDULES = {
    "1x": Schedule(epochs=12, milestones=(8, 11), multiscale=False),
    "3x": Schedule(epochs=36, milestones=(27, 33), multiscale=True),
}
BASE_BATCH = 16                     # the recipes' AdamW LR is for a total batch of 16, scaled linearly
WARMUP_RATIO = 1e-3                 # linear warm-up starts at lr * WARMUP_RATIO
TEST_SIZE = (800, 1333)             # shorter side, longer side limit


@dataclass
class TrainConfig:
    # data: a COCO-style root (or "shapes" for the built-in dataset), or explicit folders/files
    data: Optional[str] = None
    train_images: Optional[str] = None
    train_ann: Optional[str] = None
    val_images: Optional[str] = None
    val_ann: Optional[str] = None
    shapes_size: int = 256          # image size of the built-in shapes dataset
    # a released recipe (rmt.detection.recipes.RECIPES) supplying the defaults below
    recipe: Optional[str] = None
    # model
    detector: Optional[str] = None  # None: the recipe's, else mask_rcnn
    model: Optional[str] = None     # None: the recipe's, else rmt_tiny
    pretrained: Optional[str] = None
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    detector_kwargs: Dict[str, Any] = field(default_factory=dict)
    attn_forms: Optional[str] = None  # None: the recipe's (TTFF for RMT-T, TTTF otherwise)
    drop_path: Optional[float] = None  # backbone drop path; None: the recipe's
    frozen_stages: int = -1
    bn: str = "sync"                # sync (SyncBatchNorm under multi-GPU DDP), batch, frozen
    fpn_channels: int = 256
    mask_head_channels: int = 256   # Mask R-CNN mask head conv width
    box_head_size: int = 1024       # Mask R-CNN box head FC width
    # schedule (None: from the recipe and schedule)
    schedule: Optional[str] = None  # None: the recipe's, else 1x
    epochs: Optional[int] = None
    milestones: Optional[List[int]] = None
    multiscale: Optional[bool] = None
    crop: Optional[bool] = None     # the 3x pipeline's random-crop policy; None: on for 3x
    lr: Optional[float] = None      # None: the recipe's lr x total batch / 16
    weight_decay: Optional[float] = None
    warmup_iters: int = 500
    batch_size: int = 2             # images per process
    min_size: Optional[int] = None  # shorter side; None: 800 (the shapes dataset: its own size)
    max_size: Optional[int] = None  # longer side limit; None: 1333 (the shapes dataset: its own size)
    clip_grad: Optional[float] = None
    seed: int = 0
    # run (may change when resuming)
    out: str = "runs/detect"
    device: Optional[str] = None
    amp: Optional[str] = None       # bf16 or none; None: bf16 on CUDA, none on CPU
    workers: int = 4
    log_every: int = 20
    save_every: int = 500           # iterations between checkpoints (and at every epoch end)
    eval_every: int = 1             # epochs between evaluations (0: only at the end)
    max_steps: Optional[int] = None # stop (with a checkpoint) after this many optimizer steps
    skip_bad_images: bool = False   # count and skip images that cannot be loaded instead of stopping

    def resolved(self, world_size: int) -> "TrainConfig":
        """A copy with the recipe, the schedule preset and the linear LR scaling filled in."""
        d = asdict(self)
        if self.recipe:
            recipe = get_recipe(self.recipe)
            for key in ("detector", "model"):
                if d[key] is not None and d[key] != getattr(recipe, key):
                    raise ValueError(f"recipe {recipe.name} trains {key} {getattr(recipe, key)!r}, not {d[key]!r}: "
                                     f"drop --{key} or choose another recipe")
            if d["schedule"] not in (None, recipe.schedule):
                raise ValueError(f"recipe {recipe.name} is a {recipe.schedule} schedule, not {d['schedule']}")
        else:
            recipe = default_recipe(d["detector"] or "mask_rcnn", d["model"] or "rmt_tiny", d["schedule"] or "1x")
        kwargs_drop = d["backbone_kwargs"].get("drop_path_rate")
        if kwargs_drop is not None:
            if d["drop_path"] is not None and d["drop_path"] != kwargs_drop:
                raise ValueError(f"drop path given twice: {d['drop_path']} and backbone_kwargs drop_path_rate "
                                 f"{kwargs_drop}; give one")
            d["drop_path"] = kwargs_drop
        for key in ("detector", "model", "schedule", "attn_forms", "weight_decay", "drop_path"):
            if d[key] is None:
                d[key] = getattr(recipe, key)
        if d["schedule"] not in SCHEDULES:
            raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {d['schedule']!r}")
        if self.bn not in ("sync", "batch", "frozen"):
            raise ValueError(f"bn must be 'sync', 'batch' or 'frozen', got {self.bn!r}")
        if self.amp not in (None, "bf16", "none"):
            raise ValueError(f"amp must be 'bf16' or 'none', got {self.amp!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {self.batch_size}")
        preset = SCHEDULES[d["schedule"]]
        d["epochs"] = self.epochs if self.epochs is not None else preset.epochs
        if self.milestones is not None:
            d["milestones"] = list(self.milestones)
        elif self.epochs is None:
            d["milestones"] = list(preset.milestones)
        else:  # keep the preset's position of the LR steps for a custom length (8/12, 11/12)
            d["milestones"] = [max(1, round(m * d["epochs"] / preset.epochs)) for m in preset.milestones]
        d["multiscale"] = preset.multiscale if self.multiscale is None else self.multiscale
        d["crop"] = preset.multiscale if self.crop is None else self.crop
        shapes = self.data == "shapes" and not (self.train_ann or self.val_ann)
        if self.min_size is None:
            d["min_size"] = self.shapes_size if shapes else TEST_SIZE[0]
        if self.max_size is None:
            d["max_size"] = self.shapes_size if shapes else TEST_SIZE[1]
        d["lr"] = self.lr if self.lr is not None else recipe.lr * self.batch_size * world_size / BASE_BATCH
        return TrainConfig(**d)

    def crop_sizes(self) -> Tuple[Tuple[int, ...], Tuple[int, int]]:
        """The crop policy's first shorter sides and crop size range: (400, 500, 600) and (384, 600)
        at ``min_size`` 800, scaled with ``min_size``."""
        f = self.min_size / TEST_SIZE[0]
        return tuple(round(s * f) for s in (400, 500, 600)), (round(384 * f), round(600 * f))

    def train_min_sizes(self) -> List[int]:
        """Shorter sides drawn per batch in multi-scale training (480..min_size step 32), else one."""
        if not self.multiscale:
            return [self.min_size]
        low = round(self.min_size * 0.6)
        return list(range(low, self.min_size, 32)) + [self.min_size]


# settings that do not change what is computed: free to differ when resuming
RUN_FIELDS = ("out", "device", "workers", "log_every", "save_every", "eval_every", "max_steps", "skip_bad_images")


def merge_config(explicit: Dict[str, Any], saved: Optional[Dict[str, Any]] = None) -> TrainConfig:
    """Defaults, then the checkpoint's settings (when resuming), then options given explicitly.

    Raises ValueError when an explicit option would change a resumed run's computation.
    """
    names = {f.name for f in fields(TrainConfig)}
    unknown = set(explicit) - names
    if unknown:
        raise ValueError(f"unknown settings {sorted(unknown)}")
    if saved is None:
        return TrainConfig(**explicit)
    base = {k: v for k, v in saved.items() if k in names}
    conflicts = [f"{k}={explicit[k]!r} (checkpoint: {base.get(k)!r})" for k in explicit
                 if k not in RUN_FIELDS and explicit[k] != base.get(k)]
    if conflicts:
        raise ValueError("resuming keeps the run's settings, but these differ from the checkpoint: "
                         + ", ".join(conflicts) + "; drop them or start a new run in another --out")
    base["max_steps"] = None  # a stop point applies to the run it was given to
    base.update({k: v for k, v in explicit.items() if k in RUN_FIELDS})
    return TrainConfig(**base)
