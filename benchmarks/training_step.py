"""Training-step throughput of one model in several execution modes, and where the CPU time goes.

    python benchmarks/training_step.py --models rmt_small,swin_tiny_patch4_window7_224 \
        --modes eager,eager-torchln,graphed,graphed-twokernel,compiled --batch 128 --profile rmt_small --json OUT/train_modes.json

One step is forward (bf16 autocast), cross-entropy, backward and a fused AdamW update, on a fixed
channels-last batch at 224x224, timed as in ``rmt benchmark`` (median of CUDA-event timings). A mode
is an execution mode with optional switches, e.g. ``graphed-torchln`` or ``eager-cudnn-twokernel``:

* ``eager``    - plain PyTorch (the fast MaSA path for RMT models);
* ``graphed``  - the step of ``rmt train --cuda-graph``: captured once in a CUDA graph and replayed
  (no kernel-launch cost on the CPU; the optimizer is ``capturable``);
* ``compiled`` - ``torch.compile(model)`` (default mode), the step otherwise eager;
* switch ``cudnn``: the depthwise convolutions of training through cuDNN instead of the fused
  Triton kernels (``rmt.set_fast_path(dwconv_training_kernels=False)``);
* switch ``torchln``: PyTorch's LayerNorm in training instead of the multi-row Triton kernels
  (``layernorm_training_kernels=False``);
* switch ``twokernel``: the MaSA backward pass through the dq and dk/dv kernels also for sequences
  that fit one tile (``masa_single_tile_backward=False``);
* switch ``oneseq``: the MaSA forward pass with one row or column per program
  (``masa_sequences_per_program=False``);
* switch ``unfused``: blocks train module by module instead of as one autograd node each
  (``fused_training_block=False``);
* switch ``tritonwgrad``: the depthwise weight gradients through the Triton kernel instead of cuDNN
  (``dwconv_triton_weight_grad=True``);
* switch ``gelugrad``: the FFN's input-gradient kernel evaluates GELU's derivative itself instead of
  reading it from the recompute of GELU (``ffn_derivative_with_gelu=False``);
* switch ``blockgraphs``: each block's training kernels replayed from CUDA graphs
  (``model.set_block_graphs(True)``, :mod:`rmt.ops.block_graphs`; not with ``--interleave``);
* switch ``calling``: autograd runs the backward on the calling thread instead of its device thread
  (``torch.autograd.set_multithreading_enabled(False)``);
* switch ``jitlaunch``: every Triton launch through Triton's own dispatch instead of straight to the
  compiled kernel (``direct_launch=False``).

``--interleave ROUNDS`` measures eager modes of one model built once, alternating them round by round
(paired ratios that a drifting host pace does not bias), e.g.
``--models rmt_small --modes eager,eager-jitlaunch,eager-calling --batch 16 --interleave 8``.

``--profile MODEL`` prints the kernels with the most GPU time and the operators with the most CPU
time in one eager step (an eager step waits on the CPU when kernels finish faster than they launch).
``--cprofile MODEL`` runs eager steps under Python's cProfile, with autograd's backward on the
calling thread so that its Python functions are seen too, and prints the functions with the most
time of their own: where the CPU time of an eager step goes, function by function.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import timm  # noqa: E402

import rmt  # noqa: E402
from rmt.benchmark import environment, save_rows, time_step  # noqa: E402
from rmt.engine.cuda_graph import GraphedTrainStep  # noqa: E402
from rmt.profiling import profile_model  # noqa: E402


def _make(name: str, device: torch.device) -> torch.nn.Module:
    return timm.create_model(name).to(device=device, memory_format=torch.channels_last).train()


def _batch(batch: int, device: torch.device):
    """A fixed channels-last batch of 224x224 images and ImageNet labels."""
    x = torch.randn(batch, 3, 224, 224, device=device).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 1000, (batch,), device=device)


def _eager_step(run, x: torch.Tensor, y: torch.Tensor, opt: torch.optim.Optimizer):
    """One eager training step: bf16 autocast forward, cross-entropy, backward, optimizer step."""
    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(run(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def _on_calling_thread(step):
    """``step`` with autograd's backward on the calling thread (no hand-over to its device thread)."""
    def wrapped():
        with torch.autograd.set_multithreading_enabled(False):
            step()
    return wrapped


SWITCHES = ("cudnn", "torchln", "twokernel", "oneseq", "unfused", "jitlaunch", "calling", "tritonwgrad",
            "gelugrad", "blockgraphs")


def _set_switches(switches: List[str]) -> None:
    """Turn the fast-path pieces named in ``switches`` off (see the module docstring), the others on."""
    rmt.set_fast_path(dwconv_training_kernels="cudnn" not in switches,
                      layernorm_training_kernels="torchln" not in switches,
                      masa_single_tile_backward="twokernel" not in switches,
                      masa_sequences_per_program="oneseq" not in switches,
                      fused_training_block="unfused" not in switches,
                      direct_launch="jitlaunch" not in switches,
                      dwconv_triton_weight_grad="tritonwgrad" in switches,
                      ffn_derivative_with_gelu="gelugrad" not in switches)


def measure(name: str, mode: str, batch: int, device: torch.device, warmup: int, iters: int) -> Dict:
    """img/s and peak GiB of one (model, mode); failures are reported in ``note``."""
    row = dict(model=name, mode=mode, batch=batch, img_per_s=None, peak_gib=None, reserved_gib=None, setup_s=None,
               note="")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    base, *switches = mode.split("-")
    unknown = set(switches) - set(SWITCHES)
    if base not in ("eager", "graphed", "compiled") or unknown:
        raise SystemExit(f"unknown mode {mode!r}: eager, graphed or compiled, then switches from {SWITCHES}")
    _set_switches(switches)
    try:
        model = _make(name, device)
        x, y = _batch(batch, device)
        graphed = base == "graphed"
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=graphed)
        run = torch.compile(model) if base == "compiled" else model
        if graphed:  # the step of `rmt train --cuda-graph`: 3 eager warm-up steps, then capture and replay
            train_step = GraphedTrainStep(model, F.cross_entropy, opt, torch.bfloat16, None, warmup=3)

            def step():
                train_step(x, y)
            for _ in range(4):
                step()
        else:
            if "blockgraphs" in switches:
                model.set_block_graphs(True)
            step = _eager_step(run, x, y, opt)
            if "calling" in switches:
                step = _on_calling_thread(step)
            for _ in range(4 if "blockgraphs" in switches else 1):
                step()  # compile / autotune / allocate optimizer state (/ capture the blocks' graphs)
        torch.cuda.synchronize()
        row["setup_s"] = round(time.perf_counter() - t0, 1)
        sec = time_step(step, device, warmup, iters)
        row["img_per_s"] = round(batch / sec, 1)
        row["peak_gib"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
        row["reserved_gib"] = round(torch.cuda.max_memory_reserved(device) / 2**30, 2)
    except Exception as e:  # keep the table going
        row["note"] = f"{type(e).__name__}: {str(e).splitlines()[0][:100] if str(e) else ''}"
    finally:
        torch._dynamo.reset()
        _set_switches([])
    return row


def cprofile_steps(name: str, batch: int, device: torch.device, steps: int = 5, rows: int = 40) -> str:
    """cProfile table (sorted by own time) of ``steps`` eager training steps, after 3 warm-up steps."""
    import cProfile
    import io
    import pstats
    model = _make(name, device)
    x, y = _batch(batch, device)
    step = _eager_step(model, x, y, torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True))
    out = []
    for threaded in (True, False):
        with torch.autograd.set_multithreading_enabled(threaded):
            sec = time_step(step, device, 3, 10)
        out.append(f"eager step, backward on {'autograd threads' if threaded else 'the calling thread'}: "
                   f"{sec * 1e3:.1f} ms ({batch / sec:.0f} img/s)")
    prof = cProfile.Profile()
    with torch.autograd.set_multithreading_enabled(False):
        for _ in range(3):
            step()
        torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(steps):
            step()
        torch.cuda.synchronize(device)
        prof.disable()
    out.append(f"under cProfile: {(time.perf_counter() - t0) / steps * 1e3:.1f} ms per step")
    buf = io.StringIO()
    stats = pstats.Stats(prof, stream=buf)
    stats.sort_stats("tottime").print_stats(rows)
    stats.sort_stats("cumulative").print_stats(rows)
    return "\n".join(out) + "\n" + buf.getvalue()


def interleave(name: str, modes: List[str], batch: int, device: torch.device, rounds: int, iters: int) -> str:
    """Eager ``modes`` (switches only) of one model, built once, measured in alternating rounds.

    The host's pace drifts by tens of percent over minutes on shared machines; modes measured one
    after the other then differ by the drift. Here every round measures each mode (in a rotated
    order) for ``iters`` steps, and each mode is reported as the median over rounds together with its
    paired ratio to the first mode (the median of the per-round ratios)."""
    for mode in modes:
        base, *switches = mode.split("-")
        if base != "eager" or set(switches) - set(SWITCHES) or "blockgraphs" in switches:
            raise SystemExit(f"--interleave takes eager modes with switches from {SWITCHES} "
                             f"(not blockgraphs, a per-model setting), not {mode!r}")
    model = _make(name, device)
    x, y = _batch(batch, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    plain = _eager_step(model, x, y, opt)
    steps = {m: _on_calling_thread(plain) if "calling" in m.split("-") else plain for m in modes}
    rates: Dict[str, List[float]] = {m: [] for m in modes}
    try:
        for r in range(rounds):
            for m in modes[r % len(modes):] + modes[:r % len(modes)]:
                _set_switches(m.split("-")[1:])
                rates[m].append(batch / time_step(steps[m], device, 2, iters))
    finally:
        _set_switches([])
    med = lambda v: sorted(v)[len(v) // 2]  # noqa: E731
    out = [f"{name}, batch {batch}, {rounds} rounds of {iters} steps per mode (img/s)",
           f"{'mode':<28} {'median':>8} {'min':>8} {'max':>8} {'paired ratio':>13}"]
    for m in modes:
        ratio = med([a / b for a, b in zip(rates[m], rates[modes[0]])])
        out.append(f"{m:<28} {med(rates[m]):>8.1f} {min(rates[m]):>8.1f} {max(rates[m]):>8.1f} {ratio:>13.3f}")
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="rmt_small,swin_tiny_patch4_window7_224")
    p.add_argument("--modes", default="eager,graphed,compiled")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--profile", default="", metavar="MODEL")
    p.add_argument("--cprofile", default="", metavar="MODEL", help="cProfile eager steps of MODEL")
    p.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                   help="measure the eager --modes of each model in ROUNDS alternating rounds instead")
    p.add_argument("--json", default="")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("training_step.py measures CUDA execution modes; no CUDA device here", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    if args.interleave:
        for name in filter(None, args.models.split(",")):
            print(interleave(name, list(filter(None, args.modes.split(","))), args.batch, device, args.interleave,
                             args.iters), flush=True)
        return 0
    rows: List[Dict] = []
    print(f"{'model':<30} {'mode':<9} {'batch':>5} {'img/s':>8} {'peak GiB':>8} {'reserved':>8} {'setup s':>7}  note")
    for name in filter(None, args.models.split(",")):
        for mode in filter(None, args.modes.split(",")):
            r = measure(name, mode, args.batch, device, args.warmup, args.iters)
            rows.append(r)
            print(f"{name:<30} {mode:<9} {r['batch']:>5} {r['img_per_s'] or '-':>8} {r['peak_gib'] or '-':>8} "
                  f"{r.get('reserved_gib') or '-':>8} {r['setup_s'] or '-':>7}  {r['note']}", flush=True)
    if args.profile:
        print(profile_model(args.profile, device, train_batch=args.batch, phases=("training step",),
                            sort_by=("self_cuda_time_total", "self_cpu_time_total")))
    if args.cprofile:
        print(cprofile_steps(args.cprofile, args.batch, device), flush=True)
    if args.json:
        save_rows(args.json, environment(device), vars(args), rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
