"""Inference img/s of one model with fast-path pieces switched off, eager and compiled, in one process.

    python tools/inference_switches.py --model rmt_small --modes eager,eager-masa_seqs --repeats 2
    python tools/inference_switches.py --modes eager,compiled,compiled-convref --profile eager,compiled
    python tools/inference_switches.py --device cpu --threads 2 --switch cpu_fold --batch 8 --repeats 6

A mode is ``eager`` or ``compiled`` (``torch.compile(model)``), then ``-``-separated parts, each
turning one piece off for that mode: any switch of :mod:`rmt.config` (``python -c "import rmt;
print(rmt.config.describe())"`` lists them; off is False, 0 or no devices), one of the short names
below, ``reference`` (the whole model on ``masa_impl="reference"``) or, on CPU, ``malloc`` (glibc's
mmap and trim thresholds at their initial 128 KiB instead of the 1 GiB that the ``rmt`` commands set
with :func:`rmt.host_memory.keep_freed_memory`). ``--switch NAME`` is ``--modes eager,eager-NAME``.

Short names: ``convref`` (``dwconv_kernels``), ``torchln`` (``layernorm_kernels``), ``exactgelu``
(``gelu_epilogue``), ``convstem`` or ``stem`` (``stem_kernel``), ``unfusedinfer``
(``fused_inference_block``), ``graphtables`` (``position_table_op``), ``inductorln``
(``layernorm_compiled_kernels``), ``masa_seqs`` (``masa_sequences_per_program``), ``bias_fold``
(``fold_conv_bias``), ``cpu_fold`` (``cpu_fold_residual``), ``cpu_pad`` (``cpu_pad_keys``),
``cpu_chunk`` (``cpu_chunk_logit_bytes``), ``onednn_linear`` (``cpu_onednn_linear``).

Timing is ``rmt benchmark``'s harness (bf16 autocast and the median of 10 CUDA-event timings on CUDA,
float32 and the mean of ``--iters`` steps on CPU; channels-last random batch). Each repeat runs the
modes in turn, in reverse order every other repeat, so that slow drifts of the machine affect all
alike; the medians over the repeats close the table. ``--profile`` lists, for the named modes on
CUDA, the kernels with the most GPU time in one batch (grouped by name) and the batch's GPU time.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import rmt  # noqa: E402
from rmt import benchmark as bm  # noqa: E402
from rmt.config import SWITCHES  # noqa: E402
from rmt.host_memory import DEFAULT_THRESHOLD, keep_freed_memory  # noqa: E402

ALIASES = {"convref": "dwconv_kernels", "torchln": "layernorm_kernels", "exactgelu": "gelu_epilogue",
           "convstem": "stem_kernel", "stem": "stem_kernel", "unfusedinfer": "fused_inference_block",
           "graphtables": "position_table_op", "inductorln": "layernorm_compiled_kernels",
           "masa_seqs": "masa_sequences_per_program", "bias_fold": "fold_conv_bias",
           "cpu_fold": "cpu_fold_residual", "cpu_pad": "cpu_pad_keys", "cpu_chunk": "cpu_chunk_logit_bytes",
           "onednn_linear": "cpu_onednn_linear"}
SETTINGS = ("reference", "malloc")   # parts that are not rmt.config switches
MALLOC_INITIAL = 128 << 10


def parse_mode(mode: str) -> Tuple[str, Dict, List[str]]:
    """``"compiled-convref-malloc"`` -> ``("compiled", {"dwconv_kernels": False}, ["malloc"])``."""
    base, *parts = mode.split("-")
    if base not in ("eager", "compiled"):
        raise SystemExit(f"mode {mode!r}: starts with eager or compiled")
    offs, settings = {}, []
    for part in parts:
        if part in SETTINGS:
            settings.append(part)
            continue
        switch = SWITCHES.get(ALIASES.get(part, part))
        if switch is None:
            raise SystemExit(f"mode {mode!r}: unknown part {part!r}; parts are rmt.config switches "
                             f"({', '.join(SWITCHES)}), {', '.join(sorted(ALIASES))} or {', '.join(SETTINGS)}")
        offs[switch.name] = type(switch.default)()   # False, 0 or ()
    return base, offs, settings


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


def profile_kernels(name: str, impl: str, compiled: bool, size: int, batch: int, device: torch.device,
                    rows: int) -> str:
    """The kernel table of one inference batch (after a warm-up batch)."""
    from torch.profiler import ProfilerActivity, profile
    model = bm._create(name, impl, device, size).eval()
    run = torch.compile(model) if compiled else model
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            run(x)
    step()
    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize(device)
    torch._dynamo.reset()
    return _kernel_table(prof, rows)


def run_mode(name: str, mode: str, size: int, batch: int, device: torch.device, warmup: int, iters: int):
    """One timed row of ``mode`` (``rmt.benchmark.Result``; failures are in its ``note``)."""
    base, offs, settings = parse_mode(mode)
    if device.type == "cpu":
        keep_freed_memory(MALLOC_INITIAL if "malloc" in settings else DEFAULT_THRESHOLD)
    impl = "reference" if "reference" in settings else "fast"
    with rmt.fast_path_switches(**offs):
        return bm.measure(name, impl, "infer", size, batch, device, compiled=base == "compiled",
                          warmup=warmup, iters=iters)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rmt_small")
    p.add_argument("--modes", default="eager,compiled", help="comma-separated modes (see above)")
    p.add_argument("--switch", default="", help="shorthand for --modes eager,eager-SWITCH")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--warmup", type=int, default=0, help="warm-up steps (0: 3 on CUDA, 2 on CPU)")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", default="", help="comma-separated modes whose GPU kernels to list (CUDA)")
    p.add_argument("--rows", type=int, default=25)
    p.add_argument("--json", default="")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = ["eager", f"eager-{args.switch}"] if args.switch else [m for m in args.modes.split(",") if m]
    for mode in modes:
        parse_mode(mode)   # fail on a typo before anything runs
    warmup = args.warmup or (3 if device.type == "cuda" else 2)
    speeds: Dict[str, List[float]] = {m: [] for m in modes}
    rows = []
    print(bm.HEADER + "  mode")
    for repeat in range(args.repeats):
        for mode in (modes if repeat % 2 == 0 else modes[::-1]):
            row = run_mode(args.model, mode, args.size, args.batch, device, warmup, args.iters)
            speeds[mode].append(row.img_per_s or float("nan"))
            rows.append(dict(vars(row), mode_switches=mode))
            print(bm.format_row(row) + f"  {mode}", flush=True)
    if device.type == "cpu":
        keep_freed_memory()   # as the rmt commands leave it
    for mode in modes:
        print(f"{mode}: median {statistics.median(speeds[mode]):.2f} img/s over {args.repeats} runs")
    for mode in filter(None, args.profile.split(",")):
        if device.type != "cuda":
            print("--profile lists CUDA kernels; skipped on CPU", file=sys.stderr)
            break
        base, offs, settings = parse_mode(mode)
        with rmt.fast_path_switches(**offs):
            table = profile_kernels(args.model, "reference" if "reference" in settings else "fast",
                                    base == "compiled", args.size, args.batch, device, args.rows)
        print(f"\n== {args.model} {mode}, {args.size}x{args.size}, batch {args.batch}: one batch ==\n{table}")
    if args.json:
        bm.save_rows(args.json, bm.environment(device), vars(args), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
