"""The representation section: what each block does to the representation."""

from __future__ import annotations

from collections.abc import Sequence

from reports import figures
from reports.sections.common import Section, TITLES, _bn_note, _cost_header, _figure, _present, _recalibrated, _table

__all__ = ["representation_section"]


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
