"""What each block of a detector carries of its detections, and whether the drift of its raw
outputs says so.

    python -m analyses.detection --model yolo:best.pt --dataset images --data-root DIR --out runs/detection

A detector's raw outputs are mostly box coordinates over every anchor; the class scores that
decide what is detected are a sliver of them. So how far deleting a block moves the outputs
(drift) can rank the blocks unlike what they carry of the detections. This analysis reads the
detection task's per-block table (`probe.scoring.detection.Detection`: the share of the
reference detections the model with one block deleted still makes, matched one to one at IoU
>= 0.5 with the same class, and mAP50 against the same reference), sets the drift beside it
with their Spearman correlation across blocks, and pictures a few images: the intact model's
boxes beside those with the costliest block deleted and with a skipped block deleted.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

import probe
from analyses.detection.pictures import BOX_COLUMNS, as_picture, first_images, pictured_boxes
from analyses.registry import Analysis, Job
from probe.commands.config import RunConfig
from probe.commands.inputs import load_inputs, load_task
from probe.deletion.block_table import check_table, join_block_table
from probe.deletion.evaluation import single_block_sweep
from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError
from probe.scoring.detection import Detection
from probe.scoring.results import table_info
from probe.scoring.tasks import Task, resolve_task
from probe.scoring.verdict import VerdictRule, rank_correlation

__all__ = ["BLOCK_COLUMNS", "BOX_COLUMNS", "IMAGES", "VIEW_COLUMNS", "DetectionResult", "detection"]

BLOCK_COLUMNS = ["block", "position", "verdict", "detections_kept", "detections_lost", "detections_lost_se",
                 "detections", "map50", "map50_95", "map50_drop", "drift", "lost_rank", "drift_rank"]
VIEW_COLUMNS = ["view", "block", "verdict", "detections_lost", "map50_drop", "drift", "boxes"]
IMAGES = 3  # images pictured by default
_NEEDED = ["block", "position", "verdict", "detections_kept", "detections_lost", "map50", "map50_drop", "drift"]


@dataclass(frozen=True)
class DetectionResult:
    """What `detection` returns; blocks in forward order.

    blocks (detection.csv): one row per block: block, position, verdict (by the share of
        detections lost), detections_kept (the share of the reference's detections the model with
        this block deleted makes, matched one to one), detections_lost (the intact model's share
        kept minus this one: 1 - detections_kept against the intact model's own detections),
        detections_lost_se (its paired per-image standard error), detections (how many the
        ablated model makes), map50, map50_95 (against the same reference), map50_drop (the
        intact model's map50 minus this one), drift (relative L2 change of all raw outputs),
        lost_rank, drift_rank (1: the block whose deletion loses the most detections / moves
        the outputs the most; ties share the better rank).
    spearman: Spearman rank correlation of drift with detections_lost across the blocks (NaN
        when undefined: fewer than two blocks, or a column that is constant).
    max_drift: the drift under which the verdict rule calls the outputs unchanged (what a
        drift-only table would say of a block).
    intact_kept: the share of the reference's detections the intact model makes (1 against its
        own detections; below 1 against a ground truth).
    views (detection_views.csv): the pictured models, one row each: view ("intact";
        "costliest": the block whose deletion loses the most detections; "skipped": of the
        blocks called skipped, the one whose deletion loses the most), block ("" for the intact
        model), verdict, detections_lost, map50_drop, drift (the block's row of `blocks`; NaN
        for the intact model), boxes (how many boxes that model draws on the pictured images).
    boxes (detection_boxes.csv): one row per detection on a pictured image: image (0-based
        among the pictured), view, block, x1, y1, x2, y2 (pixels of the model's input), score,
        label (class index), name (the model's name for the class, else the index).
    images: the pictured images as the model took them, (height, width, 3) uint8 arrays.
    notes: why something is not there ({"pictures": ..., "skipped": ...}).
    """

    blocks: pd.DataFrame
    spearman: float
    max_drift: float
    views: pd.DataFrame
    boxes: pd.DataFrame
    intact_kept: float = 1.0
    images: tuple[np.ndarray, ...] = ()
    notes: dict[str, str] = field(default_factory=dict)

    def tables(self) -> dict[str, pd.DataFrame]:
        """{file stem: table}: detection.csv, detection_views.csv, detection_boxes.csv."""
        return {"detection": self.blocks, "detection_views": self.views, "detection_boxes": self.boxes}


def detection(model: nn.Module, data: Iterable, *, task: str | Task | Callable | None = "detection",
              table: pd.DataFrame | None = None, blocks: Sequence[str | Block] | None = None, mode: str = "zero",
              calibration: Iterable | None = None, images: int = IMAGES, rule: VerdictRule | None = None,
              progress: bool = True) -> DetectionResult:
    """The detections each block carries, their agreement with drift, and pictures.

    table: the per-block table of the detection task (e.g. `python -m probe.ablate --task
    detection`'s); swept here (deleting with `mode`, BatchNorm refitted on `calibration` when
    given) when None. images: how many of the first images of `data` are pictured (0: none).
    The pictures delete each block as the table did (its `mode` and `bn_recalibrated`
    columns). Every call leaves the model as it found it.
    """
    task = resolve_task(task)
    if not isinstance(task, Detection):
        raise ProbeError(f"detection needs a detection task (task='detection', probe.Detection(...)); the task is "
                         f"{getattr(task, 'name', task)!r}, which finds no boxes.")
    if not isinstance(images, int) or isinstance(images, bool) or images < 0:
        raise ProbeError(f"images={images!r} must be a whole number >= 0 (how many images to picture).")
    chosen = resolve_blocks(model, blocks, data=data)  # a model fx cannot trace: found on the first batch
    if table is None:
        sweep, _ = single_block_sweep(model, data, mode=mode, calibration=calibration, blocks=chosen, task=task,
                                      progress=progress)
        table = join_block_table(probe.measure(model, data, blocks=chosen, progress=progress), sweep, rule=rule)
    # The rule the verdicts came from says what drift counts as unchanged.
    max_drift = (rule or table_info(table).rule or VerdictRule()).max_drift
    intact_kept = float(table_info(table).baseline.get("detections_kept", np.nan))
    table = check_table(table, _NEEDED, "detection", model, blocks=chosen)
    if "mode" in table.columns:
        mode = str(table["mode"].iloc[0])
    recalibrate = "bn_recalibrated" in table.columns and bool(table["bn_recalibrated"].iloc[0])
    notes: dict[str, str] = {}
    if recalibrate and calibration is None:
        raise ProbeError("detection: the per-block table refitted BatchNorm statistics for every deletion "
                         "(bn_recalibrated); pass the same calibration= data, so the pictures delete as it did.")
    rows = _block_rows(table)
    by_name = {block.name: block for block in chosen}
    views = _views(rows, notes)
    parts, why = first_images(model, data, images) if images else ([], None)
    if why:
        notes["pictures"] = why
    boxes = pictured_boxes(model, task, parts, [(view, by_name.get(name)) for view, name in views], mode=mode,
                           data=data, calibration=calibration if recalibrate else None) \
        if parts else pd.DataFrame(columns=BOX_COLUMNS)
    pictures = tuple(as_picture(image) for x in parts for image in x)
    if np.isnan(intact_kept) and len(rows):  # a table read back from a CSV: kept + lost is the intact share
        intact_kept = float(rows["detections_kept"].iloc[0] + rows["detections_lost"].iloc[0])
    return DetectionResult(blocks=rows, spearman=rank_correlation(rows, "drift", "detections_lost"),
                           max_drift=max_drift, intact_kept=intact_kept, views=_view_table(rows, views, boxes),
                           boxes=boxes, images=pictures, notes=notes)


def _block_rows(table: pd.DataFrame) -> pd.DataFrame:
    rows = table.reindex(columns=BLOCK_COLUMNS).copy()
    for column in BLOCK_COLUMNS[3:-2]:
        rows[column] = pd.to_numeric(rows[column], errors="coerce")
    rows["lost_rank"] = rows["detections_lost"].rank(ascending=False, method="min").astype("Int64")
    rows["drift_rank"] = rows["drift"].rank(ascending=False, method="min").astype("Int64")
    return rows


def _views(rows: pd.DataFrame, notes: dict[str, str]) -> list[tuple[str, str | None]]:
    """[(view, block name or None)]: the intact model, the costliest block, the skipped block
    that loses the most (ties: the first in forward order)."""
    views: list[tuple[str, str | None]] = [("intact", None)]
    lost = rows["detections_lost"]
    if lost.notna().any():
        views.append(("costliest", str(rows.loc[lost.idxmax(), "block"])))
    skipped = rows[(rows["verdict"] == "skipped") & ~rows["block"].isin([name for _, name in views])]
    if len(skipped) and skipped["detections_lost"].notna().any():
        views.append(("skipped", str(skipped.loc[skipped["detections_lost"].idxmax(), "block"])))
    else:
        notes["skipped"] = "no block is called skipped, so no skipped block is pictured." if not (
            rows["verdict"] == "skipped").any() else "the only skipped block is the costliest, pictured once."
    return views


def _view_table(rows: pd.DataFrame, views: list[tuple[str, str | None]], boxes: pd.DataFrame) -> pd.DataFrame:
    indexed = rows.set_index("block")
    out = []
    for view, name in views:
        row = indexed.loc[name] if name is not None else None
        out.append({"view": view, "block": name or "",
                    **{c: (row[c] if row is not None else (np.nan if c != "verdict" else ""))
                       for c in ("verdict", "detections_lost", "map50_drop", "drift")},
                    "boxes": int((boxes["view"] == view).sum())})
    return pd.DataFrame(out, columns=VIEW_COLUMNS)


def _in_job(job: Job) -> DetectionResult:
    return detection(job.model, job.data, task=job.task, table=job.table, blocks=job.blocks,
                     calibration=job.recalibration_data, progress=job.progress)


def _alone(config: RunConfig, out: Path, progress: bool) -> DetectionResult:
    if not isinstance(resolve_task(config.task), Detection):
        raise ProbeError(f"python -m analyses.detection analyses detectors; the task is {config.task!r}: give "
                         "--task detection (and a detector with images).")
    inputs = load_inputs(config, progress=progress)
    # --conf, --nms-iou and the model's class count, as probe.ablate's task has them
    return detection(inputs.model, inputs.data, task=load_task(config, inputs.model), blocks=inputs.blocks,
                     mode=config.mode, calibration=inputs.calibration, progress=progress)


def _applies(task: Task, config: RunConfig) -> str | None:
    if isinstance(task, Detection):
        return None
    return "it shows the detections each block carries; it applies to the task 'detection' only."


ANALYSIS = Analysis(
    name="detection", order=5, in_job=_in_job, alone=_alone, options=("model", "ablation"),
    summary="a detector's blocks: the detections and mAP50 each carries, drift beside them, boxes pictured",
    applies=_applies, leads_report=True, silent_unless_run=True)
