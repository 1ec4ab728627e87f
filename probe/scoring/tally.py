"""Sum a task's per-sample scores into outcomes: the arithmetic both evaluation engines share.

Rows are the states evaluated: row 0 the intact model (the reference), then one per deleted
set. Each row's scores on a batch are compared with row 0's on the same batch (flips, paired
loss differences), so every row must see the same batches in the same order. Sums stay on the
model's device as float64 until the end, so that `all_reduce` combines processes (torchrun).

Units a task left out because their outputs were not finite (`Scores.nonfinite`) count in no
sum but their own: each row's metrics are over its finite units, a flip needs a prediction in
the row, and the paired differences behind the standard error are over the samples finite in
both the row and the reference. `results` warns once when there were any.

A task with metrics that are no ratio of sums (mAP) defines `summarize`: each row keeps its
batches' `Scores.details`, joined over processes, and the row's summary goes into its outcome's
`extra`.
"""

from __future__ import annotations

import math
import os
import sys
import warnings

import torch

from probe import distributed
from probe.scoring.results import Outcome
from probe.scoring.scores import Scores, Task

__all__ = ["Tally"]

# Columns of the per-row sums, before the task's extra values: summed loss, units, correct units,
# flips, the paired-difference sums (d^2, d w, w^2, and the samples and units they are over),
# units left out as non-finite, and samples left out whole (their extra values are no average's).
_LOSS, _WEIGHT, _CORRECT, _FLIPS, _D2, _DW, _W2, _PAIRS, _PAIRED_WEIGHT, _NONFINITE, _DROPPED = range(11)
_COLUMNS = 11


class Tally:
    """Per row: summed loss, units, correct units, flips and the paired-difference sums behind
    the standard error; per class (classification); per sample (`outcomes=True`)."""

    def __init__(self, rows: int, device: torch.device, task: Task, *, per_class: bool = False,
                 outcomes: bool = False) -> None:
        self.rows, self.device, self.task = rows, device, task
        self.per_class, self.outcomes = per_class and task.per_class, outcomes
        # Normal tensors even inside the caller's torch.inference_mode(): they are summed into in
        # place where probe runs, outside it (`probe.instrument.hooks.model_preserved`).
        with torch.inference_mode(False):
            self.totals = torch.zeros(rows, _COLUMNS, dtype=torch.float64, device=device)
            self.class_correct = torch.zeros(rows, 0, dtype=torch.float64, device=device)
            # Per row: a row's scored samples per class (its non-finite ones are left out).
            self.class_count = torch.zeros(rows, 0, dtype=torch.float64, device=device)
        self.extra: dict[str, torch.Tensor] = {}
        self.samples = [0] * rows
        self.has_correct = self.has_prediction = False
        self.per_sample: list[dict[str, list[torch.Tensor]]] = [
            {"correct": [], "loss": [], "weight": []} for _ in range(rows)]
        self.summarize = getattr(task, "summarize", None)  # dataset-level metrics from details
        self.details: list[list] = [[] for _ in range(rows)]

    def add(self, row: int, scores: Scores, reference: Scores | None,
            class_labels: torch.Tensor | None = None) -> None:
        """One row's scores on one batch; `reference`: row 0's on the same batch (None for row 0)."""
        loss = scores.loss.double()
        weight = scores.weight.double() if scores.weight is not None else torch.ones_like(loss)
        sums = torch.zeros(_COLUMNS, dtype=torch.float64, device=self.device)
        sums[_LOSS] = loss.sum()
        sums[_WEIGHT] = weight.sum()
        if scores.nonfinite is not None:
            sums[_NONFINITE] = scores.nonfinite.sum()
            sums[_DROPPED] = ((scores.nonfinite > 0) & (weight == 0)).sum()
        if scores.correct is not None:
            self.has_correct = True
            sums[_CORRECT] = scores.correct.sum()
        if reference is not None:
            if scores.prediction is not None and reference.prediction is not None:
                self.has_prediction = True
                # -1: no prediction (a position not scored, or not finite here): no flip
                sums[_FLIPS] = ((scores.prediction != reference.prediction) & (scores.prediction != -1)).sum()
            difference = loss - reference.loss.double()
            paired = weight
            both = _finite_samples(scores, reference)  # (batch,) 1.0 where neither left a unit out
            if both is not None:
                difference, paired = difference * both, weight * both
                sums[_PAIRS] = both.sum()
            else:
                sums[_PAIRS] = len(loss)
            sums[_D2] = difference.square().sum()
            sums[_DW] = (difference * paired).sum()
            sums[_PAIRED_WEIGHT] = paired.sum()
            sums[_W2] = paired.square().sum()
        else:
            sums[_W2] = weight.square().sum()
        self.totals[row] += sums
        for name, values in scores.extra.items():
            if name not in self.extra:
                self.extra[name] = torch.zeros(self.rows, dtype=torch.float64, device=self.device)
            self.extra[name][row] += values.double().sum()
        self.samples[row] += len(loss)
        if self.summarize is not None and scores.details is not None:
            self.details[row].append(scores.details)
        if self.per_class and class_labels is not None and scores.correct is not None:
            self._add_classes(row, scores.correct, class_labels, scores.classes or 0, weight)
        if self.outcomes:
            kept = self.per_sample[row]
            if scores.correct is not None and scores.correct.dtype == torch.bool:
                kept["correct"].append(scores.correct.cpu())
            kept["loss"].append(loss.cpu())
            kept["weight"].append(weight.cpu())

    def _add_classes(self, row: int, correct: torch.Tensor, labels: torch.Tensor, outputs: int,
                     weight: torch.Tensor) -> None:
        # Every class the model outputs gets a row (NaN accuracy when absent from the data).
        classes = max(outputs, int(labels.max()) + 1, self.class_count.shape[1])
        grow = classes - self.class_count.shape[1]
        if grow > 0:
            self.class_correct = torch.nn.functional.pad(self.class_correct, (0, grow))
            self.class_count = torch.nn.functional.pad(self.class_count, (0, grow))
        self.class_correct[row].index_add_(0, labels, correct.double())
        self.class_count[row].index_add_(0, labels, weight)  # 1 per sample, 0 where it was not finite

    def reduce_across_processes(self) -> None:
        """Under torchrun: every process ends with the totals over all shards."""
        distributed.sum_across(self.totals)
        for name in sorted(self.extra):
            distributed.sum_across(self.extra[name])
        self.samples = distributed.sum_across(torch.tensor(self.samples, dtype=torch.long)).tolist()
        if self.per_class:
            classes = distributed.max_across(self.class_count.shape[1])
            grow = classes - self.class_count.shape[1]
            self.class_correct = distributed.sum_across(torch.nn.functional.pad(self.class_correct, (0, grow)))
            self.class_count = distributed.sum_across(torch.nn.functional.pad(self.class_count, (0, grow)))
        if self.outcomes:
            for kept in self.per_sample:
                for name, parts in kept.items():
                    if parts:
                        kept[name] = [distributed.interleave(torch.cat(parts))]
        if self.summarize is not None:
            self.details = [distributed.gather_objects(details) for details in self.details]

    def results(self, *, warn: bool = True) -> list[Outcome]:
        """One outcome per row; the first (the reference itself) has no flip rate and no standard
        error. Where any row left units out as non-finite, every outcome has `nonfinite` (else
        None) and, with `warn`, one warning says so."""
        self.reduce_across_processes()
        totals = self.totals.cpu().tolist()
        extra = {name: values.cpu().tolist() for name, values in self.extra.items()}
        counts = self.class_count.cpu()
        any_nonfinite = any(sums[_NONFINITE] > 0 for sums in totals)
        outcomes = []
        for row, sums in enumerate(totals):
            samples, units = self.samples[row], sums[_WEIGHT]
            if units <= 0:
                units = math.nan  # no scored unit (say, sequences of one token): nothing to average
            kept = self.per_sample[row]
            scored = samples - int(sums[_DROPPED])  # the samples an extra value is averaged over
            outcomes.append(Outcome(
                accuracy=sums[_CORRECT] / units if self.has_correct else None,
                loss=sums[_LOSS] / units, samples=samples,
                flip_rate=sums[_FLIPS] / units if row and self.has_prediction else None,
                class_accuracy=(self.class_correct[row].cpu() / counts[row]).tolist() if self.per_class else None,
                class_samples=counts[row].long().tolist() if self.per_class else None,  # NaN accuracy where absent
                correct=torch.cat(kept["correct"]) if kept["correct"] else None,
                loss_increase_se=_paired_se(sums, totals[0], samples) if row else None,
                units=int(sums[_WEIGHT]),
                extra={**{name: values[row] / scored if scored else math.nan for name, values in extra.items()},
                       **(self.summarize(self.details[row]) if self.summarize is not None else {})},
                sample_loss=torch.cat(kept["loss"]) if kept["loss"] else None,
                sample_weight=torch.cat(kept["weight"]) if kept["weight"] else None,
                nonfinite=int(sums[_NONFINITE]) if any_nonfinite else None))
        if any_nonfinite and warn:
            _warn_nonfinite(self.task, totals)
        return outcomes


def _finite_samples(scores: Scores, reference: Scores) -> torch.Tensor | None:
    """(batch,) float64, 1 where neither scores left a unit out as non-finite; None: no task check."""
    if scores.nonfinite is None and reference.nonfinite is None:
        return None
    both = None
    for nonfinite in (scores.nonfinite, reference.nonfinite):
        if nonfinite is not None:
            clean = nonfinite.reshape(len(nonfinite), -1).sum(dim=1) == 0
            both = clean if both is None else both & clean
    return both.double()


def _warn_nonfinite(task: Task, totals: list[list[float]]) -> None:
    """One line for the whole call: how many units the intact model and the deletions left out."""
    base = totals[0]
    line = (f"non-finite outputs (NaN or Inf) for {int(base[_NONFINITE])} of {int(base[_WEIGHT] + base[_NONFINITE])} "
            f"{task.units} of the intact model")
    if len(totals) > 1:
        line += f", up to {int(max(sums[_NONFINITE] for sums in totals[1:]))} with blocks deleted"
    warnings.warn(f"{line}: left out of accuracy and loss, and counted in `nonfinite_outputs`.", RuntimeWarning,
                  stacklevel=_outside_probe())


def _outside_probe() -> int:
    """The stacklevel of the first caller outside probe's package: the warning names the user's call."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = sys._getframe(2), 2  # 1: _warn_nonfinite's caller (results)
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level


def _paired_se(sums: list[float], base: list[float], samples: int) -> float:
    """Standard error of (sum of losses - the reference's) / units, over samples.

    The increase is a ratio of sums, c = sum d_i / sum w_i (d_i: a sample's loss minus the
    reference's on it; w_i: its units); its linearized (delta-method) variance is
    n / (n - 1) * sum (d_i - c w_i)^2 / (sum w_i)^2, expanded into the sums kept per row.
    With w_i = 1 this is the usual standard error of a mean paired difference. Where samples
    were left out as non-finite (in the row or the reference), the sums are over the n samples
    finite in both, and c is the reported increase (each side's mean over its own finite units).
    """
    if sums[_PAIRS] == samples:  # every sample paired: the row and the reference have the same units
        units = sums[_WEIGHT]
        if samples < 2 or units <= 0:
            return math.nan
        c = (sums[_LOSS] - base[_LOSS]) / units
        residual = sums[_D2] - 2 * c * sums[_DW] + c * c * sums[_W2]
        return math.sqrt(max(residual, 0.0) * samples / (samples - 1)) / units
    pairs, units = sums[_PAIRS], sums[_PAIRED_WEIGHT]
    if pairs < 2 or units <= 0 or sums[_WEIGHT] <= 0 or base[_WEIGHT] <= 0:
        return math.nan
    c = sums[_LOSS] / sums[_WEIGHT] - base[_LOSS] / base[_WEIGHT]
    residual = sums[_D2] - 2 * c * sums[_DW] + c * c * sums[_W2]
    return math.sqrt(max(residual, 0.0) * pairs / (pairs - 1)) / units
