"""Semantic segmentation with RMT backbones: Semantic FPN and UperNet (mmsegmentation's decoders as
this package's own modules, or segmentation_models_pytorch's), released segmentors loaded whole,
ADE20K-layout data, training, mIoU evaluation and prediction. See ``rmt segment --help``."""
from .models import DECODERS, HEADS, EncoderDecoder, Segmenter, build_segmenter, load_backbone
from .released import load_released, segmentor_to_released

__all__ = ["DECODERS", "HEADS", "EncoderDecoder", "Segmenter", "build_segmenter", "load_backbone",
           "load_released", "segmentor_to_released"]
