"""Measure inference and training throughput (img/s) and peak memory of RMT variants on the fast
and reference MaSA paths (and training with block graphs), beside timm peers, in one run; optionally check the fast path's numerics
against the reference and profile where the time goes. Prints a table; --json keeps the numbers.

examples:
  rmt benchmark                                   # the full GPU table (H100: a few minutes)
  rmt benchmark --models rmt_small --peers swin_tiny_patch4_window7_224 --compiled ''
  rmt benchmark --device cpu --models rmt_small --peers '' --modes infer --infer-batch 8 \\
      --sizes '' --compiled '' --threads 2
"""
from __future__ import annotations

import argparse

# what --impls takes for RMT models
IMPLS = ("fast", "reference", "graphs")


def _names(text: str):
    return tuple(t for t in text.split(",") if t)


def _sizes(text: str):
    out = {}
    for item in _names(text):
        size, _, batch = item.partition(":")
        out[int(size)] = int(batch or 1)
    return out


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--models", default="rmt_tiny,rmt_small,rmt_base,rmt_large")
    p.add_argument("--peers", default="swin_tiny_patch4_window7_224,convnext_tiny",
                   help="timm models measured in the same run ('' for none)")
    p.add_argument("--impls", default=None,
                   help="paths for RMT models: fast, reference, graphs (the fast path replayed from CUDA "
                        "graphs: each block's training kernels in training rows, the whole forward pass in "
                        "inference rows on CUDA). Default: all three on CUDA, fast,reference on CPU")
    p.add_argument("--modes", default="infer,train", help="which of infer,train at 224")
    p.add_argument("--infer-batch", type=int, default=256)
    p.add_argument("--train-batch", type=int, default=128)
    p.add_argument("--sizes", default="512:64,1024:16", help="extra inference sizes as SIZE:BATCH")
    p.add_argument("--compiled", default="rmt_small,swin_tiny_patch4_window7_224,convnext_tiny",
                   help="models also measured under torch.compile (inference, 224)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--check", action="store_true", help="also check fast-path numerics vs reference")
    p.add_argument("--profile", default=None, metavar="MODEL",
                   help="print the top GPU kernels of MODEL's fast-path inference and training step")
    p.add_argument("--json", default=None, help="write results to this JSON file")


def run(args: argparse.Namespace) -> int:
    import torch
    from .. import benchmark as bm

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda asked for, but no CUDA device is visible")
    if args.threads:
        torch.set_num_threads(args.threads)
    modes = _names(args.modes)
    impls = _names(args.impls) if args.impls is not None else (IMPLS if device.type == "cuda" else IMPLS[:2])
    unknown = sorted(set(impls) - set(IMPLS))
    if unknown:
        raise ValueError(f"--impls {','.join(unknown)}: choose from {', '.join(IMPLS)}")
    plan = bm.Plan(models=_names(args.models), peers=_names(args.peers), impls=impls,
                   infer_batch=args.infer_batch, train_batch=args.train_batch,
                   large_sizes=_sizes(args.sizes), compiled=_names(args.compiled),
                   warmup=args.warmup, iters=args.iters)
    env = bm.environment(device)
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    checks = []
    if args.check:
        for name in plan.models:
            for c in bm.numerics(name, device, size=224 if device.type == "cuda" else 96, batch=2):
                checks.append(c)
                print(f"check {c.what:<48} rel err {c.rel_err:.2e} (limit {c.limit:g}) "
                      f"{'ok' if c.ok else 'FAILED'}")
    print(bm.HEADER)
    rows = []
    everything = [(m, i) for m in plan.models for i in plan.impls] + [(p, None) for p in plan.peers]
    for name, impl in everything:
        for mode in modes:
            if impl == "graphs" and mode == "infer" and device.type != "cuda":  # CUDA graphs need CUDA
                continue
            batch = plan.infer_batch if mode == "infer" else plan.train_batch
            rows.append(bm.measure(name, impl, mode, 224, batch, device, warmup=plan.warmup, iters=plan.iters))
            print(bm.format_row(rows[-1]), flush=True)
        for size, batch in (plan.large_sizes.items() if impl != "graphs" else ()):
            rows.append(bm.measure(name, impl, "infer", size, batch, device, warmup=plan.warmup, iters=plan.iters))
            print(bm.format_row(rows[-1]), flush=True)
    for name in plan.compiled:
        impl = "fast" if name.startswith("rmt_") else None
        rows.append(bm.measure(name, impl, "infer", 224, plan.infer_batch, device, compiled=True,
                               warmup=plan.warmup, iters=plan.iters))
        print(bm.format_row(rows[-1]), flush=True)
    print("\n" + bm.HEADER)
    for r in rows:
        print(bm.format_row(r))
    if args.profile:
        from ..profiling import profile_model
        print(profile_model(args.profile, device, plan.infer_batch, plan.train_batch))
    if args.json:
        bm.write_json(args.json, rows, checks, device)
    return 0 if all(c.ok for c in checks) else 1
