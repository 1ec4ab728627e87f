"""Detectors as their users have them (probe.loading.detectors) and their images
(probe.loading.detection_images): an Ultralytics checkpoint loaded as Ultralytics loads it, its
images prepared exactly as Ultralytics' predictor prepares them, ground truth moved through the
letterbox, and torchvision's detectors built for their checkpoint's classes."""

from __future__ import annotations

import copy
import json
import sys

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from probe.batches import batches
from probe.commands.model_identity import model_digest
from probe.errors import ProbeError
from probe.loading.datasets import make_loader
from probe.loading.detection_images import letterbox_params, load_detection_images
from probe.loading.detectors import (TORCHVISION_DETECTORS, DetectorInput, build_torchvision_detector, detector_input,
                                     load_yolo)

tasks = pytest.importorskip("ultralytics.nn.tasks")


def ultralytics_checkpoint(path, yaml="yolov8n.yaml", *, classes=3, imgsz=96, entry="ema", seed=0):
    """A checkpoint as Ultralytics' trainer writes one: the model in half precision under "ema"
    (a training checkpoint: "model" is None) or under "model" (a final, stripped one), with the
    training arguments as a dict. Returns the float32 model it holds."""
    torch.manual_seed(seed)
    model = tasks.DetectionModel(yaml, nc=classes, verbose=False)
    with torch.no_grad():  # BatchNorm statistics of a trained model, not the (0, 1) of a fresh one
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
    half = copy.deepcopy(model).half()
    stored = {"epoch": -1, "model": half if entry == "model" else None, "ema": half if entry == "ema" else None,
              "updates": 0, "train_args": {"imgsz": imgsz, "task": "detect", "model": yaml}}
    torch.save(stored, path)
    return half.float().eval()


def save_png(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def noise(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_torchvision_detector_names_are_torchvisions():
    assert set(TORCHVISION_DETECTORS) == set(torchvision.models.list_models(module=torchvision.models.detection))


@pytest.mark.parametrize(("yaml", "entry"), [("yolov8n.yaml", "ema"), ("yolo11n.yaml", "model"),
                                             ("yolov5nu.yaml", "ema")])
def test_yolo_checkpoint_loads_as_ultralytics_loads_it(tmp_path, yaml, entry):
    path = tmp_path / "best.pt"
    stored = ultralytics_checkpoint(path, yaml, entry=entry)
    model = load_yolo(f"yolo:{path}")
    theirs, _ = tasks.load_checkpoint(str(path), device="cpu", fuse=False)
    assert not model.training and all(p.dtype == torch.float32 and p.device.type == "cpu" for p in model.parameters())
    state, expected, own = model.state_dict(), stored.state_dict(), theirs.state_dict()
    assert state.keys() == expected.keys()
    for key in state:
        assert torch.equal(state[key], expected[key]) and torch.equal(state[key], own[key]), key
    images = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(images)[0], theirs(images)[0])
    assert detector_input(model) == DetectorInput("ultralytics", image_size=96, stride=32, num_classes=3,
                                                  class_names=("0", "1", "2"))
    # The run record's model identity: equal for the same file, different for one weight changed.
    assert model_digest(model) == model_digest(load_yolo(f"yolo:{path}"))
    with torch.no_grad():
        next(model.parameters())[0].mul_(0.5)
    assert model_digest(model) != model_digest(theirs)


def test_yolo_refusals_are_one_line(tmp_path, monkeypatch):
    with pytest.raises(ProbeError, match="does not exist"):
        load_yolo(f"yolo:{tmp_path / 'yolov8n.pt'}")  # never downloaded, as Ultralytics would
    (tmp_path / "model.onnx").write_bytes(b"x")
    with pytest.raises(ProbeError, match=r"\*\.pt"):
        load_yolo(f"yolo:{tmp_path / 'model.onnx'}")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ProbeError, match="Ultralytics could not load it") as error:
        load_yolo(f"yolo:{tmp_path / 'broken.pt'}")
    assert "\n" not in str(error.value)
    for name in [name for name in sys.modules if name == "ultralytics" or name.startswith("ultralytics.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if it were not installed
    monkeypatch.setitem(sys.modules, "ultralytics", None)
    with pytest.raises(ProbeError, match=r'needs Ultralytics, which is not installed: pip install -e "\.\[yolo\]"'):
        load_yolo(f"yolo:{tmp_path / 'broken.pt'}")


def predictor_input(path, image_path, imgsz):
    """What Ultralytics' own predictor (`YOLO(path).predict`) feeds the model for one image."""
    from ultralytics import YOLO

    yolo = YOLO(str(path))
    seen = []
    handle = yolo.model.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    try:
        yolo.predict(str(image_path), imgsz=imgsz, verbose=False, save=False)
    finally:
        handle.remove()
    return seen[0][0]


def test_images_are_prepared_exactly_as_ultralytics_predictor_prepares_them(tmp_path):
    path = tmp_path / "best.pt"
    ultralytics_checkpoint(path, imgsz=96)
    image = save_png(tmp_path / "data" / "images" / "wide.png", noise(50, 80))
    dataset = load_detection_images(tmp_path / "data", detector_input(load_yolo(f"yolo:{path}")))
    ours = dataset[0]
    # 50x80 at 96: scaled by 1.2 to 60x96, padded only to the next multiple of the stride 32 (64x96).
    assert ours.shape == (3, 64, 96) and (dataset.info.input_height, dataset.info.input_width) == (64, 96)
    assert torch.equal(ours, predictor_input(path, image, 96))
    assert dataset.info.image_size == 96 and dataset.info.ground_truth is None


def test_images_of_mixed_shapes_are_letterboxed_to_the_square(tmp_path):
    from ultralytics.data.augment import LetterBox

    path = tmp_path / "best.pt"
    ultralytics_checkpoint(path, imgsz=64)
    arrays = {"a.png": noise(50, 80, 1), "sub/b.png": noise(70, 30, 2)}
    for name, array in arrays.items():
        save_png(tmp_path / "data" / name, array)
    detector = detector_input(load_yolo(f"yolo:{path}"))
    dataset = load_detection_images(tmp_path / "data", detector, image_size=70)  # rounded up to 96, as Ultralytics
    assert [p.name for p in dataset.files] == ["a.png", "b.png"]
    assert any("multiple of the model's stride 32" in note for note in dataset.notes)
    for index, array in enumerate(arrays.values()):
        theirs = LetterBox(new_shape=(96, 96), auto=False, stride=32)(image=np.ascontiguousarray(array[..., ::-1]))
        expected = torch.from_numpy(np.ascontiguousarray(theirs[..., ::-1])).permute(2, 0, 1).float() / 255
        assert torch.equal(dataset[index], expected)


def test_yolo_labels_go_through_the_letterbox(tmp_path):
    root = tmp_path / "data"
    save_png(root / "images" / "wide.png", noise(50, 80))
    save_png(root / "images" / "empty.png", noise(50, 80, 1))  # no label file: no objects
    (root / "labels").mkdir()
    (root / "labels" / "wide.txt").write_text("1 0.5 0.5 0.25 0.2\n2 0.1 0.2 0.2 0.4\n1 0.5 0.5 0.25 0.2\n")
    detector = DetectorInput("ultralytics", image_size=96, stride=32, num_classes=3)
    dataset = load_detection_images(root, detector)
    assert [p.name for p in dataset.files] == ["empty.png", "wide.png"]
    image, target = dataset[1]
    # ratio 1.2, 4 rows of padding split 2 above and 2 below; the duplicate row counts once.
    # (40, 25) +- (10, 5) -> (30, 20, 50, 30) * 1.2 + (0, 2); (8, 10) +- (8, 10) -> (0, 0, 16, 20) * 1.2 + (0, 2).
    expected = torch.tensor([[36.0, 26.0, 60.0, 38.0], [0.0, 2.0, 19.2, 26.0]])
    assert torch.allclose(target["boxes"], expected, atol=1e-5) and target["labels"].tolist() == [1, 2]
    assert target["labels"].dtype == torch.int64 and image.shape == (3, 64, 96)
    params = letterbox_params((50, 80), 96, stride=32, rect=True)
    assert (params["ratio"], params["top"], params["left"]) == (1.2, 2, 0)
    assert dataset[0][1]["boxes"].shape == (0, 4) and dataset[0][1]["labels"].shape == (0,)
    assert "YOLO label files for 1 of 2 images" in dataset.info.ground_truth
    # Batches keep each image's boxes apart, through Subsets too, and probe's batches take them.
    batch = next(iter(batches(make_loader(torch.utils.data.Subset(dataset, [0, 1]), batch_size=2), torch.device("cpu"))))
    assert batch.inputs.shape == (2, 3, 64, 96) and batch.size == 2
    assert [len(t["boxes"]) for t in batch.targets] == [0, 2]
    # A torchvision detector keeps 0 for the background: class c is its label c + 1.
    shifted = load_detection_images(root, DetectorInput("torchvision", num_classes=4, labels_are_category_ids=True))
    assert shifted[1][1]["labels"].tolist() == [2, 3]
    assert torch.allclose(shifted[1][1]["boxes"], torch.tensor([[30.0, 20.0, 50.0, 30.0], [0.0, 0.0, 16.0, 20.0]]))


@pytest.mark.parametrize(("rows", "message"), [("3 0.5 0.5 0.2 0.2", "has class 3, but the model detects 3"),
                                               ("0 0.5 0.5 1.2 0.2", r"outside \[0, 1\]"),
                                               ("0 0.5 0.5 0.2", "has 4 numbers"),
                                               ("a 0.5 0.5 0.2 0.2", "not numbers")])
def test_bad_yolo_labels_are_named(tmp_path, rows, message):
    save_png(tmp_path / "images" / "a.png", noise(20, 20))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "a.txt").write_text(rows + "\n")
    with pytest.raises(ProbeError, match=message) as error:
        load_detection_images(tmp_path, DetectorInput("ultralytics", image_size=32, stride=32, num_classes=3))
    assert "a.txt" in str(error.value)


def test_a_labels_folder_that_matches_no_image_is_refused(tmp_path):
    save_png(tmp_path / "images" / "a.png", noise(20, 20))
    (tmp_path / "labels").mkdir()
    (tmp_path / "labels" / "other.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ProbeError, match="no image has a label file"):
        load_detection_images(tmp_path, DetectorInput("ultralytics", image_size=32, stride=32, num_classes=3))


def test_coco_json_is_ground_truth(tmp_path):
    root = tmp_path / "data"
    save_png(root / "images" / "wide.png", noise(50, 80))
    save_png(root / "images" / "unlisted.png", noise(50, 80, 1))
    (root / "annotations").mkdir()
    coco = {"images": [{"id": 5, "file_name": "wide.png", "height": 50, "width": 80}],
            "categories": [{"id": 3, "name": "cat"}, {"id": 7, "name": "dog"}],
            "annotations": [{"id": 1, "image_id": 5, "category_id": 7, "bbox": [30, 20, 20, 10], "iscrowd": 0},
                            {"id": 2, "image_id": 5, "category_id": 3, "bbox": [0, 0, 80, 50], "iscrowd": 1}]}
    (root / "annotations" / "instances_val.json").write_text(json.dumps(coco))
    ultralytics = DetectorInput("ultralytics", image_size=96, stride=32, num_classes=3, class_names=("a", "b", "c"))
    dataset = load_detection_images(root, ultralytics)
    assert len(dataset) == 1 and dataset.files[0].name == "wide.png"
    assert any("1 image(s)" in note and "left out" in note for note in dataset.notes)
    _, target = dataset[0]
    assert torch.allclose(target["boxes"], torch.tensor([[36.0, 26.0, 60.0, 38.0]])) and target["labels"].tolist() == [1]
    assert "1 crowd annotation(s) left out" in dataset.info.ground_truth
    by_name = DetectorInput("ultralytics", image_size=96, stride=32, num_classes=3, class_names=("dog", "x", "cat"))
    assert load_detection_images(root, by_name)[0][1]["labels"].tolist() == [0]
    torchvision_ids = DetectorInput("torchvision", num_classes=91, labels_are_category_ids=True)
    assert load_detection_images(root, torchvision_ids)[0][1]["labels"].tolist() == [7]
    (root / "labels").mkdir()
    (root / "labels" / "wide.txt").write_text("0 0.5 0.5 0.2 0.2\n")
    with pytest.raises(ProbeError, match="both a COCO JSON"):
        load_detection_images(root, ultralytics)


def test_torchvision_images_keep_their_size_unless_they_differ(tmp_path):
    save_png(tmp_path / "a.png", noise(40, 60, 1))
    save_png(tmp_path / "b.jpg", noise(40, 60, 2))
    found = DetectorInput("torchvision", num_classes=91, labels_are_category_ids=True)
    dataset = load_detection_images(tmp_path, found)
    assert dataset[0].shape == (3, 40, 60) and not dataset.notes
    assert torch.equal(dataset[0], torch.from_numpy(noise(40, 60, 1)).permute(2, 0, 1).float() / 255)
    save_png(tmp_path / "c.png", noise(30, 20, 3))
    mixed = load_detection_images(tmp_path, found)
    assert {tuple(mixed[i].shape) for i in range(3)} == {(3, 60, 60)} and "letterboxed to 60x60" in mixed.notes[0]


@pytest.mark.parametrize(("name", "classes"), [("fasterrcnn_mobilenet_v3_large_320_fpn", 5), ("ssdlite320_mobilenet_v3_large", 4)])
def test_torchvision_detector_gets_its_checkpoints_classes(tmp_path, name, classes):
    torch.manual_seed(0)
    trained = torchvision.models.get_model(name, weights=None, weights_backbone=None, num_classes=classes).eval()
    torch.save({"model": trained.state_dict(), "epoch": 3}, tmp_path / "det.pt")
    model = build_torchvision_detector(name, checkpoint=str(tmp_path / "det.pt"))
    assert not model.training and detector_input(model).num_classes == classes
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), trained.state_dict().values()))
    images = torch.rand(2, 3, 64, 80)  # one batch tensor: the model takes its images one by one from it
    with torch.no_grad():
        ours, theirs = model(images), trained(list(images))
    assert len(ours) == 2 and all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(ours, theirs))
    with pytest.raises(ProbeError, match="unknown detection model"):
        build_torchvision_detector("fasterrcnn_resnet51_fpn")
