"""Detectors on the command line: `--model yolo:PATH` and torchvision's detectors with `--dataset
images`, the detection task as their default, what a factory is called with, half-precision
weights on the CPU, and (slow) the whole command with and without ground truth."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from probe.ablate import _half_on_cpu
from probe.commands.config import RunConfig
from probe.commands.inputs import load_datasets, load_model, load_task
from probe.errors import ProbeError
from probe.scoring.detection import Detection

ROOT = Path(__file__).resolve().parents[2]
CPU = torch.device("cpu")


def test_detection_is_the_default_task_for_a_detector():
    assert RunConfig(model="yolo:best.pt", dataset="images").task == "detection"
    assert RunConfig(model="retinanet_resnet50_fpn_v2").task == "detection"
    assert RunConfig(model="mypkg:detector", dataset="images").task == "detection"
    assert RunConfig(model="mypkg:detector", dataset="images", task="drift").task == "drift"
    assert RunConfig(model="resnet18").task == "classification"
    config = RunConfig(model="yolo:best.pt", dataset="images", conf=0.001, nms_iou=0.6)
    task = load_task(config, torch.nn.Linear(2, 2))
    assert isinstance(task, Detection) and (task.conf, task.iou) == (0.001, 0.6)


@pytest.mark.parametrize(("settings", "message"), [
    ({"dataset": "images", "task": "classification"}, "--dataset images holds images without classes"),
    ({"conf": 0.3}, "--conf sets the detection task's"),
    ({"model": "yolo:a.pt", "dataset": "images", "nms_iou": 1.5}, "--nms-iou must be a number from 0 to 1"),
])
def test_detection_settings_are_checked(settings, message):
    with pytest.raises(ProbeError, match=message):
        RunConfig(**settings)


def write_images(folder: Path, count: int = 4, *, labels: bool = False) -> Path:
    """`count` small images of one bright box each on a dark ground (60x90), with YOLO labels for
    the box when asked."""
    for index in range(count):
        pixels = np.full((60, 90, 3), 30, dtype=np.uint8)
        left = 10 + 12 * index
        pixels[15:45, left:left + 30] = (220, 80 + 30 * index, 40)
        (folder / "images").mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / "images" / f"{index}.png")
        if labels:
            (folder / "labels").mkdir(exist_ok=True)
            (folder / "labels" / f"{index}.txt").write_text(f"{index % 2} {(left + 15) / 90:.6f} 0.5 {30 / 90:.6f} 0.5\n")
    return folder


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A module of factories that remember what they were called with."""
    (tmp_path / "det_factories.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        calls = []

        def yolo(**kwargs):
            from ultralytics.nn.tasks import DetectionModel
            calls.append(kwargs)
            return DetectionModel("yolov8n.yaml", nc=2, verbose=False)

        def half(**kwargs):
            calls.append(kwargs)
            torch.manual_seed(0)
            return nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(2)).half()

        def picky(num_classes):
            raise ValueError(f"no head for {num_classes} classes")
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "det_factories", raising=False)
    import det_factories
    return det_factories


def test_a_factory_gets_num_classes_only_when_the_data_has_classes(tmp_path, factories):
    pytest.importorskip("ultralytics")
    data = write_images(tmp_path / "data", 1)
    config = RunConfig(model="det_factories:yolo", dataset="images", data_root=str(data), image_size=64)
    model, source = load_model(config, CPU, progress=False)
    assert factories.calls == [{}] and source == "det_factories:yolo (its own weights)"
    assert load_datasets(config, calibration=False, model=model).evaluation[0].shape == (3, 64, 64)
    with pytest.raises(ProbeError, match=r"num_classes=10 \(the 10 classes of --dataset digits\)") as error:
        load_model(RunConfig(model="det_factories:picky", checkpoint=None, weights=None), CPU, progress=False,
                   train=False)
    assert "no head for 10 classes" in str(error.value)


def test_half_precision_weights_run_in_float32_on_the_cpu(factories, capsys):
    config = RunConfig(model="det_factories:half", dataset="digits")
    model, _ = load_model(config, CPU, progress=False, train=False)
    assert {p.dtype for p in model.parameters() if not isinstance(p, torch.nn.parameter.UninitializedParameter)} \
        == {torch.float32}
    assert _half_on_cpu(config, model, CPU) is None
    kept = RunConfig(model="det_factories:half", dataset="digits", dtype="fp16")
    model, _ = load_model(kept, CPU, progress=False, train=False)
    warning = _half_on_cpu(kept, model, CPU)
    assert warning is not None and "float16 (--dtype fp16) on the CPU" in warning and "\n" not in warning
    assert "--precision bf16" in _half_on_cpu(RunConfig(precision="bf16"), torch.nn.Linear(2, 2), CPU)


@pytest.mark.parametrize(("settings", "message"), [
    ({"model": "fasterrcnn_resnet50_fpn", "dataset": "images"}, "probe does not train detectors"),
    ({"model": "fasterrcnn_resnet50_fpn", "dataset": "digits", "task": "detection", "checkpoint": "x.pt"},
     "is a detector, which --dataset digits"),
    ({"model": "yolo:x.pt", "dataset": "images", "checkpoint": "x.pt"}, "is the checkpoint itself"),
    ({"model": "resnet18", "dataset": "images", "task": "drift", "checkpoint": "x.pt"}, "is a classifier"),
])
def test_detector_misuse_is_one_line(tmp_path, settings, message):
    write_images(tmp_path, 1)
    with pytest.raises(ProbeError, match=message):
        load_model(RunConfig(data_root=str(tmp_path), **settings), CPU, progress=False)


def ablate(home: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "probe.ablate", "--no-progress", *args], capture_output=True, text=True,
                          timeout=900, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(home)})


@pytest.mark.slow  # two whole commands on a tiny YOLOv8n, in subprocesses
@pytest.mark.parametrize("labels", [False, True], ids=["intact-reference", "ground-truth"])
def test_ablate_a_yolo_checkpoint_on_a_folder_of_images(tmp_path, labels):
    tasks = pytest.importorskip("ultralytics.nn.tasks")
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", nc=2, verbose=False)
    checkpoint = tmp_path / "best.pt"
    torch.save({"epoch": -1, "model": None, "ema": model.half(), "train_args": {"imgsz": 96}}, checkpoint)
    data = write_images(tmp_path / "data", 4, labels=labels)
    out = tmp_path / "out"
    done = ablate(tmp_path, "--model", f"yolo:{checkpoint}", "--dataset", "images", "--data-root", str(data), "--out", str(out),
                  "--image-size", "64", "--conf", "0.001", "--sections", "uncertainty")
    assert done.returncode == 0, done.stderr[-3000:]
    report = " ".join((out / "report.html").read_text().split())
    assert "detections per image on 4 images" in report and ">detections lost (%)<" in report
    table = pd.read_csv(out / "blocks.csv")
    assert len(table) == 6  # the C2f Bottlenecks with a shortcut: 1 + 2 + 2 + 1 in the backbone
    assert {"detections_kept", "detections_lost", "detections", "map50", "map50_95", "drift"} <= set(table.columns)
    record = json.loads((out / "run.json").read_text())
    assert record["task"] == "detection" and record["conf"] == 0.001 and record["model_sha256"]
    assert record["checkpoint_sha256"] and record["data"]["input_height"] == 64
    if labels:
        assert "YOLO label files for 4 of 4 images" in record["data"]["ground_truth"]
    else:
        assert record["data"]["ground_truth"] is None
    summary = done.stdout
    assert "detections per image on 4 images" in summary
    # With ground truth the reference is the 4 labelled boxes; without, the intact model's own detections.
    reference = int(summary.split("of the reference's ")[1].split(" boxes")[0])
    if labels:
        assert reference == 4
    else:
        assert "keeps 100.0%" in summary and reference > 4


@pytest.mark.slow  # a torchvision detector's whole command, in a subprocess
def test_ablate_a_torchvision_detector_with_its_checkpoint(tmp_path):
    import torchvision

    torch.manual_seed(0)
    trained = torchvision.models.get_model("fasterrcnn_mobilenet_v3_large_320_fpn", weights=None,
                                           weights_backbone=None, num_classes=3)
    torch.save({"model": trained.state_dict()}, tmp_path / "det.pt")
    data = write_images(tmp_path / "data", 4, labels=True)
    out = tmp_path / "out"
    done = ablate(tmp_path, "--model", "fasterrcnn_mobilenet_v3_large_320_fpn", "--checkpoint", str(tmp_path / "det.pt"),
                  "--dataset", "images", "--data-root", str(data), "--out", str(out), "--conf", "0",
                  "--sections", "uncertainty")
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_csv(out / "blocks.csv")
    assert len(table) > 0 and {"detections_kept", "map50", "detections"} <= set(table.columns)
    record = json.loads((out / "run.json").read_text())
    assert record["task"] == "detection" and record["data"]["input_height"] == 60  # its own size: no letterbox
    assert "of the reference's 4 boxes" in done.stdout  # the ground truth, classes 0 and 1 as labels 1 and 2
