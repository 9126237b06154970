"""Inference img/s of one model in eager and compiled modes, and the GPU kernels each one runs.

    python benchmarks/inference_modes.py --model rmt_small --modes eager,compiled,compiled-convref \
        --repeats 2 --profile eager,compiled

A mode is ``eager`` or ``compiled`` (``torch.compile(model)``, default mode) with optional switches:

* ``convref``: the depthwise convolutions through ``F.conv2d`` (cuDNN; under ``torch.compile`` what
  Inductor makes of them) instead of the fused Triton kernels (``rmt.set_fast_path(dwconv_kernels=False)``);
* ``torchln``: PyTorch's LayerNorm instead of the multi-row Triton kernels in eager mode
  (``layernorm_kernels=False``);
* ``convstem``: the stem's first conv, BatchNorm and GELU as modules (cuDNN) instead of one Triton
  kernel (``stem_kernel=False``);
* ``exactgelu``: fc1's exact GELU as its own pass instead of cuBLASLt's GEMM epilogue
  (``gelu_epilogue=False``);
* ``unfusedinfer``: blocks module by module instead of :func:`rmt.ops.block_infer.block_infer`
  (``fused_inference_block=False``);
* ``graphtables``: compiled CUDA models compute MaSA's position tables in the graph instead of
  through the op ``rmt::stage_positions`` (``position_table_op=False``);
* ``inductorln``: under ``torch.compile`` the blocks' add+LayerNorm from Inductor instead of the
  Triton kernel (``layernorm_compiled_kernels=False``);
* ``reference``: the whole model on the reference MaSA path (``masa_impl="reference"``).

Timing is ``rmt benchmark``'s harness (bf16 autocast, channels-last random batch, median of CUDA
event timings). ``--repeats`` runs the list of modes that many times, alternating, so drifts of the
machine's pace affect all modes alike. ``--profile`` lists, for the named modes, the kernels with
the most GPU time in one batch (grouped by kernel name) and the GPU time of the batch in all.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import timm  # noqa: E402

import rmt  # noqa: E402
from rmt.benchmark import environment, save_rows, time_step  # noqa: E402

SWITCHES = ("convref", "torchln", "reference", "exactgelu", "convstem", "unfusedinfer", "graphtables",
            "inductorln")


# mode switch -> the fast-path switch (rmt.config) it turns off
SWITCH_OFF = {"convref": "dwconv_kernels", "torchln": "layernorm_kernels", "exactgelu": "gelu_epilogue",
              "convstem": "stem_kernel", "unfusedinfer": "fused_inference_block",
              "graphtables": "position_table_op", "inductorln": "layernorm_compiled_kernels"}


def _switches(switches: List[str]):
    """Turn the fast-path pieces named in ``switches`` off while the model is built and run."""
    return rmt.fast_path_switches(**{SWITCH_OFF[s]: False for s in switches if s in SWITCH_OFF})


def _kernel_table(prof, rows: int) -> str:
    """The ``rows`` kernels with the most GPU time, grouped by name, and the total."""
    kernels: Dict[str, List[float]] = {}
    for e in prof.events():
        if e.device_type.name != "CUDA":
            continue
        t = kernels.setdefault(e.name, [0.0, 0])
        t[0] += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        t[1] += 1
    total = sum(t[0] for t in kernels.values())
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:rows]
    lines = [f"  {'GPU ms':>8} {'share':>6} {'calls':>6}  kernel"]
    for name, (us, calls) in top:
        lines.append(f"  {us / 1000:8.3f} {us / max(total, 1e-9):6.1%} {calls:6d}  {name[:110]}")
    lines.append(f"  {total / 1000:8.3f} 100.0%         all {len(kernels)} kernels")
    return "\n".join(lines)


def run_mode(name: str, mode: str, size: int, batch: int, device: torch.device, warmup: int,
             iters: int, profile_rows: int) -> Dict:
    """img/s of one mode (and its kernel table when ``profile_rows``); failures go to ``note``."""
    base, *switches = mode.split("-")
    if base not in ("eager", "compiled") or set(switches) - set(SWITCHES):
        raise SystemExit(f"unknown mode {mode!r}: eager or compiled, then switches from {SWITCHES}")
    row = dict(model=name, mode=mode, size=size, batch=batch, img_per_s=None, setup_s=None, note="")
    t0 = time.perf_counter()
    try:
        with _switches(switches):
            kwargs = {"masa_impl": "reference"} if "reference" in switches and name.startswith("rmt_") else {}
            model = timm.create_model(name, **kwargs).to(device=device, memory_format=torch.channels_last).eval()
            run = torch.compile(model) if base == "compiled" else model
            x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

            def step():
                with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
                    run(x)
            step()  # compile / autotune
            torch.cuda.synchronize(device)
            row["setup_s"] = round(time.perf_counter() - t0, 1)
            row["img_per_s"] = round(batch / time_step(step, device, warmup, iters), 1)
            if profile_rows:
                from torch.profiler import ProfilerActivity, profile
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    step()
                    torch.cuda.synchronize(device)
                row["kernels"] = _kernel_table(prof, profile_rows)
    except Exception as e:  # keep the table going
        row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    finally:
        torch._dynamo.reset()
        torch.cuda.empty_cache()
    return row


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rmt_small")
    p.add_argument("--modes", default="eager,compiled")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", default="", help="comma-separated modes whose kernels to list")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--json", default="")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("inference_modes.py times CUDA inference; no CUDA device here", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    modes = [m for m in args.modes.split(",") if m]
    profiled = set(filter(None, args.profile.split(",")))
    rows: List[Dict] = []
    print(f"{'model':<30} {'mode':<24} {'size':>5} {'batch':>5} {'img/s':>9} {'setup s':>7}  note")
    for rep in range(args.repeats):
        for mode in modes:
            prof_rows = args.rows if mode in profiled and rep == args.repeats - 1 else 0
            r = run_mode(args.model, mode, args.size, args.batch, device, args.warmup, args.iters, prof_rows)
            rows.append(r)
            print(f"{args.model:<30} {mode:<24} {args.size:>5} {args.batch:>5} {r['img_per_s'] or '-':>9} "
                  f"{r['setup_s'] or '-':>7}  {r['note']}", flush=True)
    for r in rows:
        if "kernels" in r:
            print(f"\n== {args.model} {r['mode']}, {r['size']}x{r['size']}, batch {r['batch']}: one batch ==")
            print(r["kernels"])
    if args.json:
        save_rows(args.json, environment(device), vars(args), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
