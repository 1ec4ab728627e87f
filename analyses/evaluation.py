"""Evaluate sets of deleted blocks, with or without BatchNorm recalibration: what every analysis runs.

Two engines give the same result dicts (see `probe.evaluate_ablations`):

- no calibration data: `probe.evaluate_ablations`, every set in one data pass, rerunning only
  the network downstream of each deletion;
- calibration data: `probe.recalibrate.evaluate_recalibrated`, which refits the BatchNorm
  statistics for each set before evaluating it (one calibration and one evaluation pass per set).

Every table an analysis returns records which engine ran in a boolean `bn_recalibrated` column.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

import probe
from probe.blocks import Block, resolve_blocks
from probe.recalibrate import evaluate_recalibrated
from probe.sweep import COLUMNS as SWEEP_COLUMNS

__all__ = ["block_table", "evaluate_sets", "single_block_sweep", "sweep_table"]


def evaluate_sets(model: nn.Module, data: Iterable, sets: Sequence[Sequence[str | Block]], *, mode: str = "zero",
                  means: Mapping[str, torch.Tensor] | None = None, calibration: Iterable | None = None,
                  per_class: bool = False, outcomes: bool = False,
                  progress: bool = True) -> tuple[dict, list[dict]]:
    """(baseline, one result dict per set): each set of blocks deleted together.

    With `calibration` (batches of held-out training data), BN statistics are recalibrated for
    each set first; the baseline is always the model as given.
    """
    if calibration is None:
        return probe.evaluate_ablations(model, data, sets, mode=mode, means=means, per_class=per_class,
                                        outcomes=outcomes, progress=progress)
    return evaluate_recalibrated(model, data, sets, calibration, mode=mode, means=means,
                                 per_class=per_class, outcomes=outcomes, progress=progress)


def single_block_sweep(model: nn.Module, data: Iterable, *, mode: str = "zero",
                       calibration: Iterable | None = None, per_class: bool = False, outcomes: bool = False,
                       blocks: Sequence[str | Block] | None = None,
                       progress: bool = True) -> tuple[pd.DataFrame, tuple[dict, list[dict]]]:
    """`probe.sweep`'s table (same columns, plus `bn_recalibrated`) and the raw evaluation.

    The raw (baseline, results) carry per-class accuracies and per-sample outcomes when asked,
    so the uncertainty analysis can reuse this one pass instead of sweeping again. blocks: the
    blocks to delete one at a time (names or Blocks, e.g. from a spec); all discovered when None.
    """
    blocks = resolve_blocks(model, blocks)
    baseline, results = evaluate_sets(model, data, [[block] for block in blocks], mode=mode,
                                      calibration=calibration, per_class=per_class, outcomes=outcomes,
                                      progress=progress)
    return sweep_table(blocks, baseline, results, mode=mode, recalibrated=calibration is not None), (baseline, results)


def sweep_table(blocks: Sequence[Block], baseline: dict, results: Sequence[dict], *, mode: str,
                recalibrated: bool) -> pd.DataFrame:
    """`probe.sweep`'s table (plus `bn_recalibrated`) from single-block evaluation results."""
    rows = []
    for block, result in zip(blocks, results):
        row = {key: result[key] for key in ("accuracy", "loss", "flip_rate", "samples")}
        rows.append({"block": block.name, "position": block.position, "mode": mode, **row,
                     "accuracy_drop": baseline["accuracy"] - result["accuracy"],
                     "loss_increase": result["loss"] - baseline["loss"]})
    table = pd.DataFrame(rows, columns=SWEEP_COLUMNS)
    table["bn_recalibrated"] = recalibrated
    table.attrs["baseline"] = {k: baseline[k] for k in ("accuracy", "loss", "samples")}
    return table


def block_table(model: nn.Module, data: Iterable, *, mode: str = "zero", calibration: Iterable | None = None,
                rule=None, blocks: Sequence[str | Block] | None = None, progress: bool = True) -> pd.DataFrame:
    """The per-block table `python -m probe.ablate` writes: measure + single deletions + verdict.

    For analyses called without a table. `attrs["baseline"]` holds the unablated model's numbers.
    """
    from analyses.verdict import VerdictRule, classify

    blocks = resolve_blocks(model, blocks)
    stats = probe.measure(model, data, blocks=blocks, progress=progress)
    sweep, _ = single_block_sweep(model, data, mode=mode, calibration=calibration, blocks=blocks, progress=progress)
    table = classify(stats.merge(sweep.drop(columns="samples"), on=["block", "position"]),
                     rule or VerdictRule())
    table.attrs["baseline"] = sweep.attrs["baseline"]
    return table


def check_table(table: pd.DataFrame, columns: Sequence[str], what: str, model: nn.Module,
                blocks: Sequence[str | Block] | None = None) -> pd.DataFrame:
    """`table` in forward order, validated: the needed columns, one row per block of `model`
    (per block of `blocks`, when the table covers chosen blocks or blocks from a spec)."""
    if not isinstance(table, pd.DataFrame):
        raise probe.ProbeError(f"{what} needs the per-block table (a DataFrame), got {type(table).__name__}.")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise probe.ProbeError(f"{what} needs column(s) {missing} in the per-block table; it has "
                               f"{list(table.columns)}. Build it with analyses.evaluation.block_table.")
    names = [block.name for block in resolve_blocks(model, blocks)]
    if sorted(map(str, table["block"])) != sorted(names):
        whose = "the model's blocks" if blocks is None else "the blocks asked for"
        raise probe.ProbeError(f"{what}: the table's blocks {list(table['block'])[:5]}... are not {whose} "
                               f"{names[:5]}...; was it computed on another model, or on other blocks "
                               "(pass those as blocks=)?")
    order = {name: i for i, name in enumerate(names)}
    return table.assign(_order=table["block"].map(order)).sort_values("_order").drop(columns="_order") \
        .reset_index(drop=True)
