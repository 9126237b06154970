"""The RMT classifier head: per-token Linear, BatchNorm and Swish, then global average pooling and
the class Linear (the released models' ``proj``/``norm``/``head`` layers)."""
from typing import Optional

import torch
import torch.nn as nn

__all__ = ["ClassifierHead"]


class ClassifierHead(nn.Module):
    """Per-token Linear(c -> hidden) + BatchNorm + Swish, global average pool, Linear(hidden -> classes).

    ``global_pool=''`` returns the unpooled ``(b, h, w, hidden)`` map.
    """

    def __init__(self, in_dim: int, hidden: int, num_classes: int, global_pool: str = "avg",
                 drop_rate: float = 0.0, device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.proj = nn.Linear(in_dim, hidden, **dd)
        self.norm = nn.BatchNorm1d(hidden, **dd)
        self.global_pool = global_pool
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(hidden, num_classes, **dd) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        if global_pool is not None:
            if global_pool not in ("avg", ""):
                raise ValueError(f"global_pool must be 'avg' or '', got {global_pool!r}")
            self.global_pool = global_pool
        ref = self.proj.weight
        self.fc = (nn.Linear(self.proj.out_features, num_classes, device=ref.device, dtype=ref.dtype)
                   if num_classes > 0 else nn.Identity()).train(self.training)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        b, h, w, _ = x.shape
        x = self.proj(x)
        x = self.norm(x.reshape(b * h * w, x.shape[-1])).view(b, h, w, x.shape[-1])
        x = x * torch.sigmoid(x)
        if self.global_pool == "avg":
            x = x.mean(dim=(1, 2))
        x = self.drop(x)
        return x if pre_logits else self.fc(x)
