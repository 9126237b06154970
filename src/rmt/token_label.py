"""Token-labelled RMT: the RMT-S*/B*/L* models (SPEC section 8) and MixToken.

:class:`TokenLabelRMT` is :class:`rmt.model.RMT` plus ``aux_head``, a Linear(c3 -> classes) applied to
every token of the last stage, in the convention of timm's VOLO (``use_aux_head``, ``use_mix_token``):

* eval mode: ``logits = head(x) + 0.5 * max over the h*w tokens of aux_head(x)`` (per class);
* train mode: ``(logits (b, classes), aux logits (b, h*w, classes), box (4,) int64 = (r1, c1, r2, c2))``.

MixToken (train mode, ``use_mix_token``): right after the stem, whose tokens are ``(b, Hs, Ws, c0)``,
a CutMix box is drawn on the final (stride-32) grid ``(h, w) = (ceil(Hs/8), ceil(Ws/8))`` with the
released rule (``lam ~ Beta(1, 1)``, ``cut = int(side * sqrt(1 - lam))``, centre uniform over the
grid, ``r1 = clip(centre - cut // 2, 0, h)``, ``r2 = clip(centre + cut // 2, 0, h)``, columns alike).
Stem rows ``8*r1:8*r2`` and columns ``8*c1:8*c2`` take the values of the reversed batch
(``x.flip(0)``); the aux logits get rows ``r1:r2``, columns ``c1:c2`` of the reversed batch back, so
each aux token again speaks for its own image. At sizes that are not multiples of 32 the final grid
is the ceil grid every stage already uses, and the stem region is clipped to the stem output: a
box that reaches the last, partial final-grid row covers the stem rows that exist under it.

The box is drawn and applied on the model's device with tensor operations only (masks, no
host synchronisation), so a training step with MixToken can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import torch
import torch.nn as nn

from .inputs import check_image
from .model import RMT

__all__ = ["TokenLabelRMT", "TOKEN_LABEL_TAGS", "draw_mix_box", "mix_region", "aux_fusion", "model_class",
           "aux_head_kwargs", "token_label_names"]

# pretrained tags whose models carry the aux head (the released token-label checkpoints)
TOKEN_LABEL_TAGS = ("tl_in1k",)
# paper rows of the token-label models: (ImageNet top-1, GFLOPs at 224)
PAPER_ROWS = {"rmt_small": (84.8, 4.5), "rmt_base": (85.6, 9.7), "rmt_large": (86.1, 18.2)}
AUX_WEIGHT = 0.5      # eval-mode weight of the aux head's token maximum
STEM_TO_FINAL = 8     # stem grid rows per final-grid row (strides 4 and 32)


def draw_mix_box(grid: Tuple[int, int], device: torch.device, beta: float = 1.0) -> torch.Tensor:
    """A MixToken box ``(r1, c1, r2, c2)`` (int64, on ``device``) on a ``grid = (h, w)`` token grid.

    ``lam ~ Beta(beta, beta)``; side cuts ``int(h * sqrt(1 - lam))`` and ``int(w * sqrt(1 - lam))``;
    centre row and column uniform over the grid; edges ``centre -/+ cut // 2`` clipped to the grid.
    Draws from the torch RNG of ``device``: lam, then the centre row, then the centre column.
    """
    h, w = grid
    if beta == 1.0:  # Beta(1, 1) is the uniform distribution
        lam = torch.rand((), device=device)
    else:
        lam = torch.distributions.Beta(torch.tensor(beta, device=device),
                                       torch.tensor(beta, device=device)).sample()
    ratio = (1.0 - lam).sqrt()
    cut_h = (h * ratio).floor().long()
    cut_w = (w * ratio).floor().long()
    cr = torch.randint(h, (), device=device)
    cc = torch.randint(w, (), device=device)
    return torch.stack([(cr - cut_h // 2).clamp(0, h), (cc - cut_w // 2).clamp(0, w),
                        (cr + cut_h // 2).clamp(0, h), (cc + cut_w // 2).clamp(0, w)])


def mix_region(x: torch.Tensor, box: torch.Tensor, scale: int = 1) -> torch.Tensor:
    """``x`` ``(b, H, W, c)`` with rows ``scale*r1:scale*r2``, columns ``scale*c1:scale*c2`` (clipped to
    ``H, W``) taken from ``x.flip(0)``; a new tensor. Applying it twice with one box gives ``x`` back."""
    _, height, width, _ = x.shape
    rows = torch.arange(height, device=x.device)
    cols = torch.arange(width, device=x.device)
    r1, c1, r2, c2 = (box * scale).unbind()
    inside = (((rows >= r1) & (rows < r2)).view(height, 1, 1)
              & ((cols >= c1) & (cols < c2)).view(1, width, 1))
    return torch.where(inside, x.flip(0), x)


def aux_fusion(logits: torch.Tensor, aux_tokens: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits: ``logits + 0.5 * aux_tokens.amax(over tokens)``; ``aux_tokens`` ``(b, h, w, C)``
    or ``(b, h*w, C)``."""
    return logits + AUX_WEIGHT * aux_tokens.flatten(1, -2).amax(dim=1)


class TokenLabelRMT(RMT):
    """RMT with the token-label aux head (SPEC section 8); arguments as :class:`rmt.model.RMT`, plus:

    Args:
        use_aux_head: the per-token classifier ``aux_head`` (always on for this class; the argument
            exists for timm's convention, ``timm.create_model('rmt_small', use_aux_head=True)``).
        use_mix_token: MixToken in train mode (see the module docstring).
    """

    def __init__(self, *args: Any, use_aux_head: bool = True, use_mix_token: bool = False, **kwargs: Any):
        if not use_aux_head:
            raise ValueError("TokenLabelRMT always has the aux head; build rmt.model.RMT for a model without it")
        super().__init__(*args, **kwargs)
        self.use_aux_head = True
        self.mix_token = use_mix_token
        self.beta = 1.0
        self.pooling_scale = STEM_TO_FINAL
        ref = self.head.proj.weight
        self.aux_head: Optional[nn.Linear] = self._make_aux_head(self.num_classes, ref.device, ref.dtype)
        if self.aux_head is not None:
            self._init_weights(self.aux_head)

    def _make_aux_head(self, num_classes: int, device, dtype) -> Optional[nn.Linear]:
        if num_classes <= 0:
            return None
        return nn.Linear(self.num_features, num_classes, device=device, dtype=dtype)

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """New, freshly initialised class head and aux head for ``num_classes`` (0: neither)."""
        super().reset_classifier(num_classes, global_pool)
        ref = self.head.proj.weight
        self.aux_head = self._make_aux_head(num_classes, ref.device, ref.dtype)
        if self.aux_head is not None:
            self._init_weights(self.aux_head)
            self.aux_head.train(self.training)

    def prune_intermediate_layers(self, indices=1, prune_norm: bool = False, prune_head: bool = True):
        take_indices = super().prune_intermediate_layers(indices, prune_norm, prune_head)
        if self.num_classes == 0:
            self.aux_head = None
        return take_indices

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Class logits of the stage-3 tokens ``x`` ``(b, h, w, c3)``, fused with the aux head's token
        maximum (the eval-mode logits; unpooled heads, ``global_pool=''``, are returned as they are)."""
        out = self.head(x, pre_logits=pre_logits)
        if pre_logits or self.aux_head is None or getattr(self.head, "global_pool", "avg") != "avg":
            return out
        return aux_fusion(out, self.aux_head(x))

    def forward(self, x: torch.Tensor):
        if self.training and self.aux_head is not None:
            return self.forward_train(x)
        return self.forward_head(self.forward_features(x))

    def forward_train(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits (b, classes), aux logits (b, h*w, classes), box (4,))``; MixToken when ``mix_token``
        (the box is all zero otherwise)."""
        check_image(x, self.in_chans)
        tokens = self._stem_tokens(x)
        if self.mix_token:
            grid = (-(-tokens.shape[1] // self.pooling_scale), -(-tokens.shape[2] // self.pooling_scale))
            box = draw_mix_box(grid, tokens.device, self.beta)
            tokens = mix_region(tokens, box, self.pooling_scale)
        else:
            box = torch.zeros(4, dtype=torch.long, device=tokens.device)
        features = self.stages(tokens)
        logits = self.head(features)
        aux = self.aux_head(features)
        if self.mix_token:
            aux = mix_region(aux, box)
        return logits, aux.flatten(1, 2), box


def token_label_names() -> list:
    """The registered token-label models: ``['rmt_small.tl_in1k', 'rmt_base.tl_in1k', 'rmt_large.tl_in1k']``."""
    return [f"{variant}.{tag}" for variant in PAPER_ROWS for tag in TOKEN_LABEL_TAGS]


def aux_head_kwargs(name: str, has_aux_head: bool) -> Dict[str, Any]:
    """``create_model`` arguments that give a model named ``name`` the aux head of a checkpoint that
    has one; none where ``name`` carries a tag (the tag decides, and a mismatch is an error on loading)."""
    return {"use_aux_head": True} if has_aux_head and "." not in name else {}


def _pretrained_tag(variant: str, pretrained_cfg: Any) -> Optional[str]:
    """The pretrained tag a ``create_model`` call asks for (``'tl_in1k'`` of ``'rmt_small.tl_in1k'``)."""
    if pretrained_cfg is None:
        return None
    if isinstance(pretrained_cfg, str):
        return pretrained_cfg
    if isinstance(pretrained_cfg, dict):
        return pretrained_cfg.get("tag")
    return getattr(pretrained_cfg, "tag", None)


def model_class(variant: str, kwargs: Dict[str, Any]) -> type:
    """:class:`TokenLabelRMT` for a token-label tag or ``use_aux_head=True``, else :class:`RMT`.

    A token-label tag turns ``use_aux_head`` and ``use_mix_token`` on (the released training setting)
    unless the call sets them; ``use_aux_head=False`` with such a tag is an error. Edits ``kwargs``.
    """
    tag = _pretrained_tag(variant, kwargs.get("pretrained_cfg"))
    if tag in TOKEN_LABEL_TAGS:
        if kwargs.get("use_aux_head") is False:
            raise ValueError(f"'{variant}.{tag}' is a token-label model with an aux head; create '{variant}' "
                             "for the plain classifier")
        kwargs.setdefault("use_aux_head", True)
        kwargs.setdefault("use_mix_token", True)
    if kwargs.get("use_aux_head"):
        return TokenLabelRMT
    kwargs.pop("use_aux_head", None)
    if kwargs.pop("use_mix_token", False):
        raise ValueError("use_mix_token needs use_aux_head=True (MixToken trains the aux head)")
    return RMT
