"""The fast-path kernels of an older revision against this tree's, at RMT-S's shapes, in one process.

    git archive <rev> src | tar -x -C /tmp/old          # the revision to compare against
    python tools/kernel_ab.py --old /tmp/old/src --batch 256 --json OUT/kernel_ab.json
    TRITON_INTERPRET=1 python tools/kernel_ab.py --old src --device cpu --smoke   # runs, times nothing useful

For each kernel call of one RMT-S block per stage (the depthwise convolutions' forward and input
gradient: CPE 3x3, LePE 5x5 on a strided slice of qkv, FFN 3x3 with GELU's derivative in the backward;
MaSA's passes: forward, forward keeping the log-sum-exp for training, and backward, of the decomposed
form in stages 1-3 and the full form in stage 4), each revision runs with its own default tiles. A row
gives both times (CUDA-graph replays, as ``kernel_tiles.py`` times them), their ratio, the registers and
spills of the compiled kernels (CUDA) and the largest difference between the two outputs relative to
the largest output. The last line sums each revision's time over RMT-S's blocks (3, 4, 18 and 4 per
stage) for one batch. ``--size 1024 --batch 16`` gives the long-sequence shapes.

The older revision's ``rmt`` package is imported under another name (``rmt_old``) from ``--old``; it
must have the private entry points used here (``dwconv._forward``/``_backward``/``_blocks``/
``_backward_blocks``, ``triton_masa._attend``/``_attend_backward``), as revisions since run L do.
"""
from __future__ import annotations

import argparse
import importlib
import sys
import types
from pathlib import Path
from typing import Callable, Dict, Iterator, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_tiles import HEADS, STAGES, _seconds  # noqa: E402
from rmt.benchmark import environment, save_rows  # noqa: E402
from rmt.ops import dwconv  # noqa: E402
from rmt.ops.masa import head_decays, rotation_tables, triton_masa  # noqa: E402

BLOCKS = [3, 4, 18, 4]  # RMT-S blocks per stage


def load_old(src: Path) -> Dict[str, types.ModuleType]:
    """``{"dwconv": ..., "triton_masa": ...}`` of the ``rmt`` package under ``src``, imported as ``rmt_old``."""
    root = src / "rmt"
    if not (root / "ops" / "dwconv.py").is_file():
        raise SystemExit(f"--old {src}: no rmt/ops/dwconv.py there (give the src folder of a checkout)")
    for name, path in (("rmt_old", root), ("rmt_old.ops", root / "ops"), ("rmt_old.ops.masa", root / "ops" / "masa")):
        module = types.ModuleType(name)
        module.__path__ = [str(path)]
        sys.modules[name] = module
    return {"dwconv": importlib.import_module("rmt_old.ops.dwconv"),
            "triton_masa": importlib.import_module("rmt_old.ops.masa.triton_masa")}


class _Recorder:
    """A ``launch`` argument that records the compiled kernels it launches (registers and spills)."""

    def __init__(self):
        self.kernels: List[object] = []

    def __call__(self, kernel):
        recorder = self

        class _Grid:
            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    compiled = kernel[grid](*args, **kwargs)
                    recorder.kernels.append(compiled)
                    return compiled
                return run
        return _Grid()

    def registers(self) -> str:
        seen = []
        for k in self.kernels:
            text = f"{getattr(k, 'n_regs', '-')}/{getattr(k, 'n_spills', '-')}"
            if text not in seen:
                seen.append(text)
        return " ".join(seen)


def _flat(out) -> torch.Tensor:
    parts = out if isinstance(out, (tuple, list)) else (out,)
    return torch.cat([p.float().flatten() for p in parts if isinstance(p, torch.Tensor)])


def _compare(kernel: str, shape: str, blocks: int, calls: Dict[str, Callable[[_Recorder], object]],
             device: torch.device, iters: int) -> Dict:
    """One table row: each revision's call timed, its kernels' registers, the outputs' difference."""
    row = dict(kernel=kernel, shape=shape, blocks=blocks)
    outs = {}
    for tag, call in calls.items():
        recorder = _Recorder()
        outs[tag] = _flat(call(recorder))
        row[f"{tag}_us"] = _seconds(lambda: call(recorder), device, iters) * 1e6
        row[f"{tag}_regs"] = recorder.registers()
    row["ratio"] = row["new_us"] / row["old_us"]
    scale = outs["old"].abs().max().clamp_min(1e-30)
    row["max_rel_diff"] = ((outs["new"] - outs["old"]).abs().max() / scale).item()
    return row


def dwconv_rows(old, batch: int, stages, device: torch.device, iters: int) -> Iterator[Dict]:
    mods = {"old": old, "new": dwconv}
    for (side, c), blocks, _, _ in stages:
        for name, ks, mult, residual in (("cpe", 3, 1, True), ("lepe", 5, 1, False), ("ffn", 3, 3, True)):
            ch = c * mult
            wide = torch.randn(batch, side, side, 3 * ch if name == "lepe" else ch, device=device,
                               dtype=torch.bfloat16)
            x = wide[..., 2 * ch:] if name == "lepe" else wide  # LePE reads v, a slice of qkv
            w = torch.randn(ch, 1, ks, ks, device=device) * 0.2
            b = torch.randn(ch, device=device)
            dy = torch.randn(batch, side, side, ch, device=device, dtype=torch.bfloat16)
            gelu = name == "ffn"

            def forward(mod):
                return lambda launch: mod._forward(launch, x, w, b, residual, False)

            def backward(mod):
                return lambda launch: mod._backward(launch, dy, x, w, residual, gelu, True, False, True)
            shape = f"{batch}x{side}x{side}x{ch}"
            yield _compare(f"dwconv {name} {ks}x{ks} fwd", shape, blocks,
                           {t: forward(m) for t, m in mods.items()}, device, iters)
            yield _compare(f"dwconv {name} {ks}x{ks} dgrad", shape, blocks,
                           {t: backward(m) for t, m in mods.items()}, device, iters)


def masa_rows(old, batch: int, stages, device: torch.device, iters: int) -> Iterator[Dict]:
    mods = {"old": old, "new": triton_masa}
    R, C, FULL = triton_masa.MODE_ROW, triton_masa.MODE_COL, triton_masa.MODE_FULL
    for (side, c), blocks, n, full in stages:
        d = c // n
        qkv = torch.randn(batch, side, side, 3, n, d, device=device, dtype=torch.bfloat16)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        sin, cos = rotation_tables(side, side, d, device=device)
        decay = head_decays(n, 2.0, 4.0, device=device).float()
        scale = d ** -0.5
        for label, mode in ((("full", FULL),) if full else (("row", R), ("col", C))):
            out, lse = triton_masa._attend(triton_masa.eager_launch, q, k, v, sin, cos, decay, None, scale, mode, True)
            grad = torch.randn_like(out)

            def forward(mod, need_lse):  # the output and, when kept, the log-sum-exp
                return lambda launch: mod._attend(launch, q, k, v, sin, cos, decay, None, scale, mode,
                                                  need_lse)[:2 if need_lse else 1]

            def backward(mod):
                return lambda launch: mod._attend_backward(launch, grad, q, k, v, out, lse, sin, cos, decay,
                                                           scale, mode)
            shape = f"{batch}x{side}x{side}x{n}x{d}"
            yield _compare(f"masa {label} fwd", shape, blocks, {t: forward(m, False) for t, m in mods.items()},
                           device, iters)
            yield _compare(f"masa {label} fwd+lse", shape, blocks, {t: forward(m, True) for t, m in mods.items()},
                           device, iters)
            yield _compare(f"masa {label} bwd", shape, blocks, {t: backward(m) for t, m in mods.items()},
                           device, iters)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--old", required=True, help="the src folder of the revision to compare against")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--size", type=int, default=224, help="image side; the token grids are size/4 ... size/32")
    p.add_argument("--kernels", default="dwconv,masa")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="one small stage (a quick check under the interpreter)")
    p.add_argument("--json", default="")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("kernel_ab.py times CUDA kernels; no CUDA device here (see --device cpu --smoke)", file=sys.stderr)
        return 2
    old = load_old(Path(args.old).resolve())
    scaled = [(max(1, side * args.size // 224), c) for side, c in STAGES]
    # ((grid side, width), blocks, heads, full form): RMT-S's full form is stage 4's
    stages = ([((4, 16), 1, 2, False)] if args.smoke
              else [(st, nb, nh, i == 3) for i, (st, nb, nh) in enumerate(zip(scaled, BLOCKS, HEADS))])
    iters = 1 if args.smoke else args.iters
    batch = 1 if args.smoke else args.batch
    rows: List[Dict] = []
    kinds = set(args.kernels.split(","))
    print(f"{'kernel':<26}{'shape':<20}{'old us':>10}{'new us':>10}{'ratio':>7}  {'old regs/spills':<18}"
          f"{'new regs/spills':<18}{'max rel diff':>12}", flush=True)
    for source in ((dwconv_rows(old["dwconv"], batch, stages, device, iters),) if "dwconv" in kinds else ()) + \
            ((masa_rows(old["triton_masa"], batch, stages, device, iters),) if "masa" in kinds else ()):
        for r in source:
            rows.append(r)
            print(f"{r['kernel']:<26}{r['shape']:<20}{r['old_us']:>10.1f}{r['new_us']:>10.1f}{r['ratio']:>7.3f}  "
                  f"{r['old_regs']:<18}{r['new_regs']:<18}{r['max_rel_diff']:>12.1e}", flush=True)
    for tag in ("old", "new"):
        total = sum(r[f"{tag}_us"] * r["blocks"] for r in rows)
        print(f"{tag}: {total:,.0f} us summed over RMT-S's blocks, one batch of {batch}")
    if args.json:
        save_rows(args.json, environment(device), vars(args), rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
