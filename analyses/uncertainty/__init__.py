"""How sure are we? Bootstrap intervals on every deletion cost, and the cost per class.

    python -m analyses.uncertainty --out runs/uncertainty

An accuracy drop measured on a few hundred samples moves in steps of one sample, and a block
that costs "0.3 points" may cost nothing. For each block we resample the evaluation samples with
replacement (a paired bootstrap: one resample draws the same samples for the unablated and the
ablated model) and report the central `level` interval of the resampled drops. A block is then
called skipped only when its branch is small *and* its interval is compatible with no cost.

A drop averaged over all classes can also hide a block that one class depends on; the per-class
table and heatmap show the drop for every (block, class).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

import probe
from probe.evaluation import single_block_sweep
from probe.results import Evaluation
from probe.table import check_table, join_block_table, unsupported_reason
from probe.verdict import UNSUPPORTED, VerdictRule, classify
from probe.blocks import Block, resolve_blocks
from probe.errors import ProbeError

__all__ = ["UncertaintyResult", "bootstrap_interval", "drop_intervals", "per_class_drops", "uncertainty"]

INTERVAL_COLUMNS = ["block", "position", "ratio", "accuracy_drop", "drop_low", "drop_high", "level", "resamples",
                    "samples", "skipped", "verdict_ci", "verdict", "bn_recalibrated"]
CLASS_COLUMNS = ["block", "position", "class", "samples", "baseline_accuracy", "accuracy", "accuracy_drop",
                 "bn_recalibrated"]


@dataclass
class UncertaintyResult:
    """intervals: one row per block: block, position, ratio, accuracy_drop (point estimate),
        drop_low / drop_high (bootstrap interval of the drop, fractions), level, resamples,
        samples, skipped (bool: ratio < the rule's max_ratio and the interval admits no cost),
        verdict_ci ("helps": the whole interval above 0; "hurts": below 0; else "skipped" or
        "neutral" by the ratio), verdict (the noise-band rule of `probe.verdict`, for
        comparison), bn_recalibrated.
    per_class: one row per (block, class) present in the data: block, position, class, samples
        (of that class), baseline_accuracy, accuracy (with the block deleted), accuracy_drop,
        bn_recalibrated.
    """

    intervals: pd.DataFrame
    per_class: pd.DataFrame


def bootstrap_interval(base_correct, ablated_correct, *, resamples: int = 1000, level: float = 0.95,
                       seed: int | Sequence[int] = 0) -> tuple[float, float]:
    """Paired percentile bootstrap interval of mean(base_correct) - mean(ablated_correct).

    Inputs: one bool per sample (the same samples, in the same order). Resampling n samples
    with replacement from the per-sample differences d_i in {-1, 0, 1} only matters through how
    many +1s and -1s are drawn, so each resample is one multinomial draw of those counts: the
    same distribution as resampling indices, in O(resamples) instead of O(resamples * n).
    Quantiles use numpy's default (linear) interpolation; `seed` seeds numpy's generator.
    """
    if not isinstance(resamples, int) or resamples < 1:
        raise ProbeError(f"resamples must be a positive whole number, got {resamples!r}.")
    if not 0 < level < 1:
        raise ProbeError(f"level must lie strictly between 0 and 1 (e.g. 0.95), got {level!r}.")
    base = np.asarray(torch.as_tensor(base_correct).cpu(), dtype=np.int64)
    ablated = np.asarray(torch.as_tensor(ablated_correct).cpu(), dtype=np.int64)
    if base.shape != ablated.shape or base.ndim != 1 or len(base) == 0:
        raise ProbeError(f"bootstrap_interval needs two equally long, non-empty outcome vectors; got shapes "
                         f"{base.shape} and {ablated.shape}.")
    d = base - ablated
    n = len(d)
    p = np.array([(d == 1).sum(), (d == -1).sum(), (d == 0).sum()], dtype=np.float64) / n
    counts = np.random.default_rng(seed).multinomial(n, p, size=resamples)  # (resamples, 3)
    drops = (counts[:, 0] - counts[:, 1]) / n
    low, high = np.quantile(drops, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _decide(ratio: float, low: float, high: float, max_ratio: float) -> str:
    """helps / hurts when the interval excludes 0; otherwise it admits no cost, and the block is
    skipped when its branch is also small."""
    if low > 0:
        return "helps"
    if high < 0:
        return "hurts"
    return "skipped" if ratio < max_ratio else "neutral"


def drop_intervals(table: pd.DataFrame, evaluation: Evaluation, *, rule: VerdictRule | None = None,
                   resamples: int = 1000, level: float = 0.95, seed: int = 0,
                   bn_recalibrated: bool = False) -> pd.DataFrame:
    """Bootstrap interval and noise-aware decision per block (see `UncertaintyResult.intervals`).

    table: one row per block in forward order with block, position, ratio (and, for the
    `verdict` column, accuracy_drop, flip_rate, samples); evaluation: (baseline, results) of
    the single-block deletions in the same order, with per-sample `correct` outcomes. Each
    block's resamples are seeded with (seed, position): independent of which blocks are asked.
    """
    rule = rule or VerdictRule()
    baseline, results = evaluation
    if "correct" not in baseline or len(results) != len(table):
        raise ProbeError("drop_intervals needs per-sample outcomes for every block: evaluate with outcomes=True.")
    if "verdict" in table and (table["verdict"] == UNSUPPORTED).all():
        verdicts = [UNSUPPORTED] * len(table)  # the intact model is at chance: no decision either
    elif {"flip_rate", "samples"} <= set(table.columns):
        verdicts = classify(table, rule)["verdict"].tolist()
    else:
        verdicts = [None] * len(table)
    rows = []
    for (_, row), result, verdict in zip(table.iterrows(), results, verdicts):
        low, high = bootstrap_interval(baseline["correct"], result["correct"], resamples=resamples, level=level,
                                       seed=[seed, int(row["position"])])
        decision = UNSUPPORTED if verdict == UNSUPPORTED else \
            _decide(float(row["ratio"]), low, high, rule.max_ratio)
        rows.append({"block": row["block"], "position": row["position"], "ratio": row["ratio"],
                     "accuracy_drop": baseline["accuracy"] - result["accuracy"], "drop_low": low, "drop_high": high,
                     "level": level, "resamples": resamples, "samples": result["samples"],
                     "skipped": decision == "skipped", "verdict_ci": decision, "verdict": verdict,
                     "bn_recalibrated": bn_recalibrated})
    return pd.DataFrame(rows, columns=INTERVAL_COLUMNS)


def per_class_drops(table: pd.DataFrame, evaluation: Evaluation, *,
                    bn_recalibrated: bool = False) -> pd.DataFrame:
    """Accuracy drop per (block, class) from an evaluation with per_class=True."""
    baseline, results = evaluation
    if "class_accuracy" not in baseline:
        raise ProbeError("per_class_drops needs per-class accuracies: evaluate with per_class=True.")
    rows = []
    for (_, row), result in zip(table.iterrows(), results):
        for cls, (count, before, after) in enumerate(zip(baseline["class_samples"], baseline["class_accuracy"],
                                                         result["class_accuracy"])):
            if count == 0:
                continue  # a class absent from the data has no accuracy
            rows.append({"block": row["block"], "position": row["position"], "class": cls, "samples": count,
                         "baseline_accuracy": before, "accuracy": after, "accuracy_drop": before - after,
                         "bn_recalibrated": bn_recalibrated})
    return pd.DataFrame(rows, columns=CLASS_COLUMNS)


def uncertainty(model: nn.Module, data: Iterable, table: pd.DataFrame | None = None, *,
                rule: VerdictRule | None = None, resamples: int = 1000, level: float = 0.95, seed: int = 0,
                mode: str = "zero", calibration: Iterable | None = None,
                evaluation: Evaluation | None = None, blocks: Sequence[str | Block] | None = None,
                progress: bool = True) -> UncertaintyResult:
    """Bootstrap intervals and per-class drops for every block deleted alone.

    table: per-block table with ratio (from `probe.measure`) and the verdict inputs, e.g.
    `python -m probe.ablate`'s; computed when None. evaluation: the single-block deletions
    with per_class=True and outcomes=True (`probe.evaluation.single_block_sweep`), to reuse
    a sweep already run; run here when None. blocks: the blocks the table covers (names or
    Blocks, e.g. from a spec); all discovered when None.
    """
    blocks = resolve_blocks(model, blocks)
    if evaluation is None:
        sweep, evaluation = single_block_sweep(model, data, mode=mode, calibration=calibration, per_class=True,
                                               outcomes=True, blocks=blocks, progress=progress)
        if table is None:
            table = join_block_table(probe.measure(model, data, blocks=blocks, progress=progress), sweep, rule,
                                     unsupported=unsupported_reason(evaluation, rule))
    elif table is None:
        raise ProbeError("uncertainty: pass the per-block table together with a precomputed evaluation.")
    table = check_table(table, ["block", "position", "ratio"], "uncertainty", model, blocks)
    if len(evaluation[1]) != len(blocks):
        raise ProbeError("uncertainty: the evaluation must hold one result per block, in forward order.")
    recal = calibration is not None
    if "bn_recalibrated" in table.columns:
        recal = bool(table["bn_recalibrated"].iloc[0])
    return UncertaintyResult(
        intervals=drop_intervals(table, evaluation, rule=rule, resamples=resamples, level=level, seed=seed,
                                 bn_recalibrated=recal),
        per_class=per_class_drops(table, evaluation, bn_recalibrated=recal))
