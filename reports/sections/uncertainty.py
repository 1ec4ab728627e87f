"""The uncertainty section: bootstrap intervals and per-class effects."""

from __future__ import annotations



from reports import figures
from reports.sections.common import PNG, ReportContext, Section, _COST_WORDS, _bn_note, _cost_header, _figure, _present, _recalibrated, _table

__all__ = ["TITLE", "uncertainty_section", "figure_files", "section", "terminal"]

TITLE = "How sure are we? (per-class effects and uncertainty)"  # the section's heading, also when it did not run


def _interval_caption(cost: str, level: str, resamples: int) -> str:
    resampled = (f"the evaluation samples were redrawn with replacement {resamples} times, the same draw for the "
                 "intact and the damaged network (a paired bootstrap), and the bar spans the middle of the redrawn "
                 "costs.")
    if cost == "drift":
        return ("Each dot is how far the outputs move, in % of their size, when that one block is deleted; the "
                f"vertical bar is its {level} bootstrap interval: " + resampled + " Drift has no sign, so the "
                "decision compares the bar with the rule's drift floor (the largest move still counted as no "
                "change): helps (the whole bar above the floor), skipped (the whole bar within the floor and the "
                "branch is small), neutral (any other).")
    if cost == "loss_increase":
        return ("Each dot is the loss increase when that one block is deleted; the vertical bar is its "
                f"{level} bootstrap interval: " + resampled + " A bar that crosses zero means this data cannot "
                "tell the cost from no cost at all. Colours: helps (the whole bar above zero), hurts (below "
                "zero), skipped (crosses zero and the branch is small), neutral (crosses zero, branch not small).")
    return ("Each dot is the accuracy lost, in percentage points, when that one block is deleted; the "
            f"vertical bar is its {level} bootstrap interval: the evaluation samples were redrawn with "
            f"replacement {resamples} times, the same draw for the intact and the damaged network "
            "(a paired bootstrap), and the bar spans the middle of the redrawn costs. A bar that "
            "crosses zero means this data cannot tell the cost from no cost at all. Colours: helps (the "
            "whole bar above zero), hurts (below zero), skipped (crosses zero and the branch is small), "
            "neutral (crosses zero, branch not small).")


def uncertainty_section(result, *, cost: str | None = None) -> Section:
    """From `analyses.uncertainty.uncertainty` (an UncertaintyResult). cost: the per-block
    table's cost column; found in the intervals table when None (`figures.plotted_interval`)."""
    intervals, per_class = result.intervals, result.per_class
    cost, low, high = figures.plotted_interval(intervals, cost)
    recal = _recalibrated(intervals)
    level = f"{intervals['level'].iloc[0]:.0%}" if len(intervals) else "95%"
    resamples = int(intervals["resamples"].iloc[0]) if len(intervals) else 0
    skipped = intervals.loc[intervals["skipped"].astype(bool), "block"].astype(str).tolist()
    contains = ("lies within the rule's drift floor" if cost == "drift" else "contains zero")
    lead = [f"Blocks skipped once noise is accounted for ({len(skipped)}): "
            + (", ".join(skipped) if skipped else "none") + ". A block counts as skipped here when its branch is "
            f"small (ratio below the rule's threshold) and the {level} bootstrap interval of its deletion cost "
            f"{contains}."]
    if "verdict" in intervals.columns and intervals["verdict"].notna().all():
        differ = intervals[(intervals["verdict"] == "skipped") != intervals["skipped"].astype(bool)]
        lead.append("The bootstrap decision agrees with the noise-band rule above on every block."
                    if differ.empty else
                    "The bootstrap decision differs from the noise-band rule above on: "
                    + ", ".join(differ["block"].astype(str)) + ".")
    lead.append(_bn_note(recal))
    fig_ci = _figure(figures.interval_plot, intervals, "Deletion cost with bootstrap intervals",
                     _interval_caption(cost, level, resamples), cost=cost,
                     width=figures.block_figure_width(len(intervals)))
    shown = [fig_ci]
    notes = []
    if len(per_class) and "accuracy_drop" in per_class.columns:
        shown.append(_figure(
            figures.class_drop_heatmap, per_class, "Deletion cost per class",
            "Each row is one deleted block (in the order data flows through the network), each "
            "column one class; the colour is how many percentage points of that class's accuracy "
            "are lost when the block is deleted (red: lost, blue: gained, white: unchanged). A "
            "block with a small overall cost can still matter for one class: look for a single "
            "red cell in an otherwise white row.",
            **figures.heatmap_size(per_class)))
    else:
        notes.append("No deletion cost per class: the task has no class labels.")
    if cost == "accuracy_drop":
        columns = {"block": ("block", None), "ratio": ("ratio", ".3f"),
                   "accuracy_drop": ("accuracy drop (pp)", "pp"), "drop_low": ("interval low (pp)", "pp"),
                   "drop_high": ("interval high (pp)", "pp"), "verdict_ci": ("decision", None),
                   "verdict": ("noise-band verdict", None)}
        measured = "accuracy drop"
    else:
        header, spec = _cost_header(cost)
        unit = " (%)" if cost == "drift" else ""
        columns = {"block": ("block", None), "ratio": ("ratio", ".3f"), cost: (header, spec),
                   low: (f"interval low{unit}", spec), high: (f"interval high{unit}", spec),
                   "verdict_ci": ("decision", None), "verdict": ("noise-band verdict", None)}
        measured = _COST_WORDS[cost][0] if cost in _COST_WORDS else cost.replace("_", " ")
    table = _table(intervals, _present(columns, intervals),
                   f"Per block: the measured {measured} and its {level} paired bootstrap interval "
                   f"({resamples} resamples), with the decision they give and the verdict of the noise-band rule.")
    return Section(id="uncertainty", title=TITLE, lead=lead,
                   figures=shown, tables=[table], notes=notes)


def section(result, context: ReportContext) -> Section:
    """The report's uncertainty section, from `analyses.uncertainty.UncertaintyResult`."""
    return uncertainty_section(result, cost=context.cost)


def figure_files(result, task) -> list[PNG]:
    """The PNG files `python -m analyses.uncertainty` writes (no per-class figure without classes)."""
    cost, _low, _high = figures.plotted_interval(result.intervals, task.cost)
    files = [PNG("drop_intervals.png", figures.interval_plot, result.intervals,
                 {"cost": cost, "width": figures.block_figure_width(len(result.intervals))})]
    if len(result.per_class):  # a task without class labels has no per-class table
        files.append(PNG("class_drops.png", figures.class_drop_heatmap, result.per_class,
                         figures.heatmap_size(result.per_class)))
    return files


def terminal(result, task) -> str:
    """What `python -m analyses.uncertainty` prints: each block's cost with its interval."""
    # accuracy_drop with drop_low/drop_high, or the task's cost with <cost>_low/<cost>_high
    cost, low, high = figures.plotted_interval(result.intervals, task.cost)
    shown = result.intervals[["block", "ratio", cost, low, high, "verdict_ci"]]
    return shown.to_string(index=False, float_format="{:.4f}".format)
