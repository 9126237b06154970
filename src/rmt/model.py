"""RMT: Retentive Networks Meet Vision Transformers (Fan et al., CVPR 2024) as timm models.

Top to bottom: helpers, attention (MaSA), block, stage, model, checkpoint hooks, configs and the
``rmt_tiny/small/base/large`` registrations (the classifier head is :mod:`rmt.head`, the stem and
the downsampling convs :mod:`rmt.stem`; training on the fast path runs each block through
:mod:`rmt.ops.block`). Token tensors inside the model are channels-last
``(b, h, w, c)``; images and returned feature maps are NCHW.

Layer names are this package's own (a fused ``qkv`` projection, timm-style ``stages`` with the
downsample at the start of the stage it feeds); :mod:`rmt.checkpoint` converts to and from the
released layout without changing any number.
"""

from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from timm.layers import DropPath, LayerScale, trunc_normal_
from timm.layers._fx import register_notrace_function
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .compat import is_exporting
from .head import ClassifierHead
from .inputs import MIN_INPUT_SIZE, FormSpec, check_image, normalize_forms
from .norm import LayerNorm
from .ops.dwconv import dwconv_nhwc
from .ops.ffn import ffn, ffn_tail
from .ops.linear import linear
from .ops.masa import IMPLS, masa
from .ops.masa.positions import cached_stage_positions, stage_positions
from .ops.residual import add_branch, branch_scale, drop_path_active, hook_free, plain_residual
from .ops.triton_support import HAS_TRITON, cpu_path_allowed, fused_allowed
from .stem import Downsample, Stem

if HAS_TRITON:
    from .ops import block as block_ops
    from .ops import block_graphs, block_infer

__all__ = ["RMT", "MaSA", "RMTBlock", "RMTStage", "MIN_INPUT_SIZE"]


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

# shape-dependent helpers stay opaque to torch.fx tracing (feature extraction by graph rewriting)
for _fn in (check_image, stage_positions, cached_stage_positions, masa, dwconv_nhwc, ffn, ffn_tail, linear):
    register_notrace_function(_fn)
del _fn


# ----------------------------------------------------------------------------------------------
# attention
# ----------------------------------------------------------------------------------------------

class _LinearOwner(nn.Module):
    """A module whose ``nn.Linear`` children run through :func:`rmt.ops.linear.linear` in training
    on the fast path (bias gradients as a GEMV, float32 gradients written directly)."""

    @torch.jit.ignore
    def _plain(self, name: str) -> bool:
        """Child ``name`` is a hook-free ``nn.Linear``, so calling a function on its parameters
        instead changes nothing (a replaced or hooked layer, e.g. LoRA, runs as it is)."""
        layer = getattr(self, name)
        return type(layer) is nn.Linear and hook_free(layer)

    @torch.jit.ignore
    def _linear(self, name: str, x: torch.Tensor, fused: bool) -> torch.Tensor:
        layer = getattr(self, name)
        return (linear(x, layer.weight, layer.bias, fused, cpu_path_allowed(self.impl, x)) if self._plain(name)
                else layer(x))


class MaSA(_LinearOwner):
    """Manhattan Self-Attention with rotation, decay bias and LePE; ``(b, h, w, c) -> (b, h, w, c)``.

    ``form`` ("decomposed" or "full") and ``impl`` (see :data:`rmt.ops.masa.IMPLS`) are plain
    attributes: they can be changed on a built model without touching the weights.
    """

    def __init__(self, dim: int, num_heads: int, form: str = "full", impl: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        if dim % num_heads or (dim // num_heads) % 2:
            raise ValueError(f"dim {dim} must split into {num_heads} heads of even width")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.form = form
        self.impl = impl
        self.qkv = nn.Linear(dim, 3 * dim, **dd)
        self.lepe = nn.Conv2d(dim, dim, 5, 1, 2, groups=dim, **dd)
        self.proj = nn.Linear(dim, dim, **dd)

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                decay: torch.Tensor) -> torch.Tensor:
        b, h, w, c = x.shape
        fused = fused_allowed(self.impl, x)
        qkv = self.qkv(x) if torch.jit.is_scripting() else self._linear("qkv", x, fused)
        q, k, v = qkv.split(c, dim=-1)
        lepe = dwconv_nhwc(v, self.lepe.weight, self.lepe.bias, False, fused, False, False)
        shape = (b, h, w, self.num_heads, self.head_dim)
        out = masa(q.view(shape), k.view(shape), v.view(shape), sin, cos, decay, self.scale,
                   self.form, self.impl, lepe.reshape(shape)).view(b, h, w, c)
        return self.proj(out) if torch.jit.is_scripting() else self._linear("proj", out, fused)


# ----------------------------------------------------------------------------------------------
# block
# ----------------------------------------------------------------------------------------------

class Mlp(_LinearOwner):
    """fc1 -> GELU -> (+ depthwise 3x3) -> fc2 on ``(b, h, w, c)`` tokens."""

    def __init__(self, dim: int, hidden: int, impl: str = "auto", device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.impl = impl
        self.fc1 = nn.Linear(dim, hidden, **dd)
        self.dwconv = nn.Conv2d(hidden, hidden, 3, 1, 1, groups=hidden, **dd)
        self.fc2 = nn.Linear(hidden, dim, **dd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_allowed(self.impl, x)
        if not torch.jit.is_scripting() and self._plain("fc1") and self._plain("fc2"):
            return ffn(x, self.fc1.weight, self.fc1.bias, self.dwconv.weight, self.dwconv.bias,
                       self.fc2.weight, self.fc2.bias, fused, cpu_path_allowed(self.impl, x))
        u = self.fc1(x) if torch.jit.is_scripting() else self._linear("fc1", x, fused)
        if not torch.jit.is_scripting() and self._plain("fc2"):
            # GELU, depthwise conv and fc2 in one op that keeps only fc1's output for backward
            return ffn_tail(u, self.dwconv.weight, self.dwconv.bias, self.fc2.weight, self.fc2.bias, fused,
                            cpu_path_allowed(self.impl, u))
        u = dwconv_nhwc(u, self.dwconv.weight, self.dwconv.bias, True, fused, True,
                        cpu_path_allowed(self.impl, u))
        return self.fc2(u)


class RMTBlock(nn.Module):
    """CPE, then MaSA and FFN residual branches with optional layer scale and drop path."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, form: str, impl: str,
                 layerscale: bool, layer_init_value: float, drop_path: float,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.cpe = nn.Conv2d(dim, dim, 3, 1, 1, groups=dim, **dd)
        self.norm1 = LayerNorm(dim, eps=1e-6, impl=impl, **dd)
        self.attn = MaSA(dim, num_heads, form, impl, **dd)
        self.ls1 = LayerScale(dim, layer_init_value, **dd) if layerscale else nn.Identity()
        self.norm2 = LayerNorm(dim, eps=1e-6, impl=impl, **dd)
        self.mlp = Mlp(dim, int(mlp_ratio * dim), impl, **dd)
        self.ls2 = LayerScale(dim, layer_init_value, **dd) if layerscale else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.impl = impl

    def forward(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                decay: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            route = self._fused_route(x)
            if route == "train":
                return self._forward_fused(x, sin, cos, decay)
            if route == "infer":
                return block_infer.block_infer(x, self._spec(sin, cos, decay), self._params(), self.impl)
        x = dwconv_nhwc(x, self.cpe.weight, self.cpe.bias, True, fused_allowed(self.impl, x), False,
                        cpu_path_allowed(self.impl, x))
        branch = self.attn(self.norm1(x), sin, cos, decay)
        if torch.jit.is_scripting():
            x = x + self.drop_path(self.ls1(branch))
        else:
            x = self._add_branch(x, branch, "ls1")
        branch = self.mlp(self.norm2(x))
        if torch.jit.is_scripting():
            return x + self.drop_path(self.ls2(branch))
        return self._add_branch(x, branch, "ls2")

    @torch.jit.ignore
    def _fused_route(self, x: torch.Tensor) -> str:
        """``"train"``: this call trains through :func:`rmt.ops.block.block_train` (one autograd node for
        the block; eager training on the fast path); ``"infer"``: it runs through
        :func:`rmt.ops.block_infer.block_infer` (no gradients to record, no layer scale, drop path
        inactive; eager or compiled); ``""``: module by module. Both need every submodule to be the
        plain, hook-free module the block was built with (a replaced or hooked layer, e.g. LoRA, keeps
        the module path). Reads the module dicts: ``nn.Module.__getattr__`` costs ~1 us a lookup."""
        m = self._modules
        attn, mlp, norm1, norm2 = m["attn"], m["mlp"], m["norm1"], m["norm2"]
        if not (HAS_TRITON and not isinstance(x, torch.fx.Proxy) and type(attn) is MaSA and type(mlp) is Mlp
                and type(norm1) is LayerNorm and type(norm2) is LayerNorm
                and attn.impl == mlp.impl == norm1.impl == norm2.impl == self.impl
                and fused_allowed(self.impl, x)):
            return ""
        ls1, ls2, drop_path = m["ls1"], m["ls2"], m["drop_path"]
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            route = "train" if block_ops.kernels_apply(x, self.impl, attn.head_dim, attn.form) else ""
        else:
            route = "infer" if (block_infer.inference_applies(x, self.impl, attn.head_dim, attn.form)
                                and not drop_path_active(drop_path)
                                and type(ls1) is nn.Identity and type(ls2) is nn.Identity) else ""
        if not route:
            return ""
        layers = self._layers()
        cpe, _, qkv, lepe, proj, _, fc1, dwconv, fc2 = layers
        if not (all(type(layer) is nn.Linear for layer in (qkv, proj, fc1, fc2))
                and all(type(layer) is nn.Conv2d for layer in (cpe, lepe, dwconv))
                and all(hook_free(layer) and layer._parameters.get("weight") is not None
                        and layer._parameters.get("bias") is not None for layer in layers)
                and hook_free(attn) and hook_free(mlp)
                and plain_residual(ls1, drop_path) and plain_residual(ls2, drop_path)):
            return ""
        return route

    @torch.jit.ignore
    def _layers(self) -> Tuple[nn.Module, ...]:
        """The nine layers with weights, in :func:`rmt.ops.block.block_forward`'s order: cpe, norm1, qkv,
        lepe, proj, norm2, fc1, dwconv, fc2 (``attn`` and ``mlp`` must be this package's modules)."""
        m = self._modules
        attn, mlp = m["attn"]._modules, m["mlp"]._modules
        return (m["cpe"], m["norm1"], attn["qkv"], attn["lepe"], attn["proj"], m["norm2"],
                mlp["fc1"], mlp["dwconv"], mlp["fc2"])

    @torch.jit.ignore
    def _spec(self, sin: torch.Tensor, cos: torch.Tensor, decay: torch.Tensor):
        """The stage's position tables with this block's attention and norm settings (a ``BlockSpec``)."""
        m = self._modules
        attn = m["attn"]
        return block_ops.BlockSpec(sin.float().contiguous(), cos.float().contiguous(), decay.float().contiguous(),
                                   attn.num_heads, attn.scale, attn.form, m["norm1"].eps, m["norm2"].eps)

    @torch.jit.ignore
    def _params(self) -> Tuple[torch.Tensor, ...]:
        """The block's 18 weights and biases in :func:`rmt.ops.block.block_forward`'s order."""
        return tuple(layer._parameters[name] for layer in self._layers() for name in ("weight", "bias"))

    @torch.jit.ignore
    def _forward_fused(self, x: torch.Tensor, sin: torch.Tensor, cos: torch.Tensor,
                       decay: torch.Tensor) -> torch.Tensor:
        """The block as one autograd node (see :meth:`_fused_route`); the same numbers as the modules,
        drop-path masks included (drawn in the same order)."""
        device = x.device.type
        if torch.is_autocast_enabled(device):
            x = x.to(torch.get_autocast_dtype(device))
        scale1 = branch_scale(x, self.ls1, self.drop_path)
        scale2 = branch_scale(x, self.ls2, self.drop_path)
        return block_ops.block_train(x, scale1, scale2, self._spec(sin, cos, decay), self._params(),
                                     block_graphs.graphs_of(self))

    @torch.jit.ignore
    def _add_branch(self, x: torch.Tensor, branch: torch.Tensor, ls: str) -> torch.Tensor:
        """``x + drop_path(ls(branch))`` in one pass (:func:`rmt.ops.residual.add_branch`)."""
        return add_branch(x, branch, getattr(self, ls), self.drop_path)


# ----------------------------------------------------------------------------------------------
# stage
# ----------------------------------------------------------------------------------------------

class RMTStage(nn.Module):
    """Optional downsample, then ``depth`` blocks sharing one rotation table and decay vector."""

    __jit_unused_properties__ = ["form"]

    def __init__(self, in_dim: int, dim: int, depth: int, num_heads: int, init_value: float,
                 heads_range: float, mlp_ratio: float, form: str, impl: str, layerscale: bool,
                 layer_init_value: float, drop_path: Sequence[float], downsample: bool,
                 device=None, dtype=None):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.init_value = float(init_value)
        self.heads_range = float(heads_range)
        self.grad_checkpointing = False
        self.downsample = Downsample(in_dim, dim, **dd) if downsample else nn.Identity()
        self.blocks = nn.ModuleList([
            RMTBlock(dim, num_heads, mlp_ratio, form, impl, layerscale, layer_init_value,
                     drop_path[i], **dd)
            for i in range(depth)])

    @property
    def form(self) -> str:
        return self.blocks[0].attn.form if len(self.blocks) else "full"

    def set_form(self, form: str) -> None:
        for blk in self.blocks:
            blk.attn.form = form

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        _, h, w, _ = x.shape
        if torch.jit.is_scripting():
            sin, cos, decay = stage_positions(h, w, self.head_dim, self.num_heads, self.init_value,
                                               self.heads_range, x.device)
        else:
            sin, cos, decay = cached_stage_positions(h, w, self.head_dim, self.num_heads, self.init_value,
                                                     self.heads_range, x.device)
        for blk in self.blocks:
            if self.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting():
                x = torch.utils.checkpoint.checkpoint(blk, x, sin, cos, decay, use_reentrant=False)
            else:
                x = blk(x, sin, cos, decay)
        return x


# ----------------------------------------------------------------------------------------------
# model
# ----------------------------------------------------------------------------------------------

class RMT(nn.Module):
    """The RMT backbone and classifier.

    ``forward_features`` returns ``(b, h/32, w/32, c3)`` (NHWC), ``forward`` logits ``(b, classes)``.
    ``forward_intermediates`` returns NCHW stage outputs taken before each downsample (strides
    4/8/16/32), passed through ``feature_norms`` when the model has them (dense prediction).
    """

    __jit_unused_properties__ = ["attention_forms"]

    def __init__(
            self,
            in_chans: int = 3,
            num_classes: int = 1000,
            global_pool: str = "avg",
            embed_dims: Sequence[int] = (64, 128, 256, 512),
            depths: Sequence[int] = (2, 2, 8, 2),
            num_heads: Sequence[int] = (4, 4, 8, 16),
            init_values: Sequence[float] = (2, 2, 2, 2),
            heads_ranges: Sequence[float] = (4, 4, 6, 6),
            mlp_ratios: Sequence[float] = (3, 3, 3, 3),
            attn_forms: FormSpec = ("decomposed", "decomposed", "full", "full"),
            layerscales: Sequence[bool] = (False, False, False, False),
            layer_init_values: float = 1e-6,
            head_hidden_size: int = 1024,
            drop_rate: float = 0.0,
            drop_path_rate: float = 0.1,
            feature_norms: bool = False,
            masa_impl: str = "auto",
            device=None,
            dtype=None,
    ):
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        num_stages = len(depths)
        if masa_impl not in IMPLS:
            raise ValueError(f"masa_impl must be one of {IMPLS}, got {masa_impl!r}")
        forms = normalize_forms(attn_forms, num_stages)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.embed_dims = tuple(embed_dims)
        self.num_features = embed_dims[-1]
        self.head_hidden_size = head_hidden_size
        self.output_fmt = "NHWC"
        self.drop_rate = drop_rate

        self.stem = Stem(in_chans, embed_dims[0], masa_impl, **dd)
        total = sum(depths)
        dpr = [drop_path_rate * i / max(total - 1, 1) for i in range(total)]
        stages, self.feature_info = [], []
        for i in range(num_stages):
            start = sum(depths[:i])
            stages.append(RMTStage(
                embed_dims[max(i - 1, 0)], embed_dims[i], depths[i], num_heads[i], init_values[i],
                heads_ranges[i], mlp_ratios[i], forms[i], masa_impl, layerscales[i],
                layer_init_values, dpr[start:start + depths[i]], downsample=i > 0, **dd))
            self.feature_info.append(dict(num_chs=embed_dims[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.stages = nn.Sequential(*stages)
        self.feature_norms = nn.ModuleList(
            [nn.LayerNorm(d, eps=1e-5, **dd) for d in embed_dims]) if feature_norms else None
        self.head = ClassifierHead(embed_dims[-1], head_hidden_size, num_classes, global_pool,
                                   drop_rate, **dd)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    # --- attention form and implementation -----------------------------------------------------

    @property
    def attention_forms(self) -> Tuple[str, ...]:
        """The MaSA form of each stage, e.g. ``('decomposed', 'decomposed', 'full', 'full')``."""
        return tuple(s.form for s in self.stages)

    def set_attention_form(self, forms: FormSpec) -> None:
        """Choose the MaSA form per stage without touching weights.

        ``forms``: ``"decomposed"``, ``"full"``, a per-stage sequence, or a string like ``"TTFF"``
        (T = decomposed, F = full), one letter per stage.
        """
        for stage, form in zip(self.stages, normalize_forms(forms, len(self.stages))):
            stage.set_form(form)

    def set_masa_impl(self, impl: str) -> None:
        """Select the MaSA implementation: ``"auto"`` (fast path where available) or ``"reference"``."""
        if impl not in IMPLS:
            raise ValueError(f"masa_impl must be one of {IMPLS}, got {impl!r}")
        for m in self.modules():
            if isinstance(m, (MaSA, Mlp, RMTBlock, LayerNorm, Stem)):
                m.impl = impl

    # --- timm model interface -------------------------------------------------------------------

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {"*.ls1.gamma", "*.ls2.gamma"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> Dict[str, Any]:
        return dict(
            stem=r"^stem",
            blocks=r"^stages\.(\d+)" if coarse else [
                (r"^stages\.(\d+)\.downsample", (0,)),
                (r"^stages\.(\d+)\.blocks\.(\d+)", None),
                (r"^feature_norms\.(\d+)", (99999,)),
            ],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for s in self.stages:
            s.grad_checkpointing = enable

    @torch.jit.ignore
    def set_block_graphs(self, enable: bool = True) -> None:
        """Replay each block's training kernels from CUDA graphs (:mod:`rmt.ops.block_graphs`): an
        eager CUDA training step with far fewer launches, the same numbers. Needs Triton."""
        if not HAS_TRITON:
            raise RuntimeError("block graphs replay the Triton training kernels: install triton")
        block_graphs.set_block_graphs([blk for s in self.stages for blk in s.blocks], enable)

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool)

    def _stem_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Image ``(b, C, H, W)`` -> contiguous tokens ``(b, H/4, W/4, c0)`` (convs run channels-last,
        except under ``torch.export``: see :func:`rmt.compat.nchw_for_conv`)."""
        x = self.stem(x if is_exporting() else x.contiguous(memory_format=torch.channels_last))
        return x.permute(0, 2, 3, 1).contiguous()

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, List[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = "NCHW",
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """Stage outputs before each downsample, NCHW (``output_fmt='NHWC'`` keeps tokens layout).

        Args:
            indices: last n stages if int, all if None, else the stage indices to return.
            norm: kept for the timm interface; per-stage norms apply whenever the model has them.
            stop_early: stop after the last requested stage.
            intermediates_only: return only the list of features.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        check_image(x, self.in_chans, self.stem[0].weight)
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        stages = self.stages[:max_index + 1] if stop_early else self.stages
        intermediates = []
        x = self._stem_tokens(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take_indices:
                feat = self.feature_norms[i](x) if self.feature_norms is not None else x
                intermediates.append(feat.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else feat)
        if intermediates_only:
            return intermediates
        return x, intermediates

    def prune_intermediate_layers(self, indices: Union[int, List[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Drop the stages after the last requested one (and the head); returns the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.stages), indices)
        self.stages = self.stages[:max_index + 1]
        if self.feature_norms is not None:
            self.feature_norms = self.feature_norms[:max_index + 1]
        if prune_head or max_index < len(self.embed_dims) - 1:
            self.num_features = self.embed_dims[max_index]
            self.head = nn.Identity()
            self.num_classes = 0
        return take_indices

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """``(b, C, H, W) -> (b, ceil(H/32), ceil(W/32), c3)``."""
        check_image(x, self.in_chans, self.stem[0].weight)
        return self.stages(self._stem_tokens(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    # --- checkpoints ------------------------------------------------------------------------------

    def load_pretrained(self, path: str) -> None:
        """Load a checkpoint file (ours, released or converted); see :mod:`rmt.checkpoint`."""
        from .checkpoint import load_into
        load_into(self, path)


# ----------------------------------------------------------------------------------------------
# configs and registrations
# ----------------------------------------------------------------------------------------------

def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: RMT) -> Dict[str, torch.Tensor]:
    """Convert any supported checkpoint layout (released, ours, wrapped) to this model's keys."""
    from .checkpoint import filter_state_dict
    return filter_state_dict(state_dict, model)


def _create_rmt(variant: str, pretrained: bool = False, **kwargs) -> RMT:
    if kwargs.get("features_only"):
        kwargs.setdefault("feature_norms", True)
    overlay = kwargs.get("pretrained_cfg_overlay")
    if overlay and overlay.get("file"):
        # read local files with RMT's own loader (clear errors, any layout) instead of timm's
        kwargs["pretrained_cfg_overlay"] = dict(overlay, custom_load=overlay.get("custom_load", True))
    out_indices = kwargs.pop("out_indices", (0, 1, 2, 3))
    from .token_label import model_class  # the aux-head model for token-label tags or use_aux_head=True
    return build_model_with_cfg(
        model_class(variant, kwargs), variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(feature_cls="getter", out_indices=out_indices),
        **kwargs)


def _cfg(**kwargs) -> Dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": (7, 7),
        "crop_pct": 0.9, "interpolation": "bicubic", "fixed_input_size": False,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "stem.0", "classifier": "head.fc", "custom_load": True,
        "license": "apache-2.0", "paper_ids": "arXiv:2309.11523",
        "paper_name": "RMT: Retentive Networks Meet Vision Transformers", **kwargs,
    }


default_cfgs = generate_default_cfgs({
    "rmt_tiny.in1k": _cfg(),
    "rmt_small.in1k": _cfg(),
    "rmt_base.in1k": _cfg(),
    "rmt_large.in1k": _cfg(),
    # the token-label models RMT-S*/B*/L* (rmt.token_label): 84.8 / 85.6 / 86.1% top-1
    **{f"rmt_{v}.tl_in1k": _cfg(classifier=("head.fc", "aux_head")) for v in ("small", "base", "large")},
})

# Architecture of each variant (SPEC section 4); ``rmt.variants`` reads this table too.
MODEL_ARGS: Dict[str, Dict[str, Any]] = {
    "rmt_tiny": dict(
        embed_dims=(64, 128, 256, 512), depths=(2, 2, 8, 2), num_heads=(4, 4, 8, 16),
        init_values=(2, 2, 2, 2), heads_ranges=(4, 4, 6, 6), mlp_ratios=(3, 3, 3, 3),
        attn_forms="TTFF", layerscales=(False,) * 4, drop_path_rate=0.1),
    "rmt_small": dict(
        embed_dims=(64, 128, 256, 512), depths=(3, 4, 18, 4), num_heads=(4, 4, 8, 16),
        init_values=(2, 2, 2, 2), heads_ranges=(4, 4, 6, 6), mlp_ratios=(4, 4, 3, 3),
        attn_forms="TTTF", layerscales=(False,) * 4, drop_path_rate=0.15),
    "rmt_base": dict(
        embed_dims=(80, 160, 320, 512), depths=(4, 8, 25, 8), num_heads=(5, 5, 10, 16),
        init_values=(2, 2, 2, 2), heads_ranges=(5, 5, 6, 6), mlp_ratios=(4, 4, 3, 3),
        attn_forms="TTTF", layerscales=(False, False, True, True), drop_path_rate=0.4),
    "rmt_large": dict(
        embed_dims=(112, 224, 448, 640), depths=(4, 8, 25, 8), num_heads=(7, 7, 14, 20),
        init_values=(2, 2, 2, 2), heads_ranges=(6, 6, 6, 6), mlp_ratios=(4, 4, 3, 3),
        attn_forms="TTTF", layerscales=(False, False, True, True), drop_path_rate=0.5),
}


@register_model
def rmt_tiny(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-T: 14.3M params, 2.5 GFLOPs, 82.4% ImageNet top-1."""
    return _create_rmt("rmt_tiny", pretrained, **dict(MODEL_ARGS["rmt_tiny"], **kwargs))


@register_model
def rmt_small(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-S: 27.0M params, 4.5 GFLOPs, 84.1% ImageNet top-1."""
    return _create_rmt("rmt_small", pretrained, **dict(MODEL_ARGS["rmt_small"], **kwargs))


@register_model
def rmt_base(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-B: 54.2M params, 9.7 GFLOPs, 85.0% ImageNet top-1."""
    return _create_rmt("rmt_base", pretrained, **dict(MODEL_ARGS["rmt_base"], **kwargs))


@register_model
def rmt_large(pretrained: bool = False, **kwargs) -> RMT:
    """RMT-L: 95.5M params, 18.2 GFLOPs, 85.5% ImageNet top-1."""
    return _create_rmt("rmt_large", pretrained, **dict(MODEL_ARGS["rmt_large"], **kwargs))
