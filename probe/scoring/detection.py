"""The detection task: which of the reference's detections a detector still makes with blocks deleted.

A detector's outputs are decoded per family into detections per image (boxes `xyxy` in input
pixels, scores, integer labels), with that family's own non-maximum suppression and defaults:

- Ultralytics YOLO (v3u, v5u, v8, v9, 11, ...; detection, segmentation and pose heads): a tensor
  `(batch, 4 + classes [+ mask coefficients / keypoints], anchors)` of `xywh` boxes and class
  scores, alone or first in a tuple (the eval output `(predictions, raw)`; segmentation's
  `((predictions, protos), raw)`); `ultralytics.utils.nms.non_max_suppression` with confidence
  0.25, IoU 0.7, at most 300. The number of classes is read from the raw head outputs beside the
  predictions (`raw["scores"]`); a bare tensor with extra channels needs `classes=`.
  End-to-end heads (YOLOv10, YOLO26) give `(batch, detections, 6 [+ extra])` of `xyxy`, score,
  class: kept above the confidence, at most 300.
- YOLOv5-style `(batch, anchors, 5 + classes)`: `xywh`, objectness, class probabilities;
  confidence = objectness x class probability, class-wise NMS (confidence 0.25, IoU 0.45, 300).
- torchvision detectors (Faster R-CNN, RetinaNet, FCOS, SSD, Mask/Keypoint R-CNN): the list of
  dicts with `boxes`, `scores`, `labels` as the model gives them (its own thresholds and NMS
  already applied); `conf`, `iou` and `max_detections`, when given, filter them further.

The reference is the ground truth when the batch's targets are a list of dicts per image with
`boxes` (`xyxy`, input pixels) and `labels`; else the intact model's detections. Per image the
detections are matched one to one with the reference, highest confidence first, each to the
unmatched reference box of its class with the highest IoU >= `match_iou`. Per image: loss = the
reference's count - matched, weight = the reference's count, correct = matched; so the outcome's
accuracy is the share of the reference's detections kept (a ratio of sums over images) and its
`loss_increase_se` the paired per-image standard error of the share lost. mAP@0.5 and
mAP@0.5:0.95 against the same reference come from torchmetrics' `MeanAveragePrecision`
(pycocotools), over the whole data set (`Detection.summarize`).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping

import numpy as np
import torch
from torchvision.ops import batched_nms, box_iou

from probe.batches import Batch
from probe.errors import ProbeError
from probe.imports import import_leaving_state
from probe.scoring.scores import Scores, Task, _per_sample, output_tensors

__all__ = ["Detection", "matched_count"]

# Each family's own defaults: (confidence, NMS IoU, most detections per image).
_ULTRALYTICS = (0.25, 0.7, 300)
# Below this share of the ground truth's boxes found by the intact model, no block verdict (`Detection.no_verdict`).
MIN_RECALL = 0.1
_YOLOV5 = (0.25, 0.45, 300)
_FORMS = ("Ultralytics YOLO predictions (batch, 4 + classes [+ extra], anchors) alone or first in a tuple, "
          "end-to-end ones (batch, detections, 6 [+ extra]), YOLOv5-style (batch, anchors, 5 + classes), or "
          "torchvision's list of dicts with 'boxes', 'scores' and 'labels' per image")

Detections = dict[str, torch.Tensor]


class Detection(Task):
    """Detections kept, detections made, mAP and drift, against the intact model's detections or
    the ground truth (see the module docstring).

    conf, iou, max_detections: confidence threshold, NMS IoU and most detections per image; None:
    the family's own defaults (Ultralytics 0.25, 0.7, 300; YOLOv5 0.25, 0.45, 300; torchvision's
    own, inside the model). match_iou: the IoU a detection needs with a reference box of its class
    to match it. classes: how many classes a bare Ultralytics or YOLOv5 tensor holds, when it
    carries channels beyond them (mask coefficients, keypoints) and no raw head outputs to read
    the number from; None: every channel after the boxes (and objectness) is a class.
    """

    name = "detection"
    cost = "detections_lost"
    needs_reference = True
    needs_targets = False
    units = "detections"

    def __init__(self, conf: float | None = None, iou: float | None = None, max_detections: int | None = None,
                 match_iou: float = 0.5, *, classes: int | None = None) -> None:
        for label, value in (("conf", conf), ("iou", iou)):
            if value is not None and not (isinstance(value, (int, float)) and 0 <= value <= 1):
                raise ProbeError(f"Detection: {label}={value!r} must be a number in [0, 1] (or None: the model "
                                 f"family's default), e.g. {0.25 if label == 'conf' else 0.7}.")
        if not (isinstance(match_iou, (int, float)) and 0 < match_iou <= 1):
            raise ProbeError(f"Detection: match_iou={match_iou!r} must be a number in (0, 1], e.g. 0.5.")
        for label, value in (("max_detections", max_detections), ("classes", classes)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ProbeError(f"Detection: {label}={value!r} must be a whole number >= 1 (or None).")
        self.conf, self.iou, self.max_detections, self.match_iou = conf, iou, max_detections, float(match_iou)
        self.classes = classes
        # The intact model's outputs last decoded, and their detections (on the device, and on the
        # CPU for mAP): every deleted set of a batch is compared with the same ones.
        self._intact: tuple[object, list[Detections], list[Detections]] | None = None

    # -- decoding --------------------------------------------------------------------------------

    def detections(self, outputs: object) -> list[Detections]:
        """The detections of each image in `outputs`: dicts with "boxes" `(n, 4)` xyxy float32 in
        input pixels, "scores" `(n,)` and "labels" `(n,)` int64, highest score first."""
        if _is_torchvision(outputs):
            return [self._filtered(image) for image in outputs]
        prediction, raw = _prediction_tensor(outputs)
        if prediction is None:
            raise ProbeError(f"the detection task cannot read the model's outputs, {_describe(outputs)}; it reads "
                             f"{_FORMS}.")
        prediction = prediction.detach().float()
        scores = _raw_scores(raw)
        if _raw_has(raw, "angle"):
            raise ProbeError("the detection task reads axis-aligned boxes; the model is an Ultralytics OBB model "
                             "(oriented boxes, with an angle per box). Use task='drift' for it.")
        if scores is not None:  # Ultralytics' eval output: the raw head says how many classes and anchors
            classes, anchors = scores.shape[1], scores.shape[-1]
            if self.classes is not None and self.classes != classes:
                raise ProbeError(f"Detection(classes={self.classes}), but the model's head outputs {classes} classes; "
                                 "leave classes out for an Ultralytics model.")
            if prediction.shape[-1] != anchors:
                return self._end_to_end(prediction)
            return self._ultralytics(prediction, classes)
        if prediction.shape[-1] == 6 and _whole_numbers(prediction[..., 5]):
            return self._end_to_end(prediction)
        if prediction.shape[1] < prediction.shape[2]:
            return self._ultralytics(prediction, self._classes(prediction.shape[1] - 4, prediction, "4 box"))
        return self._yolov5(prediction, self._classes(prediction.shape[2] - 5, prediction, "4 box and 1 objectness"))

    def _classes(self, available: int, prediction: torch.Tensor, before: str) -> int:
        classes = self.classes if self.classes is not None else available
        if classes < 1 or classes > available:
            raise ProbeError(f"the detection task read the model's predictions of shape {tuple(prediction.shape)} as "
                             f"{before} box channels and {available} more, which cannot hold "
                             f"{'classes=' + str(self.classes) if self.classes else 'a class'}; it reads {_FORMS}.")
        return classes

    def _settings(self, defaults: tuple[float, float, int]) -> tuple[float, float, int]:
        conf, iou, most = defaults
        return (conf if self.conf is None else float(self.conf), iou if self.iou is None else float(self.iou),
                most if self.max_detections is None else self.max_detections)

    def _ultralytics(self, prediction: torch.Tensor, classes: int) -> list[Detections]:
        conf, iou, most = self._settings(_ULTRALYTICS)
        nms = _ultralytics_nms()
        if nms is None:  # the same rule, without Ultralytics installed
            return [_nms(_xywh_to_xyxy(p[:4].T), p[4:4 + classes].T, conf, iou, most) for p in prediction]
        # No time limit: Ultralytics stops a slow NMS part-way (2 s + 0.05 s per image), which
        # would silently drop detections on a slow CPU.
        found = nms(prediction, conf_thres=conf, iou_thres=iou, max_det=most, nc=classes, max_time_img=math.inf)
        return [_as_detections(rows) for rows in found]

    def _end_to_end(self, prediction: torch.Tensor) -> list[Detections]:
        conf, _, most = self._settings(_ULTRALYTICS)
        found = []
        for rows in prediction:
            rows = rows[rows[:, 4] > conf][:most]
            found.append(_sorted(_as_detections(rows)))
        return found

    def _yolov5(self, prediction: torch.Tensor, classes: int) -> list[Detections]:
        conf, iou, most = self._settings(_YOLOV5)
        found = []
        for rows in prediction:
            rows = rows[rows[:, 4] > conf]  # objectness first, as YOLOv5 does
            found.append(_nms(_xywh_to_xyxy(rows[:, :4]), rows[:, 5:5 + classes] * rows[:, 4:5], conf, iou, most))
        return found

    def _filtered(self, image: Mapping) -> Detections:
        boxes, scores = image["boxes"].detach().float(), image["scores"].detach().float()
        labels = image["labels"].detach().long()
        if self.conf is not None:
            keep = scores > self.conf
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        if self.iou is not None:
            keep = batched_nms(boxes, scores, labels, self.iou)
            boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        found = _sorted({"boxes": boxes, "scores": scores, "labels": labels})
        if self.max_detections is not None:
            found = {key: value[:self.max_detections] for key, value in found.items()}
        return found

    # -- scoring ---------------------------------------------------------------------------------

    def score(self, outputs: object, batch: Batch, reference: object | None = None) -> Scores:
        truth = _ground_truth(batch)
        if reference is None:  # the intact model itself
            found, found_cpu = self._intact_detections(outputs)
        else:
            found = self.detections(outputs)
            found_cpu = [_cpu(image) for image in found]
        if len(found) != batch.size:
            raise ProbeError(f"the detection task read detections for {len(found)} images from the model's outputs "
                             f"on a batch of {batch.size}; it reads {_FORMS}.")
        if truth is not None:
            targets = targets_cpu = truth
            matched = [matched_count(image, target, self.match_iou) for image, target in zip(found_cpu, truth)]
        else:
            targets, targets_cpu = self._intact_detections(outputs if reference is None else reference)
            matched = ([len(image["boxes"]) for image in found] if reference is None else  # each matches itself
                       [matched_count(image, target, self.match_iou) for image, target in zip(found_cpu, targets_cpu)])
        device = _device_of(batch)
        counts = torch.tensor([len(target["boxes"]) for target in targets], dtype=torch.float64, device=device)
        kept = torch.tensor(matched, dtype=torch.float64, device=device)
        made = torch.tensor([len(image["boxes"]) for image in found], dtype=torch.float64, device=device)
        drift = (torch.zeros(batch.size, dtype=torch.float64, device=device) if reference is None
                 else _drift(outputs, reference, batch.size).to(device))
        return Scores(loss=counts - kept, weight=counts, correct=kept, extra={"detections": made, "drift": drift},
                      details={"preds": found_cpu, "targets": targets_cpu, "truth": truth is not None})

    def _intact_detections(self, outputs: object) -> tuple[list[Detections], list[Detections]]:
        if self._intact is None or self._intact[0] is not outputs:
            found = self.detections(outputs)
            self._intact = (outputs, found, [_cpu(image) for image in found])
        return self._intact[1], self._intact[2]

    def summarize(self, details: list) -> dict[str, float]:
        """mAP@0.5 and mAP@0.5:0.95 of one row over the whole data (torchmetrics'
        `MeanAveragePrecision`, COCO's rule, every detection counted); ProbeError when the
        reference holds no box at all."""
        self._intact = None  # scoring is over: let go of the last batch's outputs
        preds = [image for part in details for image in part["preds"]]
        targets = [image for part in details for image in part["targets"]]
        if not any(len(target["boxes"]) for target in targets):
            truth = any(part["truth"] for part in details)
            raise ProbeError(
                f"the detection task has nothing to compare with: the ground truth holds no box in the "
                f"{len(targets)} images" if truth else
                f"the detection task has nothing to compare with: the intact model made no detection on the "
                f"{len(targets)} images at {self.describe_settings()}; lower conf (--conf), or check the images' "
                "size, scaling and channels.")
        return mean_average_precision(preds, targets)

    # -- tables ----------------------------------------------------------------------------------

    def metrics(self, outcome) -> dict:
        return {"detections_kept": outcome.accuracy, "detections": outcome.extra.get("detections"),
                "reference_detections": outcome.units, "map50": outcome.extra.get("map50"),
                "map50_95": outcome.extra.get("map50_95"), "samples": outcome.samples}

    def row(self, baseline, outcome) -> dict:
        extra = outcome.extra
        return {"detections_kept": outcome.accuracy,
                # the share of the reference's detections lost beyond the intact model's own misses
                # (against the intact model, which misses none: 1 - detections_kept)
                "detections_lost": outcome.loss - baseline.loss, "detections_lost_se": outcome.loss_increase_se,
                "detections": extra.get("detections"), "map50": extra.get("map50"),
                "map50_95": extra.get("map50_95"),
                "map50_drop": baseline.extra.get("map50", math.nan) - extra.get("map50", math.nan),
                "drift": extra.get("drift")}

    def no_verdict(self, baseline) -> str | None:
        """Why no block verdict can be drawn: the intact model finds less than `MIN_RECALL` of
        the ground truth's boxes. A deletion then loses at most that share, so every block would
        look harmless ("skipped") whatever it does in the trained detector the verdicts would
        describe. Against the intact model's own detections (no ground truth) it keeps them all."""
        kept = baseline.accuracy
        if kept is None or not kept < MIN_RECALL:
            return None
        return (f"the intact model finds only {kept:.1%} of the ground truth's {baseline.units} boxes (IoU >= "
                f"{self.match_iou:g}, same class, at {self.describe_settings()}), under {MIN_RECALL:.0%}: a deletion can "
                "lose at most that share, so no block verdict can be drawn; check the checkpoint, the image size and "
                "the class order the model expects, or score against the model's own detections (images without "
                "labels).")

    def describe_settings(self) -> str:
        given = [f"{label} {value:g}" for label, value in (("conf", self.conf), ("NMS IoU", self.iou),
                                                           ("max detections", self.max_detections))
                 if value is not None]
        return ", ".join(given) if given else "the model family's default thresholds"

    def describe(self) -> str:
        return f"detection ({self.describe_settings()}; match IoU {self.match_iou:g})"


def matched_count(found: Detections, reference: Detections, match_iou: float = 0.5) -> int:
    """How many of `reference`'s boxes `found` matches one to one: its detections in descending
    score (ties in order), each to the unmatched reference box of its label with the highest IoU
    >= `match_iou` (ties: the first; an identical box has IoU 1, also one of no area)."""
    n, m = len(found["boxes"]), len(reference["boxes"])
    if n == 0 or m == 0:
        return 0
    boxes, reference_boxes = found["boxes"].double(), reference["boxes"].double()
    iou = box_iou(boxes, reference_boxes)
    # A box identical to a reference box matches it, also one of no area (IoU 0 / 0)
    iou = torch.where((boxes[:, None] == reference_boxes[None]).all(dim=-1), 1.0, iou).numpy()
    same = (found["labels"].reshape(-1, 1) == reference["labels"].reshape(1, -1)).numpy()
    iou = np.where(same & ~np.isnan(iou), iou, -1.0)
    free = np.ones(m, dtype=bool)
    count = 0
    for i in np.argsort(-found["scores"].double().numpy(), kind="stable"):
        row = np.where(free, iou[i], -1.0)
        j = int(row.argmax())
        if row[j] >= match_iou:
            free[j] = False
            count += 1
    return count


def mean_average_precision(preds: list[Detections], targets: list[Detections]) -> dict[str, float]:
    """{"map50", "map50_95"} of `preds` against `targets` (per image; CPU tensors), from
    torchmetrics on pycocotools, every detection counted (no cap of 100 per image); NaN where
    undefined (no reference box)."""
    try:
        from torchmetrics.detection import MeanAveragePrecision
        # COCO's cap of 100 detections per image is lifted: every detection counts.
        most = max([100, *(len(image["boxes"]) for image in preds)])
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", max_detection_thresholds=[1, 10, most],
                                      backend="pycocotools", extended_summary=True)
    except (ImportError, ModuleNotFoundError) as error:
        raise ProbeError(f"the detection task's mAP needs torchmetrics and pycocotools ({error}): pip install "
                         "'probe[detection]' (or pip install torchmetrics pycocotools).") from error
    metric.warn_on_many_detections = False
    metric.update([{"boxes": p["boxes"], "scores": p["scores"], "labels": p["labels"]} for p in preds],
                  [{"boxes": t["boxes"], "labels": t["labels"]} for t in targets])
    result = metric.compute()
    map50 = float(result["map_50"])
    # mAP@0.5:0.95 as COCO averages it, over the precision at every IoU threshold, recall point
    # and class (-1: undefined), all areas, the last detection cap: pycocotools' own summary of it
    # reads the cap of 100 whatever the caps are, and has none for a cap of `most`.
    precision = result["precision"][..., 0, -1]
    defined = precision[precision > -1]
    return {"map50": map50 if map50 >= 0 else math.nan,  # torchmetrics' -1: undefined
            "map50_95": float(defined.double().mean()) if defined.numel() else math.nan}


# -- the forms outputs come in ---------------------------------------------------------------------


def _is_torchvision(outputs: object) -> bool:
    return (isinstance(outputs, (list, tuple)) and bool(outputs)
            and all(isinstance(image, Mapping) and {"boxes", "scores", "labels"} <= set(image) for image in outputs))


def _prediction_tensor(outputs: object) -> tuple[torch.Tensor | None, Mapping | None]:
    """The `(batch, ., .)` predictions and the raw head outputs beside them (None when absent)."""
    first, raw = outputs, None
    if isinstance(outputs, (tuple, list)) and outputs:
        first = outputs[0]
        raw = outputs[1] if len(outputs) > 1 and isinstance(outputs[1], Mapping) else None
        if isinstance(first, (tuple, list)) and first:  # segmentation: (predictions, mask prototypes)
            first = first[0]
    if isinstance(first, torch.Tensor) and first.dim() == 3 and max(first.shape[1:]) >= 5:
        return first, raw
    return None, None


def _raw_scores(raw: Mapping | None) -> torch.Tensor | None:
    """Ultralytics' raw class scores `(batch, classes, anchors)`, of the head that made the predictions."""
    if raw is None:
        return None
    for head in (raw, raw.get("one2one"), raw.get("one2many")):
        if isinstance(head, Mapping) and isinstance(head.get("scores"), torch.Tensor) and head["scores"].dim() == 3:
            return head["scores"]
    return None


def _raw_has(raw: Mapping | None, key: str) -> bool:
    return raw is not None and any(isinstance(head, Mapping) and key in head
                                   for head in (raw, raw.get("one2one"), raw.get("one2many")))


def _whole_numbers(values: torch.Tensor) -> bool:
    return bool(((values >= 0) & (values == values.round())).all())


def _describe(outputs: object, depth: int = 0) -> str:
    if isinstance(outputs, torch.Tensor):
        return f"a tensor {tuple(outputs.shape)}"
    if depth < 2 and isinstance(outputs, (tuple, list)):
        items = ", ".join(_describe(item, depth + 1) for item in outputs[:3]) + (", ..." if len(outputs) > 3 else "")
        return f"a {type(outputs).__name__} of {len(outputs)} [{items}]"
    if isinstance(outputs, Mapping):
        return f"a dict with keys {list(outputs)[:6]}"
    return f"a {type(outputs).__name__}"


_nms_function: object = None


def _ultralytics_nms():
    """Ultralytics' own `non_max_suppression` (None when Ultralytics is not installed)."""
    global _nms_function
    if _nms_function is None:
        non_max_suppression = False
        for module in ("ultralytics.utils.nms", "ultralytics.utils.ops"):  # where 8.3+ keeps it, and before
            with contextlib.suppress(ImportError):
                non_max_suppression = getattr(import_leaving_state(module), "non_max_suppression")
                break
        _nms_function = non_max_suppression
    return _nms_function or None


def _xywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    centre, half = boxes[:, :2], boxes[:, 2:4] / 2
    return torch.cat([centre - half, centre + half], dim=1)


def _nms(boxes: torch.Tensor, class_scores: torch.Tensor, conf: float, iou: float, most: int) -> Detections:
    """Best class per box above `conf`, class-wise NMS at `iou`, the `most` highest kept."""
    scores, labels = class_scores.max(dim=1)
    keep = scores > conf
    boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
    kept = batched_nms(boxes, scores, labels, iou)[:most]  # highest score first
    return {"boxes": boxes[kept].float(), "scores": scores[kept].float(), "labels": labels[kept].long()}


def _as_detections(rows: torch.Tensor) -> Detections:
    return {"boxes": rows[:, :4].float(), "scores": rows[:, 4].float(), "labels": rows[:, 5].long()}


def _sorted(found: Detections) -> Detections:
    order = torch.argsort(found["scores"], descending=True, stable=True)
    return {key: value[order] for key, value in found.items()}


def _cpu(found: Detections) -> Detections:
    return {key: value.detach().cpu() for key, value in found.items()}


def _device_of(batch: Batch) -> torch.device:
    inputs = batch.inputs
    leaves = [inputs] if isinstance(inputs, torch.Tensor) else list(
        inputs.values() if isinstance(inputs, Mapping) else inputs)
    return next((leaf.device for leaf in leaves if isinstance(leaf, torch.Tensor)), torch.device("cpu"))


# -- the reference ---------------------------------------------------------------------------------


def _ground_truth(batch: Batch) -> list[Detections] | None:
    """The batch's ground truth (CPU), when its targets are a list of dicts per image; else None."""
    targets = batch.targets
    if not isinstance(targets, (list, tuple)):
        return None
    if len(targets) != batch.size or not all(isinstance(t, Mapping) and {"boxes", "labels"} <= set(t)
                                             for t in targets):
        found = type(targets[0]).__name__ if targets else "nothing"
        raise ProbeError(f"batch {batch.number}'s targets are a {type(targets).__name__} of {len(targets)} ({found}) "
                         f"for {batch.size} images; the detection task's ground truth is one dict per image with "
                         "'boxes' (n, 4) xyxy in input pixels and 'labels' (n,).")
    truth = []
    for target in targets:
        boxes = torch.as_tensor(target["boxes"], dtype=torch.float32).detach().cpu().reshape(-1, 4)
        labels = torch.as_tensor(target["labels"]).detach().cpu().long().reshape(-1)
        if len(labels) != len(boxes):
            raise ProbeError(f"batch {batch.number} has a ground-truth image with {len(boxes)} boxes and "
                             f"{len(labels)} labels; give one label per box.")
        truth.append({"boxes": boxes, "labels": labels})
    return truth


def _drift(outputs: object, reference: object, size: int) -> torch.Tensor:
    """Per image, ||out - ref|| / ||ref|| over every output tensor, as the drift task has it; NaN
    where the outputs hold no tensors of fixed shapes per image (torchvision's detections)."""
    current, before = output_tensors(outputs), output_tensors(reference)
    if _is_torchvision(outputs) or len(current) != len(before) or any(
            a.shape != b.shape or a.dim() == 0 or len(a) != size for a, b in zip(current, before)):
        return torch.full((size,), math.nan, dtype=torch.float64)
    difference = sum(_per_sample((a.double() - b.double()).square()) for a, b in zip(current, before))
    magnitude = sum(_per_sample(b.double().square()) for b in before)
    return difference.sqrt() / magnitude.sqrt().clamp_min(torch.finfo(torch.float64).tiny)
