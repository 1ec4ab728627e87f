"""The language-model section: layers, spans, greedy deletion, logit lens."""

from __future__ import annotations

import pandas as pd

from reports import figures
from reports.sections.common import PNG, ReportContext, Section, _figure, _table

__all__ = ["TITLE", "figure_files", "lm_section", "section", "terminal"]

TITLE = "Which layers can a language model lose? (layer pruning)"  # the section's heading, also when it did not run


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
    baseline = result.baseline
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
    return Section(id="lm", title=TITLE, lead=lead, figures=shown, tables=tables,
                   notes=[why[:1].upper() + why[1:] for why in notes.values()])


def section(result, context: ReportContext) -> Section:
    """The report's language-model section, from `analyses.lm.LMResult`."""
    return lm_section(result)


def figure_files(result, task) -> list[PNG]:
    """The PNG files `python -m analyses.lm` writes."""
    layers = result.layers[result.layers["kind"] == "layer"]
    files = [PNG("lm_similarity.png", figures.layer_similarity_plot, result.layers,
                 {"width": figures.block_figure_width(len(layers))})]
    if len(result.spans):
        files.append(PNG("lm_spans.png", figures.span_plot, result.spans))
    files.append(PNG("lm_greedy.png", figures.greedy_curves, result.greedy))
    files.append(PNG("lm_agreement.png", figures.agreement_intervals, result.agreement))
    if len(result.lens):
        files.append(PNG("lm_logit_lens.png", figures.logit_lens_plot, result.lens,
                         {"width": figures.block_figure_width(len(result.lens))}))
    return files


def terminal(result, task) -> str:
    """What `python -m analyses.lm` prints: each layer's scores, the best spans, the agreement of
    the scores, the finding, and why any part is missing."""
    layers = result.layers[result.layers["kind"] == "layer"]
    lines = [layers[["unit", "block_influence", "angular_distance", "loss_increase"]]
             .to_string(index=False, float_format="{:.4f}".format),
             result.spans[["n", "start_by_angle", "loss_by_angle", "start_by_loss", "loss_by_loss"]]
             .to_string(index=False, float_format="{:.4f}".format),
             result.agreement.to_string(index=False, float_format="{:.3f}".format),
             "\n" + result.finding]
    lines += [f"{part}: {why}" for part, why in result.notes.items()]
    return "\n".join(lines)
