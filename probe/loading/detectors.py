"""Detectors as their users have them: an Ultralytics checkpoint (`--model yolo:PATH`) loaded as
Ultralytics loads it, and torchvision's detection models by name with their weights from
`--checkpoint`; and what each needs of its images (`detector_input`), which
`probe.loading.detection_images` prepares them by. Which names are detectors:
`probe.loading.detector_names`.

Ultralytics is imported only when a `yolo:` model is loaded: probe runs without it otherwise.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision.models.detection import fcos, generalized_rcnn, retinanet, ssd

from probe.errors import ProbeError, unknown_name
from probe.imports import import_leaving_state
from probe.loading.checkpoints import _find_state_dict, _one_line, _read_checkpoint, load_checkpoint
from probe.loading.detector_names import TORCHVISION_DETECTORS, YOLO_PREFIX, is_detector, is_yolo

__all__ = ["TORCHVISION_DETECTORS", "YOLO_PREFIX", "DetectorInput", "build_torchvision_detector", "detector_input",
           "is_detector", "is_yolo", "load_yolo"]

# What the Ultralytics extra installs (README: "Install").
_INSTALL_YOLO = 'pip install -e ".[yolo]" (or pip install ultralytics)'
# Ultralytics' defaults where a checkpoint records none (ultralytics/cfg/default.yaml: imgsz; a model without
# a stride gets 32 in its loader).
_ULTRALYTICS_IMAGE_SIZE = 640
_ULTRALYTICS_STRIDE = 32


@dataclass(frozen=True)
class DetectorInput:
    """What a detector needs of its images, as its own predictor prepares them.

    family: "ultralytics" (letterboxed to `image_size`, grey 114 padding to a multiple of
        `stride`, pixels in [0, 1]), "torchvision" (pixels in [0, 1] at the image's own size: the
        model's transform resizes and normalizes) or "other" (a model of your own: as torchvision).
    image_size: the side Ultralytics letterboxes to, from the checkpoint's training arguments
        (`imgsz`); None for the others (their images keep their own size).
    stride: the model's largest stride (Ultralytics pads to a multiple of it); 1 for the others.
    num_classes: the classes the model detects (None where unknown).
    class_names: their names, in class order, where the model has them (Ultralytics' `names`).
    labels_are_category_ids: class i is COCO category id i (torchvision's COCO detectors, 91
        classes with gaps), not the i-th category.
    """

    family: str
    image_size: int | None = None
    stride: int = 1
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    labels_are_category_ids: bool = False


def detector_input(model: nn.Module) -> DetectorInput:
    """What `model`'s predictor does to an image before the model sees it (see `DetectorInput`)."""
    if _is_ultralytics(model):
        stride = getattr(model, "stride", None)
        stride = int(stride.max()) if isinstance(stride, torch.Tensor) else int(stride or _ULTRALYTICS_STRIDE)
        args = getattr(model, "args", None)
        size = args.get("imgsz") if isinstance(args, dict) else getattr(args, "imgsz", None)
        size = size or _ULTRALYTICS_IMAGE_SIZE
        if isinstance(size, (list, tuple)):  # [h, w]: probe letterboxes to a square, of the larger side
            size = max(size)
        names = getattr(model, "names", None)
        names = tuple(str(names[i]) for i in sorted(names)) if isinstance(names, dict) else (
            tuple(map(str, names)) if isinstance(names, (list, tuple)) else None)
        yaml = getattr(model, "yaml", None)
        classes = (len(names) if names else None) or (yaml.get("nc") if isinstance(yaml, dict) else None)
        return DetectorInput("ultralytics", int(size), stride, int(classes) if classes else None, names)
    if _is_torchvision_detector(model):
        return DetectorInput("torchvision", num_classes=_torchvision_classes(model), labels_are_category_ids=True)
    return DetectorInput("other")


def _is_ultralytics(model: nn.Module) -> bool:
    """An Ultralytics model (DetectionModel, SegmentationModel, PoseModel, ...), told by its class's
    package without importing Ultralytics."""
    return any(cls.__module__.split(".")[0] == "ultralytics" for cls in type(model).__mro__)


# --- Ultralytics ----------------------------------------------------------------------------------


def load_yolo(spec: str) -> nn.Module:
    """The model of an Ultralytics checkpoint `yolo:PATH`, as Ultralytics' own loader gives it
    (`ultralytics.nn.tasks.load_checkpoint`, `attempt_load_one_weight` in older versions): the
    checkpoint's "ema" entry, else its "model" entry, in float32 on the CPU, in eval mode, not
    fused, with the training arguments (`model.args`) attached. The file is unpickled as
    Ultralytics unpickles it: load only checkpoints you trust, as with Ultralytics itself."""
    path = Path(spec[len(YOLO_PREFIX):]).expanduser()
    if not spec[len(YOLO_PREFIX):]:
        raise ProbeError("--model yolo: names no file; give the checkpoint, e.g. "
                         "--model yolo:runs/detect/train/weights/best.pt.")
    # Ultralytics downloads a file it cannot find (a bare "yolov8n.pt"): refuse before it tries.
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise ProbeError(f"--model {spec}: {str(path)!r} {what}; give the path of an Ultralytics checkpoint (.pt), "
                         "e.g. yolo:runs/detect/train/weights/best.pt.")
    if path.suffix != ".pt":
        suffix = repr(path.suffix) if path.suffix else "a file without a suffix"
        raise ProbeError(f"--model {spec}: Ultralytics loads PyTorch checkpoints named *.pt, not {suffix}; give the .pt "
                         "file it saved (exported formats hold no trainable model).")
    try:
        tasks = import_leaving_state("ultralytics.nn.tasks")
    except ImportError as error:
        raise ProbeError(f"--model {spec} needs Ultralytics, which is not installed: {_INSTALL_YOLO}.") from error
    load = getattr(tasks, "load_checkpoint", None) or tasks.attempt_load_one_weight
    try:
        model, _ = load(str(path), device="cpu", inplace=True, fuse=False)
    except ProbeError:
        raise
    except Exception as error:  # Ultralytics' own texts (corrupt file, a YOLOv5-repo model, ...): one line
        raise ProbeError(f"--model {spec}: Ultralytics could not load it ({type(error).__name__}: "
                         f"{_one_line(error).strip()}).") from error
    if not isinstance(model, nn.Module):
        raise ProbeError(f"--model {spec}: Ultralytics' loader gave a {type(model).__name__}, not a torch model.")
    return model.float().eval()


# --- torchvision --------------------------------------------------------------------------------


def _is_torchvision_detector(model: nn.Module) -> bool:
    return isinstance(model, (generalized_rcnn.GeneralizedRCNN, retinanet.RetinaNet, fcos.FCOS, ssd.SSD))


def build_torchvision_detector(name: str, *, checkpoint: str | None = None, weights: str | None = None,
                               allow_pickle: bool = False) -> nn.Module:
    """torchvision's detection model `name` in eval mode: its weights from `checkpoint` (read by
    `probe.loading.checkpoints.load_checkpoint`, any form it takes), built with as many classes as
    the checkpoint's classifier has (torchvision's default, 91 COCO ids, else); or torchvision's
    `weights` (e.g. "DEFAULT", downloaded); or untrained (neither: for listing blocks). Nothing is
    downloaded without `weights`: the backbone is built without its ImageNet weights too."""
    if name not in TORCHVISION_DETECTORS:
        raise unknown_name("detection model", name, TORCHVISION_DETECTORS)
    if weights is not None:
        try:
            enum = torchvision.models.get_model_weights(name)
            chosen = torchvision.models.get_weight(weights) if "." in weights else enum[weights]
        except (KeyError, ValueError) as error:
            known = [str(w) for w in torchvision.models.get_model_weights(name)] + ["DEFAULT"]
            raise ProbeError(f"unknown weights {weights!r} for {name!r}. Known: {', '.join(known)}.") from error
        try:
            return torchvision.models.get_model(name, weights=chosen).eval()
        except (OSError, RuntimeError) as error:  # no network, a corrupt download
            raise ProbeError(f"could not load weights {weights!r} for {name!r}: {_one_line(error)}") from error
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    if checkpoint is None:
        return model.eval()
    classes = _checkpoint_classes(model, Path(checkpoint), allow_pickle=allow_pickle)
    if classes is not None and classes != _torchvision_classes(model):
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=classes)
    load_checkpoint(model, checkpoint, allow_pickle=allow_pickle)
    return model.eval()


# The classifier whose rows are (anchors x) classes, per family; the first one the model has is read.
_CLASSIFIER_KEYS = ("roi_heads.box_predictor.cls_score.weight", "head.classification_head.cls_logits.weight",
                    "head.classification_head.module_list.0.weight", "head.classification_head.module_list.0.1.weight")


def _torchvision_classes(model: nn.Module) -> int | None:
    """The classes a torchvision detector outputs (with its background class where it has one)."""
    roi_heads = getattr(model, "roi_heads", None)
    if roi_heads is not None:
        return roi_heads.box_predictor.cls_score.out_features
    head = getattr(getattr(model, "head", None), "classification_head", None)
    count = getattr(head, "num_classes", None) or getattr(head, "num_columns", None)
    return int(count) if count else None


def _checkpoint_classes(model: nn.Module, path: Path, *, allow_pickle: bool) -> int | None:
    """How many classes the checkpoint's classifier has, from its rows against the model's own
    (the rows are anchors x classes); None where the model has no known classifier (the
    checkpoint must then fit as it is)."""
    state, _ = _find_state_dict(_read_checkpoint(path, allow_pickle=allow_pickle), path)
    own = model.state_dict()
    key = next((k for k in _CLASSIFIER_KEYS if k in own), None)
    default = _torchvision_classes(model)
    if key is None or default is None:
        return None
    found = next((v for k, v in state.items() if k == key or k.endswith("." + key)), None)
    if not isinstance(found, torch.Tensor) or found.dim() == 0:
        return None  # load_checkpoint names what is missing
    rows, own_rows = found.shape[0], own[key].shape[0]
    if own_rows % default:
        return None
    anchors = own_rows // default
    return rows // anchors if rows % anchors == 0 else None  # else load_checkpoint names the misfit
