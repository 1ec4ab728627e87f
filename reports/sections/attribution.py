"""The attribution section: can a cheap signal replace deleting blocks?"""

from __future__ import annotations



from reports import figures
from reports.sections.common import PNG, ReportContext, Section, _bn_note, _figure, _recalibrated, _table

__all__ = ["TITLE", "attribution_section", "figure_files", "section", "terminal"]

TITLE = "Can a cheap signal replace deleting blocks? (attribution)"  # the section's heading, also when it did not run


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
    return Section(id="attribution", title=TITLE, lead=lead,
                   figures=[fig], tables=[table], notes=notes)


def section(result, context: ReportContext) -> Section:
    """The report's attribution section, from `analyses.attribution.AttributionResult`."""
    return attribution_section(result, cost=context.cost)


def figure_files(result, task) -> list[PNG]:
    """The PNG files `python -m analyses.attribution` writes."""
    return [PNG("proxies.png", figures.proxy_correlations, result.summary)]


def terminal(result, task) -> str:
    """What `python -m analyses.attribution` prints: each proxy's rank correlation, and why any is missing."""
    lines = [result.summary.to_string(index=False, float_format="{:.3f}".format)]
    lines += [f"no {proxy}: {why}" for proxy, why in result.notes.items()]
    return "\n".join(lines)
