"""The skipping section: the skipped blocks removed together, deletion curves, the pruned export."""

from __future__ import annotations

import pandas as pd

from probe.scoring.verdict import per_token
from reports import figures
from reports.sections.common import PNG, ReportContext, Section, _TASK_COLUMNS, _bn_note, _figure, _present, _recalibrated, _table

__all__ = ["TITLE", "skipping_section", "figure_files", "section", "terminal"]

TITLE = "Removing the skipped blocks together"  # the section's heading, also when it did not run


def _skipping_lead(summary: pd.DataFrame, cost: str) -> str:
    """What deleting every skipped block together did, in one sentence."""
    after = summary.iloc[-1]
    removed = int(after["blocks_removed"])
    names = ", ".join(str(after["removed"]).split())
    if cost == "accuracy_drop" or ("accuracy" in summary.columns and cost not in summary.columns):
        return (f"Deleting all {removed} skipped blocks at once ({names}) "
                f"changes accuracy from {summary.iloc[0]['accuracy']:.2%} to {after['accuracy']:.2%} "
                f"({-after['accuracy_drop'] * 100:+.2f} points).")
    if cost == "drift":
        return (f"Deleting all {removed} skipped blocks at once ({names}) moves the outputs by "
                f"{after['drift']:.2%} of their size from the intact model's (the relative L2 change, averaged "
                "over the samples).")
    unit = " nats per token" if per_token(summary) else ""
    return (f"Deleting all {removed} skipped blocks at once ({names}) changes the loss from "
            f"{summary.iloc[0]['loss']:.4f} to {after['loss']:.4f} ({after['loss'] - summary.iloc[0]['loss']:+.4f}"
            f"{unit}).")


def _curves_caption(curves: pd.DataFrame) -> str:
    metric = figures.curve_metric(curves, None)
    if metric == "accuracy":
        measured, drop, good = ("accuracy on the evaluation data is measured", "whose deletion alone cost least",
                                "stays high")
    elif metric == "drift":
        measured, drop, good = ("the drift of the outputs from the intact network's is measured (the relative L2 "
                                "change, in % of their size)", "whose deletion alone moved the outputs least",
                                "stays low")
    else:
        measured, drop, good = ("the loss on the evaluation data is measured", "whose deletion alone raised the "
                                "loss least", "stays low")
    return ("Blocks are deleted cumulatively: at k, the first k blocks of an order are all deleted at once "
            f"(each branch F(x) replaced by zeros, the shortcut kept) and {measured}; k = 0 is the intact network. "
            f"Green: blocks with the smallest branch/shortcut ratio go first; blue: blocks {drop} go first (this "
            "order uses the measured single-block costs, so it is the best simple order); grey: random orders, "
            f"the dotted line their mean and the shaded band their range. A curve that {good} for many "
            "blocks means the network tolerates losing them together. Veit et al. 2016 (Fig. 5a) found "
            "that residual networks degrade smoothly as random blocks are deleted, as an ensemble of many "
            "shallower paths would, where a plain network would collapse after one deletion.")


def skipping_section(result, *, calibration_samples: int | None = None, cost: str | None = None) -> Section:
    """From `analyses.skipping.skipping` (a SkippingResult). cost: the per-block table's cost
    column (`probe.scoring.verdict.cost_column`); found in the summary when None."""
    summary, curves, export = result.summary, result.curves, result.export
    cost = figures.cost_of(summary, cost)
    recal = _recalibrated(summary)
    after = summary.iloc[-1]
    removed = int(after["blocks_removed"])
    lead = []
    if removed:
        lead.append(_skipping_lead(summary, cost))
    else:
        lead.append("The verdict rule calls no block skipped, so there is nothing to remove together; the deletion "
                    "curves below still show how the network degrades as blocks are deleted.")
    lead.append(_bn_note(recal, calibration_samples))
    fig = _figure(figures.deletion_curves, curves, "Deletion curves", _curves_caption(curves))
    if cost == "accuracy_drop" and "accuracy" in summary.columns:
        tables = [_table(summary, {"state": ("network", None), "blocks_removed": ("blocks deleted", "d"),
                                   "accuracy": ("accuracy (%)", "pct"), "loss": ("loss", ".4f"),
                                   "accuracy_drop": ("accuracy drop (pp)", "pp"),
                                   "flip_rate": ("flip rate (%)", "pct")},
                         "The network before and after deleting every block the verdict rule calls skipped. Flip "
                         "rate: share of samples whose predicted class changed.")]
    else:
        columns = {"state": ("network", None), "blocks_removed": ("blocks deleted", "d"),
                   **_present(_TASK_COLUMNS, summary)}
        caption = "The network before and after deleting every block the verdict rule calls skipped"
        caption += (", against the intact network: drift is how far the outputs move, in % of their size."
                    if cost == "drift" else ", against the intact network" +
                    (" (loss: mean NLL per token, in nats)." if per_token(summary) else "."))
        tables = [_table(summary, columns, caption)]
    if len(export):
        compared = "the logits" if cost == "accuracy_drop" else "the outputs"
        tables.append(_table(export, {"model": ("model", None), "blocks": ("residual blocks", "d"),
                                      "parameters": ("parameters", ",d"), "bytes": ("bytes", ",d"),
                                      "seconds_per_batch": ("seconds per batch", ".4f"),
                                      "parameters_ratio": ("parameters ratio", ".3f"),
                                      "bytes_ratio": ("bytes ratio", ".3f"), "time_ratio": ("time ratio", ".3f"),
                                      "max_abs_difference": ("max |difference|", ".2g")},
                             "The exported pruned model against the original. In the pruned copy each skipped "
                             "block computes only its shortcut: the layers of its branch are removed, not just "
                             "multiplied by zero. Its outputs were checked against the original with those "
                             f"blocks deleted (max |difference| of {compared} over the evaluation data). Time "
                             "per batch is the fastest of several forward passes of one batch, the two models "
                             "alternating in the same process; ratios are pruned / original."))
        path = export.loc[export["model"] == "pruned", "path"]
        if len(path) and str(path.iloc[0]):
            lead.append(f"The pruned model was saved with torch.save to {path.iloc[0]} "
                        "(load it with torch.load(path, weights_only=False)).")
    elif result.export_note:
        lead.append(f"No pruned model was exported: {result.export_note}")
    return Section(id="skipping", title=TITLE, lead=lead, figures=[fig],
                   tables=tables)


def section(result, context: ReportContext) -> Section:
    """The report's skipping section, from `analyses.skipping.SkippingResult`."""
    return skipping_section(result, calibration_samples=context.calibration_samples if context.recalibrated else None,
                            cost=context.cost)


def figure_files(result, task) -> list[PNG]:
    """The PNG files `python -m analyses.skipping` writes."""
    return [PNG("deletion_curves.png", figures.deletion_curves, result.curves)]


def terminal(result, task) -> str:
    """What `python -m analyses.skipping` prints: the two states, then the pruned export."""
    summary = result.summary
    # Accuracy for classification; another task's loss, loss increase or drift.
    shown = [c for c in ("accuracy", "accuracy_drop") if c in summary.columns] or \
        [c for c in ("loss", "loss_increase", "drift") if c in summary.columns]
    lines = [summary[["state", "blocks_removed", *shown]].to_string(index=False)]
    if result.export_note:
        lines.append(f"pruned export: none ({result.export_note})")
    else:
        pruned = result.export.set_index("model").loc["pruned"]
        lines.append(f"pruned export: parameters x{pruned.parameters_ratio:.2f}, bytes x{pruned.bytes_ratio:.2f}, "
                     f"time per batch x{pruned.time_ratio:.2f} of the original")
    return "\n".join(lines)
