"""The training loop of ``rmt train``: one process, or one per device under torchrun (DDP or FSDP2).

Built from timm's pieces: ``create_optimizer_v2`` (AdamW; norms, biases and the model's
``no_weight_decay`` layer scales get no decay), ``create_scheduler_v2`` (cosine with warm-up,
stepped every update), ``Mixup`` / ``SoftTargetCrossEntropy`` (label smoothing without mixup: torch's cross-entropy) and
``ModelEmaV3``. The run directory holds ``config.yaml``, ``log.jsonl``, ``curves.png``,
``last.pth``, ``best.pth`` and ``summary.json``; only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import math
import os
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from . import config as config_mod
from . import token_labels
from .data import build_data
from .evaluate import autocast_context, evaluate
from .run_state import build_model, load_run_state, restore_rank_rng, save_run_state
from .run_dir import first_missing_folder, remove_unused_run_dir
from ..bad_images import BadImageError, bad_image_message, bad_image_problem, gathered_names, shown_names
from ..engine import (DistInfo, JsonlLogger, cleanup_distributed, load_checkpoint, plot_curves,
                      remove_partial_writes, seed_everything, setup_distributed)
from ..engine.distributed import all_reduce_sum

PLOT_GROUPS = {"loss": ["train_loss", "val_loss", "ema_loss"], "top-1 accuracy (%)": ["val_top1", "ema_top1"],
               "learning rate": ["lr"]}


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the message names the last good checkpoint."""


def find_resume(path: Optional[str]) -> Optional[Path]:
    """``--resume`` accepts a run directory (its ``last.pth``) or a checkpoint file."""
    if not path:
        return None
    p = Path(path)
    if p.is_dir():
        p = p / "last.pth"
    if not p.is_file():
        raise FileNotFoundError(f"nothing to resume: '{p}' does not exist")
    return p


def amp_dtype_for(amp: str, device: torch.device) -> Optional[torch.dtype]:
    if amp == "auto":
        amp = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "none": None}[amp]


def shard_with_fsdp(model: torch.nn.Module) -> None:
    """FSDP2: every block is a unit, the rest (stem, downsamples, head) the root unit."""
    from torch.distributed.fsdp import fully_shard
    for stage in model.stages:
        for block in stage.blocks:
            fully_shard(block)
    fully_shard(model)


def check_cuda_graph_options(cfg: Dict[str, Any], info) -> None:
    """Raise ValueError naming the option that a CUDA-graph training step cannot work with."""
    problems = []
    if info.device.type != "cuda":
        problems.append("a CUDA device (this run is on " + info.device.type + ")")
    if cfg["fsdp"]:
        problems.append("DDP or a single process (not --fsdp)")
    if cfg["accum_steps"] != 1:
        problems.append("--accum-steps 1")
    if cfg["amp"] == "fp16":
        problems.append("--amp bf16 or none (fp16's loss scaler decides on the CPU)")
    if cfg["compile"]:
        problems.append("no --compile (use torch.compile's mode='reduce-overhead' for that)")
    if cfg["opt"].lower() not in ("adam", "adamw"):
        problems.append("--opt adamw (a capturable optimizer)")
    if problems:
        raise ValueError("--cuda-graph needs " + ", ".join(problems))


def block_graphs_wanted(cfg: Dict[str, Any], device: torch.device) -> bool:
    """Whether the model's blocks replay CUDA graphs: as ``--block-graphs`` says, else (unset) on CUDA
    unless FSDP (which moves parameters), a whole-step graph, compilation or checkpointing takes over."""
    if device.type != "cuda":
        return False
    if cfg["block_graphs"] is not None:
        return bool(cfg["block_graphs"])
    return not (cfg["fsdp"] or cfg["cuda_graph"] or cfg["compile"] or cfg["grad_checkpointing"])


class Trainer:
    def __init__(self, cfg: Dict[str, Any], info: DistInfo, run_dir: Path,
                 resumed: Optional[Dict[str, Any]] = None, t_begin: Optional[float] = None):
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy
        from timm.optim import create_optimizer_v2
        from timm.utils import ModelEmaV3

        self.cfg, self.info, self.run_dir, dev = cfg, info, run_dir, info.device
        self.t_begin = t_begin or time.perf_counter()
        if cfg["threads"]:
            torch.set_num_threads(cfg["threads"])
        self.amp_dtype = amp_dtype_for(cfg["amp"], dev)
        if cfg["block_graphs"] and cfg["fsdp"]:
            raise ValueError("--block-graphs replays kernels that read each block's parameters where they "
                             "were at capture; --fsdp reshards them between forward and backward: use one")
        if cfg["fsdp"] and not info.distributed:
            raise ValueError("--fsdp needs several processes: start the run with torchrun")

        seed_everything(cfg["seed"], 0)  # identical initial weights on every rank
        self.data = build_data(cfg, info)
        self.num_classes = cfg["num_classes"] or self.data.num_classes
        if self.num_classes != self.data.num_classes:
            raise ValueError(f"--num-classes {self.num_classes} but the data set has {self.data.num_classes} classes")
        self.steps_per_epoch = self.data.train.batches_per_epoch // cfg["accum_steps"]
        if self.steps_per_epoch < 1:
            raise ValueError(f"the training set ({self.data.train_size} images over {info.world_size} process(es)) "
                             f"is smaller than one step of {cfg['batch_size']} x {cfg['accum_steps']} images; "
                             "lower --batch-size or --accum-steps")

        model = build_model(cfg, self.num_classes)
        if cfg["pretrained"]:
            from ..checkpoint import load_into
            load_into(model, cfg["pretrained"], fresh_aux_head=bool(cfg["token_label"]))
        model.to(dev)
        if cfg["channels_last"]:
            model.to(memory_format=torch.channels_last)
        if cfg["grad_checkpointing"]:
            model.set_grad_checkpointing(True)
        if block_graphs_wanted(cfg, dev) and hasattr(model, "set_block_graphs"):
            model.set_block_graphs(True)
        if cfg["sync_bn"] and info.distributed:
            if dev.type != "cuda":
                raise ValueError("--sync-bn needs CUDA devices (SyncBatchNorm has no CPU kernel)")
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        # per-tensor updates under FSDP: sharded parameters and plain buffers cannot share a foreach call
        self.ema = ModelEmaV3(model, decay=cfg["ema_decay"], use_warmup=cfg["ema_warmup"],
                              foreach=not cfg["fsdp"]) if cfg["model_ema"] else None
        self.model = model  # the module whose parameters are trained (sharded in place under FSDP)
        forward_model: torch.nn.Module = model
        self.graph_stream: Optional[torch.cuda.Stream] = None
        if cfg["fsdp"]:
            shard_with_fsdp(model)
            if self.ema is not None:
                shard_with_fsdp(self.ema.module)
        elif info.distributed:
            # depthwise conv weights (C, 1, k, k) report a stride mismatch on their size-1 dim: harmless
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            # a captured step runs on its own stream, and DDP's gradient hooks must be made on it
            self.graph_stream = torch.cuda.Stream(dev) if cfg["cuda_graph"] and dev.type == "cuda" else None
            with torch.cuda.stream(self.graph_stream) if self.graph_stream is not None else contextlib.nullcontext():
                forward_model = torch.nn.parallel.DistributedDataParallel(
                    model, device_ids=[dev.index] if dev.type == "cuda" else None,
                    gradient_as_bucket_view=True)  # gradients live in the all-reduce buckets: no copies
        self.ddp = forward_model if forward_model is not model else None
        self.forward_model = torch.compile(forward_model) if cfg["compile"] else forward_model
        seed_everything(cfg["seed"], info.rank)  # per-rank augmentation and drop-path from here on

        self.global_batch = cfg["batch_size"] * cfg["accum_steps"] * info.world_size
        if cfg["lr"] is None:
            cfg["lr"] = cfg["lr_base"] * self.global_batch / cfg["lr_base_size"]
        # one fused kernel for the whole AdamW update on CUDA (not for FSDP's sharded parameters)
        fused = dict(fused=True) if (dev.type == "cuda" and not cfg["fsdp"]
                                     and cfg["opt"].lower() in ("adam", "adamw")) else {}
        if cfg["cuda_graph"]:
            check_cuda_graph_options(cfg, info)
            fused["capturable"] = True
        self.optimizer = create_optimizer_v2(model, opt=cfg["opt"], lr=cfg["lr"], weight_decay=cfg["weight_decay"],
                                             momentum=cfg["momentum"], eps=cfg["opt_eps"], **fused)
        self.scheduler = self._make_scheduler()
        self.scaler = torch.amp.GradScaler(dev.type) if self.amp_dtype == torch.float16 else None
        self.graphed = None
        self.mixup = None
        if cfg["mixup"] > 0 or cfg["cutmix"] > 0:
            self.mixup = Mixup(mixup_alpha=cfg["mixup"], cutmix_alpha=cfg["cutmix"], prob=cfg["mixup_prob"],
                               switch_prob=cfg["mixup_switch_prob"], label_smoothing=cfg["smoothing"],
                               num_classes=self.num_classes)
            self.loss_fn = SoftTargetCrossEntropy()
        else:  # the same loss as timm's LabelSmoothingCrossEntropy, in one fused kernel
            self.loss_fn = torch.nn.CrossEntropyLoss(label_smoothing=cfg["smoothing"])
        self.token_labeler = token_labels.setup(cfg, self.num_classes, model)  # dense targets of --token-label
        if self.token_labeler is not None:
            self.loss_fn = token_labels.TokenLabelLoss()
        if cfg["cuda_graph"]:
            from ..engine.cuda_graph import GraphedTrainStep
            # DDP settles its gradient buckets over the first iterations: capture after 11 (PyTorch's advice)
            self.graphed = GraphedTrainStep(self.forward_model, self.loss_fn, self.optimizer, self.amp_dtype,
                                            cfg["clip_grad"], warmup=11 if self.ddp is not None else 3,
                                            stream=self.graph_stream)

        self.epoch, self.step_in_epoch, self.step, self.best_top1 = 0, 0, 0, -1.0
        self.completed_epochs = 0
        self.epoch_loss = [0.0, 0]  # sum and count of step losses in the current epoch
        self.last_saved: Optional[Tuple[Path, int]] = None
        if resumed is not None:
            load_run_state(resumed, model=model, optimizer=self.optimizer, scheduler=self.scheduler,
                           scaler=self.scaler, ema=self.ema.module if self.ema else None)
            self.epoch, self.step_in_epoch = int(resumed["epoch"]), int(resumed["step_in_epoch"])
            self.completed_epochs = self.epoch
            self.step, self.best_top1 = int(resumed["step"]), float(resumed.get("best_top1", -1.0))
            self.epoch_loss = list(resumed.get("epoch_loss", [0.0, 0]))
            self.last_saved = (run_dir / "last.pth", self.step)
            exact = restore_rank_rng(resumed.get("rng"), info.rank, info.world_size, cfg["seed"] + self.step)
            if not exact and info.is_main:
                print(f"note: the checkpoint was written by {len(resumed.get('rng') or [])} process(es), this run has "
                      f"{info.world_size}: weights, optimizer and schedule continue, but the data split over "
                      "processes and the random streams differ from those of an uninterrupted run")
            self.scheduler.step_update(self.step)
            if cfg["cuda_graph"]:  # the loaded param groups carry the saving run's options
                for group in self.optimizer.param_groups:
                    group["capturable"] = True
        # (step, time) where timing for --time-budget starts, after a few steps of warm-up
        self.calibration: Optional[Tuple[int, float]] = None
        self.budget: Optional[Dict[str, float]] = None  # set by the first budget fit, refined after epoch 1
        self.calibration_steps = max(10, min(50, self.steps_per_epoch // 4))
        self._set_schedule_length(cfg["epochs"])

        self.cfg.update(world_size=info.world_size, global_batch=self.global_batch,
                        steps_per_epoch=self.steps_per_epoch, train_images=self.data.train_size,
                        val_images=self.data.val_size)
        self.log = JsonlLogger(run_dir / "log.jsonl", enabled=info.is_main)
        if info.is_main:
            remove_partial_writes(run_dir)  # of checkpoint writes killed before their rename
            if resumed is not None:  # the steps after the checkpoint are trained (and logged) again
                self.log.drop_after(self.step)
            (run_dir / "config.yaml").write_text(config_mod.to_yaml(self.cfg))

    def _set_schedule_length(self, epochs: float) -> None:
        """``total_steps`` optimizer steps over ``num_epochs`` passes (the last one possibly partial)."""
        self.total_steps = max(1, round(epochs * self.steps_per_epoch))
        self.num_epochs = math.ceil(self.total_steps / self.steps_per_epoch)

    def _epoch_steps(self, epoch: int) -> int:
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def _make_scheduler(self):
        from timm.scheduler import create_scheduler_v2
        cfg = self.cfg
        total = max(1, round(cfg["epochs"] * self.steps_per_epoch))
        scheduler, _ = create_scheduler_v2(
            self.optimizer, sched=cfg["sched"], num_epochs=total / self.steps_per_epoch,
            warmup_epochs=cfg["warmup_epochs"],
            warmup_lr=cfg["warmup_lr"], min_lr=cfg["min_lr"], step_on_epochs=False,
            updates_per_epoch=self.steps_per_epoch)
        return scheduler

    def _fit_schedule_to_budget(self, epoch_overhead: Optional[float] = None) -> None:
        """Set ``epochs`` so that the run ends within ``time_budget`` minutes, from the measured step time.

        Called twice. First early in the first epoch, from the step time measured then, with the
        validation time estimated. Then once the first epoch's validation, checkpoint and plot are
        done, with their measured time (``epoch_overhead``) in place of that estimate; both calls fall
        in the first epochs, where the learning rate hardly depends on the schedule's length (the
        warm-up). Rank 0 decides; the choice is saved with the run so a resume keeps it.
        """
        cfg = self.cfg
        now = time.perf_counter()
        if epoch_overhead is None:
            step_time = (now - self.calibration[1]) / (self.step - self.calibration[0])
            self.budget = dict(minutes=cfg["time_budget"], step_time=step_time, max_epochs=cfg["epochs"])
            self.calibration = None
        budget = self.budget
        epoch_time = budget["step_time"] * self.steps_per_epoch
        if epoch_overhead is None:
            passes = 1 + (self.ema is not None) - (self.ema is not None and cfg["eval_ema_only"])
            overhead = epoch_time * passes * self.data.val_size / (3.0 * max(self.data.train_size, 1))
        else:
            overhead = epoch_overhead
        remaining = budget["minutes"] * 60.0 * 0.97 - (now - self.t_begin) - 5.0
        done = self.epoch + self.step_in_epoch / self.steps_per_epoch
        fit = done + remaining / (epoch_time + overhead)
        steps = min(round(budget["max_epochs"] * self.steps_per_epoch), int(fit * self.steps_per_epoch))
        steps = torch.tensor([max(self.step + 1, steps)], device=self.info.device)
        if self.info.distributed:
            dist.broadcast(steps, src=0)
        cfg["epochs"], cfg["time_budget"] = int(steps.item()) / self.steps_per_epoch, None
        self._set_schedule_length(cfg["epochs"])
        self.scheduler = self._make_scheduler()
        self.scheduler.step_update(self.step)
        if self.info.is_main:
            (self.run_dir / "config.yaml").write_text(config_mod.to_yaml(cfg))
            what = "validation (estimated)" if epoch_overhead is None else "validation, checkpoint and plot"
            tqdm.write(f"time budget: {self.global_batch / budget['step_time']:.0f} img/s measured, "
                       f"{epoch_time:.1f} s per epoch + {overhead:.1f} s {what}: {cfg['epochs']:.3g} epochs "
                       f"({self.total_steps} steps, of at most {budget['max_epochs']:g} epochs) fit")
        if epoch_overhead is not None:
            self.budget = None

    # --- steps ------------------------------------------------------------------------------------

    def _next_batch(self, it):
        try:
            return next(it)
        except StopIteration:
            return None
        except BadImageError as e:  # also re-raised from worker processes with a traceback inside
            raise BadImageError(bad_image_message(str(e)) or str(e)) from None

    def _window_reset(self) -> None:
        self.window = dict(loss=torch.zeros((), device=self.info.device, dtype=torch.float64), steps=0,
                           images=0, t0=time.perf_counter(), first_step=self.step + 1)

    def _check_window(self) -> Optional[float]:
        """Mean loss of the steps since the last log line over all ranks; stops the run on NaN/inf."""
        if not self.window["steps"]:
            return None
        loss = all_reduce_sum(self.window["loss"]).item() / (self.window["steps"] * self.info.world_size)
        if not math.isfinite(loss):
            where = (f"the last good checkpoint is '{self.last_saved[0]}' (step {self.last_saved[1]}): resume "
                     "from it" if self.last_saved else "no checkpoint had been written yet: start again")
            self.log.log({"event": "diverged", "step": self.step, "epoch": self.epoch})
            raise TrainingDiverged(
                f"loss became {'NaN' if math.isnan(loss) else 'infinite'} between steps {self.window['first_step']} "
                f"and {self.step} (epoch {self.epoch + 1}); training stopped. {where} with a lower --lr, "
                "--clip-grad 1.0, or --amp bf16 instead of fp16")
        return loss

    def _optimizer_step(self) -> None:
        """Clip, step and zero the gradients (unless the CUDA graph did), then advance the schedule and EMA."""
        cfg = self.cfg
        if self.graphed is None:
            if cfg["clip_grad"]:
                if self.scaler is not None:
                    self.scaler.unscale_(self.optimizer)
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg["clip_grad"])
            if self.scaler is not None:
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.step_in_epoch += 1
        self.scheduler.step_update(self.step)
        if self.ema is not None:
            self.ema.update(self.model, step=self.step)

    def _sync_context(self, last_micro: bool):
        if self.cfg["fsdp"]:
            self.model.set_requires_gradient_sync(last_micro)
            return contextlib.nullcontext()
        if self.ddp is not None and not last_micro:
            return self.ddp.no_sync()
        return contextlib.nullcontext()

    def train_epoch(self, epoch: int) -> bool:
        """Train until the epoch ends; returns True when ``max_steps`` stopped the run."""
        cfg, dev, accum = self.cfg, self.info.device, self.cfg["accum_steps"]
        if cfg["max_steps"] and self.step >= cfg["max_steps"]:
            return True
        self.data.train.set_epoch(epoch, self.step_in_epoch * accum)
        self.forward_model.train()
        bar = tqdm(total=self._epoch_steps(epoch), initial=self.step_in_epoch, desc=f"epoch {epoch + 1}/{self.num_epochs}",
                   disable=not self.info.is_main, dynamic_ncols=True, mininterval=1.0, unit="step")
        self._window_reset()
        t_epoch, images_epoch, micro = time.perf_counter(), 0, 0
        it = iter(self.data.train)
        while self.step_in_epoch < self._epoch_steps(epoch):
            batch = self._next_batch(it)
            if batch is None:
                break
            images, labels = (t.to(dev, non_blocking=True) for t in batch)
            if cfg["channels_last"]:
                images = images.contiguous(memory_format=torch.channels_last)
            if self.mixup is not None:
                images, labels = self.mixup(images, labels)
            if self.token_labeler is not None:
                labels = self.token_labeler(labels)  # packed soft targets (b, 1 + S*S, classes)
            micro += 1
            last_micro = micro % accum == 0
            if self.graphed is not None:  # forward, backward and optimizer in one replay
                loss = self.graphed(images, labels)
            else:
                # the backward on this thread, not handed to autograd's device thread: an eager RMT step
                # is bound by the host's launch rate, and the hand-over cost it 13-18% (BENCHMARKS.md, run L)
                with self._sync_context(last_micro), torch.autograd.set_multithreading_enabled(False):
                    with autocast_context(dev, self.amp_dtype):
                        loss = self.loss_fn(self.forward_model(images), labels)
                    scaled = loss / accum
                    (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            self.window["loss"] += loss.detach().double() / accum
            self.window["images"] += len(images) * self.info.world_size
            images_epoch += len(images) * self.info.world_size
            if not last_micro:
                continue
            self._optimizer_step()
            self.window["steps"] += 1
            if cfg["time_budget"]:
                if self.info.device.type == "cuda":
                    torch.cuda.synchronize()  # time finished work, not queued work
                if self.calibration is None and self.step_in_epoch >= 3:
                    self.calibration = (self.step, time.perf_counter())
                elif self.calibration and self.step - self.calibration[0] >= self.calibration_steps:
                    self._fit_schedule_to_budget()
                    bar.total = self._epoch_steps(epoch)
                    bar.set_description(f"epoch {epoch + 1}/{self.num_epochs}")
            bar.update(1)
            if self.step % cfg["log_interval"] == 0 or self.step_in_epoch == self._epoch_steps(epoch):
                self._log_window(epoch, bar)
            if cfg["max_steps"] and self.step >= cfg["max_steps"]:
                self._log_window(epoch, bar)
                self.save(epoch, self.step_in_epoch)
                bar.close()
                return True
            if cfg["checkpoint_every"] and self.step % cfg["checkpoint_every"] == 0 \
                    and self.step_in_epoch < self._epoch_steps(epoch):
                self._log_window(epoch, bar)
                self.save(epoch, self.step_in_epoch)
        bar.close()
        self._log_window(epoch, bar)
        self.epoch_time = time.perf_counter() - t_epoch
        self.epoch_images = images_epoch
        return False

    def _log_window(self, epoch: int, bar) -> None:
        loss = self._check_window()
        if loss is None:
            return
        elapsed = max(time.perf_counter() - self.window["t0"], 1e-9)
        speed = self.window["images"] / elapsed
        lr = self.optimizer.param_groups[0]["lr"]
        self.epoch_loss[0] += loss * self.window["steps"]
        self.epoch_loss[1] += self.window["steps"]
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{speed:.0f}", refresh=False)
        self.log.log({"event": "train", "epoch": epoch + self.step_in_epoch / self.steps_per_epoch,
                      "step": self.step, "train_loss": loss, "lr": lr, "img_per_s": speed})
        self._window_reset()

    # --- validation, checkpoints ------------------------------------------------------------------

    def validate(self, epoch: int) -> Dict[str, float]:
        cfg, out = self.cfg, {}
        kw = dict(device=self.info.device, num_classes=self.num_classes, amp_dtype=self.amp_dtype,
                  channels_last=cfg["channels_last"], lockstep=cfg["fsdp"], progress=self.info.is_main)
        if self.ema is None or not cfg["eval_ema_only"]:
            m = evaluate(self.model, self.data.val, desc="validate", **kw)
            out.update(val_top1=m["top1"], val_top5=m["top5"], val_loss=m["loss"], val_images=m["count"])
        if self.ema is not None:
            m = evaluate(self.ema.module, self.data.val, desc="validate EMA", **kw)
            out.update(ema_top1=m["top1"], ema_top5=m["top5"], ema_loss=m["loss"], val_images=m["count"])
        return out

    def save(self, epoch: int, step_in_epoch: int, metrics: Optional[Dict[str, float]] = None,
             best: bool = False) -> None:
        self._check_window()  # never write a checkpoint after a NaN step
        path = self.run_dir / "last.pth"
        extra = dict(epoch=epoch, step_in_epoch=step_in_epoch, step=self.step, best_top1=self.best_top1,
                     epoch_loss=list(self.epoch_loss), config=self.cfg, data_spec=self.data.spec.to_dict(),
                     rmt_variant=self.cfg["model"], num_classes=self.num_classes, metrics=metrics or {},
                     world_size=self.info.world_size)
        save_run_state(path, is_main=self.info.is_main, model=self.model, optimizer=self.optimizer,
                       scheduler=self.scheduler, scaler=self.scaler, ema=self.ema.module if self.ema else None,
                       extra=extra, also=[self.run_dir / "best.pth"] if best else None)
        self.last_saved = (path, self.step)

    def stop_on_bad_image(self, error: BadImageError) -> BadImageError:
        """The error to stop the run with, after saving where it stands so that ``--resume`` continues.

        The checkpoint is that of the last optimizer step: the resumed run loads the failing batch
        again (or, when validation failed, validates that epoch again). Under torchrun the other
        processes cannot take part in a save: the error names the last checkpoint written.
        """
        message = bad_image_problem(error)
        if not self.info.distributed:
            self._log_window(self.epoch, None)
            self.save(self.epoch, self.step_in_epoch)
            saved = f"Training stopped after saving step {self.step} to '{self.last_saved[0]}'"
        elif self.last_saved:
            saved = f"Training stopped; the last checkpoint is '{self.last_saved[0]}' (step {self.last_saved[1]})"
        else:
            saved = "Training stopped before its first checkpoint"
        return BadImageError(f"{message}. {saved}: replace or remove the image and continue with --resume "
                             f"{self.run_dir}, or add --skip-bad-images to count and skip such images")

    def fit(self) -> Dict[str, Any]:
        cfg, main = self.cfg, self.info.is_main
        if main:
            print(f"run directory: {self.run_dir}\n{cfg['model']} on {cfg['dataset']}: {self.data.train_size} training "
                  f"images, {self.num_classes} classes, {self.info.world_size} process(es) on {self.info.device.type}, "
                  f"global batch {self.global_batch}, lr {cfg['lr']:.3g}, {self.steps_per_epoch} steps/epoch, "
                  f"amp {self.amp_dtype or 'none'}" + (f", resuming at step {self.step}" if self.step else ""),
                  flush=True)
        t_start, speeds, metrics = time.perf_counter(), [], {}
        epoch = self.epoch
        while epoch < self.num_epochs:  # --time-budget may shorten the schedule during the first epoch
            self.epoch = epoch
            if self.train_epoch(epoch):
                break
            t_trained = time.perf_counter()
            metrics = self.validate(epoch)
            score = metrics.get("ema_top1", metrics.get("val_top1", 0.0))
            improved = score > self.best_top1
            self.best_top1 = max(self.best_top1, score)
            bad = int(all_reduce_sum(torch.tensor([self.data.train.bad_images], device=self.info.device)).item())
            skipped = gathered_names(getattr(self.data.train, "skipped", None)) if bad else []
            speed = self.epoch_images / max(self.epoch_time, 1e-9)
            speeds.append(speed)
            record = dict(event="epoch", epoch=epoch + 1, step=self.step,
                          epoch_train_loss=self.epoch_loss[0] / max(self.epoch_loss[1], 1),
                          epoch_time_s=self.epoch_time, img_per_s=speed, bad_images=bad, **metrics)
            if skipped:
                record["skipped_images"] = skipped
            self.log.log(record)
            self.epoch_loss = [0.0, 0]
            self.save(epoch + 1, 0, metrics, best=improved)
            self.completed_epochs = epoch + 1
            if main:
                shown = "  ".join(f"{k} {v:.2f}" for k, v in metrics.items() if k.endswith(("top1", "top5")))
                tqdm.write(f"epoch {epoch + 1}/{self.num_epochs}: train loss {record['epoch_train_loss']:.4f}  {shown}  "
                           f"{speed:.0f} img/s" + (f"  ({bad} bad images skipped so far: {shown_names(skipped)})" if bad else ""))
                plot_curves(self.log.path, self.run_dir / "curves.png", PLOT_GROUPS, x_key="step",
                            title=f"{cfg['model']} on {cfg['dataset']}")
            self.step_in_epoch = 0
            if self.budget is not None:  # the first epoch's validation, checkpoint and plot are now timed
                self.epoch = epoch + 1
                self._fit_schedule_to_budget(epoch_overhead=time.perf_counter() - t_trained)
                self.save(epoch + 1, 0, metrics, best=False)  # so that a resume keeps the refined schedule
            epoch += 1
        if self.graphed is not None:
            self.graphed.release()
        summary = dict(run_dir=str(self.run_dir), epochs_done=self.completed_epochs,
                       steps=self.step, best_top1=self.best_top1, final=metrics,
                       train_img_per_s=sum(speeds) / len(speeds) if speeds else None,
                       world_size=self.info.world_size, rank=self.info.rank, wall_s=time.perf_counter() - t_start)
        if main:
            import json
            (self.run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        return summary


def make_run_dir(cfg: Dict[str, Any], info: DistInfo, resume_path: Optional[Path]) -> Path:
    """The run directory: the resumed run's, or ``output/name`` (a new name that rank 0 chooses)."""
    if resume_path is not None:
        return resume_path.parent
    name = cfg["name"] or f"{cfg['model']}-{cfg['dataset']}-{datetime.now():%Y%m%d-%H%M%S}"
    if info.distributed:
        box = [name]
        dist.broadcast_object_list(box, src=0)
        name = box[0]
    run_dir = Path(cfg["output"]) / name
    exists = torch.tensor([int((run_dir / "last.pth").exists())], device=info.device)
    if info.distributed:
        dist.broadcast(exists, src=0)
    if exists.item():
        raise ValueError(f"run directory '{run_dir}' already holds a run: continue it with --resume {run_dir} "
                         "or choose another --name")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(options: Dict[str, Any]) -> Dict[str, Any]:
    """Run ``rmt train`` with the given options (flag names as keys, only those set explicitly)."""
    t_begin = time.perf_counter()
    resume_path = find_resume(options.get("resume"))
    resumed = load_checkpoint(resume_path) if resume_path else None
    if resumed is not None and "config" not in resumed:
        raise ValueError(f"'{resume_path}' is not a checkpoint written by rmt train (no config); to start from "
                         "its weights use --pretrained instead")
    cfg = config_mod.resolve(options, resumed["config"] if resumed else None)
    if cfg["cuda_graph"]:  # NCCL's watchdog must not poll collectives that live in a captured graph
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "0")
    info = setup_distributed(cfg["device"], cfg["dist_backend"])
    trainer: Optional[Trainer] = None
    try:
        created = first_missing_folder(Path(cfg["output"]))
        run_dir = make_run_dir(cfg, info, resume_path)
        try:
            trainer = Trainer(cfg, info, run_dir, resumed, t_begin)
        except BaseException:
            if resume_path is None and info.is_main:
                remove_unused_run_dir(run_dir, created)
            raise
        del resumed
        if trainer.epoch >= trainer.num_epochs and info.is_main:
            print(f"'{run_dir}' has already finished its {cfg['epochs']:g} epochs; pass --epochs N to train longer")
        try:
            return trainer.fit()
        except BadImageError as e:
            raise trainer.stop_on_bad_image(e) from None
    finally:
        if trainer is not None and trainer.graphed is not None:
            trainer.graphed.release()  # also after an error: a live graph would hang the teardown
        cleanup_distributed()
