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
    difference of shares, in signed percentage points), "pm" (a +- band, in points), a format
    spec, or None (shown as is). Missing values (None, "", NaN) are a dash; booleans yes/no."""
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


def skipping_section(result, *, calibration_samples: int | None = None) -> Section:
    """From `analyses.skipping.skipping` (a SkippingResult)."""
    summary, curves, export = result.summary, result.curves, result.export
    recal = _recalibrated(summary)
    after = summary.iloc[-1]
    removed = int(after["blocks_removed"])
    lead = []
    if removed:
        lead.append(f"Deleting all {removed} skipped blocks at once ({', '.join(str(after['removed']).split())}) "
                    f"changes accuracy from {summary.iloc[0]['accuracy']:.2%} to {after['accuracy']:.2%} "
                    f"({-after['accuracy_drop'] * 100:+.2f} points).")
    else:
        lead.append("The verdict rule calls no block skipped, so there is nothing to remove together; the deletion "
                    "curves below still show how the network degrades as blocks are deleted.")
    lead.append(_bn_note(recal, calibration_samples))
    fig = _figure(figures.deletion_curves, curves, "Deletion curves",
                  "Blocks are deleted cumulatively: at k, the first k blocks of an order are all deleted at once "
                  "(each branch F(x) replaced by zeros, the shortcut kept) and accuracy on the evaluation data "
                  "is measured; k = 0 is the intact network. Green: blocks with the smallest branch/shortcut "
                  "ratio go first; blue: blocks whose deletion alone cost least go first (this order uses the "
                  "measured single-block costs, so it is the best simple order); grey: random orders, the "
                  "dotted line their mean and the shaded band their range. A curve that stays high for many "
                  "blocks means the network tolerates losing them together. Veit et al. 2016 (Fig. 5a) found "
                  "that residual networks degrade smoothly as random blocks are deleted, as an ensemble of many "
                  "shallower paths would, where a plain network would collapse after one deletion.")
    tables = [_table(summary, {"state": ("network", None), "blocks_removed": ("blocks deleted", "d"),
                               "accuracy": ("accuracy (%)", "pct"), "loss": ("loss", ".4f"),
                               "accuracy_drop": ("accuracy drop (pp)", "pp"), "flip_rate": ("flip rate (%)", "pct")},
                     "The network before and after deleting every block the verdict rule calls skipped. Flip "
                     "rate: share of samples whose predicted class changed.")]
    if len(export):
        tables.append(_table(export, {"model": ("model", None), "blocks": ("residual blocks", "d"),
                                      "parameters": ("parameters", ",d"), "bytes": ("bytes", ",d"),
                                      "seconds_per_batch": ("seconds per batch", ".4f"),
                                      "parameters_ratio": ("parameters ratio", ".3f"),
                                      "bytes_ratio": ("bytes ratio", ".3f"), "time_ratio": ("time ratio", ".3f"),
                                      "max_abs_difference": ("max |difference|", ".2g")},
                             "The exported pruned model against the original. In the pruned copy each skipped "
                             "block computes only its shortcut: the layers of its branch are removed, not just "
                             "multiplied by zero. Its outputs were checked against the original with those "
                             "blocks deleted (max |difference| of the logits over the evaluation data). Time "
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


def attribution_section(result) -> Section:
    """From `analyses.attribution.attribution` (an AttributionResult)."""
    summary = result.summary
    recal = _recalibrated(summary)
    proxies = summary[summary["spearman_accuracy_drop"].notna() | summary["spearman_loss_increase"].notna()]
    lead = ["Deleting every block and re-evaluating measures each block's importance directly but costs a pass "
            "over the data per block. Cheaper signals can rank blocks without deleting anything; this section "
            "measures how well each one agrees with the measured cost, and what it costs to compute."]
    if len(proxies):
        best = proxies.loc[proxies["spearman_loss_increase"].abs().fillna(-1).idxmax()]
        lead.append(f"Best ranking of the loss increase: {best['proxy']} "
                    f"(Spearman \u03c1 = {best['spearman_loss_increase']:.2f}, {best['seconds']:.2g} s).")
    lead.append(_bn_note(recal))
    fig = _figure(figures.proxy_correlations, summary, "Cheap proxies against the measured deletion cost",
                  "Each pair of bars is one cheap signal computed for every block without deleting anything; "
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
    table = _table(summary, {"proxy": ("signal", None),
                             "spearman_accuracy_drop": ("\u03c1 vs accuracy drop", "+.2f"),
                             "spearman_loss_increase": ("\u03c1 vs loss increase", "+.2f"),
                             "seconds": ("seconds", ".3g")},
                   "Rank correlation of each signal with the measured single-block deletion cost, and its cost. "
                   "The last row is the measurement itself (every block deleted alone).")
    return Section(id="attribution", title=TITLES["attribution"], lead=lead,
                   figures=[fig], tables=[table])


def uncertainty_section(result) -> Section:
    """From `analyses.uncertainty.uncertainty` (an UncertaintyResult)."""
    intervals, per_class = result.intervals, result.per_class
    recal = _recalibrated(intervals)
    level = f"{intervals['level'].iloc[0]:.0%}" if len(intervals) else "95%"
    resamples = int(intervals["resamples"].iloc[0]) if len(intervals) else 0
    skipped = intervals.loc[intervals["skipped"].astype(bool), "block"].astype(str).tolist()
    lead = [f"Blocks skipped once noise is accounted for ({len(skipped)}): "
            + (", ".join(skipped) if skipped else "none") + ". A block counts as skipped here when its branch is "
            f"small (ratio below the rule's threshold) and the {level} bootstrap interval of its deletion cost "
            "contains zero."]
    if "verdict" in intervals.columns and intervals["verdict"].notna().all():
        differ = intervals[(intervals["verdict"] == "skipped") != intervals["skipped"].astype(bool)]
        lead.append("The bootstrap decision agrees with the noise-band rule above on every block."
                    if differ.empty else
                    "The bootstrap decision differs from the noise-band rule above on: "
                    + ", ".join(differ["block"].astype(str)) + ".")
    lead.append(_bn_note(recal))
    fig_ci = _figure(figures.drop_intervals, intervals, "Deletion cost with bootstrap intervals",
                     "Each dot is the accuracy lost, in percentage points, when that one block is deleted; the "
                     f"vertical bar is its {level} bootstrap interval: the evaluation samples were redrawn with "
                     f"replacement {resamples} times, the same draw for the intact and the damaged network "
                     "(a paired bootstrap), and the bar spans the middle of the redrawn costs. A bar that "
                     "crosses zero means this data cannot tell the cost from no cost at all. Colours: helps (the "
                     "whole bar above zero), hurts (below zero), skipped (crosses zero and the branch is small), "
                     "neutral (crosses zero, branch not small).",
                     width=figures.block_figure_width(len(intervals)))
    fig_classes = _figure(figures.class_drop_heatmap, per_class, "Deletion cost per class",
                          "Each row is one deleted block (in the order data flows through the network), each "
                          "column one class; the colour is how many percentage points of that class's accuracy "
                          "are lost when the block is deleted (red: lost, blue: gained, white: unchanged). A "
                          "block with a small overall cost can still matter for one class: look for a single "
                          "red cell in an otherwise white row.",
                          **figures.heatmap_size(per_class))
    table = _table(intervals, {"block": ("block", None), "ratio": ("ratio", ".3f"),
                               "accuracy_drop": ("accuracy drop (pp)", "pp"), "drop_low": ("interval low (pp)", "pp"),
                               "drop_high": ("interval high (pp)", "pp"), "verdict_ci": ("decision", None),
                               "verdict": ("noise-band verdict", None)},
                   f"Per block: the measured accuracy drop and its {level} paired bootstrap interval "
                   f"({resamples} resamples), with the decision they give and the verdict of the noise-band rule.")
    return Section(id="uncertainty", title=TITLES["uncertainty"], lead=lead,
                   figures=[fig_ci, fig_classes], tables=[table])


def representation_section(result, *, lines: Sequence[str] = ()) -> Section:
    """From `analyses.representation.representation` (a RepresentationResult); `lines`: what
    the numbers say (`analyses.representation.story`)."""
    summary, lens = result.summary, result.lens
    lead = ["Deleting a block says what the network loses without it; this section looks at what the block does "
            "to the representation it passes on. A block's output here is F(x) + s(x) right after its addition "
            "(before the activation the block applies after it), averaged over the spatial positions of each "
            "sample.", *lines, _bn_note(_recalibrated(summary))]
    width = figures.block_figure_width(len(summary))
    fig_accuracy = _figure(
        figures.representation_accuracy, summary, "Linear probes and the model's own head, block by block",
        "Each dot is one block: the accuracy on the evaluation data of a linear classifier (a logistic regression "
        "on the block's standardised output, averaged over spatial positions) fitted on the training data "
        "(Alain and Bengio 2016). It measures how much class information can be read from the block's output "
        "with a linear map; a dot higher than the one before means the block made the classes more separable. "
        "Dot colours are the deletion verdicts of the per-block table. Orange squares: the network's own final "
        "linear layer applied to the same output (a 'logit lens'), only where the widths fit; it needs no "
        "fitting, so it says whether the block already speaks the head's language. Dotted lines separate stages.",
        width=width)
    fig_refinement = _figure(
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
    fig_classes = _figure(
        figures.class_service_heatmap, result.classes, "Which classes each block serves",
        "Each row is one deleted block, each column one class; the colour is how many percentage points of that "
        "class's accuracy are lost when the block is deleted (red: lost, blue: gained). The boxed cell in each "
        "row is the class that block serves most: the one that loses most without it.",
        **figures.heatmap_size(result.classes))
    table = _table(summary, {"block": ("block", None), "stage": ("stage", "d"), "ratio": ("ratio", ".3f"),
                             "accuracy_drop": ("deletion cost (pp)", "pp"), "verdict": ("verdict", None),
                             "probe_accuracy": ("probe accuracy (%)", "pct"), "probe_gain": ("probe gain (pp)", "pp"),
                             "lens_accuracy": ("head accuracy (%)", "pct"), "grad_cosine": ("cos(F, dL/dh)", "+.3f"),
                             "step_ratio": ("||F||/||h||", ".3f"), "cka_previous": ("CKA with previous", ".2f"),
                             "cka_next": ("CKA with next", ".2f"), "top_class": ("serves most", None),
                             "top_class_drop": ("its drop (pp)", "pp")},
                   "Per block: its size (ratio ||F(x)||/||s(x)||), what deleting it alone costs and the verdict, its "
                   "linear probe accuracy and the gain over the block before it, the accuracy of the model's head "
                   "on its output, its refinement cosine and step size, its CKA with its neighbours, and the class "
                   "that loses most when it is deleted.")
    notes = []
    skipped = lens[~lens["applicable"].astype(bool)]
    for reason, rows in skipped.groupby("reason", sort=False):
        notes.append(f"The model's head cannot be applied to {', '.join(rows['block'])}: {reason}.")
    return Section(id="representation", title=TITLES["representation"], lead=lead,
                   figures=[fig_accuracy, fig_refinement, fig_cka, fig_classes], tables=[table], notes=notes)


def recalibration_section(df: pd.DataFrame, *, calibration_samples: int | None = None) -> Section:
    """From `analyses.recalibration.recalibration`."""
    wide = df.pivot_table(index="block", columns="bn_recalibrated", values="accuracy_drop", aggfunc="first")
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
    if "baseline_accuracy" in df.columns:
        baselines = df.groupby("bn_recalibrated")["baseline_accuracy"].first()
        words = {False: "with its trained statistics", True: "with statistics recalibrated the same way"}
        lead.append("Each drop is measured against the intact model treated alike: "
                    + "; ".join(f"{format_cell(baselines[k], 'pct')}% accuracy {words[k]}"
                                for k in (False, True) if k in baselines.index)
                    + ". Comparing recalibrated deletions with the trained model would count the refit itself "
                    "as the deletion's effect.")
    if {False, True} <= set(wide.columns) and len(wide):
        change = (wide[False] - wide[True]) * 100
        biggest = change.abs().idxmax()
        lead.append(f"Mean deletion cost: {wide[False].mean() * 100:.2f} points with trained statistics, "
                    f"{wide[True].mean() * 100:.2f} points after recalibration; the largest change is at "
                    f"{biggest} ({wide.loc[biggest, False] * 100:+.2f} \u2192 {wide.loc[biggest, True] * 100:+.2f} "
                    "points).")
    fig = _figure(figures.recalibration_effect, df, "Deletion cost with and without recalibration",
                  "For each block (in forward order), the accuracy lost when it alone is deleted, in percentage "
                  "points: vermilion with the BatchNorm statistics the network was trained with, blue after "
                  "re-estimating them for the damaged network. Where the blue bar is much shorter, most of the "
                  "damage came from stale normalisation statistics, not from lost computation; where both bars "
                  "are tall, the network needs what the block computes.",
                  width=figures.block_figure_width(len(wide)))
    shown = wide.reset_index().rename(columns={False: "trained", True: "recalibrated"})
    columns = {"block": ("block", None)}
    if "trained" in shown:
        columns["trained"] = ("drop, trained statistics (pp)", "pp")
    if "recalibrated" in shown:
        columns["recalibrated"] = ("drop, recalibrated (pp)", "pp")
    table = _table(shown, columns, "Accuracy drop per block deleted alone, without and with BatchNorm recalibration.")
    return Section(id="recalibration", title=TITLES["recalibration"], lead=lead,
                   figures=[fig], tables=[table])
