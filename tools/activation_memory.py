"""What autograd keeps for the backward pass of one training forward, in bytes, by layer.

    python tools/activation_memory.py --model rmt_small --size 224 --batch 128 --impl auto
    TRITON_INTERPRET=1 python tools/activation_memory.py --device cpu --impl triton --size 112 --batch 1

Saved tensors are collected with ``torch.autograd.graph.saved_tensors_hooks`` during a bf16
autocast forward, counted once per storage (views of one tensor share it), and attributed to the
innermost module running when they were saved. Parameters (and their autocast copies) are
excluded: the figure is activation memory, the part of the training peak that grows with the batch.
The accounting is exact and device-independent, so on CPU (with Triton's interpreter for the
fused path) it predicts the activation part of the GPU peak; ``--scale-to B`` multiplies the
total up to another batch size.
"""
from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import timm  # noqa: E402

import rmt  # noqa: E402,F401


def saved_bytes_by_layer(model: torch.nn.Module, x: torch.Tensor, amp_dtype: torch.dtype) -> Dict[str, int]:
    """Bytes of distinct saved activation storages per module type path (e.g. ``blocks.mlp``)."""
    stack: List[str] = []
    names = {m: n for n, m in model.named_modules()}
    hooks = []

    def push(module, *_):
        stack.append(names.get(module, "?"))

    def pop(module, *_):
        stack.pop()
    # global hooks: per-module hooks would change what the model runs (an FFN whose fc2 has hooks
    # calls the module instead of the fused tail)
    hooks.append(torch.nn.modules.module.register_module_forward_pre_hook(push))
    hooks.append(torch.nn.modules.module.register_module_forward_hook(pop))
    param_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    param_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    seen = set()
    by_layer: Dict[str, int] = defaultdict(int)

    def pack(t: torch.Tensor):
        if t.requires_grad and t.is_leaf:  # a parameter
            return t
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key in param_storages or key in seen or key == 0:
            return t
        if tuple(t.shape) in param_shapes or (t.dim() <= 1 and t.numel() <= 4096):
            return t  # autocast's low-precision copies of the parameters
        seen.add(key)
        where = stack[-1] if stack else "(model)"
        # group the blocks of all stages: stages.2.blocks.7.mlp.fc2 -> blocks.mlp.fc2
        parts = [p for p in where.split(".") if not p.isdigit() and p not in ("stages",)]
        by_layer[".".join(parts) or "(model)"] += storage.nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            with torch.autocast(x.device.type, dtype=amp_dtype):
                out = model(x)
        del out
    finally:
        for h in hooks:
            h.remove()
    return dict(by_layer)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="rmt_small")
    p.add_argument("--impl", default="auto", help="masa_impl of the model")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--scale-to", type=int, default=128, help="report the total also for this batch size")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    device = torch.device(args.device)
    model = timm.create_model(args.model, masa_impl=args.impl).to(device=device, memory_format=torch.channels_last)
    model.train()
    x = torch.randn(args.batch, 3, args.size, args.size, device=device).contiguous(memory_format=torch.channels_last)
    rows = saved_bytes_by_layer(model, x, torch.bfloat16)
    total = sum(rows.values())
    print(f"{args.model} impl={args.impl} {args.size}x{args.size} batch {args.batch} on {device}: "
          f"{total / 2**20:.1f} MiB saved for backward; x{args.scale_to / args.batch:g} -> "
          f"{total * args.scale_to / args.batch / 2**30:.2f} GiB at batch {args.scale_to}")
    for name, nbytes in sorted(rows.items(), key=lambda kv: -kv[1]):
        print(f"  {name:<32} {nbytes / 2**20:9.1f} MiB  {100 * nbytes / total:5.1f}%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
