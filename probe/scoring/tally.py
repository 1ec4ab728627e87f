"""Sum a task's per-sample scores into outcomes: the arithmetic both evaluation engines share.

Rows are the states evaluated: row 0 the intact model (the reference), then one per deleted
set. Each row's scores on a batch are compared with row 0's on the same batch (flips, paired
loss differences), so every row must see the same batches in the same order. Sums stay on the
model's device as float64 until the end, so that `all_reduce` combines processes (torchrun).
"""

from __future__ import annotations

import math

import torch

from probe import distributed
from probe.scoring.results import Outcome
from probe.scoring.tasks import Scores, Task

__all__ = ["Tally"]

# Columns of the per-row sums, before the task's extra values.
_LOSS, _WEIGHT, _CORRECT, _FLIPS, _D2, _DW, _W2 = range(7)
_COLUMNS = 7


class Tally:
    """Per row: summed loss, units, correct units, flips and the paired-difference sums behind
    the standard error; per class (classification); per sample (`outcomes=True`)."""

    def __init__(self, rows: int, device: torch.device, task: Task, *, per_class: bool = False,
                 outcomes: bool = False) -> None:
        self.rows, self.device, self.task = rows, device, task
        self.per_class, self.outcomes = per_class and task.per_class, outcomes
        self.totals = torch.zeros(rows, _COLUMNS, dtype=torch.float64, device=device)
        self.extra: dict[str, torch.Tensor] = {}
        self.samples = [0] * rows
        self.has_correct = self.has_prediction = False
        self.class_correct = torch.zeros(rows, 0, dtype=torch.float64, device=device)
        self.class_count = torch.zeros(0, dtype=torch.float64, device=device)
        self.per_sample: list[dict[str, list[torch.Tensor]]] = [
            {"correct": [], "loss": [], "weight": []} for _ in range(rows)]

    def add(self, row: int, scores: Scores, reference: Scores | None,
            class_labels: torch.Tensor | None = None) -> None:
        """One row's scores on one batch; `reference`: row 0's on the same batch (None for row 0)."""
        loss = scores.loss.double()
        weight = scores.weight.double() if scores.weight is not None else torch.ones_like(loss)
        sums = torch.zeros(_COLUMNS, dtype=torch.float64, device=self.device)
        sums[_LOSS] = loss.sum()
        sums[_WEIGHT] = weight.sum()
        if scores.correct is not None:
            self.has_correct = True
            sums[_CORRECT] = scores.correct.sum()
        if reference is not None:
            if scores.prediction is not None and reference.prediction is not None:
                self.has_prediction = True
                sums[_FLIPS] = (scores.prediction != reference.prediction).sum()
            difference = loss - reference.loss.double()
            sums[_D2] = difference.square().sum()
            sums[_DW] = (difference * weight).sum()
        sums[_W2] = weight.square().sum()
        self.totals[row] += sums
        for name, values in scores.extra.items():
            if name not in self.extra:
                self.extra[name] = torch.zeros(self.rows, dtype=torch.float64, device=self.device)
            self.extra[name][row] += values.double().sum()
        self.samples[row] += len(loss)
        if self.per_class and class_labels is not None and scores.correct is not None:
            self._add_classes(row, scores.correct, class_labels, scores.classes or 0)
        if self.outcomes:
            kept = self.per_sample[row]
            if scores.correct is not None and scores.correct.dtype == torch.bool:
                kept["correct"].append(scores.correct.cpu())
            kept["loss"].append(loss.cpu())
            kept["weight"].append(weight.cpu())

    def _add_classes(self, row: int, correct: torch.Tensor, labels: torch.Tensor, outputs: int) -> None:
        # Every class the model outputs gets a row (NaN accuracy when absent from the data).
        classes = max(outputs, int(labels.max()) + 1, self.class_count.shape[0])
        grow = classes - self.class_count.shape[0]
        if grow > 0:
            self.class_correct = torch.nn.functional.pad(self.class_correct, (0, grow))
            self.class_count = torch.nn.functional.pad(self.class_count, (0, grow))
        self.class_correct[row].index_add_(0, labels, correct.double())
        if row == 0:  # every row sees the same samples: count them once
            self.class_count.index_add_(0, labels, torch.ones_like(labels, dtype=torch.float64))

    def reduce_across_processes(self) -> None:
        """Under torchrun: every process ends with the totals over all shards."""
        distributed.sum_across(self.totals)
        for name in sorted(self.extra):
            distributed.sum_across(self.extra[name])
        self.samples = distributed.sum_across(torch.tensor(self.samples, dtype=torch.long)).tolist()
        if self.per_class:
            classes = distributed.max_across(self.class_count.shape[0])
            grow = classes - self.class_count.shape[0]
            self.class_correct = distributed.sum_across(torch.nn.functional.pad(self.class_correct, (0, grow)))
            self.class_count = distributed.sum_across(torch.nn.functional.pad(self.class_count, (0, grow)))
        if self.outcomes:
            for kept in self.per_sample:
                for name, parts in kept.items():
                    if parts:
                        kept[name] = [distributed.interleave(torch.cat(parts))]

    def results(self) -> list[Outcome]:
        """One outcome per row; the first (the reference itself) has no flip rate and no standard error."""
        self.reduce_across_processes()
        totals = self.totals.cpu().tolist()
        extra = {name: values.cpu().tolist() for name, values in self.extra.items()}
        counts = self.class_count.cpu()
        base_loss = totals[0][_LOSS]
        outcomes = []
        for row, sums in enumerate(totals):
            samples, units = self.samples[row], sums[_WEIGHT]
            if units <= 0:
                units = math.nan  # no scored unit (say, sequences of one token): nothing to average
            kept = self.per_sample[row]
            outcomes.append(Outcome(
                accuracy=sums[_CORRECT] / units if self.has_correct else None,
                loss=sums[_LOSS] / units, samples=samples,
                flip_rate=sums[_FLIPS] / units if row and self.has_prediction else None,
                class_accuracy=(self.class_correct[row].cpu() / counts).tolist() if self.per_class else None,
                class_samples=counts.long().tolist() if self.per_class else None,  # NaN accuracy where absent
                correct=torch.cat(kept["correct"]) if kept["correct"] else None,
                loss_increase_se=_paired_se(sums, base_loss, samples) if row else None,
                units=int(sums[_WEIGHT]),
                extra={name: values[row] / samples for name, values in extra.items()},
                sample_loss=torch.cat(kept["loss"]) if kept["loss"] else None,
                sample_weight=torch.cat(kept["weight"]) if kept["weight"] else None))
        return outcomes


def _paired_se(sums: list[float], base_loss: float, samples: int) -> float:
    """Standard error of (sum of losses - the reference's) / units, over samples.

    The increase is a ratio of sums, c = sum d_i / sum w_i (d_i: a sample's loss minus the
    reference's on it; w_i: its units); its linearized (delta-method) variance is
    n / (n - 1) * sum (d_i - c w_i)^2 / (sum w_i)^2, expanded into the sums kept per row.
    With w_i = 1 this is the usual standard error of a mean paired difference.
    """
    units = sums[_WEIGHT]
    if samples < 2 or units <= 0:
        return math.nan
    c = (sums[_LOSS] - base_loss) / units
    residual = sums[_D2] - 2 * c * sums[_DW] + c * c * sums[_W2]
    return math.sqrt(max(residual, 0.0) * samples / (samples - 1)) / units
