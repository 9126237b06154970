"""Object detection and instance segmentation with RMT backbones on torchvision's detectors.

* :func:`build_detector` - Mask R-CNN, RetinaNet or FCOS on an RMT + FPN backbone;
* :func:`build_rmt_fpn` - the backbone alone (any torchvision detector that takes ``backbone``);
* :func:`load_backbone_weights` - ImageNet or detection checkpoints, ours or released;
* :class:`CocoInstances` - COCO-format datasets; :func:`write_shapes_dataset` - the built-in one;
* :func:`load_detector` - a detector trained by ``rmt detect train``.

Requires torchvision and pycocotools (``pip install rmt[detection]``).
"""
from .backbone import RMTFeaturePyramid, build_rmt_fpn, freeze_batchnorm, load_backbone_weights
from .data import CocoInstances
from .engine import evaluate, load_detector, train
from .models import DETECTORS, build_detector
from .shapes import write_shapes_dataset

__all__ = ["RMTFeaturePyramid", "build_rmt_fpn", "freeze_batchnorm", "load_backbone_weights", "CocoInstances",
           "evaluate", "load_detector", "train", "DETECTORS", "build_detector", "write_shapes_dataset"]
