"""Spans of n consecutive layers deleted together (Gromov et al. 2024): the span with the smallest
angular distance against the span whose deletion costs least."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from torch import nn

from analyses.lm.deletions import Deletions
from analyses.lm.influence import angle_table
from analyses.lm.stream import stream_pass
from analyses.lm.units import LM, layers_of
from probe.discovery.decoder import DecoderLayers
from probe.discovery.find import Block
from probe.errors import ProbeError
from probe.scoring.results import table_info

SPAN_LOSS_COLUMNS = ["n", "start", "first_layer", "last_layer", "angle", "loss", "perplexity", "loss_increase",
                     "loss_increase_se", "by_angle", "by_loss"]
SPAN_COLUMNS = ["n", "spans", "start_by_angle", "angle", "loss_by_angle", "perplexity_by_angle", "start_by_loss",
                "angle_by_loss", "loss_by_loss", "perplexity_by_loss", "same_span", "baseline_loss",
                "baseline_perplexity"]


def check_spans(spans: Iterable[int] | None, count: int) -> list[int]:
    if spans is None:
        return list(range(1, count))
    chosen = sorted(set(spans))
    bad = [n for n in chosen if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= count]
    if bad:
        raise ProbeError(f"span lengths {bad} are not between 1 and the number of layers ({count}).")
    return [int(n) for n in chosen]


def span_loss_table(deletions: Deletions, stack: DecoderLayers, angles: pd.DataFrame, spans: list[int]) -> pd.DataFrame:
    count = len(stack.names)
    candidates = [(n, start) for n in spans for start in range(count + 1 - n)]
    outcomes = deletions.outcomes([stack.names[start:start + n] for n, start in candidates])
    angle = angles.set_index(["n", "start"])["angle"]
    rows = [{"n": n, "start": start, "first_layer": stack.names[start], "last_layer": stack.names[start + n - 1],
             "angle": float(angle.get((n, start), float("nan"))), **deletions.row(outcome)}
            for (n, start), outcome in zip(candidates, outcomes)]
    table = pd.DataFrame(rows, columns=[c for c in SPAN_LOSS_COLUMNS if c not in ("by_angle", "by_loss")])
    table["by_angle"] = False
    table["by_loss"] = False
    for _, group in table.groupby("n", sort=True):
        # The first (earliest) span wins a tie, in both picks.
        table.loc[group["angle"].idxmin() if group["angle"].notna().any() else group.index[0], "by_angle"] = True
        table.loc[group["loss"].idxmin(), "by_loss"] = True
    table.attrs["baseline"] = LM.metrics(deletions.baseline)
    return table[SPAN_LOSS_COLUMNS]


def span_losses(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
                spans: Iterable[int] | None = None, angles: pd.DataFrame | None = None,
                progress: bool = True) -> pd.DataFrame:
    """Every span of n consecutive layers deleted together, with its angular distance.

    Columns: n, start (0-based index of its first layer), first_layer, last_layer, angle (the
    angular distance between the streams entering layer start and layer start + n:
    `residual_angles`), loss, perplexity, loss_increase, loss_increase_se (deleting the span's
    layers together), by_angle (Gromov et al.'s pick for this n: the smallest angle), by_loss
    (the span whose deletion costs least); ties go to the earliest span. spans: the lengths n
    (default 1..L-1); angles: `residual_angles` already computed (one pass is saved). All spans
    are evaluated in one `probe.evaluate_ablations` call (one pass over the data).
    `attrs["baseline"]`: the intact model's numbers.
    """
    stack = layers_of(model, data, blocks)
    if angles is None:
        angles = angle_table(stack, stream_pass(model, data, stack, sublayers=False, angles=True,
                                                  progress=progress))
    return span_loss_table(Deletions(model, data, stack, progress), stack, angles,
                        check_spans(spans, len(stack.names)))


def span_summary(spans: pd.DataFrame) -> pd.DataFrame:
    """One row per span length n of a `span_losses` table: Gromov et al.'s pick against the best.

    Columns: n, spans (how many spans of that length), start_by_angle (first layer index of the
    span with the smallest angular distance), angle (its distance), loss_by_angle,
    perplexity_by_angle (deleting it), start_by_loss (the span whose deletion costs least),
    angle_by_loss (its distance), loss_by_loss, perplexity_by_loss, same_span (both picks agree),
    baseline_loss, baseline_perplexity (the intact model, from `table_info(spans).baseline`; NaN without:
    output columns, so the CSV keeps them). `attrs["baseline"]` is the spans table's.
    """
    baseline = table_info(spans).baseline
    rows = []
    for n, group in spans.groupby("n", sort=True):
        angle = group[group["by_angle"].astype(bool)].iloc[0]
        loss = group[group["by_loss"].astype(bool)].iloc[0]
        rows.append({"n": int(n), "spans": len(group), "start_by_angle": int(angle["start"]),
                     "angle": angle["angle"], "loss_by_angle": angle["loss"],
                     "perplexity_by_angle": angle["perplexity"], "start_by_loss": int(loss["start"]),
                     "angle_by_loss": loss["angle"], "loss_by_loss": loss["loss"],
                     "perplexity_by_loss": loss["perplexity"], "same_span": int(angle["start"]) == int(loss["start"]),
                     "baseline_loss": baseline.get("loss", float("nan")),
                     "baseline_perplexity": baseline.get("perplexity", float("nan"))})
    summary = pd.DataFrame(rows, columns=SPAN_COLUMNS)
    summary.attrs["baseline"] = dict(baseline)
    return summary


def best_spans(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
               spans: Iterable[int] | None = None, angles: pd.DataFrame | None = None,
               progress: bool = True) -> pd.DataFrame:
    """For each span length n, the span Gromov et al. would delete (smallest angular distance)
    against the span whose deletion really costs least: `span_summary(span_losses(...))`."""
    return span_summary(span_losses(model, data, blocks=blocks, spans=spans, angles=angles, progress=progress))
