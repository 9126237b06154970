"""Tile sizes of the depthwise-conv, LayerNorm and MaSA forward kernels at RMT-S's shapes: time, bandwidth, best choice.

    python tools/kernel_tiles.py --batch 128 --json OUT/kernel_tiles.json
    TRITON_INTERPRET=1 python tools/kernel_tiles.py --device cpu --batch 1 --smoke   # runs, times nothing useful

For every stage of RMT-S (token grids 56/28/14/7, widths 64/128/256/512, FFN hidden 3x, heads
4/4/8/16; decomposed MaSA in stages 1-3, full in stage 4) and bf16 inputs, one table row per
(kernel, shape): the time of the tile the code picks today, the fastest tile found, and the
effective bandwidth of each (bytes the kernel must move at least, divided by its time). Rows for
PyTorch's LayerNorm and cuDNN's depthwise convolution give the baselines (none for MaSA).
``--kernels`` also takes ``dwconv_bwd`` (the input-gradient kernel) and ``dwconv_wgrad`` (the
weight-gradient kernel, against cuDNN's weight gradient).
Timing: on CUDA, ten calls captured in a CUDA graph and the replays timed (median of CUDA-event
timings, divided by ten), so the CPU cost of launching does not hide the GPU time of small kernels.
"""
from __future__ import annotations

import argparse
import functools
import itertools
import sys
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from rmt.benchmark import environment, save_rows, time_step  # noqa: E402
from rmt.ops import dwconv, layernorm  # noqa: E402
from rmt.ops.masa import head_decays, rotation_tables, triton_masa  # noqa: E402
from rmt.ops.triton_support import eager_launch, next_power_of_2  # noqa: E402

WIDTHS = [64, 128, 256, 512]                          # RMT-S stage widths
STAGES = [(56, 64), (28, 128), (14, 256), (7, 512)]   # RMT-S at 224x224: (grid side, width); --size rescales
HEADS = [4, 4, 8, 16]
SMOKE_STAGES = [(9, 32)]                              # --smoke: one small grid, quick under the interpreter
SELECTED = {0, 1, 2, 3}                               # --stages (0-based here)


def _stages():
    return [st for i, st in enumerate(STAGES) if i in SELECTED]


GRAPH_LAUNCHES = 10


def _seconds(fn: Callable[[], object], device: torch.device, iters: int, graph: bool = True) -> float:
    """GPU seconds of one call of ``fn``. On CUDA the calls are captured in a CUDA graph
    (``GRAPH_LAUNCHES`` per replay) and the replays timed, so the CPU cost of a launch (which exceeds
    the run time of the small kernels of stages 3-4) does not hide the kernel's own time. ``graph=False``
    (autograd's backward, which cannot be captured from here) times plain launches."""
    if device.type != "cuda" or not graph:
        return time_step(fn, device, warmup=2, iters=iters)
    fn()  # compile
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(GRAPH_LAUNCHES):
            fn()
    return time_step(graph.replay, device, warmup=2, iters=iters) / GRAPH_LAUNCHES


def dwconv_rows(batch: int, device: torch.device, iters: int, smoke: bool,
                backward: bool = False) -> Iterator[Dict]:
    """Forward kernel of the CPE (3x3 + residual), LePE (5x5) and FFN (3x3 + residual, 3x width) convs;
    with ``backward`` their input-gradient kernel (the FFN's times GELU's derivative, read from a
    tensor as training does since run R) and bias sums."""
    widths = [8, 16, 32, 64]
    channels = [32, 64, 128]
    rows_per_program = [1, 2, 4]
    for (side, c), (name, ks, mult, residual) in itertools.product(
            SMOKE_STAGES if smoke else _stages(), [("cpe", 3, 1, True), ("lepe", 5, 1, False), ("ffn", 3, 3, True)]):
        ch = c * mult
        x = torch.randn(batch, side, side, ch, device=device, dtype=torch.bfloat16)
        w = torch.randn(ch, 1, ks, ks, device=device)
        b = torch.randn(ch, device=device)
        gelu = backward and name == "ffn"
        # read x, write y; the input gradient also reads GELU's derivative
        moved = x.numel() * 2 * (3 if gelu else 2)
        dy = torch.randn_like(x)
        derivative = torch.rand_like(x) if gelu else None

        def run(tile=None):
            if backward:
                return dwconv._backward(eager_launch, dy, x, w, residual, gelu, True, False, True, tile=tile,
                                        derivative=derivative)
            return dwconv._forward(eager_launch, x, w, b, residual, False, tile)
        default = dwconv._backward_blocks(side, ch, ks, gelu) if backward else dwconv._blocks(side, ch, ks)
        timed = {default: _seconds(lambda: run(default), device, iters)}
        for bw, bc, r in itertools.product(widths, channels, rows_per_program):
            if bw > next_power_of_2(side) or bc > next_power_of_2(ch) or smoke:
                continue
            for nw in (4, 8) if bw * bc * r >= 8192 else (4,):
                tile = (bw, bc, nw, r)
                if tile not in timed:
                    timed[tile] = _seconds(lambda: run(tile), device, iters)
        best = min(timed, key=timed.get)
        cudnn = float("nan") if backward else _seconds(  # cuDNN's forward: the forward rows' baseline
            lambda: F.conv2d(x.permute(0, 3, 1, 2), w.to(x.dtype), b.to(x.dtype), padding=ks // 2, groups=ch),
            device, iters)
        by_rows = {r: min((t, tile) for tile, t in timed.items() if tile[3] == r) for r in rows_per_program
                   if any(tile[3] == r for tile in timed)}
        yield (dict(kernel=f"dwconv {'bwd ' if backward else ''}{name} {ks}x{ks}", shape=f"{batch}x{side}x{side}x{ch}",
                         best_by_rows={r: (str(tile), t * 1e6) for r, (t, tile) in by_rows.items()},
                         default=str(default), default_us=timed[default] * 1e6,
                         best=str(best), best_us=timed[best] * 1e6, baseline_us=cudnn * 1e6,
                         default_gbs=moved / timed[default] / 1e9, best_gbs=moved / timed[best] / 1e9))


def dwconv_wgrad_rows(batch: int, device: torch.device, iters: int, smoke: bool) -> Iterator[Dict]:
    """The depthwise weight-gradient kernel (``rmt.ops.dwconv._weight_grad``, off by default) of the
    CPE, LePE and FFN convs, against cuDNN's weight gradient (the "torch us" column)."""
    for (side, c), (name, ks, mult) in itertools.product(
            SMOKE_STAGES if smoke else _stages(), [("cpe", 3, 1), ("lepe", 5, 1), ("ffn", 3, 3)]):
        ch = c * mult
        x = torch.randn(batch, side, side, ch, device=device, dtype=torch.bfloat16)
        dy = torch.randn_like(x)
        w = torch.empty(ch, 1, ks, ks, device=device, dtype=x.dtype)
        moved = x.numel() * 2 * 2  # read dy and x

        def run(tile=None):
            return dwconv._weight_grad(eager_launch, dy, x, ks, False, tile)
        default = dwconv._wgrad_blocks(side, side, ch, ks)
        timed = {default: _seconds(lambda: run(default), device, iters)}
        for bw, bc, nw, r in itertools.product([4, 8, 16, 32], [16, 32, 64], [4, 8], [2, 4, 8, 16]):
            if bw > next_power_of_2(side) or bc > next_power_of_2(ch) or r > side or smoke:
                continue
            tile = (bw, bc, nw, r)
            if tile not in timed:
                timed[tile] = _seconds(lambda: run(tile), device, iters)
        best = min(timed, key=timed.get)
        cudnn = _seconds(lambda: torch.ops.aten.convolution_backward(
            dy.permute(0, 3, 1, 2), x.permute(0, 3, 1, 2), w, [ch], [1, 1], [ks // 2] * 2, [1, 1], False,
            [0, 0], ch, [False, True, False]), device, iters)
        yield dict(kernel=f"dwconv wgrad {name} {ks}x{ks}", shape=f"{batch}x{side}x{side}x{ch}",
                   default=str(default), default_us=timed[default] * 1e6, best=str(best),
                   best_us=timed[best] * 1e6, baseline_us=cudnn * 1e6,
                   default_gbs=moved / timed[default] / 1e9, best_gbs=moved / timed[best] / 1e9)


def layernorm_rows(batch: int, device: torch.device, iters: int, smoke: bool) -> Iterator[Dict]:
    """Forward and backward LayerNorm kernels against PyTorch's, bf16 tokens, float32 parameters."""
    for side, c in (SMOKE_STAGES if smoke else _stages()):
        x = torch.randn(batch * side * side, c, device=device, dtype=torch.bfloat16)
        w, b = torch.randn(c, device=device), torch.randn(c, device=device)
        dy = torch.randn_like(x)
        _, mean, rstd = layernorm._forward(x, w, b, 1e-6, x.dtype)
        for phase, moved in (("forward", x.numel() * 4), ("backward", x.numel() * 6)):
            default_m, _, default_warps = layernorm._tile(c, backward=phase == "backward")
            choices = [(default_m, default_warps)] + ([] if smoke else [
                (m, nw) for m in (16, 32, 64) for nw in (4, 8)
                if m * next_power_of_2(c) <= 16384 and (m, nw) != (default_m, default_warps)])

            def run(m, nw):
                if phase == "forward":
                    return layernorm._forward(x, w, b, 1e-6, x.dtype, m, nw)
                return layernorm._backward(dy, x, w, mean, rstd, m, nw)
            timed = {choice: _seconds(lambda: run(*choice), device, iters) for choice in choices}
            best = min(timed, key=timed.get)
            xt = x.detach().requires_grad_(phase == "backward")
            if phase == "forward":
                def torch_ln():
                    return F.layer_norm(x, (c,), w.to(x.dtype), b.to(x.dtype), 1e-6)
            else:
                out = F.layer_norm(xt, (c,), w.to(x.dtype), b.to(x.dtype), 1e-6)

                def torch_ln():
                    return torch.autograd.grad(out, xt, dy, retain_graph=True)
            default = choices[0]
            yield (dict(kernel=f"layernorm {phase}", shape=f"{x.shape[0]}x{c}",
                             default=f"rows {default[0]}, warps {default[1]}", default_us=timed[default] * 1e6,
                             best=f"rows {best[0]}, warps {best[1]}", best_us=timed[best] * 1e6,
                             baseline_us=_seconds(torch_ln, device, iters, graph=phase == "forward") * 1e6,
                             default_gbs=moved / timed[default] / 1e9, best_gbs=moved / timed[best] / 1e9))


def masa_rows(batch: int, device: torch.device, iters: int, smoke: bool) -> Iterator[Dict]:
    """MaSA forward kernels: the row and column passes of the decomposed form (stages 1-3; one
    sequence per program or several, ``seqs``) and the full form (stage 4; flash tiles)."""
    R, C, FULL = triton_masa.MODE_ROW, triton_masa.MODE_COL, triton_masa.MODE_FULL
    stages = [(st, n, m) for i, (st, n) in enumerate(zip(STAGES, HEADS)) if i in SELECTED
              for m in ((R, C) if i < 3 else (FULL,))]
    if smoke:
        stages = [(SMOKE_STAGES[0], 2, R), (SMOKE_STAGES[0], 2, FULL)]
    for (side, c), n, mode in stages:
        d = c // n
        qkv = torch.randn(batch, side, side, 3, n, d, device=device, dtype=torch.bfloat16)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        sin, cos = rotation_tables(side, side, d, device=device)
        decay = head_decays(n, 2.0, 4.0, device=device).float()
        seq = side * side if mode == FULL else side
        moved = q.numel() * 2 * 4  # read q, k, v; write the output

        def run(choice):
            config, seqs = choice
            return triton_masa._attend(eager_launch, q, k, v, sin, cos, decay, None, d ** -0.5,
                                       mode, False, config, seqs)
        config = triton_masa._launch_config(seq, d)
        default = (None, None)  # what the model runs: _attend's own choice
        if mode == FULL or seq > config[0]:
            tiles = [(32, 64), (64, 32), (64, 64), (128, 64), (64, 128), (128, 128)]
            others = [((bm, bn, nw), None) for (bm, bn) in tiles for nw in (2, 4, 8)
                      if max(bm, bn) <= 2 * next_power_of_2(seq)]
        else:
            others = [((config[0], config[0], nw), s) for nw in (2, 4, 8) for s in (0, 1, 2, 4, 8, 16)
                      if s * config[0] <= 256]
        choices = [default] + ([] if smoke else [o for o in others if o != default])
        timed = {}
        for choice in choices:
            try:
                timed[choice] = _seconds(lambda: run(choice), device, iters)
            except Exception as e:  # e.g. out of shared memory for the largest tiles
                print(f"masa {choice}: {type(e).__name__}", file=sys.stderr)
        best = min(timed, key=timed.get)
        kind = {R: "row pass", C: "col pass", FULL: "full"}[mode]

        def name(choice):
            if choice == default:
                return "auto" + ("" if mode == FULL or seq > config[0]
                             else f" x{triton_masa._seqs_per_program(config[0], side)}")
            return str(choice[0]) + ("" if choice[1] is None else f" x{choice[1]}")
        yield (dict(kernel=f"masa fwd {kind}", shape=f"{batch}x{side}x{side}x{n}x{d}",
                         default=name(default), default_us=timed[default] * 1e6,
                         best=name(best), best_us=timed[best] * 1e6, baseline_us=float("nan"),
                         default_gbs=moved / timed[default] / 1e9, best_gbs=moved / timed[best] / 1e9))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="one small shape, the default tiles only (a quick check)")
    p.add_argument("--kernels", default="dwconv,layernorm,masa", help="which sweeps, comma separated")
    p.add_argument("--size", type=int, default=224, help="image side; the token grids are size/4 ... size/32")
    p.add_argument("--stages", default="1,2,3,4", help="which stages' shapes, comma separated (1-4)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kernel_tiles.py times CUDA kernels; no CUDA device here (use --device cpu --smoke "
              "under TRITON_INTERPRET=1 for a check that it runs)", file=sys.stderr)
        return 1
    torch.manual_seed(0)
    STAGES[:] = [(args.size // (4 * 2 ** i), c) for i, c in enumerate(WIDTHS)]
    SELECTED.clear()
    SELECTED.update(int(i) - 1 for i in args.stages.split(","))
    sweeps = {"dwconv": dwconv_rows, "dwconv_bwd": functools.partial(dwconv_rows, backward=True),
              "dwconv_wgrad": dwconv_wgrad_rows, "layernorm": layernorm_rows, "masa": masa_rows}
    unknown = set(args.kernels.split(",")) - set(sweeps)
    if unknown:
        print(f"unknown --kernels {sorted(unknown)}: choose from {sorted(sweeps)}", file=sys.stderr)
        return 1
    print(f"{'kernel':<24} {'shape':<18} {'default tile':<18} {'us':>8} {'GB/s':>7}  "
          f"{'best tile':<18} {'us':>8} {'GB/s':>7}  {'torch us':>8}", flush=True)
    rows: List[Dict] = []
    for name, sweep in sweeps.items():
        if name not in args.kernels.split(","):
            continue
        for r in sweep(args.batch, device, args.iters, args.smoke):  # printed as they come
            rows.append(r)
            print(f"{r['kernel']:<24} {r['shape']:<18} {r['default']:<18} {r['default_us']:>8.1f} "
                  f"{r['default_gbs']:>7.0f}  {r['best']:<18} {r['best_us']:>8.1f} {r['best_gbs']:>7.0f}  "
                  f"{r['baseline_us']:>8.1f}", flush=True)
    for r in rows:
        if r.get("best_by_rows"):
            print(f"{r['kernel']:<24} {r['shape']:<18} best per rows/program: " + ", ".join(
                f"{n}: {tile} {us:.1f} us" for n, (tile, us) in r["best_by_rows"].items()))
    if args.json:
        save_rows(args.json, environment(device), vars(args), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
