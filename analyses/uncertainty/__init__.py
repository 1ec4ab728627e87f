"""How sure are we? Bootstrap intervals on every deletion cost, and the cost per class.

    python -m analyses.uncertainty --out runs/uncertainty

An accuracy drop measured on a few hundred samples moves in steps of one sample, and a block
that costs "0.3 points" may cost nothing. For each block we resample the evaluation samples with
replacement (a paired bootstrap: one resample draws the same samples for the unablated and the
ablated model) and report the central `level` interval of the resampled drops. A block is then
called skipped only when its branch is small *and* its interval is compatible with no cost.

A drop averaged over all classes can also hide a block that one class depends on; the per-class
table and heatmap show the drop for every (block, class).

Other tasks (`probe.scoring.tasks`) have a continuous cost: the loss increase (language models, your
own loss) or the drift of the outputs. Its interval is a paired bootstrap over samples too
(`cost_interval`), from the per-sample losses and units of the sweep; there are no classes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

import probe
from analyses.registry import Analysis, Job
from probe.commands.config import RunConfig
from probe.commands.inputs import load_inputs
from probe.deletion.evaluation import single_block_sweep
from probe.scoring.results import Evaluation, Outcome, table_info
from probe.deletion.block_table import check_table, join_block_table, unsupported_reason
from probe.scoring.tasks import Classification, Task, resolve_task
from probe.scoring.verdict import UNSUPPORTED, VerdictRule, classify, cost_column
from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError

__all__ = ["UncertaintyResult", "bootstrap_interval", "check_bootstrap", "cost_interval", "drop_intervals",
           "interval_columns", "per_class_drops", "uncertainty"]

INTERVAL_COLUMNS = ["block", "position", "ratio", "accuracy_drop", "drop_low", "drop_high", "level", "resamples",
                    "samples", "skipped", "verdict_ci", "verdict", "bn_recalibrated"]
CLASS_COLUMNS = ["block", "position", "class", "samples", "baseline_accuracy", "accuracy", "accuracy_drop",
                 "bn_recalibrated"]


def interval_columns(cost: str = "accuracy_drop") -> list[str]:
    """The columns of the intervals table for a task whose cost column is `cost`
    (`probe.scoring.tasks.Task.cost`): `INTERVAL_COLUMNS` for classification; for a continuous cost the
    point estimate and its interval are named for it (`loss_increase`, `loss_increase_low`,
    `loss_increase_high`; `drift`, `drift_low`, `drift_high`)."""
    if cost == "accuracy_drop":
        return list(INTERVAL_COLUMNS)
    return ["block", "position", "ratio", cost, f"{cost}_low", f"{cost}_high", *INTERVAL_COLUMNS[6:]]


@dataclass(frozen=True)
class UncertaintyResult:
    """intervals: one row per block: block, position, ratio, accuracy_drop (point estimate),
        drop_low / drop_high (bootstrap interval of the drop, fractions), level, resamples,
        samples, skipped (bool: ratio < the rule's max_ratio and the interval admits no cost),
        verdict_ci ("helps": the whole interval above 0; "hurts": below 0; else "skipped" or
        "neutral" by the ratio), verdict (the noise-band rule of `probe.scoring.verdict`, for
        comparison), bn_recalibrated.
        Other tasks (`interval_columns`): the cost and its interval are named for the task's
        cost column: loss_increase, loss_increase_low, loss_increase_high (lm: mean NLL per
        token; your own loss) or drift, drift_low, drift_high (`cost_interval`). verdict_ci for
        loss_increase: "helps" when the interval lies above the rounding tolerance (a millionth
        of the intact model's loss, as `probe.scoring.verdict.noise_band`), "hurts" below minus it, else
        "skipped" or "neutral" by the ratio. For drift, which has no direction and no sign,
        the tolerance is the rule's max_drift: "helps" when the whole interval lies above it,
        "skipped" when the whole interval lies at or below it and the ratio is small, else
        "neutral"; never "hurts".
    per_class: one row per (block, class) present in the data: block, position, class, samples
        (of that class), baseline_accuracy, accuracy (with the block deleted), accuracy_drop,
        bn_recalibrated. Classification only: for other tasks an empty table with these columns.
    """

    intervals: pd.DataFrame
    per_class: pd.DataFrame

    def tables(self) -> dict[str, pd.DataFrame]:
        """{file stem: table}: drop_intervals.csv, class_drops.csv."""
        return {"drop_intervals": self.intervals, "class_drops": self.per_class}


def bootstrap_interval(base_correct, ablated_correct, *, resamples: int = 1000, level: float = 0.95,
                       seed: int | Sequence[int] = 0) -> tuple[float, float]:
    """Paired percentile bootstrap interval of mean(base_correct) - mean(ablated_correct).

    Inputs: one bool per sample (the same samples, in the same order). Resampling n samples
    with replacement from the per-sample differences d_i in {-1, 0, 1} only matters through how
    many +1s and -1s are drawn, so each resample is one multinomial draw of those counts: the
    same distribution as resampling indices, in O(resamples) instead of O(resamples * n).
    Quantiles use numpy's default (linear) interpolation; `seed` seeds numpy's generator.
    """
    check_bootstrap(resamples, level)
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


def check_bootstrap(resamples: int, level: float) -> None:
    """A ProbeError unless `resamples` is a positive whole number and 0 < `level` < 1 (every
    bootstrap's arguments: the intervals here, the lm analysis's score agreement)."""
    if isinstance(resamples, bool) or not isinstance(resamples, (int, np.integer)) or resamples < 1:
        raise ProbeError(f"resamples must be a positive whole number, got {resamples!r}.")
    if not 0 < level < 1:
        raise ProbeError(f"level must lie strictly between 0 and 1 (e.g. 0.95), got {level!r}.")


def cost_interval(base_loss, ablated_loss, weight=None, *, resamples: int = 1000, level: float = 0.95,
                  seed: int | Sequence[int] = 0) -> tuple[float, float]:
    """Paired percentile bootstrap interval of a continuous cost, sum(d) / sum(w) over samples.

    d_i = ablated_loss_i - base_loss_i (a sample's loss summed over its units, with the block
    deleted and intact; for `drift` the intact model's is 0, so d_i is the sample's drift), w_i
    its units (tokens for `lm`; 1 each when `weight` is None). Resample r draws n sample indices
    with replacement, `rng.integers(0, n, n)` from `numpy.random.default_rng(seed)`, one draw
    per resample in order, and computes sum(d[idx]) / sum(w[idx]) (NaN when the drawn samples
    hold no unit). Quantiles use numpy's default (linear) interpolation, ignoring NaN.
    """
    check_bootstrap(resamples, level)
    base = np.asarray(torch.as_tensor(base_loss).cpu(), dtype=np.float64)
    ablated = np.asarray(torch.as_tensor(ablated_loss).cpu(), dtype=np.float64)
    w = np.ones_like(ablated) if weight is None else np.asarray(torch.as_tensor(weight).cpu(), dtype=np.float64)
    if not (base.shape == ablated.shape == w.shape) or base.ndim != 1 or len(base) == 0:
        raise ProbeError(f"cost_interval needs equally long, non-empty per-sample vectors; got shapes {base.shape}, "
                         f"{ablated.shape} and {w.shape}.")
    d = ablated - base
    n = len(d)
    rng = np.random.default_rng(seed)
    costs = np.empty(resamples, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        for r in range(resamples):  # one resample at a time: O(n) memory, whatever `resamples`
            idx = rng.integers(0, n, n)
            units = w[idx].sum()
            costs[r] = d[idx].sum() / units if units > 0 else np.nan
    if np.isnan(costs).all():
        return float("nan"), float("nan")
    low, high = np.nanquantile(costs, [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def _decide(ratio: float, low: float, high: float, max_ratio: float, tolerance: float = 0.0) -> str:
    """helps / hurts when the interval excludes 0 (by more than `tolerance`: float rounding of a
    continuous loss); otherwise it admits no cost, and the block is skipped when its branch is
    also small."""
    if low > tolerance:
        return "helps"
    if high < -tolerance:
        return "hurts"
    return "skipped" if ratio < max_ratio else "neutral"


def _decide_drift(ratio: float, low: float, high: float, max_ratio: float, max_drift: float) -> str:
    """Drift has no sign: helps when the whole interval lies above max_drift; skipped when all
    of it lies at or below max_drift and the branch is small; else neutral."""
    if low > max_drift:
        return "helps"
    if high <= max_drift and ratio < max_ratio:
        return "skipped"
    return "neutral"


def _task_of(evaluation, task: str | Task | Callable | None) -> Task:
    """The task given, else the one that scored `evaluation`, else classification."""
    if task is not None:
        return resolve_task(task)
    return resolve_task(getattr(evaluation, "task", None))


def drop_intervals(table: pd.DataFrame, evaluation: Evaluation, *, rule: VerdictRule | None = None,
                   resamples: int = 1000, level: float = 0.95, seed: int = 0,
                   bn_recalibrated: bool = False, task: str | Task | Callable | None = None) -> pd.DataFrame:
    """Bootstrap interval and noise-aware decision per block (see `UncertaintyResult.intervals`).

    table: one row per block in forward order with block, position, ratio (and, for the
    `verdict` column, accuracy_drop, flip_rate, samples, or the task's cost and its standard
    error); evaluation: (baseline, results) of the single-block deletions in the same order,
    with per-sample outcomes (`correct` for classification, `sample_loss` and `sample_weight`
    for other tasks). Each block's resamples are seeded with (seed, position): independent of
    which blocks are asked. task: the task given, else the evaluation's (`Evaluation.task`),
    else classification. The `verdict` column is the table's own (classified once, where the
    table was built), and `verdict_ci` uses the rule that made it (`attrs["rule"]`, VerdictRule()
    for a table read back from a CSV); with `rule` given, or for a table without verdicts, both
    are by `rule`.
    """
    given_rule, rule = rule, rule or table_info(table).rule or VerdictRule()
    task = _task_of(evaluation, task)
    baseline, results = evaluation
    classification = isinstance(task, Classification)
    needed = "correct" if classification else "sample_loss"
    if getattr(baseline, needed) is None or len(results) != len(table) or \
            any(getattr(result, needed) is None for result in results):
        raise ProbeError("drop_intervals needs per-sample outcomes for every block: evaluate with outcomes=True.")
    noise_columns = {"flip_rate", "samples"} if classification else {task.cost, f"{task.cost}_se", "samples"}
    if "verdict" in table and (given_rule is None or (table["verdict"] == UNSUPPORTED).all()):
        verdicts = table["verdict"].tolist()  # unsupported: the intact model is at chance, no decision either
    elif noise_columns <= set(table.columns) and (classification or cost_column(table) == task.cost):
        verdicts = classify(table, rule=rule)["verdict"].tolist()
    else:
        verdicts = [None] * len(table)
    cost = task.cost
    tolerance = 0.0
    if cost == "loss_increase":  # as probe.scoring.verdict's noise floor: below it, two float sums differ by rounding
        tolerance = 1e-6 * abs(baseline.loss) + 1e-12
    rows = []
    for (_, row), result, verdict in zip(table.iterrows(), results, verdicts):
        block_seed = [seed, int(row["position"])]
        if classification:
            # Only samples scored in both states: a non-finite output is no sample (weight 0).
            kept = _scored_in_both(baseline, result)
            low, high = bootstrap_interval(baseline.correct[kept], result.correct[kept], resamples=resamples,
                                           level=level, seed=block_seed)
            point = baseline.accuracy - result.accuracy
        else:
            low, high = cost_interval(baseline.sample_loss, result.sample_loss, _weights(baseline, result),
                                      resamples=resamples, level=level, seed=block_seed)
            point = _point(cost, baseline, result)
        ratio = float(row["ratio"])
        if verdict == UNSUPPORTED:
            decision = UNSUPPORTED
        elif cost == "drift":
            decision = _decide_drift(ratio, low, high, rule.max_ratio, rule.max_drift)
        else:
            decision = _decide(ratio, low, high, rule.max_ratio, tolerance)
        names = interval_columns(cost)
        rows.append({"block": row["block"], "position": row["position"], "ratio": row["ratio"],
                     names[3]: point, names[4]: low, names[5]: high,
                     "level": level, "resamples": resamples, "samples": result.samples,
                     "skipped": decision == "skipped", "verdict_ci": decision, "verdict": verdict,
                     "bn_recalibrated": bn_recalibrated})
    return pd.DataFrame(rows, columns=interval_columns(cost))


def _scored_in_both(baseline: Outcome, result: Outcome) -> torch.Tensor:
    """Which samples both states scored (weight > 0): a sample whose output was not finite in
    either is left out of the paired bootstrap, as it is of the accuracies."""
    kept = torch.ones(len(baseline.correct), dtype=torch.bool)
    for weight in (baseline.sample_weight, result.sample_weight):
        if weight is not None:
            kept &= torch.as_tensor(weight).cpu().reshape(len(kept), -1).sum(dim=1) > 0
    return kept


def _weights(baseline: Outcome, result: Outcome):
    """Per-sample units: the deleted state's (the same as the intact model's on the same samples)."""
    return result.sample_weight if result.sample_weight is not None else baseline.sample_weight


def _point(cost: str, baseline: Outcome, result: Outcome) -> float:
    """The point estimate of a continuous cost: the loss increase, or the drift itself."""
    if cost == "drift":
        return float(result.loss)
    return float(result.loss - baseline.loss)


def per_class_drops(table: pd.DataFrame, evaluation: Evaluation, *,
                    bn_recalibrated: bool = False) -> pd.DataFrame:
    """Accuracy drop per (block, class) from an evaluation with per_class=True (classification;
    an evaluation of another task gives an empty table with the same columns)."""
    baseline, results = evaluation
    task = getattr(evaluation, "task", None)
    if task is not None and not task.per_class:
        return pd.DataFrame(columns=CLASS_COLUMNS)
    if baseline.class_accuracy is None:
        raise ProbeError("per_class_drops needs per-class accuracies: evaluate with per_class=True.")
    rows = []
    for (_, row), result in zip(table.iterrows(), results):
        for cls, (count, before, after) in enumerate(zip(baseline.class_samples, baseline.class_accuracy,
                                                         result.class_accuracy)):
            if count == 0:
                continue  # a class absent from the data has no accuracy
            rows.append({"block": row["block"], "position": row["position"], "class": cls, "samples": count,
                         "baseline_accuracy": before, "accuracy": after, "accuracy_drop": before - after,
                         "bn_recalibrated": bn_recalibrated})
    return pd.DataFrame(rows, columns=CLASS_COLUMNS)


def uncertainty(model: nn.Module, data: Iterable, *, table: pd.DataFrame | None = None,
                rule: VerdictRule | None = None, resamples: int = 1000, level: float = 0.95, seed: int = 0,
                mode: str = "zero", calibration: Iterable | None = None,
                evaluation: Evaluation | None = None, blocks: Sequence[str | Block] | None = None,
                task: str | Task | Callable | None = None, progress: bool = True) -> UncertaintyResult:
    """Bootstrap intervals and per-class drops for every block deleted alone.

    table: per-block table with ratio (from `probe.measure`) and the verdict inputs, e.g.
    `python -m probe.ablate`'s; computed when None. evaluation: the single-block deletions
    with per_class=True and outcomes=True (`probe.deletion.evaluation.single_block_sweep`), to reuse
    a sweep already run; run here when None. blocks: the blocks the table covers (names or
    Blocks, e.g. from a spec); all discovered when None. task: what the outputs mean
    (`probe.scoring.tasks`); None takes the evaluation's task when one is given, else classification.
    Other tasks get intervals of their cost (`interval_columns`) and no per-class table.
    """
    blocks = resolve_blocks(model, blocks)
    task = _task_of(evaluation, task)
    if evaluation is None:
        sweep, evaluation = single_block_sweep(model, data, mode=mode, calibration=calibration, per_class=True,
                                               outcomes=True, blocks=blocks, task=task, progress=progress)
        if table is None:
            table = join_block_table(probe.measure(model, data, blocks=blocks, progress=progress), sweep, rule=rule,
                                     unsupported=unsupported_reason(evaluation, rule))
    elif table is None:
        raise ProbeError("uncertainty: pass the per-block table together with a precomputed evaluation.")
    evaluation_task = getattr(evaluation, "task", None)
    if evaluation_task is not None and evaluation_task.cost != task.cost:
        raise ProbeError(f"uncertainty: the evaluation was scored by task {evaluation_task.name!r}, not "
                         f"{task.name!r}; pass the task it was made with (task=).")
    held = cost_column(table)
    if held in table.columns and held != task.cost:
        raise ProbeError(f"uncertainty: the per-block table holds {held} (a table of another task), but the task "
                         f"{task.name!r} measures {task.cost}; pass the task the table was made with (task=).")
    table = check_table(table, ["block", "position", "ratio"], "uncertainty", model, blocks=blocks)
    if len(evaluation[1]) != len(blocks):
        raise ProbeError("uncertainty: the evaluation must hold one result per block, in forward order.")
    recal = calibration is not None
    if "bn_recalibrated" in table.columns:
        recal = bool(table["bn_recalibrated"].iloc[0])
    classes = per_class_drops(table, evaluation, bn_recalibrated=recal) if task.per_class else \
        pd.DataFrame(columns=CLASS_COLUMNS)
    return UncertaintyResult(
        intervals=drop_intervals(table, evaluation, rule=rule, resamples=resamples, level=level, seed=seed,
                                 bn_recalibrated=recal, task=task),
        per_class=classes)


def _in_job(job: Job) -> UncertaintyResult:
    config = job.config
    return uncertainty(job.model, job.data, table=job.table, resamples=config.bootstrap, level=config.level, seed=config.seed,
                       evaluation=job.evaluation, blocks=job.blocks, task=job.task, progress=job.progress)


def _alone(config: RunConfig, out: Path, progress: bool) -> UncertaintyResult:
    inputs = load_inputs(config, progress=progress)
    return uncertainty(inputs.model, inputs.data, resamples=config.bootstrap, level=config.level, seed=config.seed,
                       mode=config.mode, calibration=inputs.calibration, blocks=inputs.blocks,
                       task=resolve_task(config.task), progress=progress)


ANALYSIS = Analysis(
    name="uncertainty", order=40, in_job=_in_job, alone=_alone, options=("model", "ablation", "uncertainty"),
    summary="bootstrap intervals of each block's cost, and per-class costs")
