"""Process-group set-up for runs started directly or through torchrun (single- or multi-node).

torchrun exports ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``; without them the run is a single
process. The backend is NCCL on CUDA and gloo on CPU unless chosen explicitly.
"""
from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in the run."""
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes files, logs and progress bars."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: Optional[str] = None, backend: Optional[str] = None) -> DistInfo:
    """Join the torchrun process group when there is one and pick this process's device.

    ``device``: "cuda", "cpu" or None (CUDA when available). Under torchrun each process takes
    GPU ``LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    want = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if want.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError("--device cuda was asked for but no CUDA device is visible; use --device cpu")
        torch.cuda.set_device(local % torch.cuda.device_count())
        dev = torch.device("cuda", torch.cuda.current_device())
    else:
        dev = torch.device(want)
    if world > 1 and not dist.is_initialized():
        backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, device_id=dev if dev.type == "cuda" else None)
    return DistInfo(rank=rank, world_size=world, local_rank=local, device=dev)


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed Python, NumPy and torch with ``seed + rank`` (different augmentation per rank)."""
    s = seed + rank
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)
    return s


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks (identity for a single process)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over ranks (identity for a single process)."""
    if dist.is_available() and dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def rank_param_disagreement(model: torch.nn.Module) -> float:
    """Largest absolute difference of any parameter element between any two ranks (0.0 alone).

    Every rank must call it (two collectives). The parameters are flattened to one float32 vector
    of ``P`` elements; its element-wise maximum and minimum over ranks are all-reduced, so the
    memory is ``2 P`` floats whatever the number of ranks. Sharded parameters (FSDP2 DTensors)
    are gathered whole first. DDP-wrapped models can be passed as they are.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return 0.0
    parts = []
    for p in model.parameters():
        full = p.full_tensor() if hasattr(p, "full_tensor") else p  # DTensor -> whole tensor
        parts.append(full.detach().float().reshape(-1))
    if not parts:
        return 0.0
    high = torch.cat(parts)
    low = high.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return (high - low).abs().max().item()


def report_rank_agreement(model: torch.nn.Module, logger, step: int, is_main: bool) -> Optional[float]:
    """At the end of a multi-process run: print (rank 0) and log the ranks' parameter disagreement.

    Logs ``{"event": "ranks", "step": step, "world_size": W, "rank_max_param_diff": d}`` through
    ``logger`` (a :class:`~rmt.engine.metrics_log.JsonlLogger`, enabled on rank 0). Returns ``d``,
    or None for a single process (nothing printed or logged).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    gap = rank_param_disagreement(model)
    logger.log({"event": "ranks", "step": step, "world_size": dist.get_world_size(), "rank_max_param_diff": gap})
    if is_main:
        print(f"ranks agree: largest parameter difference between the {dist.get_world_size()} processes "
              f"after step {step} is {gap:.3g}")
    return gap
