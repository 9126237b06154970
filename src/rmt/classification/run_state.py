"""Models for classification runs and the complete state of a run in a checkpoint.

A training checkpoint is one file of tensors and plain containers (``torch.load(weights_only=True)``):

* ``model`` / ``model_ema``: full state dicts in this package's layout (so ``rmt.load_into``,
  ``rmt convert`` and ``timm.create_model(..., pretrained_cfg_overlay=dict(file=...))`` read it);
* ``optimizer`` (keyed by parameter name), ``scheduler``, ``scaler``;
* ``epoch`` / ``step_in_epoch`` (where to continue), ``step`` (optimizer steps so far);
* ``rng``: the RNG states of every rank; ``config``; ``data_spec`` (input size, normalisation,
  class names) for ``rmt eval`` / ``rmt predict``; ``best_top1`` and the last ``metrics``.

The state dicts are gathered with ``torch.distributed.checkpoint.state_dict``, which handles plain,
DDP and FSDP2 models alike; every rank takes part, rank 0 writes.
"""
from __future__ import annotations

import json
import re
from typing import Any, Dict, Optional

import torch
import torch.distributed as dist

from ..engine import capture_rng_state, restore_rng_state, save_checkpoint


def build_model(cfg: Dict[str, Any], num_classes: int, **overrides) -> torch.nn.Module:
    """The timm model named by ``cfg['model']`` for ``num_classes`` classes."""
    import timm
    import rmt
    if cfg["model"] not in rmt.VARIANTS:
        raise ValueError(f"unknown model {cfg['model']!r}; choose from {', '.join(rmt.VARIANTS)}")
    kwargs = dict(model_kwargs(cfg))
    if cfg.get("token_label"):  # the aux head and MixToken of token-label training (rmt.token_label)
        kwargs.update(use_aux_head=True, use_mix_token=True)
    if cfg.get("drop_path") is not None:
        kwargs["drop_path_rate"] = cfg["drop_path"]
    if cfg.get("attn_forms"):
        kwargs["attn_forms"] = cfg["attn_forms"]
    kwargs.update(overrides)
    try:
        return timm.create_model(cfg["model"], num_classes=num_classes, **kwargs)
    except TypeError as e:
        if not model_kwargs(cfg):
            raise
        raise ValueError(model_kwargs_error(cfg, e)) from None


def model_kwargs_error(cfg: Dict[str, Any], error: TypeError) -> str:
    """What is wrong with ``--model-kwargs``, from the TypeError of the model's constructor."""
    import inspect
    from ..model import RMT
    accepted = [n for n in inspect.signature(RMT.__init__).parameters if n not in ("self", "device", "dtype")]
    unknown = re.search(r"unexpected keyword argument '(\w+)'", str(error))
    if unknown:
        return (f"--model-kwargs: {cfg['model']} has no argument '{unknown[1]}'; it takes "
                f"{', '.join(accepted)}")
    return f"--model-kwargs {json.dumps(model_kwargs(cfg))} do not fit {cfg['model']} ({error})"


def model_kwargs(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """Extra architecture arguments (``--model-kwargs '{"depths": [1, 1, 2, 1]}'``) as a dict."""
    return dict(cfg.get("model_kwargs") or {})


def _full_options(cpu_offload: bool = True):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def full_model_state(module: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The whole, unsharded state dict of a plain, DDP-wrapped or FSDP2-sharded module (on CPU)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    return get_model_state_dict(module, options=_full_options())


def load_full_model_state(module: torch.nn.Module, state: Dict[str, torch.Tensor]) -> None:
    from torch.distributed.checkpoint.state_dict import set_model_state_dict
    set_model_state_dict(module, state, options=_full_options(cpu_offload=False))


def gather_rng_states() -> list:
    """RNG states of all ranks, in rank order (a single-element list without a process group)."""
    state = capture_rng_state()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        states = [None] * dist.get_world_size()
        dist.all_gather_object(states, state)
        return states
    return [state]


def restore_rank_rng(states: Optional[list], rank: int, world_size: int, fallback_seed: int) -> bool:
    """Restore this rank's RNG from a checkpoint's list; reseed when the world size changed.

    Returns True when the exact states were restored.
    """
    if states and len(states) == world_size:
        restore_rng_state(states[rank])
        return True
    from ..engine import seed_everything
    seed_everything(fallback_seed, rank)
    return False


def save_run_state(path, *, is_main: bool, model: torch.nn.Module, optimizer, scheduler, scaler,
                   ema: Optional[torch.nn.Module], extra: Dict[str, Any],
                   also: Optional[list] = None) -> None:
    """Gather the state of every rank and let rank 0 write it atomically to ``also`` and then ``path``.

    ``path`` (``last.pth``) is written last: were the process killed between the writes, the
    previous ``last.pth`` is what a resume starts from, and it redoes the steps (and rewrites the
    files) that lead here. Written the other way round, a ``last.pth`` recording a new best would
    stand beside the old ``best.pth`` for good.
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    state = dict(extra)
    state["model"] = full_model_state(model)
    if ema is not None:
        state["model_ema"] = full_model_state(ema)
    state["optimizer"] = get_optimizer_state_dict(model, optimizer, options=_full_options())
    state["scheduler"] = scheduler.state_dict() if scheduler is not None else None
    state["scaler"] = scaler.state_dict() if scaler is not None else None
    state["rng"] = gather_rng_states()
    if is_main:
        for target in [*(also or []), path]:
            save_checkpoint(state, target)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def load_run_state(state: Dict[str, Any], *, model: torch.nn.Module, optimizer, scheduler, scaler,
                   ema: Optional[torch.nn.Module]) -> None:
    """Put the model, EMA, optimizer, scheduler and scaler states of a checkpoint back in place."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
    load_full_model_state(model, state["model"])
    if ema is not None:
        if state.get("model_ema") is not None:
            load_full_model_state(ema, state["model_ema"])
        else:
            load_full_model_state(ema, state["model"])
    if state.get("optimizer"):
        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=_full_options(cpu_offload=False))
    if scheduler is not None and state.get("scheduler"):
        scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
