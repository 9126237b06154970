"""Per-stage position tables of MaSA (rotation sin/cos and per-head decays), cached in eager mode."""
from typing import Any, Dict, Tuple

import torch

from ...compat import is_exporting
from ...config import fast_path
from .naive import head_decays, rotation_tables



def stage_positions(h: int, w: int, head_dim: int, num_heads: int, init_value: float,
                     heads_range: float, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotation tables ``(h, w, d)`` and per-head decay ``(n,)`` of one stage (float32)."""
    sin, cos = rotation_tables(h, w, head_dim, device=device)
    return sin, cos, head_decays(num_heads, init_value, heads_range, device=device)


_POSITION_CACHE: Dict[Tuple[Any, ...], Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


@torch.jit.ignore
def cached_stage_positions(h: int, w: int, head_dim: int, num_heads: int, init_value: float,
                           heads_range: float, device: torch.device
                           ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`stage_positions`, computed once per grid size and device in eager mode.

    Saves a dozen small kernels per stage and step. The tables are never modified in place and are
    made outside inference mode, so one cache serves inference and training. Under ``torch.compile``
    on CUDA they come from :func:`stage_positions_op` (copies of the cached tables); under export,
    ``torch.jit.trace`` and on other devices they are computed in the graph.
    """
    if torch.jit.is_tracing():   # a traced graph computes them from its (traced) grid size
        return stage_positions(h, w, head_dim, num_heads, init_value, heads_range, device)
    if torch.compiler.is_compiling():
        if fast_path.position_table_op and device.type == "cuda" and not is_exporting():
            return stage_positions_op(h, w, head_dim, num_heads, init_value, heads_range, device)
        return stage_positions(h, w, head_dim, num_heads, init_value, heads_range, device)
    key = (h, w, head_dim, num_heads, init_value, heads_range, device)
    hit = _POSITION_CACHE.get(key)
    if hit is None:
        if len(_POSITION_CACHE) >= 256:
            _POSITION_CACHE.clear()
        with torch.inference_mode(False), torch.no_grad():
            hit = stage_positions(h, w, head_dim, num_heads, init_value, heads_range, device)
        _POSITION_CACHE[key] = hit
    return hit


@torch.library.custom_op("rmt::stage_positions", mutates_args=())
def stage_positions_op(h: int, w: int, head_dim: int, num_heads: int, init_value: float,
                       heads_range: float, device: torch.device
                       ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`stage_positions` as one opaque op for ``torch.compile``: copies of the cached tables.

    Computed in the graph, the tables are element-wise functions of the grid that Inductor writes out
    again for every kernel that reads them (six small kernels per block of RMT-S, 157 launches per
    forward pass); an op's outputs are computed once per stage and shared by its blocks.
    """
    return tuple(t.clone() for t in cached_stage_positions(h, w, head_dim, num_heads, init_value,
                                                            heads_range, device))


@stage_positions_op.register_fake
def _(h: int, w: int, head_dim: int, num_heads: int, init_value: float, heads_range: float,
      device: torch.device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    table = (h, w, head_dim)
    return (torch.empty(table, device=device), torch.empty(table, device=device),
            torch.empty((num_heads,), device=device))
