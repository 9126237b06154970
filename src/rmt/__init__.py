"""rmt: the RMT vision backbone (Retentive Networks Meet Vision Transformers) as timm models.

``import rmt`` registers ``rmt_tiny``, ``rmt_small``, ``rmt_base`` and ``rmt_large`` with timm, the
token-label models ``rmt_small.tl_in1k``, ``rmt_base.tl_in1k``, ``rmt_large.tl_in1k`` (RMT-S*/B*/L*)
and the plug-in models ``rmt_deit_small``, ``rmt_swin_tiny``. The fast path's switches are in
:mod:`rmt.config` (``rmt.set_fast_path(...)``, ``with rmt.fast_path_switches(...):``).
"""
from .model import MODEL_ARGS, RMT, MaSA, RMTBlock, RMTStage
from .token_label import TokenLabelRMT
from .checkpoint import CheckpointError, convert, load_into
from . import config
from .config import fast_path_switches, set_fast_path
from . import plugin_models  # noqa: F401,E402  (registers rmt_deit_small and rmt_swin_tiny)

__version__ = "0.1.0"
VARIANTS = tuple(MODEL_ARGS)

__all__ = ["RMT", "TokenLabelRMT", "MaSA", "RMTBlock", "RMTStage", "MODEL_ARGS", "VARIANTS", "CheckpointError",
           "convert", "load_into", "config", "set_fast_path", "fast_path_switches", "__version__"]
