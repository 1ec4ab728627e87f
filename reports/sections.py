"""One report section per analysis: its figures with captions, its tables, and what it found.

Each builder takes the tidy tables an analysis returned and gives a `Section` that the HTML
template renders. Captions are written for a reader who has never seen probe: each says what
one mark on the figure is, how it was measured, and what a high or low value means.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from probe.scoring.verdict import per_token
from reports import figures
from reports.embed import data_uri, render_png

__all__ = ["TITLES", "Figure", "Section", "Table", "attribution_section", "degradation_section", "format_cell",
           "is_number", "not_run_section",
           "recalibration_section", "representation_section", "skipping_section", "uncertainty_section"]


@dataclass
class Figure:
    title: str
    caption: str
    src: str  # a data: URI, so the report stays one file
    alt: str = ""


@dataclass
class Table:
    caption: str
    headers: list[str]
    rows: list[list[dict]]  # cells: {"text", "cls"}


@dataclass
class Section:
    """A titled part of the report; `id` is its anchor in the table of contents."""

    id: str
    title: str
    lead: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# The title of each analysis section, by section id (analyses.pipeline.SECTIONS).
TITLES = {
    "degradation": "Does depth hurt without shortcuts? (degradation)",
    "skipping": "Removing the skipped blocks together",
    "attribution": "Can a cheap signal replace deleting blocks? (attribution)",
    "uncertainty": "How sure are we? (per-class effects and uncertainty)",
    "representation": "What does each block do to the representation?",
    "recalibration": "Does the cost survive BatchNorm recalibration?",
}


# --- formatting -----------------------------------------------------------------------------

_MISSING = "\u2013"


def format_cell(value, spec: str | None) -> str:
    """How every table of the report prints a value. spec: "pct" (a share, shown in %), "pp" (a
    difference of shares, in signed percentage points), "pm" (a +- band, in points), "pm" and a
    format spec (a +- band as that spec prints it, e.g. "pm.4f"), a format spec, or None (shown
    as is). Missing values (None, "", NaN) are a dash; booleans yes/no."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if not isinstance(value, numbers.Real) or spec is None:
        return _MISSING if value is None or (isinstance(value, str) and value == "") else str(value)
    value = float(value)
    if math.isnan(value):
        return _MISSING
    if spec == "pct":
        return f"{value * 100:.2f}"
    if spec == "pp":
        return f"{value * 100:+.2f}"
    if spec == "pm":
        return f"\u00b1{value * 100:.2f}"
    if spec.startswith("pm"):
        return "\u00b1" + format(value, spec[2:])
    if spec.endswith("d"):
        return format(int(round(value)), spec)  # counts: "d" and ",d" need an int
    return format(value, spec)


def is_number(value) -> bool:
    """A real number (numpy scalars included), not a boolean: what is right-aligned."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _cell(value, spec: str | None) -> dict:
    """One table cell of `format_cell`, right-aligned when it is a number."""
    return {"text": format_cell(value, spec), "cls": "num" if is_number(value) and spec is not None else ""}


def _table(df: pd.DataFrame, columns: Mapping[str, tuple[str, str | None]], caption: str) -> Table:
    """columns: {column: (header, spec)} in display order."""
    rows = [[_cell(row[c], spec) for c, (_, spec) in columns.items()] for _, row in df.iterrows()]
    return Table(caption=caption, headers=[header for header, _ in columns.values()], rows=rows)


def _figure(draw, df: pd.DataFrame, title: str, caption: str, **size) -> Figure:
    return Figure(title=title, caption=caption, src=data_uri(render_png(draw, df, **size)), alt=title)


def _bn_note(recalibrated: bool, calibration_samples: int | None = None) -> str:
    if recalibrated:
        amount = f"{calibration_samples} " if calibration_samples else ""
        return ("BatchNorm statistics: recalibrated. After each deletion the BatchNorm layers re-estimated their "
                f"running mean and variance on {amount}held-out samples (never among the evaluated ones) "
                "with the deletion in place, before evaluating (the model itself was restored exactly "
                "afterwards).")
    return ("BatchNorm statistics: as trained (not recalibrated after deletions). Numbers with recalibrated "
            "statistics are in the BatchNorm section when it was run.")


def _recalibrated(df: pd.DataFrame) -> bool:
    return bool(len(df)) and "bn_recalibrated" in df.columns and bool(df["bn_recalibrated"].iloc[0])


# --- tasks ------------------------------------------------------------------------------------
# An analysis of a task other than classification holds the task's columns (`probe.scoring.tasks`) in
# place of accuracy: its cost is the loss increase or the drift of the outputs. Each builder
# takes `cost=` (the per-block table's `probe.scoring.verdict.cost_column`), or finds it in its tables
# (`reports.figures.cost_of`).

# {column: (header, spec)} of every task's sweep columns, in display order.
_TASK_COLUMNS = {
    "loss": ("loss", ".4f"), "perplexity": ("perplexity", ".4g"), "token_accuracy": ("token accuracy (%)", "pct"),
    "accuracy": ("accuracy (%)", "pct"), "loss_increase": ("loss increase", "+.4f"),
    "loss_increase_se": ("its standard error", ".4f"), "perplexity_ratio": ("perplexity ratio", ".4f"),
    "token_accuracy_drop": ("token accuracy drop (pp)", "pp"), "accuracy_drop": ("accuracy drop (pp)", "pp"),
    "drift": ("drift (%)", "pct"), "drift_se": ("its standard error (%)", "pct"), "kl": ("KL (nats)", ".4g"),
    "token_flip_rate": ("token flip rate (%)", "pct"), "flip_rate": ("flip rate (%)", "pct"),
}
# (the cost in words, header of its column, format spec, the same spec for one number in a sentence)
_COST_WORDS = {
    "accuracy_drop": ("accuracy drop", "accuracy drop (pp)", "pp"),
    "loss_increase": ("loss increase", "loss increase", "+.4f"),
    "drift": ("drift of the outputs", "drift (%)", "pct"),
}


def _present(columns: Mapping[str, tuple[str, str | None]], df: pd.DataFrame) -> dict:
    """`columns` restricted to those `df` has, in the same order."""
    return {c: spec for c, spec in columns.items() if c in df.columns}


def _amount(value, cost: str) -> str:
    """One cost in a sentence: "+1.25 points", "+0.0123" (loss), "3.40%" (drift)."""
    if cost == "accuracy_drop":
        return f"{format_cell(value, 'pp')} points"
    if cost == "drift":
        return f"{format_cell(value, 'pct')}%"
    return format_cell(value, "+.4f")


def _cost_header(cost: str) -> tuple[str, str]:
    """(header, spec) of a cost column in a section's table."""
    _, header, spec = _COST_WORDS.get(cost, (cost, cost.replace("_", " "), ".4g"))
    return header, spec


# --- sections -------------------------------------------------------------------------------


def not_run_section(id: str, reason: str) -> Section:
    """The section of an analysis that did not run, saying why (so a reader knows it is missing)."""
    return Section(id=id, title=TITLES.get(id, id), lead=[f"Not run: {reason}"])


def degradation_section(df: pd.DataFrame, *, lines: Sequence[str] = ()) -> Section:
    """From `analyses.degradation.degradation`."""
    fig = _figure(figures.degradation_curve, df, "Error against depth",
                  "Each point is one network, trained with the same recipe and then evaluated; its height is "
                  "the error (100% minus accuracy). Dashed lines with squares: error on the training data the "
                  "network was fitted to; solid lines with circles: error on held-out test data. Vermilion: "
                  "plain networks (the same stacks of layers with the shortcut connections removed); blue: "
                  "residual networks. If deeper plain networks only overfitted, their training error would "
                  "fall with depth. A dashed vermilion line that rises with depth is the degradation problem "
                  "(He et al. 2016, Fig. 1 and 6): more layers make a plain network harder to optimise, and the "
                  "shortcuts remove the problem.")
    table = _table(df, {"depth": ("depth", "d"), "model": ("model", None),
                        "train_accuracy": ("train accuracy (%)", "pct"), "test_accuracy": ("test accuracy (%)", "pct"),
                        "train_loss": ("train loss", ".4f"), "test_loss": ("test loss", ".4f"),
                        "epochs": ("epochs", "d")},
                   "Final accuracy and mean cross-entropy of each network on the whole training and test splits.")
    return Section(id="degradation", title=TITLES["degradation"],
                   lead=["Plain and residual CIFAR-style networks of several depths were trained identically; "
                         "this shows what the shortcut connections buy. Trained networks are cached, so only the "
                         "first run trains them.", *lines],
                   figures=[fig], tables=[table])


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
    return Section(id="skipping", title=TITLES["skipping"], lead=lead, figures=[fig],
                   tables=tables)


def attribution_section(result, *, cost: str | None = None) -> Section:
    """From `analyses.attribution.attribution` (an AttributionResult): one `spearman_<truth>`
    column per measured cost (classification: accuracy drop and loss increase; another task: its
    cost). cost: the per-block table's cost column; found in the summary when None."""
    summary = result.summary
    truths = [c for c in summary.columns if str(c).startswith("spearman_")]
    cost = cost or (truths[0][len("spearman_"):] if truths else "accuracy_drop")
    recal = _recalibrated(summary)
    proxies = summary[summary[truths].notna().any(axis=1)] if truths else summary.iloc[:0]
    lead = ["Deleting every block and re-evaluating measures each block's importance directly but costs a pass "
            "over the data per block. Cheaper signals can rank blocks without deleting anything; this section "
            "measures how well each one agrees with the measured cost, and what it costs to compute."]
    if len(proxies):
        # The finest-grained truth: the loss increase where there is one (accuracy moves in whole samples).
        key = "spearman_loss_increase" if "spearman_loss_increase" in truths else truths[0]
        best = proxies.loc[proxies[key].abs().fillna(-1).idxmax()]
        lead.append(f"Best ranking of the {key[len('spearman_'):].replace('_', ' ')}: {best['proxy']} "
                    f"(Spearman \u03c1 = {best[key]:.2f}, {best['seconds']:.2g} s).")
    lead.append(_bn_note(recal))
    if truths == ["spearman_accuracy_drop", "spearman_loss_increase"]:
        caption = ("Each pair of bars is one cheap signal computed for every block without deleting anything; "
                   "under its name, the seconds it took over the evaluation data. Bar length is Spearman's rank "
                   "correlation, over the blocks, between the signal and the measured cost of deleting the block "
                   "alone: blue against the accuracy drop, orange against the increase in cross-entropy loss "
                   "(finer-grained, since accuracy moves in whole samples). 1: the signal orders the blocks "
                   "exactly as their deletion costs do; 0: no relation; negative: the reverse order. Signals: "
                   "ratio = ||F(x)||/||s(x)|| (branch size against the shortcut it is added to); cosine = "
                   "cos(F(x), s(x)); block_influence = 1 - cos(s(x), s(x) + F(x)), how much the block turns the "
                   "signal passing through it (ShortGPT's block influence); gradient_x_activation = captum's "
                   "gradient \u00d7 activation on the branch output, summed, i.e. the first-order estimate of the "
                   "log-probability of the true class lost when the branch is set to zero.")
    else:
        measured = " and ".join(c[len("spearman_"):].replace("_", " ") for c in truths)
        gradient = ("gradient_x_activation = captum's gradient \u00d7 activation on the branch output, summed, "
                    "with minus the task's per-sample loss as the output (per token for a language model), i.e. "
                    "the first-order estimate of the loss increase when the branch is set to zero."
                    if cost != "drift" else
                    "gradient \u00d7 activation has no bars here: the drift is 0 at the intact model and smallest "
                    "there, so its gradient is 0.")
        caption = ("Each bar is one cheap signal computed for every block without deleting anything; under its "
                   "name, the seconds it took over the evaluation data. Bar length is Spearman's rank correlation, "
                   "over the blocks, between the signal and the measured cost of deleting the block alone (the "
                   f"{measured}). 1: the signal orders the blocks exactly as their deletion costs do; 0: no "
                   "relation; negative: the reverse order. Signals: ratio = ||F(x)||/||s(x)|| (branch size against "
                   "the shortcut it is added to); cosine = cos(F(x), s(x)); block_influence = 1 - cos(s(x), s(x) + "
                   "F(x)), how much the block turns the signal passing through it (ShortGPT's block influence); "
                   + gradient)
    fig = _figure(figures.proxy_correlations, summary, "Cheap proxies against the measured deletion cost", caption)
    columns = {"proxy": ("signal", None),
               **{c: (f"\u03c1 vs {c[len('spearman_'):].replace('_', ' ')}", "+.2f") for c in truths},
               "seconds": ("seconds", ".3g")}
    table = _table(summary, columns,
                   "Rank correlation of each signal with the measured single-block deletion cost, and its cost. "
                   "The last row is the measurement itself (every block deleted alone).")
    notes = [f"No {proxy}: {why}" for proxy, why in (getattr(result, "notes", None) or {}).items()]
    return Section(id="attribution", title=TITLES["attribution"], lead=lead,
                   figures=[fig], tables=[table], notes=notes)


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
    table's cost column; found in the intervals table when None (`figures.interval_columns`)."""
    intervals, per_class = result.intervals, result.per_class
    cost, low, high = figures.interval_columns(intervals, cost)
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
    fig_ci = _figure(figures.drop_intervals, intervals, "Deletion cost with bootstrap intervals",
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
    return Section(id="uncertainty", title=TITLES["uncertainty"], lead=lead,
                   figures=shown, tables=[table], notes=notes)


def representation_section(result, *, lines: Sequence[str] = (), cost: str | None = None) -> Section:
    """From `analyses.representation.representation` (a RepresentationResult); `lines`: what
    the numbers say (`analyses.representation.story`). Tables that do not apply to the task
    (probes, lens and classes without class labels; refinement for drift) are empty, their
    figures left out, and `result.notes` says why. cost: the per-block table's cost column;
    found in the summary when None."""
    summary, lens = result.summary, result.lens
    cost = figures.cost_of(summary, cost)
    empty = {name: why for name, why in (getattr(result, "notes", None) or {}).items()}
    lead = ["Deleting a block says what the network loses without it; this section looks at what the block does "
            "to the representation it passes on. A block's output here is F(x) + s(x) right after its addition "
            "(before the activation the block applies after it), averaged over the spatial positions of each "
            "sample.", *lines, _bn_note(_recalibrated(summary))]
    width = figures.block_figure_width(len(summary))
    fig_accuracy = None if "probes" in empty else _figure(
        figures.representation_accuracy, summary, "Linear probes and the model's own head, block by block",
        "Each dot is one block: the accuracy on the evaluation data of a linear classifier (a logistic regression "
        "on the block's standardised output, averaged over spatial positions) fitted on the training data "
        "(Alain and Bengio 2016). It measures how much class information can be read from the block's output "
        "with a linear map; a dot higher than the one before means the block made the classes more separable. "
        "Dot colours are the deletion verdicts of the per-block table. Orange squares: the network's own final "
        "linear layer applied to the same output (a 'logit lens'), only where the widths fit; it needs no "
        "fitting, so it says whether the block already speaks the head's language. Dotted lines separate stages.",
        width=width)
    fig_refinement = None if "refinement" in empty or not len(result.refinement) else _figure(
        figures.refinement_profile, result.refinement, "Iterative refinement",
        "Bars: for each block, the cosine between what its branch adds, F(h), and the gradient of the loss at "
        "the block's input h, averaged over the evaluation samples (error bars: standard deviation). A "
        "negative cosine means the branch moves h in a direction that lowers the loss, a step of gradient "
        "descent on the features; -1 would be straight down the gradient, 0 unrelated. Jastrzebski et al. 2018 "
        "found negative cosines in residual networks: blocks refine the features iteratively. n/a: the block "
        "changes the shape (a stage change), so F(h) and h cannot be compared. Line (right axis): the step's "
        "relative size ||F(h)|| / ||h||.",
        width=width)
    fig_cka = _figure(
        figures.cka_heatmap, result.cka, "Similarity of the blocks' outputs",
        "Each cell compares the outputs of two blocks over the evaluation samples with linear CKA (Kornblith et "
        "al. 2019): 1 when one is a rotation or a uniform scaling of the other, near 0 when they are unrelated. "
        "It was accumulated exactly over the data, batch by batch, from the features' cross-covariances. White "
        "lines separate stages; bright squares along the diagonal mean blocks within a stage change the "
        "representation only a little at a time.",
        **figures.cka_size(result.cka))
    fig_classes = None if "classes" in empty or not len(result.classes) else _figure(
        figures.class_service_heatmap, result.classes, "Which classes each block serves",
        "Each row is one deleted block, each column one class; the colour is how many percentage points of that "
        "class's accuracy are lost when the block is deleted (red: lost, blue: gained). The boxed cell in each "
        "row is the class that block serves most: the one that loses most without it.",
        **figures.heatmap_size(result.classes))
    cost_header, cost_spec = ("deletion cost (pp)", "pp") if cost == "accuracy_drop" else \
        (f"deletion cost: {_cost_header(cost)[0]}", _cost_header(cost)[1])
    columns = {"block": ("block", None), "stage": ("stage", "d"), "ratio": ("ratio", ".3f"),
               cost: (cost_header, cost_spec), "verdict": ("verdict", None),
               "probe_accuracy": ("probe accuracy (%)", "pct"), "probe_gain": ("probe gain (pp)", "pp"),
               "lens_accuracy": ("head accuracy (%)", "pct"), "grad_cosine": ("cos(F, dL/dh)", "+.3f"),
               "step_ratio": ("||F||/||h||", ".3f"), "cka_previous": ("CKA with previous", ".2f"),
               "cka_next": ("CKA with next", ".2f"), "top_class": ("serves most", None),
               "top_class_drop": ("its drop (pp)", "pp")}
    # Columns of tables that do not apply to the task are left out (they would be all dashes).
    dropped = {"probes": ("probe_accuracy", "probe_gain"), "lens": ("lens_accuracy",),
               "refinement": ("grad_cosine", "step_ratio"), "classes": ("top_class", "top_class_drop")}
    for name in empty:
        for column in dropped.get(name, ()):
            columns.pop(column, None)
    table = _table(summary, _present(columns, summary),
                   "Per block: its size (ratio ||F(x)||/||s(x)||), what deleting it alone costs and the verdict, its "
                   "linear probe accuracy and the gain over the block before it, the accuracy of the model's head "
                   "on its output, its refinement cosine and step size, its CKA with its neighbours, and the class "
                   "that loses most when it is deleted." if not empty else
                   "Per block: its size (ratio ||F(x)||/||s(x)||), what deleting it alone costs and the verdict, "
                   "and what of the rest applies to the task: its refinement cosine and step size, and its CKA "
                   "with its neighbours.")
    # Why a table is empty, unless the lines (`story`) say it already.
    notes = [why[:1].upper() + why[1:] for why in empty.values() if not any(why in line for line in lines)]
    skipped = lens[~lens["applicable"].astype(bool)] if len(lens) else lens
    for reason, rows in skipped.groupby("reason", sort=False):
        notes.append(f"The model's head cannot be applied to {', '.join(rows['block'])}: {reason}.")
    return Section(id="representation", title=TITLES["representation"], lead=lead,
                   figures=[f for f in (fig_accuracy, fig_refinement, fig_cka, fig_classes) if f is not None],
                   tables=[table], notes=notes)


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
    return Section(id="recalibration", title=TITLES["recalibration"], lead=lead,
                   figures=[fig], tables=[table])


# --- the lm analysis (analyses.lm) -----------------------------------------------------------------

__all__ += ["lm_section"]
TITLES["lm"] = "Which layers can a language model lose? (layer pruning)"

_GREEDY_WORDS = {"greedy": "greedy deletion (SLEB, re-scored after each removal)",
                 "single_loss": "the one-shot order by single-layer loss increase",
                 "block_influence": "the one-shot order by block influence (ShortGPT)"}


def _lm_greedy_lead(greedy: pd.DataFrame) -> str | None:
    """Perplexity of each order at its largest k, in one sentence."""
    if not len(greedy):
        return None
    k = int(greedy["k"].max())
    last = greedy[greedy["k"] == k]
    baseline = greedy[greedy["k"] == 0]["perplexity"]
    parts = [f"{_GREEDY_WORDS.get(row['order'], row['order'])}: {row['perplexity']:.4g}"
             for _, row in last.iterrows()]
    intact = f" (intact: {baseline.iloc[0]:.4g})" if len(baseline) else ""
    return f"Perplexity after deleting {k} layer(s){intact}: " + "; ".join(parts) + "."


def _lm_span_lead(spans: pd.DataFrame) -> str | None:
    if not len(spans):
        return None
    same = int(spans["same_span"].astype(bool).sum())
    worst = spans.assign(gap=spans["loss_by_angle"] - spans["loss_by_loss"]).sort_values("gap").iloc[-1]
    return (f"The span with the smallest angular distance was also the cheapest span to delete for {same} of "
            f"{len(spans)} span lengths; the largest gap is at n = {int(worst['n'])} (loss {worst['loss_by_angle']:.4f}"
            f" against {worst['loss_by_loss']:.4f} for the best span).")


def lm_section(result) -> Section:
    """From `analyses.lm.lm_layers` (an LMResult): block influence per layer and sublayer, the
    spans, greedy against one-shot deletion, the cheap scores' rank correlations, the logit lens
    (left out, with the reason in the notes, when it does not apply), and the finding."""
    layers, spans, greedy, agreement, lens = result.layers, result.spans, result.greedy, result.agreement, result.lens
    notes = dict(getattr(result, "notes", None) or {})
    count = int((layers["kind"] == "layer").sum()) if len(layers) else 0
    lead = ["A decoder layer adds two branches to the residual stream, attention and then the MLP (its two "
            "sublayers, each one of probe's blocks); deleting a layer deletes both, so the layer passes its input "
            "on unchanged. Papers that prune whole layers of language models (ShortGPT, Men et al. 2024; Gromov "
            "et al. 2024; SLEB, Song et al. 2024) find that many deep layers can go. This section asks their "
            f"questions of this model's {count} layers. Every loss is the mean next-token negative log-likelihood "
            "per token on the evaluation data (padding excluded); perplexity is its exponential.",
            result.finding]
    lead += [line for line in (_lm_greedy_lead(greedy), _lm_span_lead(spans)) if line]
    baseline = layers.attrs.get("baseline", {})
    if "loss" in baseline:
        lead.append(f"The intact model: loss {baseline['loss']:.4f}, perplexity {baseline['perplexity']:.4g}.")
    shown = []
    width = figures.block_figure_width(count)
    shown.append(_figure(
        figures.layer_similarity_plot, layers, "Block influence of every layer and sublayer",
        "Blue dots: for each layer, its block influence 1 - cos(h_in, h_out), the cosine between the residual "
        "stream entering and leaving the layer, computed for each token over the hidden dimension and averaged "
        "over every real token of the evaluation data (ShortGPT). 0: the layer leaves the stream's direction as it "
        "was; larger: it turns it. Dashed lines: the same for each sublayer, between its shortcut s(x) and s(x) + "
        "F(x) at its residual addition. Dotted black line (right axis): the loss increase when the layer alone is "
        "deleted. ShortGPT deletes the layers with the lowest block influence; that works when the two curves "
        "rise and fall together.", width=width))
    # Each figure of a table that is not empty: (table, figure, title, caption, width).
    optional = [
        (spans, figures.span_plot, "Deleting n consecutive layers",
         "For each span length n: vermilion, the loss after deleting the n consecutive layers whose input and "
         "output streams are closest, by the angular distance arccos(cos) / pi between the stream entering the "
         "span and the stream leaving it, averaged over tokens (Gromov et al. 2024 delete that span, then "
         "fine-tune); blue, the loss after deleting the span of n layers that really costs least (every span "
         "was deleted and evaluated). Dotted: the intact model. Where the two curves meet, the angle found the "
         "best span without deleting anything.", figures.SCATTER_WIDTH),
        (greedy, figures.greedy_curves, "Greedy against one-shot layer deletion",
         "Perplexity as k layers are deleted together. Blue: greedy deletion (SLEB): at each step every "
         "remaining layer is deleted together with those already removed, and the one whose removal gives the "
         "lowest loss goes; the choice is re-scored after each removal. Green: the layers ranked once by the "
         "loss increase of deleting each alone, cheapest first. Vermilion: ranked once by block influence, "
         "lowest first (ShortGPT). Greedy lies lowest when deletions interact: a layer that is cheap alone can "
         "be expensive once its neighbours are gone.", figures.SCATTER_WIDTH),
        (agreement, figures.agreement_intervals, "Cheap scores against the measured deletion cost",
         "Each dot is Spearman's rank correlation, over the layers (blue) or sublayers (orange), between a score "
         "computed without deleting anything and the measured loss increase of deleting that unit alone; the bar "
         "is its bootstrap interval (units resampled with replacement). block_influence: 1 - cos(stream in, "
         "stream out); angular_distance: arccos of the same cosine / pi; ratio: ||F(x)|| / ||s(x)||, the "
         "branch's size against the shortcut it is added to. A score that ranks well correlates positively: "
         "units that turn the stream more cost more to delete.", figures.SCATTER_WIDTH),
        (lens, figures.logit_lens_plot, "Logit lens",
         "The model's own final norm and unembedding applied to the residual stream after each layer (and to "
         "the embeddings), as if the model stopped there (the logit lens). Blue: the next-token loss of that "
         "prediction; orange (right axis): the share of tokens whose top-1 prediction is already the model's "
         "final one. After the last layer the lens is the model itself (100%). Layers after which the curves "
         "barely move add little to the prediction.", figures.block_figure_width(len(lens))),
    ]
    shown += [_figure(draw, df, title, caption, width=wide) for df, draw, title, caption, wide in optional if len(df)]
    tables = []
    if len(agreement):
        tables.append(_table(agreement, {"kind": ("units", None), "score": ("score", None),
                                         "spearman": ("Spearman \u03c1", "+.2f"), "low": ("interval low", "+.2f"),
                                         "high": ("interval high", "+.2f"), "level": ("level", "pct"),
                                         "units": ("count", "d")},
                             "Rank correlation of each cheap score with the measured loss increase of deleting "
                             "the unit alone, with its percentile bootstrap interval (level in %)."))
    if len(spans):
        tables.append(_table(spans, {"n": ("n", "d"), "start_by_angle": ("first layer, by angle", "d"),
                                     "angle": ("angular distance", ".4f"), "loss_by_angle": ("its loss", ".4f"),
                                     "start_by_loss": ("first layer, best by loss", "d"),
                                     "loss_by_loss": ("its loss", ".4f"), "same_span": ("same span", None)},
                             "For each span length n: the span the angular distance picks and the best span by "
                             "measured loss (first layers 0-based), and the loss after deleting each."))
    if len(layers):
        rows = layers[layers["kind"] == "layer"]
        tables.append(_table(rows, {"unit": ("layer", None), "block_influence": ("block influence", ".4f"),
                                    "angular_distance": ("angular distance", ".4f"), "loss": ("loss, deleted", ".4f"),
                                    "loss_increase": ("loss increase", "+.4f"),
                                    "loss_increase_se": ("its standard error", ".4f")},
                             "Per layer: its block influence and angular distance, and the loss when it alone is "
                             "deleted (loss increase over the intact model, with the standard error of the paired "
                             "per-sequence differences)."))
    if len(greedy):
        order = greedy[(greedy["order"] == "greedy") & (greedy["k"] > 0)]
        tables.append(_table(order, {"k": ("k", "d"), "removed": ("layer removed", None), "loss": ("loss", ".4f"),
                                     "perplexity": ("perplexity", ".4g")},
                             "The greedy (SLEB) deletion order: the layer removed at each step, and the model after."))
    return Section(id="lm", title=TITLES["lm"], lead=lead, figures=shown, tables=tables,
                   notes=[why[:1].upper() + why[1:] for why in notes.values()])
