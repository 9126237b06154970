"""Object detection and instance segmentation with RMT backbones on torchvision's detectors.

* :func:`build_detector` - Mask R-CNN, Cascade Mask R-CNN, RetinaNet or FCOS on an RMT + FPN backbone;
* :class:`CascadeRoIHeads` - Cascade R-CNN heads for any torchvision two-stage detector;
* :func:`build_rmt_fpn` - the backbone alone (any torchvision detector that takes ``backbone``);
* :func:`load_backbone_weights` - ImageNet or detection checkpoints, ours or released;
* :data:`RECIPES` - the released training configurations, by name (``maskrcnn_s_1x`` ...);
* :func:`load_released_detector` - a whole released mmdetection detector, converted;
* :class:`CocoInstances` - COCO-format datasets; :func:`write_shapes_dataset` - the built-in one;
* :func:`load_detector` - a detector trained by ``rmt detect train`` (or a released one).

Requires torchvision, and pycocotools for data and metrics (``pip install rmt[detection]``).
Names are imported on first use, so model building works without pycocotools.
"""
from importlib import import_module

_EXPORTS = {
    "RMTFeaturePyramid": "backbone", "build_rmt_fpn": "backbone", "build_feature_pyramid": "backbone",
    "freeze_batchnorm": "backbone", "load_backbone_weights": "backbone",
    "CascadeRoIHeads": "cascade", "CascadeMaskRCNN": "cascade", "build_cascade_roi_heads": "cascade",
    "CocoInstances": "data",
    "evaluate": "engine", "load_detector": "engine", "train": "engine",
    "DETECTORS": "models", "build_detector": "models",
    "RECIPES": "recipes",
    "load_released_detector": "released",
    "write_shapes_dataset": "shapes",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'rmt.detection' has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
