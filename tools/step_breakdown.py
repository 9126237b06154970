"""GPU time of one RMT training step, piece by piece and stage by stage.

    python tools/step_breakdown.py --model rmt_small --batch 128

One eager step (bf16 autocast, cross-entropy, backward, fused AdamW) runs under ``torch.profiler``
with every piece of the fused block (:mod:`rmt.ops.block`: depthwise convolutions, LayerNorms, MaSA,
the linear layers, the FFN tail) wrapped in a labelled range that synchronises the device at both
ends, so each kernel runs inside the range of the piece that launched it. Each kernel's duration is
then booked to the innermost range around it. The synchronisation slows the step on the clock but
not the kernels: the table shows where the GPU time of a step goes (kernel durations only; a step
replayed from CUDA graphs takes about their sum). ``--kernels N`` also lists the N longest kernels of
each piece.
"""
from __future__ import annotations

import argparse
import functools
import sys
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import timm  # noqa: E402

import rmt  # noqa: E402,F401
from rmt.ops import block, dwconv, ffn, layernorm  # noqa: E402

PREFIX = "rmt/"
_dim = [0]  # width of the block being run (to tell the CPE from the FFN's depthwise conv)


def _labelled(fn: Callable, namer: Callable[..., str]) -> Callable:
    """``fn`` inside a profiler range named ``namer(*args)`` with the device synchronised at both ends."""
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        label = namer(*args, **kwargs)
        torch.cuda.synchronize()
        with torch.profiler.record_function(PREFIX + label):
            out = fn(*args, **kwargs)
            torch.cuda.synchronize()
        return out
    return wrapped


def _grid(x: torch.Tensor) -> str:
    """``"HxW"`` of ``(b, h, w, ...)`` tokens, or of flattened ``(b * h * w, c)`` ones (square grids)."""
    return f"{x.shape[1]}x{x.shape[2]}" if x.dim() >= 4 else _dim_grid(x)


def _conv_role(x: torch.Tensor, weight: torch.Tensor, gelu: bool) -> str:
    if weight.shape[-1] > 3:
        return "lepe"
    if gelu:
        return "ffn dwconv"
    return "cpe" if x.shape[-1] == _dim[0] else "ffn dwconv recompute"


def _linear_role(weight: torch.Tensor) -> str:
    out, inp = weight.shape
    if out == 3 * inp:
        return "qkv"
    if out == inp:
        return "proj"
    return "fc1" if out > inp else "fc2"


def _conv_namer(kind: str, x_at: int, gelu_at: int):
    """Label of a depthwise-conv call whose input and ``gelu`` flag are positional ``x_at``/``gelu_at``."""
    def name(*args, **kwargs):
        x, weight = args[x_at], args[x_at + 1]
        return f"{_conv_role(x, weight, args[gelu_at])} {kind}|{_grid(x)}"
    return name


def _block_namer(kind: str):
    def name(*args, **kwargs):
        x = args[0] if kind == "fwd" else args[0].saved[0]
        _dim[0] = x.shape[-1]
        return f"block {kind} other|{_grid(x)}"
    return name


def install() -> List[Tuple[object, str, Callable]]:
    """Wrap the pieces; returns what to restore."""
    patches = [
        (block, "block_forward", _block_namer("fwd")),
        (block, "block_backward", _block_namer("bwd")),
        (dwconv, "_forward", _conv_namer("fwd", 1, 5)),     # (launch, x, weight, bias, residual, gelu, ...)
        (dwconv, "_backward", _conv_namer("bwd", 2, 5)),    # (launch, grad, x, weight, residual, gelu, ...)
        (layernorm, "_forward", lambda x, *a, **k: f"norm fwd|{_dim_grid(x)}"),
        (layernorm, "_backward", lambda g, x, *a, **k: f"norm bwd|{_dim_grid(x)}"),
        (block, "attention_forward", lambda q, *a, **k: f"masa fwd|{_grid(q)}"),
        (block, "attention_backward", lambda g, q, *a, **k: f"masa bwd|{_grid(q)}"),
        (F, "linear", lambda x, w, *a, **k: f"{_linear_role(w)} fwd|{_grid(x)}" if x.dim() == 4 else "head|-"),
        (block, "linear_backward", lambda g, x, w, *a, **k: f"{_linear_role(w)} bwd|{_grid(x)}"),
        (ffn, "linear_backward", lambda g, x, w, *a, **k: f"{_linear_role(w)} wgrad|{_grid(x)}"),
        (ffn, "gelu_and_derivative", lambda a, *r, **k: f"gelu+derivative|{_grid(a)}"),
        (F, "gelu", lambda a, *r, **k: f"gelu|{_grid(a) if a.dim() == 4 else '-'}"),
        (block, "ffn_tail_backward", lambda g, a, *r, **k: f"ffn tail bwd other|{_grid(a)}"),
        (block, "_residual_backward", lambda g, *r, **k: f"residual bwd|{_grid(g)}"),
        (block, "cast_together", lambda *a, **k: "weight casts|-"),
    ]
    saved = []
    for owner, attr, namer in patches:
        original = getattr(owner, attr)
        saved.append((owner, attr, original))
        setattr(owner, attr, _labelled(original, namer))
    return saved


def _dim_grid(x2d: torch.Tensor) -> str:
    """Grid of a LayerNorm's flattened ``(tokens, c)`` input, from the batch set by :func:`main`."""
    side = int(round((x2d.shape[0] / _batch[0]) ** 0.5))
    return f"{side}x{side}"


_batch = [1]


def breakdown(model_name: str, batch: int, kernels: int) -> str:
    device = torch.device("cuda")
    _batch[0] = batch
    model = timm.create_model(model_name).to(device=device, memory_format=torch.channels_last).train()
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (batch,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def step():
        with torch.profiler.record_function(PREFIX + "outside blocks fwd|-"):
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            torch.cuda.synchronize()
        with torch.profiler.record_function(PREFIX + "outside blocks bwd|-"):
            loss.backward()
            torch.cuda.synchronize()
        with torch.profiler.record_function(PREFIX + "optimizer|-"):
            opt.step()
            opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize()

    saved = install()
    try:
        with torch.autograd.set_multithreading_enabled(False):
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                    torch.profiler.ProfilerActivity.CUDA]) as prof:
                step()
                torch.cuda.synchronize()
    finally:
        for owner, attr, original in saved:
            setattr(owner, attr, original)
    return _table(prof.events(), kernels)


def _table(events, kernels: int) -> str:
    ranges = sorted(((e.time_range.start, e.time_range.end, e.name[len(PREFIX):]) for e in events
                     if e.name.startswith(PREFIX)), key=lambda r: r[0])
    # device activity: kernels, copies and fills; not the device-side copies of annotated ranges
    host = {e.name for e in events if e.device_type != torch.autograd.DeviceType.CUDA}
    cuda = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA and e.time_range.end > 0
            and e.name not in host and not e.name.startswith(PREFIX)]
    per: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
    names: Dict[str, Dict[str, float]] = defaultdict(lambda: defaultdict(float))
    counts: Dict[str, int] = defaultdict(int)
    total = 0.0
    for k in cuda:
        mid = 0.5 * (k.time_range.start + k.time_range.end)
        inner = [r for r in ranges if r[0] <= mid <= r[1]]
        label = max(inner, key=lambda r: r[0])[2] if inner else "unlabelled|-"
        piece, grid = label.split("|")
        us = k.time_range.end - k.time_range.start
        per[piece][grid] += us
        counts[piece] += 1
        names[piece][k.name[:60]] += us
        total += us
    grids = sorted({g for p in per.values() for g in p if g != "-"}, key=lambda g: -int(g.split("x")[0]))
    cols = grids + ["-"]
    out = [f"GPU time of one step: {total / 1e3:.2f} ms in {len(cuda)} kernels (ms per piece and token grid)",
           f"{'piece':<24}" + "".join(f"{g:>9}" for g in cols) + f"{'total':>9}{'share':>7}{'kernels':>8}"]
    for piece, row in sorted(per.items(), key=lambda kv: -sum(kv[1].values())):
        s = sum(row.values())
        out.append(f"{piece:<24}" + "".join(f"{row.get(g, 0) / 1e3:>9.3f}" for g in cols)
                   + f"{s / 1e3:>9.3f}{100 * s / total:>6.1f}%{counts[piece]:>8}")
    if kernels:
        out.append("")
        for piece, row in sorted(names.items(), key=lambda kv: -sum(kv[1].values())):
            top = sorted(row.items(), key=lambda kv: -kv[1])[:kernels]
            out.append(f"{piece}: " + "; ".join(f"{n} {us / 1e3:.3f}" for n, us in top))
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rmt_small")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--kernels", type=int, default=3, help="longest kernels listed per piece")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("step_breakdown.py profiles a CUDA training step; no CUDA device here", file=sys.stderr)
        return 2
    print(breakdown(args.model, args.batch, args.kernels), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
