"""Where the host (CPU) time of eager training steps goes, by source line, from stack samples.

    python tools/host_profile.py --model rmt_small --batch 16 --steps 40
    python tools/host_profile.py --model rmt_small --batch 16 --steps 40 --infer

``--infer`` samples inference forward passes instead (``torch.inference_mode``, eval mode).

An eager step waits on the CPU when its kernels finish faster than Python and PyTorch issue them.
cProfile (``benchmarks/training_step.py --cprofile``) instruments every Python call and so inflates Python-heavy
paths; this script instead samples the stack of the stepping thread every ``--interval-ms`` from a
second thread (``sys._current_frames``), which costs the step about 2%. Time spent in C (PyTorch's
dispatcher, the CUDA driver, cuBLAS) is charged to the Python line that called it. The backward runs
on the calling thread (``torch.autograd.set_multithreading_enabled(False)``; ``--threaded`` keeps
autograd's device thread), so autograd's engine is charged to ``loss.backward()`` and the Python
backward functions appear with their own lines. Sampling from inside needs the GIL, which biases the
samples towards calls that release it; an outside sampler has no such bias:
``py-spy record -f raw -o OUT -- python tools/host_profile.py --interval-ms 1000``.

Prints three tables: the innermost line of this repository's code in each sample (which of our
calls cost the time, everything below them included), the innermost frame of any code (where the
interpreter actually was), and the step phases (forward, backward, optimizer).
"""
from __future__ import annotations

import argparse
import collections
import sys
import threading
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import timm  # noqa: E402

import rmt  # noqa: E402,F401
from rmt.benchmark import time_step  # noqa: E402

REPO = str(Path(__file__).resolve().parents[1])


class StackSampler:
    """Samples one thread's Python stack every ``interval`` seconds until stopped."""

    def __init__(self, thread_id: int, interval: float) -> None:
        self.thread_id, self.interval = thread_id, interval
        self.ours: collections.Counter = collections.Counter()
        self.leaf: collections.Counter = collections.Counter()
        self.phase: collections.Counter = collections.Counter()
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "StackSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            frame = sys._current_frames().get(self.thread_id)
            if frame is None:
                continue
            self.samples += 1
            code = frame.f_code
            self.leaf[f"{Path(code.co_filename).name}:{frame.f_lineno} {code.co_name}"] += 1
            ours, phase = None, "other"
            f = frame
            while f is not None:
                name = f.f_code.co_filename
                if ours is None and name.startswith(REPO) and f.f_code.co_name not in STEPS:
                    ours = f"{Path(name).relative_to(REPO)}:{f.f_lineno} {f.f_code.co_name}"
                if f.f_code.co_name in STEPS:
                    phase = PHASES.get(f.f_lineno, "other")
                f = f.f_back
            self.ours[ours or "(outside this repository)"] += 1
            self.phase[phase] += 1


PHASES: dict = {}
STEPS = ("timed_steps", "timed_inference")


def timed_steps(model, x, y, opt, steps: int) -> None:
    """The eager step of ``benchmarks/training_step.py``, its phases on separate lines for the sampler."""
    for _ in range(steps):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)  # PHASE forward
        loss.backward()  # PHASE backward
        opt.step()  # PHASE optimizer
        opt.zero_grad(set_to_none=True)  # PHASE zero_grad


def timed_inference(model, x, steps: int) -> None:
    """The harness's eager inference step (bf16 autocast under inference mode)."""
    for _ in range(steps):
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
            model(x)  # PHASE forward


def _register_phases() -> None:
    import inspect
    for fn in (timed_steps, timed_inference):
        lines, start = inspect.getsourcelines(fn)
        for i, line in enumerate(lines):
            if "# PHASE " in line:
                PHASES[start + i] = line.split("# PHASE ")[1].strip()


def _table(title: str, counter: collections.Counter, total: int, ms_per_sample: float, rows: int) -> str:
    out = [f"\n{title}", f"{'share':>6} {'ms/step':>8}  where"]
    for key, n in counter.most_common(rows):
        out.append(f"{100 * n / total:5.1f}% {n * ms_per_sample:8.2f}  {key}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rmt_small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--interval-ms", type=float, default=0.5)
    p.add_argument("--rows", type=int, default=45)
    p.add_argument("--infer", action="store_true", help="sample inference forward passes instead of training steps")
    p.add_argument("--threaded", action="store_true",
                   help="keep the backward on autograd's device thread (its frames are then not sampled)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("host_profile.py profiles CUDA steps; no CUDA device here", file=sys.stderr)
        return 2
    _register_phases()
    dev = torch.device("cuda")
    model = timm.create_model(args.model).to(device=dev, memory_format=torch.channels_last)
    model.train(not args.infer)
    x = torch.randn(args.batch, 3, 224, 224, device=dev).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (args.batch,), device=dev)
    if args.infer:
        def steps(n: int) -> None:
            timed_inference(model, x, n)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

        def steps(n: int) -> None:
            timed_steps(model, x, y, opt, n)
    with torch.autograd.set_multithreading_enabled(args.threaded):
        sec = time_step(lambda: steps(1), dev, 5, 20)
        what = "forward" if args.infer else "step, backward on " + (
            "autograd threads" if args.threaded else "the calling thread")
        print(f"{args.model} batch {args.batch}: {sec * 1e3:.1f} ms per {what} unsampled "
              f"({args.batch / sec:.0f} img/s)")
        sampler = StackSampler(threading.get_ident(), args.interval_ms / 1e3)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with sampler:
            steps(args.steps)
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    ms_per_step = wall / args.steps * 1e3
    total = max(sampler.samples, 1)
    per_sample = ms_per_step / total
    print(f"sampled: {ms_per_step:.1f} ms per step, {total / args.steps:.0f} samples per step")
    print(_table("step phases", sampler.phase, total, per_sample, 10))
    print(_table("innermost line of this repository (everything it called included)", sampler.ours, total,
                 per_sample, args.rows))
    print(_table("innermost frame of any code", sampler.leaf, total, per_sample, args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
