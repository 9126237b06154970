"""Model facts: parameters, multiply-accumulates and feature layout, for ``rmt info``.

FLOPs are reported as multiply-accumulates (MACs, the convention of the paper and of fvcore):
convolutions, linear layers and the attention matrix products, counted by
``torch.utils.flop_counter`` on the meta device (no memory, no compute). Normalisation, softmax,
activations and element-wise additions are not counted.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
from torch.utils.flop_counter import FlopCounterMode

PAPER_GFLOPS = {"rmt_tiny": 2.5, "rmt_small": 4.5, "rmt_base": 9.7, "rmt_large": 18.2,
                "rmt_small.tl_in1k": 4.5, "rmt_base.tl_in1k": 9.7, "rmt_large.tl_in1k": 18.2}
PAPER_TOP1 = {"rmt_tiny": 82.4, "rmt_small": 84.1, "rmt_base": 85.0, "rmt_large": 85.5,
              "rmt_small.tl_in1k": 84.8, "rmt_base.tl_in1k": 85.6, "rmt_large.tl_in1k": 86.1}


def parse_size(text: str) -> Tuple[int, int]:
    """``"224"`` -> (224, 224); ``"800x1333"`` -> (800, 1333) as (height, width)."""
    parts = text.lower().replace(",", "x").split("x")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise ValueError(f"image size {text!r} is not N or HxW (e.g. 224 or 800x1333)") from None
    if len(sizes) == 1:
        return sizes[0], sizes[0]
    if len(sizes) == 2:
        return sizes[0], sizes[1]
    raise ValueError(f"image size {text!r} is not N or HxW (e.g. 224 or 800x1333)")


def count_macs(model: torch.nn.Module, size: Tuple[int, int], in_chans: int = 3) -> int:
    """Multiply-accumulates of one forward pass of a single image of ``size`` (H, W)."""
    meta = _to_meta(model)
    x = torch.empty(1, in_chans, *size, device="meta")
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        meta.eval()(x)
    return counter.get_total_flops() // 2


def _to_meta(model: torch.nn.Module) -> torch.nn.Module:
    import copy
    if next(model.parameters()).device.type == "meta":
        return model
    return copy.deepcopy(model).to("meta")


def summarize(name: str, size: Tuple[int, int] = (224, 224), forms: Optional[str] = None,
              num_classes: int = 1000) -> Dict[str, Any]:
    """Parameters, MACs at ``size``, feature channels/strides and MaSA forms of a registered model."""
    import timm
    model = timm.create_model(name, num_classes=num_classes, device="meta")
    if forms:
        model.set_attention_form(forms)
    params = sum(p.numel() for p in model.parameters())
    macs = count_macs(model, size, model.in_chans)
    h, w = size
    features = []
    for info in model.feature_info:
        r = info["reduction"]
        features.append(dict(stage=len(features), channels=info["num_chs"], stride=r,
                             grid=(-(-h // r), -(-w // r))))
    return dict(name=name, params=params, size=size, gmacs=macs / 1e9,
                paper_gflops=PAPER_GFLOPS.get(name), paper_top1=PAPER_TOP1.get(name),
                forms=model.attention_forms, features=features,
                head_hidden_size=model.head_hidden_size, num_classes=num_classes,
                aux_head=getattr(model, "aux_head", None) is not None)


def format_summary(s: Dict[str, Any]) -> str:
    """Human-readable text of :func:`summarize`."""
    lines = [f"{s['name']}",
             f"  parameters      {s['params']:,} ({s['params'] / 1e6:.2f}M, {s['num_classes']} classes)",
             f"  MACs            {s['gmacs']:.3f} G at {s['size'][0]}x{s['size'][1]}"
             + (f" (paper: {s['paper_gflops']} G at 224x224, ImageNet top-1 {s['paper_top1']}%)"
                if s["paper_gflops"] else ""),
             "  stage  channels  stride  grid      MaSA form"]
    for f, form in zip(s["features"], s["forms"]):
        grid = f"{f['grid'][0]}x{f['grid'][1]}"
        lines.append(f"  {f['stage']:<5}  {f['channels']:<8}  {f['stride']:<6}  {grid:<8}  {form}")
    lines.append(f"  head            Linear -> {s['head_hidden_size']} + BN + Swish, avg pool, Linear")
    if s.get("aux_head"):
        lines.append("  aux head        Linear per token (token labeling); eval logits = head + 0.5 * max over tokens")
    return "\n".join(lines)
