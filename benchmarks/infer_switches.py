"""Inference img/s of one model with fast-path pieces switched on and off, alternating in one process.

    python benchmarks/infer_switches.py --model rmt_small --switch masa_seqs --repeats 2

``--switch`` names a module flag of the fast path (``masa_seqs``: the MaSA forward kernel with several
rows or columns per program, :data:`rmt.ops.masa.triton_masa.SEQUENCES_PER_PROGRAM_FORWARD`).
Each repeat times the flag on, then off (``rmt benchmark``'s harness: bf16, batch 256, median of
10 steps), so slow drifts of the machine affect both alike.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import rmt  # noqa: E402,F401
from rmt import benchmark as bm  # noqa: E402
from rmt.ops.masa import triton_masa  # noqa: E402

FLAGS = {"masa_seqs": (triton_masa, "SEQUENCES_PER_PROGRAM_FORWARD")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rmt_small")
    p.add_argument("--switch", default="masa_seqs", choices=sorted(FLAGS))
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("infer_switches.py times CUDA inference; no CUDA device here", file=sys.stderr)
        return 2
    module, name = FLAGS[args.switch]
    device = torch.device("cuda")
    print(bm.HEADER + "  " + args.switch)
    for _ in range(args.repeats):
        for on in (True, False):
            setattr(module, name, on)
            row = bm.measure(args.model, "fast", "infer", args.size, args.batch, device)
            print(bm.format_row(row) + f"  {'on' if on else 'off'}", flush=True)
    setattr(module, name, True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
