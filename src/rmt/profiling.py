"""Where the time goes: the top GPU kernels of one inference batch and one training step."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def profile_model(name: str, device: torch.device, infer_batch: int = 256, train_batch: int = 128,
                  size: int = 224, rows: int = 20) -> str:
    """A text table per phase of the kernels with the most device time (fast MaSA path, bf16)."""
    import timm
    from torch.profiler import ProfilerActivity, profile
    import rmt  # noqa: F401

    model = timm.create_model(name).to(device=device, memory_format=torch.channels_last)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    out = []
    for phase, batch in (("inference", infer_batch), ("training step", train_batch)):
        x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 1000, (batch,), device=device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

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
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        with profile(activities=activities) as prof:
            step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        out.append(f"\n== {name} {phase}, batch {batch} ==\n"
                   + prof.key_averages().table(sort_by=sort, row_limit=rows, max_name_column_width=70))
    return "\n".join(out)
