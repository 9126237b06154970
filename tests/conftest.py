import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

# Without a GPU the Triton kernels are checked in Triton's interpreter; it must be chosen before
# Triton compiles anything, i.e. before rmt is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import rmt  # noqa: E402,F401  (registers the models)

DATA = Path(__file__).parent / "data"

# a small configuration for fast tests: every feature of the real variants (layer scale,
# both forms, odd mlp ratios), a fraction of the compute
SMALL_ARGS = dict(embed_dims=(16, 32, 64, 128), depths=(1, 2, 2, 1), num_heads=(2, 2, 4, 8),
                  heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 4, 3), layerscales=(False, False, True, True),
                  head_hidden_size=64, drop_path_rate=0.0)
# one block per stage: whole-model checks of the Triton kernels, which Triton's interpreter runs on
# the CPU at seconds per block (both forms, layer scale on and off, every stage's grid)
ONE_BLOCK_ARGS = dict(SMALL_ARGS, depths=(1, 1, 1, 1))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def saved_bytes(fn):
    """Bytes of distinct storages autograd keeps while running ``fn`` (parameters excluded)."""
    seen = {}

    def pack(t):
        if not (t.is_leaf and t.requires_grad):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(seen.values())


def assert_same_gradients(got: torch.Tensor, want: torch.Tensor, inputs, names, tol: float) -> None:
    """Backpropagate one random output gradient through ``got`` and ``want``: the gradients of every
    input have the same dtype and agree to ``tol`` relative error."""
    g = torch.randn_like(want)
    for name, a, e in zip(names, torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        assert a.dtype == e.dtype and rel_err(a, e) <= tol, name


@pytest.fixture(scope="module")
def one_thread():
    """Small models run fastest on one thread (and do not fight other processes for cores)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def golden():
    z = np.load(DATA / "rmt_mini.npz")
    cfg = json.loads(bytes(z["config_json"]))
    sd = {k[len("official_state_dict."):]: torch.from_numpy(np.array(z[k]))
          for k in z.files if k.startswith("official_state_dict.")}
    arrays = {k: torch.from_numpy(np.array(z[k])) for k in z.files
              if not k.startswith("official_state_dict.") and k != "config_json"}
    return cfg, sd, arrays


def golden_model_kwargs(cfg):
    return dict(num_classes=cfg["num_classes"], embed_dims=cfg["embed_dims"], depths=cfg["depths"],
                num_heads=cfg["num_heads"], init_values=cfg["init_values"],
                heads_ranges=cfg["heads_ranges"], mlp_ratios=cfg["mlp_ratios"],
                layerscales=cfg["layerscales"], layer_init_values=cfg["layer_init_values"],
                head_hidden_size=cfg["projection"], drop_path_rate=cfg["drop_path_rate"])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _fast_path_restored():
    """Tests switch the fast path with ``rmt.set_fast_path(...)``; every switch is restored afterwards."""
    saved = rmt.config.fast_path.values()
    yield
    rmt.set_fast_path(**saved)
