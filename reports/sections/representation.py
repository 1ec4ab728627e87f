"""The representation section: what each block does to the representation."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from probe.scoring.tasks import Classification

from reports import figures
from reports.sections.common import PNG, ReportContext, Section, _bn_note, _cost_header, _figure, _present, _recalibrated, _table

__all__ = ["TITLE", "figure_files", "representation_section", "section", "story", "terminal"]

TITLE = "What does each block do to the representation?"  # the section's heading, also when it did not run


def representation_section(result, *, lines: Sequence[str] = (), cost: str | None = None) -> Section:
    """From `analyses.representation.representation` (a RepresentationResult); `lines`: what
    the numbers say (`story`). Tables that do not apply to the task
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
    return Section(id="representation", title=TITLE, lead=lead,
                   figures=[f for f in (fig_accuracy, fig_refinement, fig_cka, fig_classes) if f is not None],
                   tables=[table], notes=notes)


def story(result) -> list[str]:
    """A few sentences on what the tables say together, for the report and the terminal."""
    s, cka_df = result.summary, result.cka
    lines = []
    probes = result.probes
    notes = getattr(result, "notes", {}) or {}
    if len(probes):
        first_input = probes["previous_test_accuracy"].iloc[0]
        top_gains = probes.nlargest(3, "gain")
        lines.append(
            f"Linear probes read {first_input:.1%} of the evaluation labels from the first block's input, "
            f"{probes['test_accuracy'].iloc[0]:.1%} after the first block and {probes['test_accuracy'].iloc[-1]:.1%} "
            f"after the last (best {probes['test_accuracy'].max():.1%}, at "
            f"{probes.loc[probes['test_accuracy'].idxmax(), 'block']}). "
            "The largest gains: " + ", ".join(f"{r.block} ({r.gain * 100:+.1f} points)" for r in top_gains.itertuples())
            + ".")
    elif "probes" in notes:
        lines.append("No linear probes, logit lens or drop per class: " + notes["probes"])
    if "refinement" in notes:
        lines.append("No refinement: " + notes["refinement"])
    skipped = s[s["verdict"] == "skipped"]
    if len(skipped) and len(probes):
        gains = skipped["probe_gain"] * 100
        lines.append(f"The {len(skipped)} blocks the deletion rule calls skipped change probe accuracy by "
                     f"{gains.sum():+.1f} points together (from {gains.min():+.1f} to {gains.max():+.1f} each).")
    lens = result.lens[result.lens["applicable"].astype(bool)]
    if len(lens):
        lines.append(f"The model's own head applies to {len(lens)} of {len(result.lens)} blocks (those of its input "
                     f"width); on them its accuracy goes from {lens['accuracy'].iloc[0]:.1%} ({lens['block'].iloc[0]}) "
                     f"to {lens['accuracy'].iloc[-1]:.1%} ({lens['block'].iloc[-1]}), agreeing with the final "
                     f"prediction on {lens['agreement'].iloc[-1]:.1%} at the last.")
    defined = s[s["grad_cosine"].notna()]
    if len(defined):
        negative = int((defined["grad_cosine"] < 0).sum())
        lines.append(f"cos(F(h), dL/dh) is negative at {negative} of the {len(defined)} blocks where F(h) and h share a "
                     f"shape (mean {defined['grad_cosine'].mean():+.3f}, from {defined['grad_cosine'].min():+.3f} to "
                     f"{defined['grad_cosine'].max():+.3f}): "
                     + ("most blocks move the features down the loss, as Jastrzebski et al. 2018 found."
                        if negative > len(defined) / 2 else "most blocks do not move the features down the loss.")
                     + f" ||F(h)||/||h|| is {s['step_ratio'].iloc[0]:.2f} at the first block and "
                     f"{s['step_ratio'].iloc[-1]:.2f} at the last.")
    pairs = cka_df[cka_df["position_b"] > cka_df["position_a"]]
    within, across = pairs[pairs["stage_a"] == pairs["stage_b"]], pairs[pairs["stage_a"] != pairs["stage_b"]]
    neighbours = s.loc[s["stage"] == s["stage"].shift(-1), "cka_next"].dropna()  # next block, same stage
    if len(neighbours):
        lines.append(f"Linear CKA between neighbouring blocks of one stage averages {neighbours.mean():.2f} (all pairs "
                     f"within a stage: {within['cka'].mean():.2f}"
                     + (f"; pairs from different stages: {across['cka'].mean():.2f})." if len(across) else ")."))
    lines.append(_verdict(s, probes, neighbours, no_gradient="refinement" in notes))
    return lines


def _verdict(s: pd.DataFrame, probes: pd.DataFrame, neighbours: pd.Series, no_gradient: bool = False) -> str:
    """Which story the numbers tell: iterative refinement (Greff et al. 2017, Jastrzebski et al.
    2018), when neighbours within a stage are alike and most branches point down the loss."""
    defined = s["grad_cosine"].dropna()
    downhill = len(defined) > 0 and (defined < 0).mean() > 0.5
    alike = len(neighbours) > 0 and neighbours.mean() >= 0.9
    arrival = ""
    if len(probes):
        starts = probes["stage"] != probes["stage"].shift(1)  # the first block of each stage
        net = probes["test_accuracy"].iloc[-1] - probes["previous_test_accuracy"].iloc[0]
        arrival = (f" Of the {net * 100:+.1f} points the probes gain from the first block's input to the last "
                   f"block's output, {probes.loc[starts, 'gain'].sum() * 100:+.1f} come at the first block of a "
                   f"stage ({', '.join(probes.loc[starts, 'block'])}).")
    if downhill and alike:
        return ("Together: the iterative-refinement story. Within a stage each block changes the representation "
                "only a little (neighbours' CKA at least 0.9 on average) and in a direction that lowers the loss: "
                f"small steps of refinement.{arrival}")
    downhill_text = "the task has no loss gradient to compare the branches with" if no_gradient else \
        "most branches do not point down the loss"
    missing = [text for ok, text in ((downhill, downhill_text),
                                     (alike, "neighbouring blocks within a stage are not alike (CKA below 0.9)"))
               if not ok]
    return f"Together: not a clean iterative-refinement story ({'; '.join(missing)}).{arrival}"


def section(result, context: ReportContext) -> Section:
    """The report's representation section, from `analyses.representation.RepresentationResult`."""
    return representation_section(result, lines=story(result), cost=context.cost)


def figure_files(result, task) -> list[PNG]:
    """The PNG files `python -m analyses.representation` writes: a figure of each table that
    applies to the task (`result.notes` says why the others are empty)."""
    width = figures.block_figure_width(len(result.summary))
    files = []
    if len(result.probes):
        files.append(PNG("representation_accuracy.png", figures.representation_accuracy, result.summary,
                         {"width": width}))
    if len(result.refinement):
        files.append(PNG("refinement.png", figures.refinement_profile, result.refinement, {"width": width}))
    files.append(PNG("cka.png", figures.cka_heatmap, result.cka, figures.cka_size(result.cka)))
    if len(result.classes):
        files.append(PNG("block_classes.png", figures.class_service_heatmap, result.classes,
                         figures.heatmap_size(result.classes)))
    return files


def terminal(result, task) -> str:
    """What `python -m analyses.representation` prints: the per-block summary, then the story."""
    columns = ["block", "ratio", task.cost, "probe_accuracy", "probe_gain", "lens_accuracy", "grad_cosine",
               "step_ratio", "cka_next"]
    shown = result.summary[[c for c in columns if c in result.summary.columns]]
    if not isinstance(task, Classification):  # the columns of tables that do not apply are all NaN
        shown = shown.dropna(axis="columns", how="all")
    return "\n".join([shown.to_string(index=False, float_format="{:.3f}".format), "", *story(result), ""])
