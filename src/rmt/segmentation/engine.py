"""Iteration-based training of Semantic FPN / UperNet on an ADE20K-layout dataset.

The paper's recipes are the defaults (:data:`RECIPES`): AdamW with a poly schedule on 512x512
crops of batch 16, 80k iterations for Semantic FPN and 160k (with 1500 warm-up iterations, an
auxiliary head and no weight decay on norms and biases) for UperNet. One process, or one per GPU
under torchrun (DDP, SyncBatchNorm); bf16 autocast on CUDA.

Nothing is lost on interruption: ``OUT/last.pt`` is rewritten atomically every
``checkpoint_interval`` iterations and when the run stops (Ctrl-C or SIGTERM stop it cleanly at
the end of the current iteration), and resuming continues exactly: the sampler position,
per-sample augmentation seeds, optimizer, schedule and every RNG state come back. Under torchrun
the run ends by logging the largest parameter difference between ranks (``{"event": "ranks", ...}``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

import timm.optim
import timm.scheduler
import torch
import torch.distributed as torch_dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from ..bad_images import BadImageError, SkipReport, bad_image_problem
from ..engine import (DistInfo, JsonlLogger, capture_rng_state, cleanup_distributed, load_checkpoint,
                      plot_curves, remove_partial_writes, report_rank_agreement, restore_rng_state,
                      save_checkpoint, seed_everything, setup_distributed)
from ..engine.distributed import all_reduce_mean, all_reduce_sum
from .data import (IGNORE_INDEX, EvalTransform, SegmentationFolder, TrainTransform, collate_skipping_bad,
                   parse_size, read_class_names, read_dataset_meta)
from .evaluation import SPEC_KEYS, evaluate, save_weights
from .metrics import format_scores, plot_per_class
from .models import build_segmenter, describe


@dataclass(frozen=True)
class Recipe:
    iterations: int
    lr: float
    weight_decay: float
    power: float           # poly schedule exponent
    min_lr: float
    warmup_iters: int
    warmup_ratio: float    # warm-up starts at lr * warmup_ratio
    no_decay_norms: bool   # no weight decay on norms and biases
    aux_weight: float      # loss weight of the auxiliary head (0: no auxiliary head)
    eval_interval: int


RECIPES: Dict[str, Recipe] = {
    # Semantic FPN, 80k (PVT's setting, as the paper): AdamW 1e-4, wd 1e-4, poly 0.9
    "fpn": Recipe(80_000, 1e-4, 1e-4, 0.9, 1e-6, 0, 1e-6, False, 0.0, 4000),
    # UperNet, 160k (Swin's setting): AdamW 6e-5, wd 0.01, warm-up 1500, poly 1.0, aux head 0.4
    "upernet": Recipe(160_000, 6e-5, 0.01, 1.0, 0.0, 1500, 1e-6, True, 0.4, 8000),
}

# fields that may change when a run is resumed (device, workers and log interval stay as saved unless
# given); everything else comes from the checkpoint, and giving another value is an error
RUNTIME_FIELDS = ("out", "resume", "device", "workers", "stop_after", "log_interval", "skip_bad_images")


@dataclass
class TrainConfig:
    data: str                                  # dataset folder, or "synthetic"
    out: str = "runs/segment"
    model: str = "rmt_small"
    head: str = "upernet"
    decoder: str = "mmseg"                     # mmseg (the released architecture) or smp
    pretrained: Optional[str] = None           # backbone checkpoint (any supported layout)
    classes: Optional[str] = None              # "ade20k", a class-list file, or None (dataset.json/ADE20K)
    reduce_zero_label: Optional[bool] = None   # None: dataset.json, else True (ADE20K)
    iterations: Optional[int] = None           # None: the recipe's
    batch_size: int = 16                       # total over all processes
    lr: Optional[float] = None
    weight_decay: Optional[float] = None
    warmup_iters: Optional[int] = None
    aux_weight: Optional[float] = None
    crop_size: Optional[Tuple[int, int]] = None  # None: dataset.json, else 512x512
    scale: Optional[Tuple[int, int]] = None      # None: dataset.json, else 2048x512 (long, short)
    drop_path_rate: Optional[float] = None
    backbone_kwargs: Dict[str, Any] = field(default_factory=dict)
    grad_checkpointing: bool = False
    precision: str = "auto"                    # auto (bf16 on CUDA, fp32 on CPU), bf16, fp32
    eval_interval: Optional[int] = None
    checkpoint_interval: int = 1000
    log_interval: int = 50
    workers: int = 4
    device: Optional[str] = None
    seed: int = 0
    resume: Optional[str] = None               # "auto" (OUT/last.pt) or a checkpoint path
    stop_after: Optional[int] = None           # stop after this many iterations of this run
    skip_bad_images: bool = False              # count and skip pairs that cannot be loaded instead of stopping


class TrainSampler(Sampler):
    """Endless ``(index, augmentation seed)`` pairs for one rank, starting at a given iteration.

    Every epoch is a fresh permutation (seeded by ``seed`` and the epoch); iteration ``i`` takes
    global batch ``i mod steps_per_epoch`` of it, and rank ``r`` the ``r``-th slice of that batch.
    """

    def __init__(self, size: int, per_rank: int, rank: int, world: int, seed: int, start_iteration: int = 0):
        global_batch = per_rank * world
        if size < global_batch:
            raise ValueError(f"the training set has {size} images, fewer than one batch of {global_batch}; "
                             "lower --batch-size")
        self.size, self.per_rank, self.rank, self.world, self.seed = size, per_rank, rank, world, seed
        self.steps_per_epoch = size // global_batch
        self.start = start_iteration

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        iteration, epoch, perm = self.start, -1, None
        while True:
            e, step = divmod(iteration, self.steps_per_epoch)
            if e != epoch:
                epoch = e
                perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed * 100_003 + e))
            base = (step * self.world + self.rank) * self.per_rank
            for pos in range(base, base + self.per_rank):
                yield int(perm[pos]), (self.seed * 1_000_003 + epoch) * 10_000_019 + pos
            iteration += 1


def seg_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Pixel-averaged cross-entropy over non-ignored pixels (0 when all are ignored)."""
    loss = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / (labels != IGNORE_INDEX).sum().clamp_min(1)


class _StopFlag:
    """Set by SIGINT/SIGTERM so the loop can stop at an iteration boundary and save."""

    def __init__(self):
        self.requested = False
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def resolve_config(cfg: TrainConfig) -> Tuple[TrainConfig, Optional[Dict[str, Any]]]:
    """Load the checkpoint to resume from (if any) and merge its configuration with ``cfg``."""
    last = Path(cfg.out) / "last.pt"
    if cfg.resume is None:
        if last.exists():
            raise RuntimeError(f"'{last}' exists: pass --resume to continue that run, or choose "
                                  "another --out")
        return cfg, None
    path = last if cfg.resume == "auto" else Path(cfg.resume)
    if not path.is_file():
        raise FileNotFoundError(f"nothing to resume: '{path}' does not exist")
    ckpt = load_checkpoint(path)
    saved = dict(ckpt["config"])
    saved.setdefault("decoder", "smp")  # runs started before the mmseg decoder existed used smp's
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    # a setting left at its default keeps the saved value; one given differently must not change the run
    changed = [k for k, v in dataclasses.asdict(cfg).items()
               if k not in RUNTIME_FIELDS and k != "data" and k in saved and k in defaults
               and v != defaults[k] and _comparable(v) != _comparable(saved[k])]
    if changed:
        given = ", ".join(f"{_option(k)} {getattr(cfg, k)!r} (the run has {saved[k]!r})" for k in changed)
        raise ValueError(f"resuming '{path}' keeps the settings it was started with, but {given} was given: "
                         "drop those options to continue the run, or start a new one with another --out")
    # this invocation's own settings; device, workers and log interval as saved unless given
    saved.update({k: getattr(cfg, k) for k in RUNTIME_FIELDS
                  if k in ("out", "resume", "stop_after", "skip_bad_images")
                  or getattr(cfg, k) != defaults[k] or k not in saved})
    if cfg.data:  # the dataset may have moved
        saved["data"] = cfg.data
    return TrainConfig(**saved), ckpt


def _comparable(value: Any) -> Any:
    """Tuples and lists compare alike (a checkpoint's config may hold either)."""
    return list(value) if isinstance(value, (tuple, list)) else value


def _option(name: str) -> str:
    """The ``rmt segment train`` option of a :class:`TrainConfig` field."""
    return {"iterations": "--iters", "drop_path_rate": "--drop-path"}.get(name, "--" + name.replace("_", "-"))


def prepare_data(cfg: TrainConfig, dist: DistInfo) -> Path:
    """The dataset folder; ``"synthetic"`` writes the built-in dataset to ``OUT/data`` first."""
    if cfg.data != "synthetic":
        root = Path(cfg.data)
        if not root.is_dir():
            raise FileNotFoundError(f"dataset folder '{root}' does not exist (or use --data synthetic)")
        return root
    from .synthetic import make_synthetic_dataset
    root = Path(cfg.out) / "data"
    if dist.is_main:
        make_synthetic_dataset(root)
    if dist.distributed:
        torch_dist.barrier()
    return root


def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Run (or resume) training; returns the final evaluation (empty without a validation split)."""
    dist = setup_distributed(cfg.device)
    try:
        return _train(cfg, dist)
    finally:
        cleanup_distributed()


def _train(cfg: TrainConfig, dist: DistInfo) -> Dict[str, Any]:
    cfg, ckpt = resolve_config(cfg)
    out = Path(cfg.out)
    root = prepare_data(cfg, dist)
    meta = read_dataset_meta(root)
    class_names = read_class_names(cfg.classes, root)
    num_classes = len(class_names)
    reduce = cfg.reduce_zero_label if cfg.reduce_zero_label is not None else meta.get("reduce_zero_label", True)
    crop = parse_size(cfg.crop_size or meta.get("crop_size", 512))
    scale = parse_size(cfg.scale or meta.get("scale", (2048, 512)))
    recipe = RECIPES[cfg.head] if cfg.head in RECIPES else None
    if recipe is None:
        raise ValueError(f"unknown head {cfg.head!r}; choose from {', '.join(RECIPES)}")
    iterations = cfg.iterations or recipe.iterations
    lr = cfg.lr if cfg.lr is not None else recipe.lr
    weight_decay = cfg.weight_decay if cfg.weight_decay is not None else recipe.weight_decay
    warmup = min(cfg.warmup_iters if cfg.warmup_iters is not None else recipe.warmup_iters, iterations - 1)
    aux_weight = cfg.aux_weight if cfg.aux_weight is not None else recipe.aux_weight
    eval_interval = min(cfg.eval_interval or recipe.eval_interval, iterations)
    checkpoint_interval = min(cfg.checkpoint_interval, iterations)
    if cfg.batch_size % dist.world_size:
        raise ValueError(f"--batch-size {cfg.batch_size} does not split over {dist.world_size} processes")
    per_rank = cfg.batch_size // dist.world_size
    precision = cfg.precision if cfg.precision != "auto" else ("bf16" if dist.device.type == "cuda" else "fp32")
    amp = precision == "bf16"

    seed_everything(cfg.seed, dist.rank)
    train_set = SegmentationFolder(root, "training", TrainTransform(crop, scale), reduce, cfg.skip_bad_images)
    try:
        val_set = SegmentationFolder(root, "validation", EvalTransform(), reduce)
    except FileNotFoundError as e:
        val_set = None
        if dist.is_main:
            print(f"no validation split, training without evaluation ({e})")

    backbone_kwargs = dict(cfg.backbone_kwargs)
    if cfg.drop_path_rate is not None:
        backbone_kwargs["drop_path_rate"] = cfg.drop_path_rate
    model = build_segmenter(cfg.model, cfg.head, num_classes, decoder=cfg.decoder, aux_head=aux_weight > 0,
                            pretrained=cfg.pretrained if ckpt is None else None,
                            backbone_kwargs=backbone_kwargs)
    spec = dict(model=cfg.model, head=cfg.head, decoder=cfg.decoder, num_classes=num_classes,
                aux_head=aux_weight > 0, backbone_kwargs=backbone_kwargs, class_names=list(class_names),
                reduce_zero_label=reduce, scale=list(scale), crop_size=list(crop))
    assert set(spec) == set(SPEC_KEYS)
    if cfg.grad_checkpointing:
        model.backbone.set_grad_checkpointing(True)
    model.to(dist.device)

    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=lr, weight_decay=weight_decay,
                                               filter_bias_and_bn=recipe.no_decay_norms)
    scheduler = timm.scheduler.PolyLRScheduler(
        optimizer, t_initial=iterations, power=recipe.power, lr_min=recipe.min_lr, warmup_t=warmup,
        warmup_lr_init=lr * recipe.warmup_ratio, t_in_epochs=False)
    start, best = 0, float("-inf")
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start, best = int(ckpt["iteration"]), float(ckpt.get("best_miou", best))
        rng = ckpt.get("rng") or []
        if dist.rank < len(rng):
            restore_rng_state(rng[dist.rank])
        if dist.is_main:
            print(f"resuming at iteration {start} of {iterations}")
    scheduler.step_update(start)

    net = model
    if dist.distributed:
        if dist.device.type == "cuda":  # batch statistics over all GPUs (PyTorch's SyncBN is CUDA-only)
            net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        net = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[dist.device.index] if dist.device.type == "cuda" else None)
    sampler = TrainSampler(len(train_set), per_rank, dist.rank, dist.world_size, cfg.seed, start)
    loader = DataLoader(train_set, batch_size=per_rank, sampler=sampler, num_workers=cfg.workers,
                        collate_fn=collate_skipping_bad, pin_memory=dist.device.type == "cuda", drop_last=True,
                        persistent_workers=cfg.workers > 0,
                        generator=torch.Generator().manual_seed(cfg.seed))

    logger = JsonlLogger(out / "log.jsonl", enabled=dist.is_main)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        remove_partial_writes(out)  # of checkpoint writes killed before their rename
        if ckpt is not None:  # the iterations after the checkpoint run (and are logged) again
            logger.drop_after(start)
        info = describe(model)
        print(f"{cfg.head} ({cfg.decoder} decoder) on {cfg.model}: {info['params'] / 1e6:.2f}M parameters, "
              f"{num_classes} classes, {len(train_set)} training images, {iterations} iterations of batch {cfg.batch_size} "
              f"({dist.world_size} process{'es' if dist.world_size > 1 else ''}, {precision}), crop "
              f"{crop[0]}x{crop[1]}, scale {scale[0]}x{scale[1]}")
        if ckpt is None:
            logger.log({"event": "start", "config": dataclasses.asdict(cfg), "spec": spec, **info})

    def checkpoint(iteration: int) -> None:
        rng = [capture_rng_state()]
        if dist.distributed:
            rng = [None] * dist.world_size
            torch_dist.all_gather_object(rng, capture_rng_state())
        if dist.is_main:
            save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                             "scheduler": scheduler.state_dict(), "iteration": iteration,
                             "config": dataclasses.asdict(cfg), "segmenter": spec, "rng": rng,
                             "best_miou": best}, out / "last.pt")

    def run_eval(iteration: int) -> Dict[str, Any]:
        nonlocal best
        result = evaluate(model, val_set, num_classes, dist, class_names=class_names, scale=scale,
                          crop=crop, stride=(crop[0] * 2 // 3, crop[1] * 2 // 3), amp=amp,
                          workers=min(cfg.workers, 2), desc=f"eval @{iteration}")
        if dist.is_main:
            logger.log({"step": iteration, "mIoU": result["mIoU"], "mAcc": result["mAcc"], "aAcc": result["aAcc"]})
            if result["mIoU"] > best:
                best = result["mIoU"]
                save_weights(model, spec, out / "best.safetensors", {"iteration": iteration, "mIoU": best})
            tqdm.write(f"iteration {iteration}: mIoU {result['mIoU']:.2f}  mAcc {result['mAcc']:.2f}  "
                       f"aAcc {result['aAcc']:.2f}  (best {best:.2f})")
        return result

    end = iterations if cfg.stop_after is None else min(iterations, start + cfg.stop_after)
    autocast = torch.autocast(dist.device.type, dtype=torch.bfloat16) if amp else contextlib.nullcontext()
    sums = torch.zeros(3, device=dist.device)  # loss, aux loss, steps
    result: Dict[str, Any] = {}
    net.train()
    batches = iter(loader)
    skipped_images = SkipReport()

    def next_batch(iteration: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """The next batch with at least one image; on an image that cannot be loaded (no
        --skip-bad-images) the run is saved where it stands and stopped."""
        try:
            while True:
                images, labels, skipped = next(batches)
                skipped_images.add(skipped)
                if images is not None:
                    return images, labels
        except BadImageError as e:
            saved = "the last checkpoint written is kept"
            if not dist.distributed:  # the others cannot join a save under torchrun
                checkpoint(iteration)
                saved = f"the run was saved at iteration {iteration}"
            raise BadImageError(f"{bad_image_problem(e)}. Training stopped; {saved} in "
                                f"'{out / 'last.pt'}': replace or remove the image and continue with --resume, "
                                "or add --skip-bad-images to count and skip such images") from None
    bar = tqdm(total=iterations, initial=start, desc="train", disable=not dist.is_main, dynamic_ncols=True)
    tick, done = time.time(), start
    with _StopFlag() as stop:
        for iteration in range(start, end):
            images, labels = next_batch(iteration)
            bad = labels[(labels != IGNORE_INDEX) & ((labels < 0) | (labels >= num_classes))]
            if bad.numel():
                raise ValueError(
                    f"label value {int(bad[0])} is outside 0..{num_classes - 1} for {num_classes} classes; "
                    f"check --classes and --reduce-zero-label (now {'on' if reduce else 'off'})")
            images = images.to(dist.device, non_blocking=True)
            labels = labels.to(dist.device, non_blocking=True)
            with autocast:
                logits, aux = net(images, return_aux=True)
            loss_main = seg_loss(logits, labels)
            loss_aux = seg_loss(aux, labels) if aux is not None else torch.zeros((), device=dist.device)
            loss = loss_main + aux_weight * loss_aux
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done = iteration + 1
            scheduler.step_update(done)
            sums += torch.stack([loss_main.detach(), loss_aux.detach(), torch.ones((), device=dist.device)])
            bar.update(1)

            if done % cfg.log_interval == 0 or done == end:
                mean = all_reduce_mean(sums[:2] / sums[2])
                loss_value, aux_value = mean.tolist()
                if not torch.isfinite(mean).all():
                    raise RuntimeError(f"the loss became {loss_value} at iteration {done}; resume from the "
                                       "last checkpoint with a lower --lr, or use --precision fp32")
                elapsed = time.time() - tick
                record = {"step": done, "train_loss": loss_value, "lr": optimizer.param_groups[0]["lr"],
                          "img_per_s": float(sums[2]) * cfg.batch_size / max(elapsed, 1e-9)}
                if aux is not None:
                    record["aux_loss"] = aux_value
                logger.log(record)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{record['lr']:.2e}")
                sums.zero_()
                tick = time.time()
            if val_set is not None and (done % eval_interval == 0 or done == iterations):
                result = run_eval(done)
                net.train()
                tick = time.time()
            if done % checkpoint_interval == 0 or done == end:
                checkpoint(done)
            stopping = stop.requested
            if dist.distributed:  # every rank must stop at the same iteration: agree at log steps
                stopping = done % cfg.log_interval == 0 and bool(
                    all_reduce_sum(torch.tensor(float(stopping), device=dist.device)) > 0)
            if stopping and done < end:
                checkpoint(done)
                break
    bar.close()
    report_rank_agreement(model, logger, done, dist.is_main)  # torchrun: every rank's weights alike?
    if skipped_images.count:
        print(f"training: {skipped_images.summary()}")
    if dist.is_main and done < iterations:
        print(f"stopped at iteration {done} of {iterations}; '{out / 'last.pt'}' holds the state, "
              "continue with --resume")

    if dist.is_main:
        if done == iterations:
            save_weights(model, spec, out / "model.safetensors", {"iteration": done})
        plot_curves(out / "log.jsonl", out / "curves.png",
                    {"loss": ["train_loss", "aux_loss"], "lr": ["lr"], "mIoU": ["mIoU"]},
                    title=f"{cfg.head} / {cfg.model}")
        if result:
            (out / "metrics.txt").write_text(format_scores(result) + "\n")
            plot_per_class(result, out / "per_class_iou.png", title=f"{cfg.head} / {cfg.model} @ {done}")
    return result
