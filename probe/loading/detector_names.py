"""Which `--model` names a detector: `yolo:PATH` (an Ultralytics checkpoint) or one of torchvision's
detection models. Kept apart from `probe.loading.detectors`, which loads them, so that choosing
the default task (`probe.commands.config`) imports neither torchvision nor Ultralytics."""

from __future__ import annotations

__all__ = ["TORCHVISION_DETECTORS", "YOLO_PREFIX", "is_detector", "is_yolo"]

YOLO_PREFIX = "yolo:"
# torchvision's detection models (Faster/Mask/Keypoint R-CNN, RetinaNet, FCOS, SSD), by name
# (tests/core/loading/test_detectors.py checks them against `torchvision.models.list_models`).
TORCHVISION_DETECTORS: tuple[str, ...] = (
    "fasterrcnn_mobilenet_v3_large_320_fpn", "fasterrcnn_mobilenet_v3_large_fpn", "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2", "fcos_resnet50_fpn", "keypointrcnn_resnet50_fpn", "maskrcnn_resnet50_fpn",
    "maskrcnn_resnet50_fpn_v2", "retinanet_resnet50_fpn", "retinanet_resnet50_fpn_v2", "ssd300_vgg16",
    "ssdlite320_mobilenet_v3_large")


def is_yolo(name: str) -> bool:
    """`--model yolo:PATH`: an Ultralytics checkpoint."""
    return isinstance(name, str) and name.startswith(YOLO_PREFIX)


def is_detector(name: str) -> bool:
    """A `--model` that names a detector: `yolo:PATH` or one of torchvision's detection models."""
    return is_yolo(name) or name in TORCHVISION_DETECTORS
