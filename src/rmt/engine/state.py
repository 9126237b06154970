"""Training checkpoints that survive crashes: atomic writes and complete, restorable state.

A checkpoint is a dict of tensors and plain containers (so it reloads with
``torch.load(weights_only=True)``): model and EMA weights, optimizer, scheduler and grad-scaler
states, counters, the resolved config and the RNG states of every generator in play.
"""
from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch


def save_checkpoint(state: Dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, rename.

    A crash at any moment leaves either the previous file or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Dict[str, Any]:
    """Load a training checkpoint without unpickling arbitrary objects."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{path}' does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise RuntimeError(f"checkpoint '{path}' could not be read ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''}); it may be damaged") from e


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
