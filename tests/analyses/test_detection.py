"""The detection analysis against hand computations: its per-block table, ranks and Spearman
correlation, the pictured models' boxes against a hand loop (each unit replaced by its shortcut,
the task's own decoding and NMS), and its figures, report section and terminal words."""

from __future__ import annotations

from copy import deepcopy as copy_module

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402

import probe  # noqa: E402
from analyses.detection import BLOCK_COLUMNS, DetectionResult, detection  # noqa: E402
from analyses.registry import get  # noqa: E402
from probe.commands.config import RunConfig  # noqa: E402
from probe.scoring.detection import Detection  # noqa: E402
from probe.scoring.tasks import Classification, Drift  # noqa: E402
from reports import figures  # noqa: E402
from reports.sections import detection as page  # noqa: E402
from tiny_models import assert_unchanged, snapshot  # noqa: E402

tasks = pytest.importorskip("ultralytics.nn.tasks")

# A hand-made per-block table for YOLOv8n's 6 blocks (values as the detection task gives them).
LOST = [0.10, 0.976, 0.05, 0.20, 0.0, 0.55]
DRIFT = [0.30, 0.115, 0.02, 0.25, 0.01, 0.065]
VERDICTS = ["helps", "helps", "skipped", "skipped", "skipped", "helps"]


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


@pytest.fixture(scope="module")
def yolo():
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", verbose=False).eval()
    x = torch.rand(4, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    return model, [x[:2], x[2:]], probe.find_blocks(model, example_input=x[:1])


def hand_table(blocks) -> pd.DataFrame:
    n = len(blocks)
    return pd.DataFrame({"block": [b.name for b in blocks], "position": range(n), "mode": "zero",
                         "detections_kept": [1 - v for v in LOST], "detections_lost": LOST,
                         "detections_lost_se": [0.01] * n, "detections": [40] * n,
                         "map50": [0.9 - v for v in LOST], "map50_95": [0.5] * n, "map50_drop": LOST,
                         "drift": DRIFT, "samples": 4, "bn_recalibrated": False, "verdict": VERDICTS})


def spearman_by_hand(x: list[float], y: list[float]) -> float:
    def ranks(values):  # no ties here
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        for rank, i in enumerate(order, 1):
            out[i] = float(rank)
        return out
    rx, ry = ranks(x), ranks(y)
    n = len(x)
    return 1 - 6 * sum((a - b) ** 2 for a, b in zip(rx, ry)) / (n * (n * n - 1))


# --- the table -------------------------------------------------------------------------------------


def test_blocks_ranks_spearman_and_views_by_hand(yolo):
    model, data, blocks = yolo
    result = detection(model, data, task=Detection(), table=hand_table(blocks), blocks=blocks, images=0,
                       progress=False)
    rows = result.blocks
    assert list(rows.columns) == BLOCK_COLUMNS and list(rows["block"]) == [b.name for b in blocks]
    assert rows["detections_lost"].tolist() == LOST and rows["drift"].tolist() == DRIFT
    assert rows["lost_rank"].tolist() == [4, 1, 5, 3, 6, 2]
    assert rows["drift_rank"].tolist() == [1, 3, 5, 2, 6, 4]
    # ranks of drift 6,4,2,5,1,3 and of lost 3,6,2,4,1,5: sum d^2 = 9+4+0+1+0+4 = 18; 1 - 6*18/210
    assert result.spearman == pytest.approx(1 - 6 * 18 / 210, abs=1e-12)
    assert result.spearman == pytest.approx(spearman_by_hand(DRIFT, LOST), abs=1e-12)
    # costliest: blocks[1] (97.6%); of the skipped blocks, blocks[3] loses the most (20%)
    assert result.views[["view", "block"]].values.tolist() == [["intact", ""], ["costliest", blocks[1].name],
                                                               ["skipped", blocks[3].name]]
    assert result.views["detections_lost"].tolist()[1:] == [0.976, 0.20]
    assert result.images == () and len(result.boxes) == 0 and result.max_drift == 0.05
    assert result.intact_kept == pytest.approx(1.0)  # no baseline: kept + lost of a row
    table = hand_table(blocks)
    table.attrs["baseline"] = {"detections_kept": 0.962}
    assert detection(model, data, task=Detection(), table=table, blocks=blocks, images=0,
                     progress=False).intact_kept == 0.962
    assert set(result.tables()) == {"detection", "detection_views", "detection_boxes"}


def test_no_skipped_block_is_said(yolo):
    model, data, blocks = yolo
    table = hand_table(blocks).assign(verdict="helps")
    result = detection(model, data, task=Detection(), table=table, blocks=blocks, images=0, progress=False)
    assert result.views["view"].tolist() == ["intact", "costliest"]
    assert result.notes["skipped"] == "no block is called skipped, so no skipped block is pictured."


def test_refusals(yolo):
    model, data, blocks = yolo
    with pytest.raises(probe.ProbeError, match="needs a detection task.*'drift'"):
        detection(model, data, task=Drift(), table=hand_table(blocks), blocks=blocks)
    with pytest.raises(probe.ProbeError, match="images=-1"):
        detection(model, data, task=Detection(), table=hand_table(blocks), blocks=blocks, images=-1)
    with pytest.raises(probe.ProbeError, match="calibration="):
        detection(model, data, task=Detection(), table=hand_table(blocks).assign(bn_recalibrated=True),
                  blocks=blocks, images=1)
    with pytest.raises(probe.ProbeError, match="map50_drop"):
        detection(model, data, task=Detection(), table=hand_table(blocks).drop(columns="map50_drop"), blocks=blocks)


def test_applies_to_detection_only():
    analysis = get("detection")
    assert analysis.applies(Detection(), RunConfig()) is None
    for task in (Classification(), Drift()):
        assert "applies to the task 'detection' only" in analysis.applies(task, RunConfig())
    assert analysis.leads_report and analysis.silent_unless_run


# --- the pictures ----------------------------------------------------------------------------------


def detections_by_hand(model, parts, task, unit_name: str | None) -> list[dict]:
    """The model's detections with the Bottleneck `unit_name` replaced by its shortcut (x -> x)."""
    unit = model.get_submodule(unit_name) if unit_name else None
    if unit is not None:
        unit.forward = lambda x: x
    try:
        with torch.no_grad():
            return [found for x in parts for found in task.detections(model(x))]
    finally:
        if unit is not None:
            del unit.forward


def test_pictured_boxes_equal_a_hand_loop(yolo):
    model, data, blocks = yolo
    task = Detection(conf=0.0, max_detections=8)  # random weights: every score is small
    before = snapshot(model)
    result = detection(model, data, task=task, table=hand_table(blocks), blocks=blocks, images=3, progress=False)
    assert_unchanged(model, before)
    # three images from two batches: 2 + 1
    assert len(result.images) == 3
    for i, image in enumerate(torch.cat(data)[:3]):
        expected = (image.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        np.testing.assert_array_equal(result.images[i], expected)
    parts = [data[0], data[1][:1]]
    for view, block in result.views[["view", "block"]].itertuples(index=False):
        unit = next(b.module for b in blocks if b.name == block) if block else None
        hand = detections_by_hand(model, parts, task, unit)
        mine = result.boxes[result.boxes["view"] == view]
        assert sorted(mine["image"].unique().tolist()) == [0, 1, 2]
        for i, found in enumerate(hand):
            rows = mine[mine["image"] == i]
            assert len(rows) == len(found["boxes"]) == 8
            np.testing.assert_array_equal(rows[["x1", "y1", "x2", "y2"]].to_numpy(), found["boxes"].numpy())
            np.testing.assert_array_equal(rows["score"].to_numpy(), found["scores"].numpy())
            assert rows["label"].tolist() == found["labels"].tolist()
            assert rows["name"].tolist() == [model.names[label] for label in found["labels"].tolist()]
        assert result.views.set_index("view").loc[view, "boxes"] == 24
    # deleting the costliest block changes what the detector finds
    intact = result.boxes[result.boxes["view"] == "intact"][["x1", "y1", "x2", "y2", "score"]].to_numpy()
    costliest = result.boxes[result.boxes["view"] == "costliest"][["x1", "y1", "x2", "y2", "score"]].to_numpy()
    assert not np.array_equal(intact, costliest)


def test_pictures_refit_batchnorm_as_the_table_did(yolo):
    """A table made with BatchNorm recalibrated: each pictured deletion refits the statistics on
    the calibration data, as a hand loop does (a copy, the unit replaced by its shortcut, every
    BatchNorm reset and averaged over the calibration batches in train mode)."""
    model, data, blocks = yolo
    task = Detection(conf=0.0, max_detections=5)
    calibration = [torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(7))]
    before = snapshot(model)
    result = detection(model, data, task=task, table=hand_table(blocks).assign(bn_recalibrated=True), blocks=blocks,
                       calibration=calibration, images=2, progress=False)
    assert_unchanged(model, before)
    name = result.views.set_index("view").loc["costliest", "block"]
    copy = copy_module(model)
    unit = copy.get_submodule(next(b.module for b in blocks if b.name == name))
    unit.forward = lambda x: x
    norms = [m for m in copy.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        for m in norms:
            m.reset_running_stats()
            m.momentum = None
            m.train()
        for x in calibration:
            copy(x)
        copy.eval()
        hand = task.detections(copy(data[0]))
    mine = result.boxes[result.boxes["view"] == "costliest"]
    for i, found in enumerate(hand):
        rows = mine[mine["image"] == i]
        np.testing.assert_allclose(rows[["x1", "y1", "x2", "y2"]].to_numpy(), found["boxes"].numpy(), rtol=1e-6, atol=1e-4)  # pixels; float rounding near 0
        np.testing.assert_allclose(rows["score"].to_numpy(), found["scores"].numpy(), rtol=1e-5, atol=1e-6)


def test_inputs_that_are_no_images_are_noted(yolo):
    model, data, blocks = yolo
    from analyses.detection.pictures import first_images
    parts, why = first_images(model, [torch.zeros(2, 5)], 3)
    assert parts == [] and "a tensor of shape (2, 5), not a batch of images" in why


# --- figures, the page, the terminal ---------------------------------------------------------------


def hand_result() -> DetectionResult:
    names = ["b0", "b1", "b2", "b3"]
    rows = pd.DataFrame({"block": names, "position": range(4), "verdict": ["helps", "helps", "skipped", "neutral"],
                         "detections_kept": [0.024, 0.45, 0.99, 0.98], "detections_lost": [0.976, 0.55, 0.01, 0.02],
                         "detections_lost_se": [0.01, 0.05, 0.01, 0.02], "detections": [3, 120, 260, 258],
                         "map50": [0.02, 0.4, 0.98, 0.97], "map50_95": [0.01, 0.3, 0.9, 0.9],
                         "map50_drop": [0.98, 0.6, 0.02, 0.03], "drift": [0.115, 0.03, 0.01, 0.20],
                         "lost_rank": [1, 2, 4, 3], "drift_rank": [2, 3, 4, 1]})
    views = pd.DataFrame({"view": ["intact", "costliest", "skipped"], "block": ["", "b0", "b2"],
                          "verdict": ["", "helps", "skipped"], "detections_lost": [np.nan, 0.976, 0.01],
                          "map50_drop": [np.nan, 0.98, 0.02], "drift": [np.nan, 0.115, 0.01], "boxes": [2, 1, 2]})
    boxes = pd.DataFrame({"image": [0, 1, 0, 0, 1], "view": ["intact", "intact", "costliest", "skipped", "skipped"],
                          "block": ["", "", "b0", "b2", "b2"], "x1": [2.0, 4, 1, 2, 4], "y1": [3.0, 5, 1, 3, 5],
                          "x2": [10.0, 12, 30, 10, 12], "y2": [11.0, 9, 6, 11, 9], "score": [0.9, 0.8, 0.3, 0.9, 0.8],
                          "label": [0, 1, 0, 0, 1], "name": ["cat", "dog", "cat", "cat", "dog"]})
    images = tuple(np.full((16, 20, 3), 100 * i, dtype=np.uint8) for i in range(2))
    return DetectionResult(blocks=rows, spearman=0.4, max_drift=0.05, views=views, boxes=boxes, images=images)


def test_agreement_lines_say_when_drift_misleads():
    lines = page.agreement_lines(hand_result())
    assert lines[0] == "The reference is the intact model's own detections."
    assert lines[1] == "Deleting b0 costs the most: 97.6% of the reference's detections lost, mAP50 down 98.0 points."
    assert lines[2].startswith("Drift ranks the blocks unlike the detections they carry (Spearman \u03c1 = +0.40 "
                               "over 4 blocks, below 0.8)")
    assert lines[3] == "b0, the block whose deletion loses the most detections, ranks 2 of 4 by drift (11.5%)."
    assert lines[4] == ("Drift alone would call 1 block(s) unchanged (under 5%) although deleting them loses "
                        "detections beyond noise: b1 (3.0% drift, 55.0% lost).")
    assert lines[5] == ("Drift would overstate 1 block(s) whose deletion moves the outputs by 5% or more but loses no "
                        "detections beyond noise: b3 (20.0% drift, 2.0% lost).")
    agreeing = hand_result()
    agreeing = DetectionResult(blocks=agreeing.blocks.assign(drift=[0.9, 0.6, 0.01, 0.04], drift_rank=[1, 2, 4, 3]),
                               spearman=1.0, max_drift=0.05, views=agreeing.views, boxes=agreeing.boxes,
                               intact_kept=0.962)
    lines = page.agreement_lines(agreeing)
    assert lines[0] == ("The reference is the ground truth: the intact model finds 96.2% of its boxes, and a block's "
                        "share lost is what its deletion loses beyond that.")
    assert lines[2] == ("Drift ranks the blocks nearly as the detections do (Spearman \u03c1 = +1.00 over 4 blocks): "
                        "here the raw outputs do not mislead.")
    assert len(lines) == 3
    # nothing beyond noise: the ranks compare noise, and the section says so
    noise = DetectionResult(blocks=hand_result().blocks.assign(verdict="skipped"), spearman=0.4, max_drift=0.05,
                            views=agreeing.views, boxes=agreeing.boxes)
    assert page.agreement_lines(noise)[2].startswith("No block's deletion loses detections beyond noise")
    # a torchvision detector's outputs have no drift
    lists = DetectionResult(blocks=hand_result().blocks.assign(drift=np.nan), spearman=np.nan, max_drift=0.05,
                            views=agreeing.views, boxes=agreeing.boxes)
    assert page.agreement_lines(lists)[2].startswith("The model's outputs are its detections already")
    # nothing lost at all
    none = DetectionResult(blocks=hand_result().blocks.assign(detections_lost=0.0, verdict="skipped"), spearman=np.nan,
                           max_drift=0.05, views=agreeing.views, boxes=agreeing.boxes)
    assert page.agreement_lines(none)[1:] == [
        "No block's deletion loses any of the reference's detections.",
        "Drift and the detections lost cannot be rank-correlated over these 4 block(s) (too few, or one of them does "
        "not vary)."]


def test_detections_per_block_draws_the_shares():
    ax = figures.detections_per_block(hand_result().blocks)
    heights = [patch.get_height() for patch in ax.patches if isinstance(patch, Rectangle)][:4]
    np.testing.assert_allclose(heights, [97.6, 55.0, 1.0, 2.0])
    diamonds = ax.collections[-1].get_offsets()
    np.testing.assert_allclose(np.asarray(diamonds)[:, 1], [98.0, 60.0, 2.0, 3.0])


def test_drift_vs_detections_places_each_block():
    ax = figures.drift_vs_detections(hand_result().blocks, max_drift=0.05)
    np.testing.assert_allclose(ax.collections[0].get_offsets(), [[11.5, 97.6], [3.0, 55.0], [1.0, 1.0], [20.0, 2.0]])
    assert "Spearman \u03c1 = +0.40" in ax.get_title()  # ascending ranks: drift 3,2,1,4, lost 4,3,1,2: 1 - 6*6/60
    assert [t.get_text() for t in ax.texts] == ["b0", "b1", "b2", "b3"]


def test_pictures_put_each_box_on_its_picture():
    result = hand_result()
    ax = figures.detection_pictures(result.boxes, images=result.images, views=result.views)
    assert sum(isinstance(artist, AxesImage) for artist in ax.get_children()) == 2 * 3  # images x views
    rectangles = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(rectangles) == 5
    gap = 0.06 * 20
    # image 1 (second row) of the intact model: (4, 5)-(12, 9), one row down
    assert rectangles[1].get_xy() == (4.0, 16 + gap + 5.0) and rectangles[1].get_width() == 8.0
    # the costliest view (second column), its box clipped to the 20-pixel-wide picture
    assert rectangles[2].get_xy() == (20 + gap + 1.0, 1.0) and rectangles[2].get_width() == 19.0


def test_section_and_terminal():
    result = hand_result()
    section = page.section(result, context=None)
    assert section.id == "detection" and section.title == page.TITLE
    assert len(section.figures) == 3 and all(f.src.startswith("data:image/png;base64,") for f in section.figures)
    assert "Costliest: b0, whose deletion loses 97.6%" in section.figures[2].caption
    (table,) = section.tables
    assert [row[0]["text"] for row in table.rows] == ["b0", "b1", "b2", "b3"]
    assert table.rows[0][2]["text"] == "2.40" and table.rows[0][3]["text"] == "97.60"  # kept, lost (%)
    assert table.headers[5] == "detections per image" and table.rows[1][5]["text"] == "120.00"
    assert section.lead[1:] == page.agreement_lines(result)
    names = [png.name for png in page.figure_files(result, Detection())]
    assert names == ["detection_blocks.png", "detection_drift.png", "detection_pictures.png"]
    text = page.terminal(result, Detection())
    assert "b0" in text and page.agreement_lines(result)[3] in text
    noted = DetectionResult(blocks=result.blocks, spearman=0.4, max_drift=0.05, views=result.views.iloc[:2],
                            boxes=result.boxes, notes={"skipped": "no block is called skipped, so ..."})
    assert page.section(noted, context=None).notes == ["No block is called skipped, so ..."]


# --- the command -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_command_on_a_yolo_checkpoint(tmp_path):
    """`python -m analyses.detection --model yolo:PATH --dataset images`: its tables and figures,
    and the intact model's pictured boxes equal the model's own detections on the images as
    probe prepares them."""
    from PIL import Image

    from analyses.detection.__main__ import main
    from probe.loading.detection_images import load_detection_images
    from probe.loading.detectors import detector_input, load_yolo
    torch.manual_seed(0)
    model = tasks.DetectionModel("yolov8n.yaml", nc=3, verbose=False)
    half = copy_module(model).half()
    torch.save({"epoch": -1, "model": None, "ema": half, "updates": 0,
                "train_args": {"imgsz": 64, "task": "detect", "model": "yolov8n.yaml"}}, tmp_path / "best.pt")
    root = tmp_path / "images"
    root.mkdir()
    for i in range(4):
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / f"{i}.png")
    out = tmp_path / "out"
    assert main(["--model", f"yolo:{tmp_path / 'best.pt'}", "--dataset", "images", "--data-root", str(root),
                 "--conf", "0.0", "--out", str(out), "--no-progress"]) == 0
    for name in ("detection_blocks.png", "detection_drift.png", "detection_pictures.png"):
        assert (out / name).stat().st_size > 0
    rows = pd.read_csv(out / "detection.csv")
    assert len(rows) == 6 and (rows["detections_kept"] + rows["detections_lost"]).round(12).eq(1.0).all()
    boxes = pd.read_csv(out / "detection_boxes.csv")
    loaded = load_yolo(f"yolo:{tmp_path / 'best.pt'}")
    prepared = load_detection_images(root, detector_input(loaded))  # no labels: images alone
    images = torch.stack([prepared[i] for i in range(3)])
    with torch.no_grad():
        hand = Detection(conf=0.0).detections(loaded(images))
    intact = boxes[boxes["view"] == "intact"]
    for i, found in enumerate(hand):
        mine = intact[intact["image"] == i]
        np.testing.assert_allclose(mine[["x1", "y1", "x2", "y2"]].to_numpy(), found["boxes"].numpy(), rtol=1e-6, atol=1e-4)  # pixels; float rounding near 0
        np.testing.assert_allclose(mine["score"].to_numpy(), found["scores"].numpy(), rtol=1e-6, atol=1e-6)
