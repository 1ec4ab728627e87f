"""The detection section: which blocks carry a detector's detections, and whether drift says so."""

from __future__ import annotations

import math

import pandas as pd

from reports import figures
from reports.sections.common import PNG, ReportContext, Section, _figure, _table

__all__ = ["AGREES", "TITLE", "agreement_lines", "detection_section", "figure_files", "section", "terminal"]

TITLE = "Which blocks carry the detections?"  # the section's heading, also when it did not run

# Spearman's rho of drift with the detections lost from which drift is said to rank the blocks
# as the detections do; below it, the section says the raw-output measure misleads.
AGREES = 0.8


def _share(value: float) -> str:
    return f"{value:.1%}" if pd.notna(value) else "n/a"


def agreement_lines(result) -> list[str]:
    """What the numbers say of drift against the detections, for the report and the terminal."""
    rows, rho = result.blocks, result.spearman
    n = len(rows)
    if n == 0:
        return []
    worst = rows.loc[rows["detections_lost"].idxmax()] if rows["detections_lost"].notna().any() else None
    lines = []
    if pd.notna(result.intact_kept) and result.intact_kept < 1 - 1e-9:
        lines.append(f"The reference is the ground truth: the intact model finds {_share(result.intact_kept)} of its "
                     "boxes, and a block's share lost is what its deletion loses beyond that.")
    else:
        lines.append("The reference is the intact model's own detections.")
    if worst is not None and worst["detections_lost"] <= 0:
        lines.append("No block's deletion loses any of the reference's detections.")
    elif worst is not None:
        lines.append(f"Deleting {worst['block']} costs the most: {_share(worst['detections_lost'])} of the "
                     f"reference's detections lost, mAP50 down {worst['map50_drop'] * 100:.1f} points.")
    if rows["drift"].isna().all():
        lines.append("The model's outputs are its detections already (no raw tensor of one shape per image), so "
                     "there is no drift to compare with them.")
        return lines
    if math.isnan(rho):
        lines.append(f"Drift and the detections lost cannot be rank-correlated over these {n} block(s) (too few, or "
                     "one of them does not vary).")
        return lines
    if not (rows["verdict"] == "helps").any():
        lines.append(f"No block's deletion loses detections beyond noise, so ranking the blocks by them ranks noise: "
                     f"Spearman \u03c1 = {rho:+.2f} of drift with the detections lost says little here.")
        return lines
    if rho >= AGREES:
        lines.append(f"Drift ranks the blocks nearly as the detections do (Spearman \u03c1 = {rho:+.2f} over {n} "
                     "blocks): here the raw outputs do not mislead.")
    else:
        lines.append(f"Drift ranks the blocks unlike the detections they carry (Spearman \u03c1 = {rho:+.2f} over {n} "
                     f"blocks, below {AGREES:g}): drift weighs every raw output alike, and in a detector's head most "
                     "of them are box coordinates over every anchor, while the class scores that decide what is "
                     "detected are few. Judge the blocks by the detections, not by the drift.")
    if worst is not None and worst["drift_rank"] != 1:
        lines.append(f"{worst['block']}, the block whose deletion loses the most detections, ranks "
                     f"{int(worst['drift_rank'])} of {n} by drift ({_share(worst['drift'])}).")
    floor = result.max_drift
    hidden = rows[(rows["verdict"] == "helps") & (rows["drift"] < floor)]
    if len(hidden):
        lines.append(f"Drift alone would call {len(hidden)} block(s) unchanged (under {floor:.0%}) although deleting "
                     "them loses detections beyond noise: " + ", ".join(
                         f"{r.block} ({_share(r.drift)} drift, {_share(r.detections_lost)} lost)"
                         for r in hidden.itertuples()) + ".")
    loud = rows[rows["verdict"].isin(["skipped", "neutral"]) & (rows["drift"] >= floor)]
    if len(loud):
        lines.append(f"Drift would overstate {len(loud)} block(s) whose deletion moves the outputs by {floor:.0%} or "
                     "more but loses no detections beyond noise: " + ", ".join(
                         f"{r.block} ({_share(r.drift)} drift, {_share(r.detections_lost)} lost)"
                         for r in loud.itertuples()) + ".")
    return lines


def _pictures_caption(result) -> str:
    views = result.views.set_index("view")
    parts = ["Each row is one image as the detector took it; each column one model: the intact model, then "
             "the same model with one block's branch deleted. Boxes are each model's detections (after its own "
             "non-maximum suppression and thresholds), coloured by class and labelled with the class and the score."]
    if "costliest" in views.index:
        row = views.loc["costliest"]
        parts.append(f"Costliest: {row['block']}, whose deletion loses {_share(row['detections_lost'])} of the "
                     "reference's detections over the whole evaluation data.")
    if "skipped" in views.index:
        row = views.loc["skipped"]
        parts.append(f"Skipped: {row['block']}, of the blocks the rule calls skipped the one whose deletion loses "
                     f"the most ({_share(row['detections_lost'])}).")
    return " ".join(parts)


def detection_section(result, *, lines=()) -> Section:
    """From `analyses.detection.detection` (a DetectionResult)."""
    rows = result.blocks
    width = figures.block_figure_width(len(rows))
    drifted = rows["drift"].notna().any()  # a torchvision detector's outputs have no drift
    shown = [
        _figure(figures.detections_per_block, rows, "Detections and mAP50 lost, block by block",
                "Bars: for each block, the share of the reference's detections (the intact model's, or the "
                "ground truth when the data has it) that the model with that block's branch deleted no longer "
                "makes, beyond those the intact model misses; detections are matched one to one at IoU 0.5 or "
                "more with the same class (error bars: the paired per-image standard error). Bar colours are the "
                "verdicts of the per-block table. Black diamonds: how many points mAP50 falls, against the same "
                "reference.", width=width),
        _figure(figures.drift_vs_detections, rows, "Drift of the raw outputs against the detections lost",
                "One dot per block: how far its deletion moves all the raw outputs (relative L2 change, x) against "
                "the share of detections it loses (y). Were drift a faithful proxy, the dots would rise from left "
                "to right; the dashed line is the drift the verdict rule calls unchanged.",
                max_drift=result.max_drift) if drifted else None,
    ]
    shown = [figure for figure in shown if figure is not None]
    if len(result.images):
        size = figures.pictures_size(result.views, result.images)
        shown.append(_figure(figures.detection_pictures, result.boxes, "What the detector sees, intact and ablated",
                             _pictures_caption(result), images=result.images, views=result.views, **size))
    table = _table(rows, {"block": ("block", None), "verdict": ("verdict", None),
                          "detections_kept": ("detections kept (%)", "pct"),
                          "detections_lost": ("detections lost (%)", "pct"),
                          "detections_lost_se": ("its standard error (%)", "pct"),
                          "detections": ("detections per image", ".2f"), "map50": ("mAP50", ".3f"),
                          "map50_drop": ("mAP50 drop (pp)", "pp"), "map50_95": ("mAP50-95", ".3f"),
                          "drift": ("drift (%)", "pct"), "lost_rank": ("rank by detections lost", "d"),
                          "drift_rank": ("rank by drift", "d")},
                   "Per block, deleted alone: the share of the reference's detections kept and lost, how many "
                   "detections per image the ablated model makes, its mAP50 and mAP50-95 against the same "
                   "reference, and the drift of the raw outputs; the two ranks (1: costliest) say whether drift "
                   "orders the blocks as the detections do.")
    return Section(id="detection", title=TITLE,
                   lead=["A detector is judged by its detections: which boxes it finds, of which class. This section "
                         "shows, per block, what deleting it does to them, beside the drift of the raw outputs.",
                         *lines],
                   figures=shown, tables=[table], notes=[why[:1].upper() + why[1:] for why in result.notes.values()])


def section(result, context: ReportContext) -> Section:
    """The report's detection section, from `analyses.detection.DetectionResult`."""
    return detection_section(result, lines=agreement_lines(result))


def figure_files(result, task) -> list[PNG]:
    """The PNG files `python -m analyses.detection` writes."""
    width = figures.block_figure_width(len(result.blocks))
    files = [PNG("detection_blocks.png", figures.detections_per_block, result.blocks, {"width": width})]
    if result.blocks["drift"].notna().any():
        files.append(PNG("detection_drift.png", figures.drift_vs_detections, result.blocks,
                         {"max_drift": result.max_drift}))
    if len(result.images):
        files.append(PNG("detection_pictures.png", figures.detection_pictures, result.boxes,
                         {"images": result.images, "views": result.views,
                          **figures.pictures_size(result.views, result.images)}))
    return files


def terminal(result, task) -> str:
    """What `python -m analyses.detection` prints: the per-block table, then what it says."""
    columns = ["block", "verdict", "detections_kept", "detections_lost", "map50", "map50_drop", "drift",
               "lost_rank", "drift_rank"]
    shown = result.blocks[[c for c in columns if c in result.blocks.columns]]
    return "\n".join([shown.to_string(index=False, float_format="{:.3f}".format), "", *agreement_lines(result), ""])
