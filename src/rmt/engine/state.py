"""Training checkpoints that survive crashes: atomic writes and complete, restorable state.

A checkpoint is a dict of tensors and plain containers (so it reloads with
``torch.load(weights_only=True)``): model and EMA weights, optimizer, scheduler and grad-scaler
states, counters, the resolved config and the RNG states of every generator in play.
"""
from __future__ import annotations

import errno
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np
import torch

_PARTIAL = re.compile(r"\.(.+)\.tmp(\d+)$")  # what save_checkpoint writes before its rename


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (disk full, no permission...); the previous file is intact."""


def save_checkpoint(state: Dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    A crash at any moment leaves either the previous file or the new one, never a torn file. A
    failed write (a full disk above all) removes its temporary file and raises
    :class:`CheckpointWriteError` saying what happened.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        written = tmp.stat().st_size if tmp.exists() else 0
        tmp.unlink(missing_ok=True)
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        raise CheckpointWriteError(_write_failure(path, e, written)) from e
    return path


def _write_failure(path: Path, error: BaseException, written: int) -> str:
    """Words for a failed checkpoint write; torch.save reports a full disk as a RuntimeError."""
    codes = {getattr(error, "errno", None), getattr(error.__cause__, "errno", None)}
    text = f"{error} {error.__cause__ or ''}".lower()
    before = "the previous file is unchanged" if path.exists() else "no earlier file was there"
    if codes & {errno.ENOSPC, errno.EDQUOT} or "no space left" in text or "quota" in text:
        free = shutil.disk_usage(path.parent).free
        return (f"the disk is full: writing checkpoint '{path}' stopped after {written / 2**20:.0f} MiB with "
                f"{free / 2**20:.0f} MiB left on the device holding '{path.parent}' ({before}); free some "
                "space (or give another output folder) and resume")
    return f"checkpoint '{path}' could not be written ({type(error).__name__}: {error}); {before}"


def remove_partial_writes(folder: str | Path) -> List[Path]:
    """Delete the temporary files of checkpoint writes that were killed before their rename.

    Only files of processes that no longer run are removed; returns the paths removed.
    """
    removed = []
    for tmp in Path(folder).glob(".*.tmp*"):
        m = _PARTIAL.fullmatch(tmp.name)
        if m is None or not tmp.is_file() or _process_alive(int(m[2])):
            continue
        tmp.unlink(missing_ok=True)
        removed.append(tmp)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """Load a training checkpoint without unpickling arbitrary objects."""
    from ..checkpoint import CheckpointError, load_torch_file
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    obj = load_torch_file(path, map_location)
    if not isinstance(obj, dict):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a training checkpoint")
    return obj


def capture_rng_state() -> Dict[str, Any]:
    """RNG states of Python, NumPy, torch CPU and every CUDA device, as tensors and plain types."""
    np_state = np.random.get_state()
    state: Dict[str, Any] = {
        "python": _py_state_to_plain(random.getstate()),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Optional[Dict[str, Any]]) -> None:
    """Inverse of :func:`capture_rng_state`; silently skips generators the state does not hold."""
    if not state:
        return
    random.setstate(_plain_to_py_state(state["python"]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda_states)


def _py_state_to_plain(s):
    version, internal, gauss = s
    return {"version": version, "internal": torch.tensor(internal, dtype=torch.int64), "gauss": gauss}


def _plain_to_py_state(d):
    return (d["version"], tuple(int(x) for x in d["internal"].tolist()), d["gauss"])
