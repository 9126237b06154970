"""Inference img/s of one model with fast-path pieces switched on and off, alternating in one process.

    python benchmarks/infer_switches.py --model rmt_small --switch masa_seqs --repeats 2

    python benchmarks/infer_switches.py --device cpu --threads 2 --switch cpu_fold --batch 8 --repeats 6

``--switch`` names a module flag of the fast path (``masa_seqs``: the MaSA forward kernel with several
rows or columns per program, :data:`rmt.ops.masa.triton_masa.SEQUENCES_PER_PROGRAM_FORWARD`;
``cpu_fold``: the CPU path's residual folded into the depthwise kernel,
:data:`rmt.ops.dwconv.FOLD_RESIDUAL_ON_CPU`; ``cpu_pad``: the CPU path's rows of 8-15 keys padded to 16
for the softmax, :data:`rmt.ops.masa.cpu.PAD_KEYS`; ``malloc``: glibc's mmap and trim thresholds at 1 GiB,
:func:`rmt.host_memory.keep_freed_memory`, against its initial 128 KiB without dynamic raising;
``gelu_epilogue``: fc1's GELU in cuBLASLt's GEMM epilogue at half-precision inference,
:data:`rmt.ops.linear.GELU_EPILOGUE`; ``stem``: the stem's first conv, BatchNorm and GELU as one Triton
kernel at inference, :data:`rmt.ops.stem_conv.FUSED_KERNELS`; ``bias_fold``: the other stem and
downsampling convs' bias in their BatchNorm's shift, :data:`rmt.stem.FOLD_CONV_BIAS`; ``onednn_linear``:
the CPU path's Linear layers through oneDNN's matmul at float32 inference instead of ``F.linear``,
:data:`rmt.ops.linear.ONEDNN_CPU_LINEAR`; ``cpu_chunk``: the CPU path's decomposed MaSA in groups of
images whose logits fit in 4 MiB, :data:`rmt.ops.masa.cpu.CHUNK_LOGIT_BYTES`, against the whole batch
at once). Each repeat times the flag on and off, in alternating order (``rmt
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
from rmt.host_memory import DEFAULT_THRESHOLD, keep_freed_memory  # noqa: E402
from rmt import stem as stem_module  # noqa: E402
from rmt.ops import dwconv, linear, stem_conv  # noqa: E402
from rmt.ops.masa import cpu as masa_cpu  # noqa: E402
from rmt.ops.masa import triton_masa  # noqa: E402

FLAGS = {"masa_seqs": (triton_masa, "SEQUENCES_PER_PROGRAM_FORWARD"),
         "cpu_fold": (dwconv, "FOLD_RESIDUAL_ON_CPU"),
         "cpu_pad": (masa_cpu, "PAD_KEYS"),
         "gelu_epilogue": (linear, "GELU_EPILOGUE"),
         "stem": (stem_conv, "FUSED_KERNELS"),
         "bias_fold": (stem_module, "FOLD_CONV_BIAS"),
         "onednn_linear": (linear, "ONEDNN_CPU_LINEAR")}
# switches that are settings rather than module flags: name -> function(on)
SETTERS = {"malloc": lambda on: keep_freed_memory(DEFAULT_THRESHOLD if on else 128 << 10),
           "cpu_chunk": lambda on: setattr(masa_cpu, "CHUNK_LOGIT_BYTES", (4 << 20) if on else 0)}


def _switch(name: str, on: bool) -> None:
    if name in SETTERS:
        SETTERS[name](on)
    else:
        module, attr = FLAGS[name]
        setattr(module, attr, on)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rmt_small")
    p.add_argument("--switch", default="masa_seqs", choices=sorted(FLAGS) + sorted(SETTERS))
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
