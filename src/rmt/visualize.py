"""What MaSA does, as pictures: decay patterns, attention maps of a query token, class activation maps.

Every attention weight drawn here comes from the real operator, :func:`rmt.ops.masa.masa`, not from
a re-derivation: MaSA's output is linear in ``v``, so the weight with which query token ``t`` reads
token ``t'`` is ``d out[t] / d v[t']``. :func:`attention_weights` runs the operator with a zero
one-channel probe as ``v`` and reads those derivatives with autograd. This gives the full form's
softmax row and, for the decomposed form, its *effective* 2-D weights (row pass then column pass:
``A_h[r, r'] * A_w[r', s, s']``), which are never formed explicitly by the operator.

* :func:`decay_patterns` runs it with zero ``q`` and ``k``, leaving only the decay bias: each head's
  spatial prior. With zero q/k both forms give the same weights, ``gamma_j ** (|dr| + |ds|)``
  normalised, because that decay factorises into a row and a column term.
* :func:`attention_maps` captures the inputs of a block's attention on a real image with a forward
  pre-hook, recomputes that block's ``q`` and ``k`` from them, and runs the probe.
* :func:`class_activation_map` is Grad-CAM (or a relative, from the ``grad-cam`` package) on a stage.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

from .engine.metrics_log import save_figure
from .model import RMT, stage_positions
from .ops.masa import masa

__all__ = ["attention_weights", "decay_patterns", "attention_maps", "class_activation_map",
           "load_image", "plot_decay_patterns", "plot_attention", "plot_cam", "CAM_METHODS"]

CAM_METHODS = ("gradcam", "gradcam++", "xgradcam", "layercam", "eigencam", "hirescam")


# ------------------------------------------------------------------------------------------------
# attention weights from the operator
# ------------------------------------------------------------------------------------------------

def attention_weights(q: torch.Tensor, k: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                      decay: torch.Tensor, scale: float, form: str, query: Tuple[int, int]) -> torch.Tensor:
    """Weights of query token ``query = (row, col)`` on every token, per head, from the real operator.

    Args:
        q, k: ``(1, h, w, n, d)``; sin, cos: ``(h, w, d)``; decay: ``(n,)``; form: "full"/"decomposed".
    Returns:
        ``(n, h, w)`` float64 weights; each head's map sums to 1.
    """
    _, h, w, n, _ = q.shape
    r, s = query
    if not (0 <= r < h and 0 <= s < w):
        raise ValueError(f"query token {query} is outside the {h}x{w} grid")
    q, k, sin, cos, decay = (t.detach().double() for t in (q, k, sin, cos, decay))
    probe = torch.zeros(1, h, w, n, 1, dtype=torch.float64, requires_grad=True)
    with torch.enable_grad():
        out = masa(q, k, probe, sin, cos, decay, scale, form=form, impl="reference")
        (grad,) = torch.autograd.grad(out[0, r, s, :, 0].sum(), probe)
    return grad[0, :, :, :, 0].permute(2, 0, 1)


def _grid_query(query: Tuple[float, float], h: int, w: int) -> Tuple[int, int]:
    """Fractions ``(y, x)`` in [0, 1] of the grid -> token ``(row, col)``."""
    fy, fx = query
    if not (0 <= fy <= 1 and 0 <= fx <= 1):
        raise ValueError(f"query position {query} must be fractions in [0, 1] (0,0 top-left, 1,1 bottom-right)")
    return min(int(fy * h), h - 1), min(int(fx * w), w - 1)


def stage_grids(model: RMT, size: Tuple[int, int]) -> List[Tuple[int, int]]:
    """Token grid ``(h, w)`` of each stage for an image of ``size`` (strides 4, 8, 16, 32, ceil)."""
    h, w = size
    grids = []
    for i in range(len(model.stages)):
        stride = 4 * 2 ** i
        grids.append((-(-h // stride), -(-w // stride)))
    return grids


def decay_patterns(model: RMT, size: Tuple[int, int] = (224, 224), query: Tuple[float, float] = (0.5, 0.5),
                   forms: Sequence[str] = ("full", "decomposed")) -> List[Dict[str, Any]]:
    """Each stage's per-head weights around a query with zero q/k (the decay alone), for each form.

    Returns one dict per (stage, form): ``stage, form, grid, query (row, col), decays (n,), weights (n, h, w)``.
    """
    out = []
    for i, (stage, (h, w)) in enumerate(zip(model.stages, stage_grids(model, size))):
        sin, cos, decay = stage_positions(h, w, stage.head_dim, stage.num_heads, stage.init_value,
                                          stage.heads_range, torch.device("cpu"))
        zeros = torch.zeros(1, h, w, stage.num_heads, stage.head_dim)
        token = _grid_query(query, h, w)
        for form in forms:
            weights = attention_weights(zeros, zeros, sin, cos, decay, stage.head_dim ** -0.5, form, token)
            out.append(dict(stage=i, form=form, grid=(h, w), query=token, decays=decay, weights=weights))
    return out


def capture_attention_inputs(model: RMT, image: torch.Tensor, stage: int, block: int):
    """Run ``model`` on ``image`` and return ``(attn_module, x, sin, cos, decay)`` of one block's MaSA."""
    try:
        attn = model.stages[stage].blocks[block].attn
    except IndexError:
        depths = [len(s.blocks) for s in model.stages]
        raise ValueError(f"no block {block} in stage {stage}: the model has stages 0..{len(depths) - 1} "
                         f"with {depths} blocks") from None
    captured = {}
    handle = attn.register_forward_pre_hook(lambda module, args: captured.setdefault("args", args))
    try:
        with torch.no_grad():
            model.forward_intermediates(image, indices=[stage], stop_early=True, intermediates_only=True)
    finally:
        handle.remove()
    x, sin, cos, decay = captured["args"]
    return attn, x, sin, cos, decay


def attention_maps(model: RMT, image: torch.Tensor, stage: int, block: int,
                   query: Tuple[float, float]) -> Dict[str, Any]:
    """Per-head attention of one query token in a block's MaSA on ``image`` ``(1, 3, H, W)``.

    Returns ``weights (n, h, w)``, ``grid``, ``query (row, col)``, ``form``, ``stride``.
    """
    attn, x, sin, cos, decay = capture_attention_inputs(model, image, stage, block)
    b, h, w, c = x.shape
    with torch.no_grad():
        q, k, _ = attn.qkv(x).split(c, dim=-1)
    shape = (b, h, w, attn.num_heads, attn.head_dim)
    token = _grid_query(query, h, w)
    weights = attention_weights(q.reshape(shape), k.reshape(shape), sin, cos, decay, attn.scale, attn.form, token)
    return dict(weights=weights, grid=(h, w), query=token, form=attn.form, stride=4 * 2 ** stage)


# ------------------------------------------------------------------------------------------------
# class activation maps
# ------------------------------------------------------------------------------------------------

def cam_target_layer(model: nn.Module, stage: int) -> nn.Module:
    """The module whose output Grad-CAM reads: an RMT or Swin stage, a ViT block (all give NHWC maps)."""
    if isinstance(model, RMT):
        layers = model.stages
    elif hasattr(model, "layers"):        # Swin
        layers = model.layers
    elif hasattr(model, "blocks"):        # ViT with a token grid (RMT-DeiT)
        layers = model.blocks
    else:
        raise ValueError(f"do not know where the feature maps of {type(model).__name__} are")
    if not -len(layers) <= stage < len(layers):
        raise ValueError(f"--stage {stage} is out of range: the model has {len(layers)} stages/blocks")
    return layers[stage]


def class_activation_map(model: nn.Module, image: torch.Tensor, target_class: Optional[int] = None,
                         stage: int = -1, method: str = "gradcam") -> Tuple[np.ndarray, int, torch.Tensor]:
    """A class activation map of ``image`` ``(1, 3, H, W)`` for ``target_class`` (default: top-1).

    Returns ``(cam (H, W) in [0, 1], class index, class probabilities (num_classes,))``.
    """
    try:
        import pytorch_grad_cam as gc
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise RuntimeError("class activation maps need the 'grad-cam' package: pip install 'rmt[viz]'") from None
    classes = {"gradcam": gc.GradCAM, "gradcam++": gc.GradCAMPlusPlus, "xgradcam": gc.XGradCAM,
               "layercam": gc.LayerCAM, "eigencam": gc.EigenCAM, "hirescam": gc.HiResCAM}
    if method not in classes:
        raise ValueError(f"unknown CAM method {method!r}; choose from {', '.join(CAM_METHODS)}")
    with torch.no_grad():
        probs = model(image).softmax(-1)[0]
    if probs.ndim != 1 or probs.numel() < 2:
        raise ValueError("class activation maps need a classifier; the model has no class logits "
                         "(a backbone checkpoint without head?)")
    if target_class is None:
        target_class = int(probs.argmax())
    if not 0 <= target_class < probs.numel():
        raise ValueError(f"--class {target_class} is outside 0..{probs.numel() - 1}")
    layer = cam_target_layer(model, stage)
    with classes[method](model=model, target_layers=[layer],
                         reshape_transform=lambda t: t.permute(0, 3, 1, 2)) as cam:
        grayscale = cam(input_tensor=image, targets=[ClassifierOutputTarget(target_class)])
    return grayscale[0], target_class, probs


# ------------------------------------------------------------------------------------------------
# images and plots
# ------------------------------------------------------------------------------------------------

def load_image(path: str | Path, model: nn.Module, size: Optional[Tuple[int, int]] = None
               ) -> Tuple[torch.Tensor, np.ndarray]:
    """Read an image and prepare it as the model's eval transform does (timm data config).

    Returns ``(tensor (1, 3, H, W), picture (H, W, 3) in [0, 1])``; the picture is exactly what the
    model sees (resized and centre-cropped), so maps overlay it pixel for pixel.
    """
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform, resolve_model_data_config
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image '{path}' does not exist")
    try:
        img = Image.open(path).convert("RGB")
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"cannot read '{path}' as an image ({e})") from None
    cfg = resolve_model_data_config(model)
    if size is not None:
        cfg["input_size"] = (3, *size)
    tensor = create_transform(**cfg, is_training=False)(img).unsqueeze(0)
    mean = torch.tensor(cfg["mean"]).view(3, 1, 1)
    std = torch.tensor(cfg["std"]).view(3, 1, 1)
    picture = (tensor[0] * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()
    return tensor, picture


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def plot_decay_patterns(patterns: List[Dict[str, Any]], path: str | Path, title: str = "",
                        log_scale: bool = False) -> Path:
    """One row per (stage, form), one panel per head; the query token is marked."""
    from matplotlib.colors import LogNorm
    plt = _pyplot()
    cols = max(p["weights"].shape[0] for p in patterns)
    rows = len(patterns)
    fig, axes = plt.subplots(rows, cols, figsize=(1.45 * cols + 1.2, 1.6 * rows + 0.9), squeeze=False)
    for ax_row, p in zip(axes, patterns):
        weights = p["weights"].numpy()
        for j, ax in enumerate(ax_row):
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(weights):
                ax.axis("off")
                continue
            norm = LogNorm(vmin=weights[j].max() * 1e-4, vmax=weights[j].max()) if log_scale else None
            ax.imshow(np.maximum(weights[j], 1e-30) if log_scale else weights[j], cmap="magma",
                      interpolation="nearest", norm=norm)
            ax.plot(p["query"][1], p["query"][0], marker="+", color="cyan", markersize=6)
            gamma = math.exp(float(p["decays"][j]))
            ax.set_title(f"head {j}  γ={gamma:.3f}", fontsize=7)
        h, w = p["grid"]
        ax_row[0].set_ylabel(f"stage {p['stage']}\n{p['form']}\n{h}x{w}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def _overlay(ax, picture: np.ndarray, heat: np.ndarray, stride: int, alpha: float = 0.55) -> None:
    """Draw ``heat`` (h, w) over ``picture`` (H, W, 3), each cell covering ``stride`` pixels."""
    H, W = picture.shape[:2]
    h, w = heat.shape
    ax.imshow(picture)
    ax.imshow(heat, cmap="jet", alpha=alpha, interpolation="bilinear",
              extent=(0, w * stride, h * stride, 0))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_xticks([])
    ax.set_yticks([])


def plot_attention(picture: np.ndarray, maps: Dict[str, Any], path: str | Path,
                   heads: Optional[Sequence[int]] = None, title: str = "") -> Path:
    """The image with the query token marked, then one overlay per head and their mean."""
    plt = _pyplot()
    weights = maps["weights"].numpy()
    heads = list(range(len(weights))) if heads is None else list(heads)
    for j in heads:
        if not 0 <= j < len(weights):
            raise ValueError(f"--head {j} is outside 0..{len(weights) - 1} for this stage")
    panels = [(f"head {j}", weights[j]) for j in heads]
    if len(heads) > 1:
        panels.append(("mean of heads", weights[heads].mean(0)))
    cols = min(len(panels) + 1, 6)
    rows = math.ceil((len(panels) + 1) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.7 * rows + 0.4), squeeze=False)
    axes = axes.ravel()
    stride = maps["stride"]
    qy, qx = ((maps["query"][0] + 0.5) * stride, (maps["query"][1] + 0.5) * stride)
    axes[0].imshow(picture)
    axes[0].plot(qx, qy, marker="o", markersize=8, markerfacecolor="none", markeredgecolor="cyan", mew=2)
    axes[0].set_title("query token", fontsize=9)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    for ax, (name, heat) in zip(axes[1:], panels):
        _overlay(ax, picture, heat, stride)
        ax.plot(qx, qy, marker="+", color="white", markersize=8, mew=2)
        ax.set_title(name, fontsize=9)
    for ax in axes[len(panels) + 1:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_cam(picture: np.ndarray, cam: np.ndarray, path: str | Path, title: str = "") -> Path:
    """The image and the class activation map over it, side by side."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.9))
    axes[0].imshow(picture)
    axes[0].set_title("input", fontsize=9)
    axes[0].set_xticks([])
    axes[0].set_yticks([])
    _overlay(axes[1], picture, cam, 1, alpha=0.5)
    axes[1].set_title("class activation map", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
