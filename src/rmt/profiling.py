"""Where the time goes: the top kernels and operators of one inference batch and one training step."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

PHASES = ("inference", "training step")
LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel", "cuLaunchKernelEx")


def profile_model(name: str, device: torch.device, infer_batch: int = 256, train_batch: int = 128,
                  size: int = 224, rows: int = 20, phases: Sequence[str] = PHASES,
                  sort_by: Sequence[str] = ("self_cuda_time_total",)) -> str:
    """A text table per phase and sort key (fast MaSA path, bf16, fused AdamW), with launch counts.

    ``sort_by`` takes profiler keys such as ``self_cuda_time_total`` (device time) and
    ``self_cpu_time_total`` (what an eager step waits on when kernels launch slower than they run);
    on CPU the CUDA key falls back to CPU time.
    """
    import timm
    from torch.profiler import ProfilerActivity, profile
    import rmt  # noqa: F401

    model = timm.create_model(name).to(device=device, memory_format=torch.channels_last)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cuda)
    out = []
    for phase in phases:
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}; expected one of {PHASES}")
        batch = infer_batch if phase == "inference" else train_batch
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)

        def step():
            if phase == "inference":
                model.eval()
                with torch.inference_mode(), amp:
                    model(x)
            else:
                model.train()
                with amp:
                    loss = F.cross_entropy(model(x), y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
        for _ in range(3):
            step()
        if cuda:
            torch.cuda.synchronize(device)
        with profile(activities=activities) as prof:
            step()
            if cuda:
                torch.cuda.synchronize(device)
        events = prof.key_averages()
        launches = sum(e.count for e in events if e.key in LAUNCH_EVENTS)
        out.append(f"\n== {name} {phase}, batch {batch}: {launches} kernel launches ==")
        for key in sort_by:
            key = key if cuda or "cuda" not in key else "self_cpu_time_total"
            out.append(events.table(sort_by=key, row_limit=rows, max_name_column_width=70))
    return "\n".join(out)
