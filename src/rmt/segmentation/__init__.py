"""Semantic segmentation with RMT backbones: Semantic FPN and UperNet (segmentation_models_pytorch
heads), ADE20K-layout data, training, mIoU evaluation and prediction. See ``rmt segment --help``."""
from .models import HEADS, Segmenter, build_segmenter, load_backbone

__all__ = ["HEADS", "Segmenter", "build_segmenter", "load_backbone"]
