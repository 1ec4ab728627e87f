"""The detection task: decoding per family, one-to-one matching, the paired standard error, mAP,
and each block's detections_kept and map50 on Ultralytics YOLO and torchvision detectors equal to
a hand loop (a copy of the model with that unit's branch removed by hand, the family's own NMS,
the matching written again here, torchmetrics for mAP)."""

from __future__ import annotations

import copy
import logging
import math
import os
from collections import OrderedDict

import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

os.environ.setdefault("YOLO_OFFLINE", "1")  # nothing may download (fonts, weights)

import probe  # noqa: E402
from probe.errors import ProbeError  # noqa: E402
from probe.scoring.cost import COSTS, DETECTIONS_LOST  # noqa: E402
from probe.scoring.detection import Detection, matched_count  # noqa: E402
from probe.scoring.tally import Tally  # noqa: E402
from probe.scoring.verdict import VerdictRule, classify, cost_column  # noqa: E402
from probe.batches import batches  # noqa: E402
from tiny_models import assert_unchanged, snapshot  # noqa: E402

MAP_THRESHOLDS = [1, 10, 1000]  # every detection counts (none of these images has more than 300)
# The fabricated detector's one block, named (its branch adds a constant: no addition discovery finds)
BLOCK = [probe.Block(name="block", module="block", branch="block.branch", shortcut=None, position=0)]


# -- the matching and mAP, written again -------------------------------------------------------------


def iou_by_hand(a: list[float], b: list[float]) -> float:
    if a == b:
        return 1.0  # also for a box of no area
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def matched_by_hand(found: dict, reference: dict, threshold: float = 0.5) -> int:
    boxes, scores, labels = found["boxes"].tolist(), found["scores"].tolist(), found["labels"].tolist()
    ref_boxes, ref_labels = reference["boxes"].tolist(), reference["labels"].tolist()
    taken = [False] * len(ref_boxes)
    count = 0
    for i in sorted(range(len(boxes)), key=lambda i: -scores[i]):  # stable: ties in order
        best, best_iou = None, -1.0
        for j, box in enumerate(ref_boxes):
            if taken[j] or ref_labels[j] != labels[i]:
                continue
            overlap = iou_by_hand(boxes[i], box)
            if overlap > best_iou:
                best, best_iou = j, overlap
        if best is not None and best_iou >= threshold:
            taken[best] = True
            count += 1
    return count


def map_by_hand(preds: list[dict], targets: list[dict]) -> tuple[float, float]:
    """(mAP@0.5 with no cap on detections per image, mAP@0.5:0.95 with COCO's cap of 100, which
    is the same where no image has more: pycocotools summarizes it at 100 only)."""
    from torchmetrics.detection import MeanAveragePrecision
    found = []
    for thresholds in (MAP_THRESHOLDS, None):
        metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", max_detection_thresholds=thresholds)
        metric.warn_on_many_detections = False
        metric.update([{k: p[k] for k in ("boxes", "scores", "labels")} for p in preds],
                      [{k: t[k] for k in ("boxes", "labels")} for t in targets])
        found.append(metric.compute())
    return float(found[0]["map_50"]), float(found[1]["map"])


def kept_and_map(found: list[dict], reference: list[dict]) -> tuple[float, float, list[int]]:
    matched = [matched_by_hand(f, r) for f, r in zip(found, reference)]
    return sum(matched) / sum(len(r["boxes"]) for r in reference), map_by_hand(found, reference)[0], matched


def paired_se_by_hand(losses: list[float], weights: list[float], base_losses: list[float]) -> float:
    """The delta-method standard error of (sum loss - sum base loss) / sum weight over samples."""
    n, units = len(losses), sum(weights)
    c = (sum(losses) - sum(base_losses)) / units
    residual = sum((l - b - c * w) ** 2 for l, b, w in zip(losses, base_losses, weights))
    return math.sqrt(residual * n / (n - 1)) / units


# -- matching, SE and mAP on fabricated detections ----------------------------------------------------


def dets(boxes, scores, labels) -> dict:
    return {"boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "scores": torch.tensor(scores, dtype=torch.float32), "labels": torch.tensor(labels, dtype=torch.int64)}


def test_matching_is_one_to_one_by_class_and_confidence():
    reference = dets([[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 10, 10]], [1, 1, 1], [0, 0, 1])
    # The 0.9 box overlaps reference 0 with IoU 0.81 and takes it; the 0.8 box (IoU 1 with it)
    # finds it taken and reference 2 of another class: unmatched. IoU 0.4 < 0.5: no match.
    found = dets([[0, 0, 10, 9], [0, 0, 10, 10], [20, 20, 30, 24]], [0.9, 0.8, 0.7], [0, 0, 0])
    assert matched_count(found, reference) == 1 == matched_by_hand(found, reference)
    assert matched_count(found, reference, 0.4) == 2 == matched_by_hand(found, reference, 0.4)
    # Highest confidence first: listed last, the 0.95 box takes reference 0 from the 0.9 one.
    found = dets([[0, 0, 10, 9], [0, 0, 10, 10]], [0.9, 0.95], [0, 1])
    assert matched_count(found, reference) == 2
    assert matched_count(dets([], [], []), reference) == 0 == matched_count(found, dets([], [], []))
    flat = dets([[5, 5, 5, 9], [5, 5, 5, 9]], [0.5, 0.5], [0, 0])  # no area: IoU 0 / 0, but identical
    assert matched_count(flat, flat) == 2


class FixedDetector(nn.Module):
    """A residual block over per-image candidate rows (x1, y1, x2, y2, score, label), and a head
    that keeps the rows of positive score as torchvision's list of dicts. The block's branch
    adds `shift` to the candidates' scores and boxes: deleting it changes what is detected."""

    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.block = ShiftBlock(shift)

    def forward(self, x: torch.Tensor) -> list[dict]:
        rows = self.block(x)
        return [{"boxes": r[r[:, 4] > 0, :4], "scores": r[r[:, 4] > 0, 4], "labels": r[r[:, 4] > 0, 5].long()}
                for r in rows]


class ShiftBlock(nn.Module):
    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.branch = Shift(shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class Shift(nn.Module):
    def __init__(self, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("shift", shift)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.shift.expand_as(x)


def fixed_detector_data() -> tuple[FixedDetector, list]:
    """3 images, one class. With the branch (intact): image 0 detects A, B' (15-25 px), C (scores
    .9 .8 .7), image 1 D, E (.9, .4), image 2 F (.5). Without it: image 0 has B at 20-30 px
    instead (IoU 1/3 with B'); image 1 loses E (score -0.1); image 2 gains G (score .1)."""
    candidates = torch.tensor([
        [[0, 0, 10, 10, .9, 0], [20, 0, 30, 10, .8, 0], [40, 0, 50, 10, .7, 0]],
        [[0, 0, 10, 10, .9, 0], [20, 0, 30, 10, -.1, 0], [0, 0, 0, 0, 0, 0]],
        [[0, 0, 10, 10, .5, 0], [60, 60, 70, 70, .1, 0], [0, 0, 0, 0, 0, 0]]])
    shift = torch.zeros_like(candidates)
    shift[0, 1, 0] = shift[0, 1, 2] = -5.0  # B' = B moved 5 px left
    shift[1, 1, 4] = 0.5                    # E: 0.4 with the branch
    shift[2, 1, 4] = -0.2                   # G: -0.1 with the branch, not detected
    return FixedDetector(shift), [(candidates,)]


def test_fixed_detector_kept_se_and_map_by_hand():
    model, data = fixed_detector_data()
    before = snapshot(model)
    table = probe.sweep(model, data, task="detection", blocks=BLOCK, progress=False)
    assert_unchanged(model, before)
    row = table.iloc[0]
    # reference counts 3, 2, 1 (6 in all); matched 2, 1, 1 -> 4 kept of 6
    assert row["detections_kept"] == 4 / 6
    assert row["detections_lost"] == pytest.approx(2 / 6, abs=1e-15)
    assert row["detections"] == pytest.approx((3 + 1 + 2) / 3)
    assert row["detections_lost_se"] == pytest.approx(paired_se_by_hand([1, 1, 0], [3, 2, 1], [0, 0, 0]), rel=1e-12)
    # mAP@0.5 by COCO's rule, one class, 6 boxes to find: by score A .9 and D .9 hit, B .8 misses,
    # C .7 and F .5 hit, G .1 misses: the precision envelope is 1 up to recall 2/6 (34 of the 101
    # recall points), 0.8 up to 4/6 (33 more), nothing beyond.
    expected = _coco_ap([(0.9, True), (0.9, True), (0.8, False), (0.7, True), (0.5, True), (0.1, False)], 6)
    assert expected == pytest.approx((34 + 0.8 * 33) / 101)
    assert row["map50"] == pytest.approx(expected, rel=1e-6)  # torchmetrics answers in float32
    assert row["map50_95"] == pytest.approx(map_by_hand(*_fixed_detector_map_inputs())[1], rel=1e-6)
    assert row["map50_drop"] == pytest.approx(1.0 - expected, rel=1e-6)
    assert math.isnan(row["drift"])  # torchvision's detections: no tensor of one shape per image
    assert table.attrs["baseline"] == {"detections_kept": 1.0, "detections": 2.0, "reference_detections": 6,
                                       "map50": 1.0, "map50_95": 1.0, "samples": 3}


def _fixed_detector_map_inputs() -> tuple[list[dict], list[dict]]:
    """The fixed detector's detections without its branch, and with it (the reference)."""
    model, data = fixed_detector_data()
    (candidates,) = data[0]
    with torch.no_grad():
        reference = model(candidates)
        model.block.branch.shift.zero_()
        return model(candidates), reference


def _coco_ap(ranked: list[tuple[float, bool]], positives: int) -> float:
    """COCO's 101-point interpolated AP of detections ranked by score (stable)."""
    ranked = sorted(ranked, key=lambda item: -item[0])
    tp = fp = 0
    recall, precision = [], []
    for _, hit in ranked:
        tp, fp = tp + hit, fp + (not hit)
        recall.append(tp / positives)
        precision.append(tp / (tp + fp))
    for i in range(len(precision) - 2, -1, -1):  # the precision envelope
        precision[i] = max(precision[i], precision[i + 1])
    total = 0.0
    for point in [i / 100 for i in range(101)]:
        reached = [p for r, p in zip(recall, precision) if r >= point]
        total += reached[0] if reached else 0.0
    return total / 101


def test_ground_truth_is_the_reference_and_the_se_is_paired():
    model, data = fixed_detector_data()
    (candidates,) = data[0]
    truth = [{"boxes": torch.tensor([[0., 0, 10, 10], [20, 0, 30, 10], [80, 80, 90, 90]]), "labels": torch.tensor([0, 0, 0])},
             {"boxes": torch.tensor([[0., 0, 10, 10]]), "labels": torch.tensor([1])},
             {"boxes": torch.tensor([[60., 60, 70, 70]]), "labels": torch.tensor([0])}]
    table = probe.sweep(model, [(candidates, truth)], task="detection", blocks=BLOCK, progress=False)
    row = table.iloc[0]
    # intact: image 0 matches A (B' has IoU 1/3 with the true B), image 1 none (D is of class 0),
    # image 2 none -> 1 of 5; deleted: image 0 A and B, image 1 none, image 2 G -> 3 of 5
    assert table.attrs["baseline"]["detections_kept"] == 1 / 5
    assert row["detections_kept"] == 3 / 5
    assert row["detections_lost"] == pytest.approx(-2 / 5, abs=1e-15)  # deleting the block finds more
    assert row["detections_lost_se"] == pytest.approx(paired_se_by_hand([1, 1, 0], [3, 1, 1], [2, 1, 1]), rel=1e-12)
    assert classify(table.assign(ratio=0.1))["verdict"].iloc[0] == "hurts"


def test_the_verdict_reads_detections_lost_with_its_standard_error():
    table = pd.DataFrame({"block": ["a", "b", "c"], "ratio": [0.1, 0.1, 0.9], "detections_kept": [0.7, 0.98, 0.97],
                          "detections_lost": [0.3, 0.02, 0.03], "detections_lost_se": [0.05, 0.015, 0.01],
                          "drift": [0.5, 0.4, 0.3], "samples": [10, 10, 10]})
    assert cost_column(table) == "detections_lost"
    judged = classify(table)
    assert judged["noise"].tolist() == pytest.approx([0.1, 0.03, 0.02])
    assert judged["verdict"].tolist() == ["helps", "skipped", "helps"]
    assert "detections" in VerdictRule().describe("detections_lost")
    assert COSTS["detections_lost"] is DETECTIONS_LOST and DETECTIONS_LOST.se_column == "detections_lost_se"
    # An analysis table without the standard error: the figures read detections_lost before drift.
    assert [c for c in COSTS if c in ("detections_lost", "drift")][0] == "detections_lost"


def test_no_verdict_when_the_intact_model_finds_under_a_tenth_of_the_ground_truth():
    from probe.deletion.block_table import unsupported_reason
    from probe.scoring.results import Evaluation, Outcome

    def evaluation(kept: float) -> Evaluation:
        return Evaluation(baseline=Outcome(accuracy=kept, loss=1 - kept, samples=4, units=40), sets=[],
                          task=Detection())

    assert "finds only 7.5% of the ground truth's 40 boxes (IoU >= 0.5, same class" in unsupported_reason(
        evaluation(3 / 40))
    assert unsupported_reason(evaluation(4 / 40)) is None  # a tenth: verdicts
    assert unsupported_reason(evaluation(1.0)) is None  # against its own detections it keeps them all
    # The whole per-block table: ground truth the intact model matches none of (other places).
    model, data = fixed_detector_data()
    (candidates,) = data[0]
    far = [{"boxes": torch.tensor([[200., 200, 210, 210]]), "labels": torch.tensor([0])} for _ in range(3)]
    table = probe.block_table(model, [(candidates, far)], task="detection", blocks=BLOCK, progress=False)
    assert table["verdict"].tolist() == ["unsupported"]
    near = [{"boxes": torch.tensor([[0., 0, 10, 10]]), "labels": torch.tensor([0])} for _ in range(3)]
    table = probe.block_table(model, [(candidates, near)], task="detection", blocks=BLOCK, progress=False)
    assert table["verdict"].tolist() != ["unsupported"]


# -- decoding ------------------------------------------------------------------------------------------


def test_yolov5_style_outputs_are_decoded_with_objectness():
    # (1, anchors 10, 5 + 2 classes): xywh, objectness, class probabilities
    prediction = torch.tensor([[[50, 50, 20, 20, 0.9, 0.5, 0.1],     # conf 0.45, class 0
                                [52, 50, 20, 20, 0.8, 0.1, 0.6],     # conf 0.48, class 1: NMS is per class
                                [51, 50, 20, 20, 0.2, 0.9, 0.9]]     # objectness 0.2 < 0.25: dropped
                               + [[9, 9, 2, 2, 0.1, 0.5, 0.5]] * 7])  # more anchors than channels
    found = Detection().detections((prediction, [torch.zeros(1, 3, 2, 2, 7)]))[0]
    assert found["labels"].tolist() == [1, 0]
    assert found["scores"].tolist() == pytest.approx([0.48, 0.45])
    assert found["boxes"].tolist() == [[42, 40, 62, 60], [40, 40, 60, 60]]
    assert found["boxes"].dtype == torch.float32 and found["labels"].dtype == torch.int64
    # the same class: NMS at YOLOv5's 0.45 keeps the higher
    prediction[0, 1, 5:] = torch.tensor([0.6, 0.1])
    assert Detection().detections(prediction)[0]["scores"].tolist() == pytest.approx([0.48])


def test_end_to_end_outputs_and_torchvision_filters():
    rows = torch.tensor([[[0, 0, 10, 10, 0.9, 2], [5, 5, 9, 9, 0.2, 1], [1, 1, 4, 4, 0.5, 0]]])
    found = Detection().detections(rows)[0]
    assert found["scores"].tolist() == pytest.approx([0.9, 0.5]) and found["labels"].tolist() == [2, 0]
    assert Detection(conf=0.1, max_detections=1).detections(rows)[0]["labels"].tolist() == [2]
    image = {"boxes": rows[0, :, :4], "scores": rows[0, :, 4], "labels": rows[0, :, 5].long()}
    assert len(Detection().detections([image])[0]["boxes"]) == 3  # torchvision's own thresholds
    assert Detection(conf=0.3).detections([image])[0]["labels"].tolist() == [2, 0]


def test_unreadable_outputs_and_bad_settings_are_one_line_errors():
    with pytest.raises(ProbeError, match=r"cannot read the model's outputs, a tensor \(4, 10\).*torchvision"):
        Detection().detections(torch.zeros(4, 10))
    with pytest.raises(ProbeError, match="conf=1.5"):
        Detection(conf=1.5)
    with pytest.raises(ProbeError, match="max_detections=0"):
        Detection(max_detections=0)
    with pytest.raises(ProbeError, match="classes=9"):
        Detection(classes=9).detections(torch.zeros(1, 8, 100))
    model, data = fixed_detector_data()
    (candidates,) = data[0]
    with pytest.raises(ProbeError, match="ground truth is one dict per image"):
        probe.sweep(model, [(candidates, [{"boxes": torch.zeros(0, 4)}] * 3)], task="detection", blocks=BLOCK,
                    progress=False)
    nothing = candidates.clone()
    nothing[..., 4] = -1.0  # no score above 0, with the branch or without
    with pytest.raises(ProbeError, match="made no detection on the 3 images"):
        probe.sweep(model, [(nothing,)], task=Detection(), blocks=BLOCK, progress=False)


def test_tally_keeps_details_only_for_a_task_that_summarizes():
    model, data = fixed_detector_data()
    task = Detection()
    (batch,) = list(batches(data, torch.device("cpu")))
    outputs = model(batch.inputs)
    tally = Tally(1, torch.device("cpu"), task)
    tally.add(0, task.score(outputs, batch), None)
    (outcome,) = tally.results()
    assert outcome.extra == {"detections": 2.0, "drift": 0.0, "map50": 1.0, "map50_95": 1.0}
    plain = Tally(1, torch.device("cpu"), probe.Drift())
    plain.add(0, probe.Drift().score(torch.ones(2, 3), next(iter(batches([(torch.ones(2, 3),)], torch.device("cpu"))))),
              None)
    assert plain.details == [[]] and plain.results()[0].extra == {}


class GridDetector(nn.Module):
    """A detector torch.fx can trace: three residual blocks and an anchor-free head giving
    Ultralytics' form, (batch, 4 + classes, anchors) of xywh boxes and class scores."""

    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, stride=4, padding=1)
        self.blocks = nn.Sequential(*(ConvResidual(16) for _ in range(3)))
        self.head = nn.Conv2d(16, 4 + classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.blocks(self.stem(x))
        y = self.head(features).flatten(2)
        rows, columns = torch.meshgrid(torch.arange(features.shape[2]), torch.arange(features.shape[3]),
                                       indexing="ij")
        centres = torch.stack([columns, rows]).flatten(1).float() * 4 + 2
        return torch.cat([centres + 4 * y[:, :2], 8 * y[:, 2:4].exp(), y[:, 4:].sigmoid()], dim=1)


class ConvResidual(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(channels, channels, 3, padding=1), nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.bn(self.conv(x)))


def test_fast_engines_give_the_numbers_of_whole_forwards():
    torch.manual_seed(0)
    model = GridDetector().eval()
    images = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    data = [(images[:2],), (images[2:],)]
    sets = [["blocks.0"], ["blocks.1"], ["blocks.2"], ["blocks.0", "blocks.1"]]
    whole = probe.evaluate_ablations(model, data, sets, task=Detection(conf=0.3, max_detections=25), fast=False,
                                       progress=False)
    for fast in ({}, {"stack": 3}):
        evaluation = probe.evaluate_ablations(model, data, sets, task=Detection(conf=0.3, max_detections=25),
                                              progress=False, **fast)
        assert probe.fast_path_note(model).engine == "suffix"
        assert [dict(o) for o in evaluation.sets] == [dict(o) for o in whole.sets]
    assert 0.5 < min(o.accuracy for o in whole.sets) < max(o.accuracy for o in whole.sets) < 1
    # BatchNorm recalibration: its fast passes give the numbers of its whole ones too
    calibration = [(torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(4)),)]
    refitted = [probe.evaluate_ablations(model, data, sets[:2], calibration=calibration, fast=fast, progress=False,
                                         task=Detection(conf=0.3, max_detections=25)) for fast in (True, False)]
    assert [dict(o) for o in refitted[0].sets] == [dict(o) for o in refitted[1].sets]
    assert refitted[0].baseline.extra["map50"] == 1.0


def test_without_ultralytics_the_same_rule_gives_the_same_detections(ultralytics, monkeypatch):
    from probe.scoring import detection
    model, images = yolo("yolov8n.yaml"), yolo_images()
    with torch.no_grad():
        outputs = model(images)
    found = Detection(conf=0.01).detections(outputs)
    monkeypatch.setattr(detection, "_nms_function", False)
    again = Detection(conf=0.01).detections(outputs)
    assert sum(len(f["boxes"]) for f in found) > 50
    for a, b in zip(found, again):
        assert all(torch.equal(a[key], b[key]) for key in ("boxes", "scores", "labels"))


# -- Ultralytics YOLO, built from its own YAML ---------------------------------------------------------


@pytest.fixture(scope="module")
def ultralytics():
    pytest.importorskip("ultralytics")
    from ultralytics.utils import LOGGER
    level = LOGGER.level
    LOGGER.setLevel(logging.ERROR)
    import ultralytics
    yield ultralytics
    LOGGER.setLevel(level)


def yolo(yaml: str, classes: int = 3, seed: int = 0) -> nn.Module:
    """A YOLO of random weights whose blocks matter: BatchNorm statistics of random images (so
    that activations neither vanish nor explode), scales spread out, class biases low."""
    from ultralytics.nn.tasks import DetectionModel
    torch.manual_seed(seed)
    model = DetectionModel(yaml, nc=classes, verbose=False)
    return calibrated(model, lambda head: [seq[-1].bias for seq in head.cv3], torch.rand(4, 3, 96, 96))


def calibrated(model: nn.Module, class_biases, images: torch.Tensor) -> nn.Module:
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
            norm.reset_running_stats()
            norm.momentum = None  # the statistics of this one batch
        model.train()(images)
        for norm in norms:
            norm.momentum = 0.1
        for bias in class_biases(model.model[-1]):
            bias.fill_(-2.0)
    return model.eval()


def yolo_images() -> torch.Tensor:
    return torch.rand(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def ultralytics_nms(outputs, classes: int, conf: float) -> list[dict]:
    from ultralytics.utils.nms import non_max_suppression
    rows = non_max_suppression(outputs[0], conf_thres=conf, iou_thres=0.7, max_det=300, nc=classes)
    return [{"boxes": r[:, :4], "scores": r[:, 4], "labels": r[:, 5].long()} for r in rows]


def delete_by_hand(model: nn.Module, block: str) -> nn.Module:
    """A copy of `model` with the unit `block` names replaced by its shortcut, by module type."""
    from ultralytics.nn.modules.block import Attention, Bottleneck, PSABlock
    model = copy.deepcopy(model)
    name, _, part = block.partition("[")
    unit = model.get_submodule(name)
    if isinstance(unit, Bottleneck):
        unit.forward = lambda x: x  # x + cv2(cv1(x)) -> x
    elif isinstance(unit, PSABlock):
        setattr(unit, part.rstrip("]"), Zeros(getattr(unit, part.rstrip("]"))))  # x + attn(x) -> x + 0
    elif isinstance(unit, Attention):
        unit.pe = Zeros(unit.pe)  # attention(v) + pe(v) -> attention(v) + 0
    else:
        raise AssertionError(f"no hand deletion for {block} ({type(unit).__name__})")
    return model


class Zeros(nn.Module):
    """A branch deleted: zeros of its output's shape."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, *args, **kwargs):
        return torch.zeros_like(self.module(*args, **kwargs))


def residual_additions(model: nn.Module) -> int:
    """Counted by hand: each Bottleneck with its shortcut on, two per PSABlock (attention, feed
    forward) with its shortcut on, and the addition of an Attention's positional encoding (pe) to
    its attention output, which discovery also takes for a residual block."""
    from ultralytics.nn.modules.block import Attention, Bottleneck, PSABlock
    return sum(isinstance(m, Bottleneck) and m.add for m in model.modules()) + sum(
        2 * (isinstance(m, PSABlock) and m.add) + isinstance(m, Attention) for m in model.modules())


@pytest.mark.parametrize("yaml", ["yolov8n.yaml", pytest.param("yolo11n.yaml", marks=pytest.mark.slow), "yolov5nu.yaml"])
def test_yolo_blocks_equal_a_hand_loop(ultralytics, yaml):
    conf = 0.01
    model, images = yolo(yaml), yolo_images()
    classes = model.model[-1].nc
    before = snapshot(model)
    blocks = probe.find_blocks(model, example_input=images)
    assert len(blocks) == residual_additions(model)
    table = probe.sweep(model, [(images,)], task=Detection(conf=conf), blocks=blocks, progress=False)
    assert_unchanged(model, before)
    with torch.no_grad():
        reference = ultralytics_nms(model(images), classes, conf)
    assert table.attrs["baseline"]["reference_detections"] == sum(len(r["boxes"]) for r in reference) > 20
    lost = 0
    for block, row in zip(blocks, table.itertuples()):
        with torch.no_grad():
            found = ultralytics_nms(delete_by_hand(model, block.name)(images), classes, conf)
        kept, map50, _ = kept_and_map(found, reference)
        assert (row.block, row.detections_kept, row.map50) == (block.name, kept, map50)
        assert row.detections == sum(len(f["boxes"]) for f in found) / 3
        lost += kept < 1
    assert lost >= 2  # the deletions change what is detected


@pytest.mark.parametrize("yaml", ["yolov10n.yaml", "yolo26n.yaml"])
def test_end_to_end_heads_are_read_as_ultralytics_reads_them(ultralytics, yaml):
    from ultralytics.utils.nms import non_max_suppression
    model, images = yolo(yaml), yolo_images()
    with torch.no_grad():
        many = model(images)  # built from YAML, the one-to-many head answers: (batch, 4 + classes, anchors)
        model.model[-1].end2end = True
        one = model(images)  # (batch, detections, 6)
        model.model[-1].end2end = False
    assert one[0].shape[-1] == 6 and many[0].shape[1] == 7
    for outputs, end2end in ((one, True), (many, False)):
        found = Detection(conf=0.05).detections(outputs)
        rows = non_max_suppression(outputs[0], conf_thres=0.05, iou_thres=0.7, max_det=300, nc=3, end2end=end2end)
        assert sum(len(r) for r in rows) > 10
        for f, r in zip(found, rows):
            order = torch.argsort(r[:, 4], descending=True, stable=True)
            assert torch.equal(f["boxes"], r[order, :4]) and torch.equal(f["labels"], r[order, 5].long())


def test_oriented_boxes_are_refused(ultralytics):
    from ultralytics.nn.tasks import OBBModel
    model = OBBModel("yolov8n-obb.yaml", nc=2, verbose=False).eval()
    with torch.no_grad(), pytest.raises(ProbeError, match="OBB model"):
        Detection().detections(model(yolo_images()))


def test_yolo_with_ground_truth_and_segmentation_head(ultralytics):
    from ultralytics.nn.tasks import SegmentationModel
    torch.manual_seed(0)
    model = SegmentationModel("yolov8n-seg.yaml", nc=2, verbose=False).eval()
    with torch.no_grad():
        for head in model.model[-1].cv3:
            head[-1].bias.normal_(-2.0, 1.0)
    images = yolo_images()
    outputs = model(images)
    assert isinstance(outputs[0], tuple)  # ((predictions, protos), raw)
    found = Detection(conf=0.05).detections(outputs)
    expected = ultralytics_nms(outputs[0], 2, 0.05)
    for f, e in zip(found, expected):
        assert torch.equal(f["boxes"], e["boxes"]) and torch.equal(f["labels"], e["labels"])
    # the ground truth as the reference: boxes near the intact model's first detections
    truth = [{"boxes": f["boxes"][:3] + 1.0, "labels": f["labels"][:3]} for f in found]
    table = probe.sweep(model, [(images, truth)], task=Detection(conf=0.05), blocks=["model.2.m.0"],
                        progress=False)
    with torch.no_grad():
        ablated = Detection(conf=0.05).detections(delete_by_hand(model, "model.2.m.0")(images))
    kept, map50, matched = kept_and_map(ablated, truth)
    row = table.iloc[0]
    assert (row["detections_kept"], row["map50"]) == (kept, map50)
    base_kept, _, base_matched = kept_and_map(found, truth)
    assert table.attrs["baseline"]["detections_kept"] == base_kept
    assert row["detections_lost"] == pytest.approx(base_kept - kept, abs=1e-15)
    weights = [len(t["boxes"]) for t in truth]
    assert row["detections_lost_se"] == pytest.approx(paired_se_by_hand(
        [w - m for w, m in zip(weights, matched)], weights, [w - m for w, m in zip(weights, base_matched)]),
        rel=1e-12, nan_ok=True)


# -- torchvision detectors --------------------------------------------------------------------------


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.normal_(1.0, 0.3)
                module.bias.normal_(0.0, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def fpn_forward_without(fpn, dropped: int):
    """torchvision's FeaturePyramidNetwork.forward, the top-down term of its `dropped`-th addition
    (in the order they run) left out."""
    def forward(x):
        names, x = list(x.keys()), list(x.values())
        last_inner = fpn.get_result_from_inner_blocks(x[-1], -1)
        results = [fpn.get_result_from_layer_blocks(last_inner, -1)]
        for count, idx in enumerate(range(len(x) - 2, -1, -1)):
            inner_lateral = fpn.get_result_from_inner_blocks(x[idx], idx)
            top_down = F.interpolate(last_inner, size=inner_lateral.shape[-2:], mode="nearest")
            last_inner = inner_lateral if count == dropped else inner_lateral + top_down
            results.insert(0, fpn.get_result_from_layer_blocks(last_inner, idx))
        if fpn.extra_blocks is not None:
            results, names = fpn.extra_blocks(results, x, names)
        return OrderedDict(zip(names, results))
    return forward


def delete_torchvision_by_hand(model: nn.Module, block: str) -> nn.Module:
    from torchvision.models.mobilenetv3 import InvertedResidual
    from torchvision.models.resnet import Bottleneck
    model = copy.deepcopy(model)
    name, _, part = block.partition("[")
    unit = model.get_submodule(name)
    if isinstance(unit, Bottleneck):
        unit.bn3 = Zeros(unit.bn3)  # relu(bn3(...) + identity) -> relu(identity)
    elif isinstance(unit, InvertedResidual):
        unit.forward = lambda x: x  # block(x) + x -> x
    elif name.endswith("fpn"):
        unit.forward = fpn_forward_without(unit, int(part.rstrip("]") or 0))
    else:
        raise AssertionError(f"no hand deletion for {block} ({type(unit).__name__})")
    return model


def torchvision_additions(model: nn.Module) -> int:
    """Counted by hand: ResNet Bottlenecks and MobileNet inverted residuals with their shortcut,
    and the FPN's top-down additions (one fewer than its levels)."""
    from torchvision.models.mobilenetv3 import InvertedResidual
    from torchvision.models.resnet import Bottleneck
    return (sum(isinstance(m, Bottleneck) or (isinstance(m, InvertedResidual) and m.use_res_connect)
                for m in model.modules()) + len(model.backbone.fpn.inner_blocks) - 1)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["fasterrcnn_mobilenet_v3_large_fpn", "retinanet_resnet50_fpn"])
def test_torchvision_blocks_equal_a_hand_loop(name):
    from torchvision.models import detection
    # low thresholds, so that a random model detects; few detections, so that pycocotools is quick
    extra = ({"score_thresh": 0.001, "detections_per_img": 40} if name.startswith("retinanet") else
             {"box_score_thresh": 0.01, "box_detections_per_img": 40})
    torch.manual_seed(0)
    model = randomized(getattr(detection, name)(weights=None, weights_backbone=None, num_classes=3, min_size=96,
                                                max_size=128, **extra))
    images = torch.rand(2, 3, 96, 112, generator=torch.Generator().manual_seed(2))
    before = snapshot(model)
    blocks = probe.find_blocks(model, example_input=images)
    assert len(blocks) == torchvision_additions(model)
    table = probe.sweep(model, [(images,)], task="detection", blocks=blocks, progress=False)
    assert_unchanged(model, before)
    with torch.no_grad():
        reference = model(images)
    assert table.attrs["baseline"]["reference_detections"] == sum(len(r["boxes"]) for r in reference) > 20
    changed = 0
    for block, row in zip(blocks, table.itertuples()):
        with torch.no_grad():
            found = delete_torchvision_by_hand(model, block.name)(images)
        kept, map50, _ = kept_and_map(found, reference)
        assert (row.block, row.detections_kept, row.map50) == (block.name, kept, map50)
        changed += kept < 1
    assert changed >= 2


# -- several processes -------------------------------------------------------------------------------

JOB = '''
import json, sys, torch
from probe import distributed
from probe.batches import Batch
from probe.scoring.detection import Detection
from probe.scoring.tally import Tally


def detections(image, shift):
    generator = torch.Generator().manual_seed(image)
    n = 3 + image % 4
    corner = torch.rand(n, 2, generator=generator) * 50
    boxes = torch.cat([corner, corner + 5 + 20 * torch.rand(n, 2, generator=generator)], 1)
    boxes = boxes + shift * 8 * torch.rand(n, 4, generator=generator)
    return {"boxes": boxes, "scores": torch.rand(n, generator=generator),
            "labels": torch.randint(0, 2, (n,), generator=generator)}


distributed.init_from_environment(torch.device("cpu"))
task, tally = Detection(), Tally(3, torch.device("cpu"), Detection())
for image in range(distributed.rank(), 7, distributed.world_size()):
    batch = Batch(inputs=torch.zeros(1, 1), targets=None, raw=None, size=1, number=image + 1)
    intact = [detections(image, 0)]
    reference = task.score(intact, batch)
    tally.add(0, reference, None)
    for row in (1, 2):
        tally.add(row, task.score([detections(image, row)], batch, intact), reference)
outcomes = tally.results()
if distributed.rank() == 0:
    with open(sys.argv[1], "w") as file:
        json.dump({"world_size": distributed.world_size(), "outcomes": [
            {"kept": o.accuracy, "se": o.loss_increase_se, **o.extra} for o in outcomes]}, file)
'''


@pytest.mark.slow
def test_map_under_torchrun_is_over_every_process(tmp_path):
    import shutil
    import subprocess
    import sys
    job = tmp_path / "job.py"
    job.write_text(JOB)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or "torchrun"
    for name, command in (("one", [sys.executable]), ("two", [torchrun, "--standalone", "--nproc_per_node=2"])):
        done = subprocess.run([*command, str(job), str(tmp_path / f"{name}.json")], env=env, capture_output=True,
                              timeout=300)
        assert done.returncode == 0, done.stderr.decode()[-3000:]
    import json
    one, two = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for a, b in zip(one["outcomes"], two["outcomes"]):
        assert a.keys() == b.keys() and {"map50", "map50_95", "detections"} <= set(a)
        for key in a:
            assert a[key] == b[key] if a[key] is None else a[key] == pytest.approx(b[key], rel=1e-9, nan_ok=True), key
    assert 0 < two["outcomes"][2]["map50"] < two["outcomes"][1]["map50"] < 1
