"""rmt: the RMT vision backbone (Retentive Networks Meet Vision Transformers) as timm models.

``import rmt`` registers ``rmt_tiny``, ``rmt_small``, ``rmt_base`` and ``rmt_large`` with timm, and the
token-label models ``rmt_small.tl_in1k``, ``rmt_base.tl_in1k``, ``rmt_large.tl_in1k`` (RMT-S*/B*/L*).
"""
from .model import MODEL_ARGS, RMT, MaSA, RMTBlock, RMTStage
from .token_label import TokenLabelRMT
from .checkpoint import CheckpointError, convert, load_into
from . import plugin_models  # noqa: F401,E402  (registers rmt_deit_small and rmt_swin_tiny)

__version__ = "0.1.0"
VARIANTS = tuple(MODEL_ARGS)

__all__ = ["RMT", "TokenLabelRMT", "MaSA", "RMTBlock", "RMTStage", "MODEL_ARGS", "VARIANTS", "CheckpointError",
           "convert", "load_into", "__version__"]
