"""The recalibration section: does the cost survive BatchNorm recalibration?"""

from __future__ import annotations

import pandas as pd

from reports import figures
from reports.sections.common import PNG, ReportContext, Section, _COST_WORDS, _amount, _cost_header, _figure, _table, format_cell

__all__ = ["TITLE", "recalibration_section", "figure_files", "section", "terminal"]

TITLE = "Does the cost survive BatchNorm recalibration?"  # the section's heading, also when it did not run


def recalibration_section(df: pd.DataFrame, *, calibration_samples: int | None = None,
                          cost: str | None = None) -> Section:
    """From `analyses.recalibration.recalibration`. cost: the per-block table's cost column
    (accuracy_drop, loss_increase, drift); found in `df` when None."""
    cost = figures.cost_of(df, cost)
    wide = df.pivot_table(index="block", columns="bn_recalibrated", values=cost, aggfunc="first")
    order = df.drop_duplicates("block").sort_values("position")["block"]
    wide = wide.reindex(order)
    amount = f"{calibration_samples} " if calibration_samples else ""
    lead = ["Deleting a block shifts every activation after it, but each BatchNorm layer downstream still "
            "normalises with the mean and variance it saw in training. EagleEye (Li et al. 2020) showed that "
            "re-estimating those statistics after pruning changes which pruned networks look good. Here every "
            f"block was deleted alone twice: with the trained statistics, and after re-estimating them on {amount}"
            "held-out samples (never among the evaluated ones) with the block deleted (BatchNorm layers in "
            "training mode, cumulative "
            "average, no gradients). The model's own statistics were restored exactly afterwards."]
    words = {False: "with its trained statistics", True: "with statistics recalibrated the same way"}
    # Per cost: the column of the intact model each row is compared with, and how one of its values reads.
    compared = {"accuracy_drop": ("baseline_accuracy", "Each drop", lambda v: f"{format_cell(v, 'pct')}% accuracy"),
                "loss_increase": ("baseline_loss", "Each loss increase", lambda v: f"loss {format_cell(v, '.4f')}")}
    if cost in compared and compared[cost][0] in df.columns:
        column, subject, reads = compared[cost]
        baselines = df.groupby("bn_recalibrated")[column].first()
        lead.append(f"{subject} is measured against the intact model treated alike: "
                    + "; ".join(f"{reads(baselines[k])} {words[k]}" for k in (False, True) if k in baselines.index)
                    + ". Comparing recalibrated deletions with the trained model would count the refit itself "
                    "as the deletion's effect.")
    elif cost == "drift":
        lead.append("Each drift is measured against the outputs of the intact model treated alike (with its "
                    "trained statistics, or recalibrated the same way): comparing recalibrated deletions with the "
                    "trained model would count the refit itself as the deletion's effect.")
    if {False, True} <= set(wide.columns) and len(wide) and cost == "accuracy_drop":
        change = (wide[False] - wide[True]) * 100
        biggest = change.abs().idxmax()
        lead.append(f"Mean deletion cost: {wide[False].mean() * 100:.2f} points with trained statistics, "
                    f"{wide[True].mean() * 100:.2f} points after recalibration; the largest change is at "
                    f"{biggest} ({wide.loc[biggest, False] * 100:+.2f} \u2192 {wide.loc[biggest, True] * 100:+.2f} "
                    "points).")
    elif {False, True} <= set(wide.columns) and len(wide):
        biggest = (wide[False] - wide[True]).abs().idxmax()
        name = _COST_WORDS[cost][0] if cost in _COST_WORDS else cost
        lead.append(f"Mean {name}: {_amount(wide[False].mean(), cost)} with trained statistics, "
                    f"{_amount(wide[True].mean(), cost)} after recalibration; the largest change is at {biggest} "
                    f"({_amount(wide.loc[biggest, False], cost)} \u2192 {_amount(wide.loc[biggest, True], cost)}).")
    if cost == "accuracy_drop":
        caption = ("For each block (in forward order), the accuracy lost when it alone is deleted, in percentage "
                   "points: vermilion with the BatchNorm statistics the network was trained with, blue after "
                   "re-estimating them for the damaged network. Where the blue bar is much shorter, most of the "
                   "damage came from stale normalisation statistics, not from lost computation; where both bars "
                   "are tall, the network needs what the block computes.")
    else:
        measured = ("how far the outputs move (in % of their size)" if cost == "drift"
                    else "the loss increase")
        caption = (f"For each block (in forward order), {measured} when it alone is deleted: vermilion with the "
                   "BatchNorm statistics the network was trained with, blue after re-estimating them for the "
                   "damaged network. Where the blue bar is much shorter, most of the damage came from stale "
                   "normalisation statistics, not from lost computation; where both bars are tall, the network "
                   "needs what the block computes.")
    fig = _figure(figures.recalibration_effect, df, "Deletion cost with and without recalibration", caption,
                  cost=cost, width=figures.block_figure_width(len(wide)))
    shown = wide.reset_index().rename(columns={False: "trained", True: "recalibrated"})
    header, spec = _cost_header(cost)
    short = "drop" if cost == "accuracy_drop" else header
    unit = " (pp)" if cost == "accuracy_drop" else ""
    columns = {"block": ("block", None)}
    if "trained" in shown:
        columns["trained"] = (f"{short}, trained statistics{unit}", spec)
    if "recalibrated" in shown:
        columns["recalibrated"] = (f"{short}, recalibrated{unit}", spec)
    name = "Accuracy drop" if cost == "accuracy_drop" else header[:1].upper() + header[1:]
    table = _table(shown, columns, f"{name} per block deleted alone, without and with BatchNorm recalibration.")
    return Section(id="recalibration", title=TITLE, lead=lead,
                   figures=[fig], tables=[table])


def section(result, context: ReportContext) -> Section:
    """The report's recalibration section, from `analyses.recalibration.RecalibrationResult`."""
    return recalibration_section(result.table, calibration_samples=context.calibration_samples, cost=context.cost)


def figure_files(result, task) -> list[PNG]:
    """The PNG files `python -m analyses.recalibration` writes."""
    return [PNG("recalibration.png", figures.recalibration_effect, result.table,
                {"cost": task.cost, "width": figures.block_figure_width(result.table["block"].nunique())})]


def terminal(result, task) -> str:
    """What `python -m analyses.recalibration` prints: each block's cost, as trained and recalibrated."""
    table = result.table
    order = table.drop_duplicates("block")["block"]
    wide = table.pivot(index="block", columns="bn_recalibrated", values=task.cost).loc[order]
    # The cost as the report shows it: accuracy in percentage points, drift in %, a loss as it is.
    scale, digits, names = {
        "accuracy_drop": (100, 2, ("drop (pp)", "drop recalibrated (pp)")),
        "drift": (100, 2, ("drift (%)", "drift recalibrated (%)")),
    }.get(task.cost, (1, 4, ("loss increase", "loss increase recalibrated")))
    return (wide * scale).round(digits).rename(columns=dict(zip((False, True), names))).to_string()
