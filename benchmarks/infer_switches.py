"""Inference img/s of one model with fast-path pieces switched on and off, alternating in one process.

    python benchmarks/infer_switches.py --model rmt_small --switch masa_seqs --repeats 2

    python benchmarks/infer_switches.py --device cpu --threads 2 --switch cpu_fold --batch 8 --repeats 6

``--switch`` names a fast-path switch of :mod:`rmt.config` (``python -c "import rmt;
print(rmt.config.describe())"`` lists them; "off" is False, 0 or no devices, "on" its default) or one
of the short names ``masa_seqs`` (``masa_sequences_per_program``), ``cpu_fold`` (``cpu_fold_residual``),
``cpu_pad`` (``cpu_pad_keys``), ``cpu_chunk`` (``cpu_chunk_logit_bytes``: groups of images whose logits
fit in 4 MiB, against the whole batch at once), ``stem`` (``stem_kernel``), ``bias_fold``
(``fold_conv_bias``), ``onednn_linear`` (``cpu_onednn_linear``), or ``malloc``: glibc's mmap and trim
thresholds at 1 GiB, :func:`rmt.host_memory.keep_freed_memory`, against its initial 128 KiB without
dynamic raising. Each repeat times the flag on and off, in alternating order (``rmt
benchmark``'s harness: bf16 on CUDA, float32 on CPU; median of 10 steps on CUDA, mean of ``--iters``
on CPU), so slow drifts of the machine affect both alike; the medians over the repeats close the table.
On CPU glibc's malloc thresholds are raised first, as the ``rmt`` commands do (except for ``malloc``).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import rmt  # noqa: E402,F401
from rmt import benchmark as bm  # noqa: E402
from rmt.config import SWITCHES, set_fast_path  # noqa: E402
from rmt.host_memory import DEFAULT_THRESHOLD, keep_freed_memory  # noqa: E402

# short names of the switches compared most often
ALIASES = {"masa_seqs": "masa_sequences_per_program", "cpu_fold": "cpu_fold_residual", "cpu_pad": "cpu_pad_keys",
           "cpu_chunk": "cpu_chunk_logit_bytes", "stem": "stem_kernel", "bias_fold": "fold_conv_bias",
           "onednn_linear": "cpu_onednn_linear"}
# switches that are settings rather than rmt.config switches: name -> function(on)
SETTERS = {"malloc": lambda on: keep_freed_memory(DEFAULT_THRESHOLD if on else 128 << 10)}


def _off(default):
    """A switch's "off" value: False, 0 or no devices."""
    return type(default)()


def _switch(name: str, on: bool) -> None:
    if name in SETTERS:
        SETTERS[name](on)
        return
    switch = SWITCHES[ALIASES.get(name, name)]
    set_fast_path(**{switch.name: switch.default if on else _off(switch.default)})


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rmt_small")
    p.add_argument("--switch", default="masa_seqs", choices=sorted(SWITCHES) + sorted(ALIASES) + sorted(SETTERS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--device", default="cuda")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: PyTorch's default)")
    p.add_argument("--iters", type=int, default=10)
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device here; use --device cpu", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    print(bm.HEADER + "  " + args.switch)
    if device.type == "cpu" and args.switch != "malloc":
        keep_freed_memory()  # as the rmt commands do on CPU
    speeds = {True: [], False: []}
    for repeat in range(args.repeats):
        for on in ((True, False) if repeat % 2 == 0 else (False, True)):
            _switch(args.switch, on)
            row = bm.measure(args.model, "fast", "infer", args.size, args.batch, device,
                             warmup=2 if device.type == "cpu" else 3, iters=args.iters)
            speeds[on].append(row.img_per_s)
            print(bm.format_row(row) + f"  {'on' if on else 'off'}", flush=True)
    _switch(args.switch, True)
    for on in (True, False):
        print(f"{args.switch} {'on' if on else 'off'}: median {statistics.median(speeds[on]):.2f} img/s "
              f"over {args.repeats} runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
