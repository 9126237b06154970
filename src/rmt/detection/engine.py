"""Training and evaluation loops for RMT detectors: single process or torchrun DDP, bf16 autocast.

``train(config)`` runs the mmdetection-style recipe (AdamW, linear warm-up, step decay), logs to
``OUT/log.jsonl`` with a PNG of the curves, evaluates COCO AP, and writes ``OUT/last.pth``
atomically every ``save_every`` iterations and at each epoch end. Under torchrun the run ends by
logging the largest parameter difference between ranks (``{"event": "ranks", ...}``). A checkpoint holds the model,
optimizer, scheduler, position in the epoch, the settings and every rank's RNG states, so a
resumed run continues exactly where the interrupted one was.
"""
from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils.data import DataLoader
from tqdm import tqdm

from ..bad_images import BadImageError, SkipReport, bad_image_problem
from ..engine import (DistInfo, JsonlLogger, capture_rng_state, cleanup_distributed, load_checkpoint,
                      plot_curves, remove_partial_writes, report_rank_agreement, restore_rng_state,
                      save_checkpoint, seed_everything, setup_distributed)
from ..engine.distributed import all_reduce_mean
from .config import TEST_SIZE, WARMUP_RATIO, TrainConfig, merge_config
from .data import CocoInstances, TrainSampler, collate, collate_train, find_split, shard_indices
from .evaluation import coco_evaluate, format_metrics, to_coco_results
from .models import build_detector, detector_has_masks
from .shapes import write_shapes_dataset


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------

def _gather(obj: Any) -> List[Any]:
    """Every rank's ``obj`` (a list of one for a single process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _broadcast(obj: Any) -> Any:
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def autocast(device: torch.device, amp: bool):
    """bf16 autocast on ``device`` when ``amp``, else a no-op context."""
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)


def to_device(images: Sequence[torch.Tensor], targets: Sequence[Dict[str, torch.Tensor]],
              device: torch.device) -> Tuple[List[torch.Tensor], List[Dict[str, torch.Tensor]]]:
    """uint8 images -> float in [0, 1] on ``device``; targets moved alongside."""
    images = [im.to(device, non_blocking=True).float().div_(255) for im in images]
    targets = [{k: v.to(device, non_blocking=True) for k, v in t.items()} for t in targets]
    return images, targets


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------

def resolve_split(cfg: TrainConfig, split: str) -> Tuple[Path, Path]:
    """Image folder and annotation file of ``split`` ("train"/"val") from the settings."""
    images, ann = getattr(cfg, f"{split}_images"), getattr(cfg, f"{split}_ann")
    if images and ann:
        return Path(images), Path(ann)
    if not cfg.data:
        raise ValueError(f"no {split} data: pass --data ROOT (COCO layout, or 'shapes' for the built-in "
                         f"dataset) or --{split}-images and --{split}-ann")
    root = shapes_root(cfg) if cfg.data == "shapes" else Path(cfg.data)
    found_images, found_ann = find_split(root, split)
    return Path(images) if images else found_images, Path(ann) if ann else found_ann


def shapes_root(cfg: TrainConfig) -> Path:
    return Path(cfg.out) / "shapes_data"


def prepare_shapes(cfg: TrainConfig, info: DistInfo) -> None:
    """Write the built-in dataset (rank 0; others wait) when ``--data shapes``."""
    if cfg.data == "shapes":
        if info.is_main:
            write_shapes_dataset(shapes_root(cfg), image_size=cfg.shapes_size, seed=0)
        _barrier()


def make_eval_loader(dataset: CocoInstances, indices: List[int], batch_size: int, workers: int) -> DataLoader:
    subset = torch.utils.data.Subset(dataset, indices)
    return DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                      collate_fn=collate, pin_memory=torch.cuda.is_available(),
                      generator=torch.Generator())  # worker seeds drawn apart from the global RNG


# ------------------------------------------------------------------------------------------------
# evaluation
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, dataset: CocoInstances, info: DistInfo, amp: bool, with_masks: bool,
             batch_size: int = 2, workers: int = 2, limit: Optional[int] = None,
             progress: bool = True) -> Dict[str, float]:
    """COCO box (and mask) AP of ``model`` on ``dataset`` (sharded over ranks); same dict on every rank.

    ``limit`` evaluates the first ``limit`` images only. Keys: ``bbox_AP``, ``bbox_AP50`` ... and
    ``segm_*`` when ``with_masks`` (the model predicts masks), plus the counts of images and detections.
    """
    model = unwrap(model)  # no DDP collectives: ranks may hold one image more or less
    was_training = model.training
    model.eval()
    indices = shard_indices(len(dataset), info.rank, info.world_size, limit)
    loader = make_eval_loader(dataset, indices, batch_size, workers)
    results: List[Dict] = []
    image_ids: List[int] = []
    bar = tqdm(loader, desc="eval", unit="batch", disable=not (progress and info.is_main), leave=False)
    for images, targets in bar:
        images, _ = to_device(images, [], info.device)
        with autocast(info.device, amp):
            outputs = model(images)
        for out, target in zip(outputs, targets):
            image_id = int(target["image_id"])
            image_ids.append(image_id)
            results.extend(to_coco_results(out, image_id, dataset.cat_ids))
    model.train(was_training)
    all_results = [r for part in _gather(results) for r in part]
    all_ids = [i for part in _gather(image_ids) for i in part]
    metrics = None
    if info.is_main:
        metrics = coco_evaluate(dataset.coco, all_results, all_ids, ("bbox", "segm") if with_masks else ("bbox",))
        metrics["num_images"] = len(all_ids)
        metrics["num_detections"] = len(all_results)
    return _broadcast(metrics)


# ------------------------------------------------------------------------------------------------
# training
# ------------------------------------------------------------------------------------------------

def build_from_config(cfg: TrainConfig, num_classes: int, pretrained: Optional[str] = None) -> nn.Module:
    """The detector a run trains (or evaluates), from its settings."""
    backbone_kwargs = dict(cfg.backbone_kwargs)
    if cfg.drop_path is not None and cfg.model.startswith("rmt"):
        backbone_kwargs.setdefault("drop_path_rate", cfg.drop_path)
    return build_detector(
        cfg.detector, cfg.model, num_classes, pretrained=pretrained,
        min_size=tuple(cfg.train_min_sizes()) if cfg.multiscale else cfg.min_size,
        max_size=cfg.max_size, frozen_stages=cfg.frozen_stages, frozen_bn=cfg.bn == "frozen",
        attn_forms=cfg.attn_forms or "TTTF", fpn_channels=cfg.fpn_channels,
        mask_head_channels=cfg.mask_head_channels, box_head_size=cfg.box_head_size,
        backbone_kwargs=backbone_kwargs, **cfg.detector_kwargs)


def _checkpoint_state(model: nn.Module, optimizer, scheduler, cfg: TrainConfig, epoch: int, batch: int,
                      step: int, dataset: CocoInstances, metrics: Dict[str, float]) -> Dict[str, Any]:
    return {
        "model": unwrap(model).state_dict(), "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(), "epoch": epoch, "batch": batch, "step": step,
        "config": asdict(cfg), "classes": list(dataset.class_names), "cat_ids": list(dataset.cat_ids),
        "metrics": metrics, "rng": _gather(capture_rng_state()),
    }


def train(explicit: Dict[str, Any], resume: Optional[str] = None) -> Dict[str, float]:
    """Train a detector; ``explicit`` holds the settings given (see :class:`TrainConfig`).

    Returns the last evaluation's metrics. Resuming (``resume`` = a ``last.pth``) continues the
    saved run exactly; settings other than :data:`~rmt.detection.config.RUN_FIELDS` must not change.
    """
    state = load_checkpoint(resume) if resume else None
    cfg = merge_config(explicit, state["config"] if state else None)
    info = setup_distributed(cfg.device)
    try:
        return _train(cfg.resolved(info.world_size), info, state, resume)
    finally:
        cleanup_distributed()


def _train(cfg: TrainConfig, info: DistInfo, state: Optional[Dict[str, Any]], resume: Optional[str]) -> Dict[str, float]:
    out = Path(cfg.out)
    if state is None and (out / "last.pth").exists():
        raise ValueError(f"'{out}' already holds a run (last.pth): continue it with --resume {out / 'last.pth'} "
                         "or choose another --out")
    seed_everything(cfg.seed, info.rank)
    amp = (cfg.amp or ("bf16" if info.device.type == "cuda" else "none")) == "bf16"
    prepare_shapes(cfg, info)
    with_masks = detector_has_masks(cfg.detector)
    train_set = CocoInstances(*resolve_split(cfg, "train"), train=True, with_masks=with_masks, seed=cfg.seed,
                              crop=cfg.crop_sizes() if cfg.crop else None, crop_max_size=cfg.max_size,
                              skip_bad=cfg.skip_bad_images)
    val_set = CocoInstances(*resolve_split(cfg, "val"), train=False, with_masks=False)
    if val_set.cat_ids != train_set.cat_ids:
        raise ValueError(f"train and val annotations define different categories ({train_set.class_names} vs "
                         f"{val_set.class_names}); they must share one category list")

    model = build_from_config(cfg, len(train_set.cat_ids), pretrained=None if state else cfg.pretrained)
    if state:
        model.load_state_dict(state["model"])
    if cfg.bn == "sync" and info.distributed and info.device.type == "cuda":
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model.to(info.device)
    if info.distributed:
        model = nn.parallel.DistributedDataParallel(
            model, device_ids=[info.device.index] if info.device.type == "cuda" else None)

    from timm.optim import create_optimizer_v2
    from timm.scheduler import MultiStepLRScheduler
    optimizer = create_optimizer_v2(unwrap(model), "adamw", lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = TrainSampler(len(train_set), cfg.batch_size, info.rank, info.world_size, cfg.seed)
    iters = sampler.batches_per_epoch()
    scheduler = MultiStepLRScheduler(
        optimizer, decay_t=[m * iters for m in cfg.milestones], decay_rate=0.1,
        warmup_t=cfg.warmup_iters, warmup_lr_init=cfg.lr * WARMUP_RATIO, warmup_prefix=False, t_in_epochs=False)
    epoch, batch, step, metrics = 0, 0, 0, {}
    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        epoch, batch, step, metrics = state["epoch"], state["batch"], state["step"], state.get("metrics") or {}
        rngs = state.get("rng") or []
        if len(rngs) == info.world_size:
            restore_rng_state(rngs[info.rank])
        else:
            seed_everything(cfg.seed + step, info.rank)
        if info.is_main:
            print(f"resuming {resume} at epoch {epoch + 1}, iteration {batch} of {iters} (step {step})"
                  + ("" if len(rngs) == info.world_size else
                     f"; saved with {len(rngs)} processes, now {info.world_size}: random draws re-seeded"))
    scheduler.step_update(step)

    logger = JsonlLogger(out / "log.jsonl", enabled=info.is_main)
    if info.is_main:
        remove_partial_writes(out)  # of checkpoint writes killed before their rename
        if state:  # the steps after the checkpoint run (and are logged) again
            logger.drop_after(step)
    if info.is_main and not state:
        print(f"training {cfg.detector} with {cfg.model} on {len(train_set)} images ({len(train_set.cat_ids)} "
              f"classes), {cfg.epochs} epochs of {iters} iterations, batch {cfg.batch_size}x{info.world_size}, "
              f"lr {cfg.lr:.3g}, weight decay {cfg.weight_decay:g}, drop path {cfg.drop_path:g}, "
              f"{'bf16' if amp else 'fp32'} on {info.device}"
              + (f" (recipe {cfg.recipe})" if cfg.recipe else ""))
        logger.log({"event": "config", "step": 0, "config": asdict(cfg)})
    loader = DataLoader(train_set, batch_size=cfg.batch_size, sampler=sampler, num_workers=cfg.workers,
                        collate_fn=collate_train, pin_memory=info.device.type == "cuda",
                        generator=torch.Generator())  # worker seeds drawn apart from the global RNG
    skipped_images = SkipReport()

    def save(epoch_: int, batch_: int) -> None:
        ckpt = _checkpoint_state(model, optimizer, scheduler, cfg, epoch_, batch_, step, train_set, metrics)
        if info.is_main:
            save_checkpoint(ckpt, out / "last.pth")
            plot_curves(out / "log.jsonl", out / "curves.png",
                        {"loss": ["loss"], "lr": ["lr"], "AP": ["bbox_AP", "segm_AP"]},
                        title=f"{cfg.detector} {cfg.model}")

    model.train()
    stopped = False
    try:
        while epoch < cfg.epochs and not stopped:
            sampler.set_epoch(epoch, skip_batches=batch)
            train_set.set_epoch(epoch)
            bar = tqdm(total=iters, initial=batch, desc=f"epoch {epoch + 1}/{cfg.epochs}", unit="it",
                       disable=not info.is_main, dynamic_ncols=True)
            window, t0, n_images = [], time.perf_counter(), 0
            for images, targets, skipped in loader:
                skipped_images.add(skipped)
                if not images:  # every image of the batch skipped: no step
                    if info.distributed:
                        raise BadImageError(f"every image of a batch at step {step} was skipped; under torchrun "
                                            "the other processes cannot skip that step with this one")
                    batch += 1
                    bar.update(1)
                    continue
                images, targets = to_device(images, targets, info.device)
                with autocast(info.device, amp):
                    losses = model(images, targets)
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise RuntimeError(
                        f"loss became {loss.item()} at step {step} ({ {k: round(v.item(), 4) for k, v in losses.items()} }); "
                        f"lower --lr, add --clip-grad, or resume from the last good checkpoint '{out / 'last.pth'}'")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.clip_grad:
                    torch.nn.utils.clip_grad_norm_(unwrap(model).parameters(), cfg.clip_grad)
                optimizer.step()
                step += 1
                batch += 1
                scheduler.step_update(step)
                n_images += len(images) * info.world_size
                window.append(torch.stack([loss.detach(), *[v.detach() for v in losses.values()]]).float())
                bar.update(1)
                if step % cfg.log_every == 0 or batch == iters:
                    mean = all_reduce_mean(torch.stack(window).mean(0)).tolist()
                    record = {"step": step, "epoch": epoch + batch / iters, "loss": mean[0],
                              **dict(zip(losses.keys(), mean[1:])), "lr": optimizer.param_groups[0]["lr"],
                              "img_per_s": n_images / (time.perf_counter() - t0)}
                    logger.log(record)
                    bar.set_postfix(loss=f"{mean[0]:.3f}", lr=f"{record['lr']:.2e}")
                    window, t0, n_images = [], time.perf_counter(), 0
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    stopped = True
                    break
                if cfg.save_every and step % cfg.save_every == 0 and batch < iters:
                    save(epoch, batch)
            bar.close()
            if batch >= iters:
                epoch, batch = epoch + 1, 0
                last = epoch == cfg.epochs
                if last or (cfg.eval_every and epoch % cfg.eval_every == 0):
                    metrics = evaluate(model, val_set, info, amp, with_masks, cfg.batch_size, cfg.workers)
                    logger.log({"step": step, "epoch": epoch, **metrics})
                    if info.is_main:
                        print(f"epoch {epoch}: COCO AP on {metrics['num_images']} val images\n{format_metrics(metrics)}")
            save(epoch, batch)
    except KeyboardInterrupt:
        if not info.distributed:  # other ranks may be gone: no collective save under DDP
            save(epoch, batch)
            print(f"\ninterrupted: saved the run after step {step} to {out / 'last.pth'} (--resume continues it)")
        raise
    except BadImageError as e:  # without --skip-bad-images: save where the run is, then stop
        saved = "the last checkpoint written is kept"
        if not info.distributed:
            save(epoch, batch)
            saved = f"the run was saved after step {step}"
        raise BadImageError(f"{bad_image_problem(e)}. Training stopped; {saved} in '{out / 'last.pth'}': "
                            "replace or remove the image and continue with --resume, or add --skip-bad-images "
                            "to count and skip such images") from None
    report_rank_agreement(model, logger, step, info.is_main)  # torchrun: every rank's weights alike?
    if skipped_images.count and info.is_main:
        print(f"training: {skipped_images.summary()}")
    if info.is_main:
        print(f"{'stopped at' if stopped else 'finished after'} step {step}; checkpoint {out / 'last.pth'}, "
              f"log {out / 'log.jsonl'}, curves {out / 'curves.png'}")
    return metrics


# ------------------------------------------------------------------------------------------------
# loading a trained detector
# ------------------------------------------------------------------------------------------------

def load_detector(path: str | Path, device: torch.device | str = "cpu",
                  min_size: Optional[int] = None, max_size: Optional[int] = None,
                  detector: Optional[str] = None, model_name: Optional[str] = None,
                  backbone_kwargs: Optional[Dict[str, Any]] = None, attn_forms: Optional[str] = None,
                  ) -> Tuple[nn.Module, Dict[str, Any]]:
    """A detector saved by :func:`train`, or a released mmdetection 2.x detector, in eval mode, and
    its metadata: ``config`` (a :class:`TrainConfig`), ``classes``, ``cat_ids``, ``epoch``, ``step``,
    ``metrics``, ``released`` (a :class:`~rmt.detection.released.ReleasedDetector` or None).

    ``min_size``/``max_size`` override the test image size. ``detector``, ``model_name``,
    ``backbone_kwargs`` and ``attn_forms`` apply to released files (see
    :func:`~rmt.detection.released.load_released_detector`).
    """
    from .released import released_state_dict
    state = load_checkpoint(path)
    if released_state_dict(state) is not None:
        return _load_released(path, device, min_size, max_size, detector, model_name, backbone_kwargs, attn_forms)
    if "model" not in state or "config" not in state or "classes" not in state:
        raise ValueError(f"'{path}' is not a checkpoint written by 'rmt detect train' nor a whole released "
                         "mmdetection detector (it lacks the model settings and class names)")
    cfg = merge_config({}, state["config"])
    cfg.multiscale = False  # inference at one size
    if min_size:
        cfg.min_size = min_size
    if max_size:
        cfg.max_size = max_size
    model = build_from_config(cfg, len(state["classes"]))
    model.load_state_dict(state["model"])
    model.to(device).eval()
    meta = {k: state.get(k) for k in ("classes", "cat_ids", "epoch", "step", "metrics")}
    meta.update(config=cfg, released=None)
    return model, meta


def _load_released(path, device, min_size, max_size, detector, model_name, backbone_kwargs, attn_forms):
    from .released import coco_classes, load_released_detector
    sizes = dict(min_size=min_size or TEST_SIZE[0], max_size=max_size or TEST_SIZE[1])
    model, info = load_released_detector(
        path, lambda *a, **k: build_detector(*a, **k, **sizes), detector, model_name, backbone_kwargs, attn_forms)
    model.to(device).eval()
    names, ids = coco_classes()
    if info.num_classes == len(ids):
        classes, cat_ids = info.classes or names, ids
    else:
        classes = info.classes or [f"class {i}" for i in range(1, info.num_classes + 1)]
        cat_ids = list(range(1, info.num_classes + 1))
    cfg = merge_config(dict(detector=info.detector, model=model_name or info.variant, attn_forms=attn_forms
                            or info.attn_forms, **sizes))
    meta = dict(classes=classes, cat_ids=cat_ids, epoch=info.meta.get("epoch"), step=info.meta.get("iter"),
                metrics=None, config=cfg, released=info)
    return model, meta
