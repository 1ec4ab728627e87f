"""Evaluate the model with sets of blocks deleted: the engine behind `probe.sweep`, the analyses
and the CLI's per-block table.

Two engines give the same `probe.results.Evaluation`:

- without calibration data, every set is evaluated in one data pass. The loop runs batches
  outside and ablations inside: each batch is loaded once, its unablated predictions are the
  reference for the flip rate, and one hook per block stays attached for the whole pass
  (switched on for the blocks being deleted). Where the model can be cut at its blocks
  (`probe.suffix`), a deletion reruns only the network from its earliest block on, fed from the
  baseline pass; otherwise it runs the whole forward. Counts are summed on the device.
- with calibration data (`calibration=`), `probe.recalibrate.evaluate_recalibrated` refits the
  BatchNorm statistics for each set before evaluating it.

Tables built from an evaluation record which engine ran in a boolean `bn_recalibrated` column.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from probe import distributed
from probe.ablation import branch_replacement, check_mode
from probe.batches import batches, check_targets_fit, explained_misfit, input_dtype, model_device, read_again
from probe.blocks import Block, resolve_blocks
from probe.hooks import attached, model_preserved, replace_branches
from probe.measurement import branch_means
from probe.recalibrate import evaluate_recalibrated
from probe.results import Evaluation, Outcome
from probe.suffix import InPlaceError, runner_for

__all__ = ["COLUMNS", "evaluate_ablations", "single_block_sweep", "sweep", "sweep_table"]

COLUMNS = ["block", "position", "mode", "accuracy", "loss", "accuracy_drop", "loss_increase",
           "flip_rate", "samples"]


def sweep(model: nn.Module, data: Iterable, *, mode: str = "zero", blocks: Sequence[str | Block] | None = None,
          means: Mapping[str, torch.Tensor] | None = None, fast: bool = True, progress: bool = True) -> pd.DataFrame:
    """Ablate every block alone (mode "zero" or "mean") and compare with the unablated model.

    Returns one row per block in forward order; `df.attrs["baseline"]` holds the unablated
    model's {"accuracy", "loss", "samples"}. Accuracies are fractions in [0, 1]; `loss` is the
    mean cross-entropy; `flip_rate` is the share of samples whose predicted class changes.
    `fast=False` runs a full forward per ablation (same numbers, slower; for checking).
    """
    check_mode(mode)
    chosen = resolve_blocks(model, blocks)
    evaluation = evaluate_ablations(model, data, [[block] for block in chosen], mode=mode, means=means,
                                    fast=fast, progress=progress)
    return sweep_table(chosen, evaluation, mode=mode)


def single_block_sweep(model: nn.Module, data: Iterable, *, mode: str = "zero",
                       calibration: Iterable | None = None, per_class: bool = False, outcomes: bool = False,
                       blocks: Sequence[str | Block] | None = None,
                       progress: bool = True) -> tuple[pd.DataFrame, Evaluation]:
    """`sweep`'s table (plus `bn_recalibrated`) and the evaluation it came from.

    The evaluation carries per-class accuracies and per-sample outcomes when asked, so the
    uncertainty analysis can reuse this one pass instead of sweeping again. blocks: the blocks
    to delete one at a time (names or Blocks, e.g. from a spec); all discovered when None.
    """
    blocks = resolve_blocks(model, blocks)
    evaluation = evaluate_ablations(model, data, [[block] for block in blocks], mode=mode, calibration=calibration,
                                    per_class=per_class, outcomes=outcomes, progress=progress)
    return sweep_table(blocks, evaluation, mode=mode, recalibrated=calibration is not None), evaluation


def sweep_table(blocks: Sequence[Block], evaluation: Evaluation, *, mode: str,
                recalibrated: bool | None = None) -> pd.DataFrame:
    """One row per block deleted alone (`COLUMNS`), from an evaluation of single-block sets.

    `recalibrated` (True/False) adds the `bn_recalibrated` column; None leaves it out, as
    `probe.sweep` does. `attrs["baseline"]` holds the accuracy, loss and samples the rows are
    compared with (with BN recalibration: the intact model recalibrated; then
    `attrs["trained_baseline"]` holds the intact model as given).
    """
    baseline, results = evaluation
    rows = [{"block": block.name, "position": block.position, "mode": mode, "accuracy": result.accuracy,
             "loss": result.loss, "accuracy_drop": baseline.accuracy - result.accuracy,
             "loss_increase": result.loss - baseline.loss, "flip_rate": result.flip_rate,
             "samples": result.samples} for block, result in zip(blocks, results)]
    table = pd.DataFrame(rows, columns=COLUMNS)
    if recalibrated is not None:
        table["bn_recalibrated"] = recalibrated
    table.attrs["baseline"] = baseline.summary()
    if evaluation.trained_baseline is not None:  # recalibrated: the intact model as given, for the record
        table.attrs["trained_baseline"] = evaluation.trained_baseline.summary()
    return table


def evaluate_ablations(model: nn.Module, data: Iterable, ablation_sets: Sequence[Sequence[str | Block]], *,
                       mode: str = "zero", means: Mapping[str, torch.Tensor] | None = None,
                       calibration: Iterable | None = None, fast: bool = True, per_class: bool = False,
                       outcomes: bool = False, progress: bool = True) -> Evaluation:
    """Accuracy, loss and flip rate with each set of blocks ablated together.

    Returns an `Evaluation`: (baseline, one `Outcome` per set). With `per_class=True` each
    outcome also has `class_accuracy` and `class_samples`; with `outcomes=True` also `correct`,
    one entry per sample in data order (for bootstrap intervals: O(samples) memory). With
    `calibration` (held-out batches), BatchNorm statistics are refitted for each set before it
    is evaluated, and the baseline is the intact model refitted on the same batches (the model
    as given is then the evaluation's `trained_baseline`).
    """
    check_mode(mode)
    if calibration is not None:
        return evaluate_recalibrated(model, data, ablation_sets, calibration, mode=mode, means=means,
                                     per_class=per_class, outcomes=outcomes, progress=progress)
    named = {b.name: b for b in resolve_blocks(model, [b for s in ablation_sets for b in s],
                                               unique=False)}  # one discovery; sets may share blocks
    sets = [[named[b.name if isinstance(b, Block) else b] for b in s] for s in ablation_sets]
    involved = list({block.name: block for s in sets for block in s}.values())
    if mode == "mean" and means is None and involved:
        means = branch_means(model, data, blocks=involved, progress=progress)
        data = read_again(data)
    device = model_device(model)
    # Cut points are needed only where ablations start: the involved blocks' modules. (Blocks
    # given as Block objects, e.g. from a spec, then need no discovery at all.)
    replacement = branch_replacement(mode, means)
    active: set[str] = set()
    tally = _Tally(len(sets) + 1, device, per_class, outcomes)
    with model_preserved(model), attached() as handles, torch.no_grad():
        # Set to this call's replacement only while the model is held: runners are shared.
        runner = runner_for(model, involved, replacement) if fast and involved else None
        replace_branches(model, involved, replacement, handles,
                         active=lambda block: block.name in active)
        for inputs, targets in batches(data, device, dtype=input_dtype(model), progress=progress,
                                       desc=f"sweep ({len(sets)} ablations)"):
            logits = None
            with explained_misfit(inputs):
                if runner is not None:
                    try:
                        logits, cache = runner.baseline(inputs)
                    except InPlaceError:
                        runner = None  # the cache cannot be trusted: full forwards from here on
                if runner is None:
                    logits = model(inputs)
            check_targets_fit(logits, targets)
            reference = logits.argmax(dim=1)
            outcomes_per_row = [logits]
            for ablation_set in sets:
                active.clear()
                active.update(block.name for block in ablation_set)
                if runner is not None and ablation_set:
                    outcomes_per_row.append(runner.suffix(runner.first(ablation_set), cache))
                else:
                    outcomes_per_row.append(model(inputs))
                active.clear()
            tally.add(outcomes_per_row, targets, reference)
    baseline, *results = tally.results()
    return Evaluation(baseline, results)


class _Tally:
    """Per row (baseline, then each ablation set): correct count, summed loss, flips; per class."""

    def __init__(self, rows: int, device: torch.device, per_class: bool, outcomes: bool) -> None:
        self.totals = torch.zeros(rows, 3, dtype=torch.float64, device=device)
        self.per_class, self.outcomes = per_class, outcomes
        self.class_correct = torch.zeros(rows, 0, dtype=torch.float64, device=device)
        self.class_count = torch.zeros(0, dtype=torch.float64, device=device)
        self.correct: list[torch.Tensor] = []
        self.samples = 0

    def add(self, logits_per_row: list[torch.Tensor], targets: torch.Tensor, reference: torch.Tensor) -> None:
        logits = torch.stack(logits_per_row).float()  # (rows, batch, classes)
        predictions = logits.argmax(dim=2)
        correct = predictions == targets  # (rows, batch)
        losses = F.cross_entropy(logits.flatten(0, 1), targets.repeat(len(logits)), reduction="none")
        self.totals[:, 0] += correct.sum(dim=1)
        self.totals[:, 1] += losses.view(len(logits), -1).double().sum(dim=1)
        self.totals[:, 2] += (predictions != reference).sum(dim=1)
        self.samples += len(targets)
        if self.per_class:
            classes = max(logits.shape[2], self.class_count.shape[0])
            if classes > self.class_count.shape[0]:
                self.class_correct = torch.nn.functional.pad(self.class_correct, (0, classes - self.class_count.shape[0]))
                self.class_count = torch.nn.functional.pad(self.class_count, (0, classes - self.class_count.shape[0]))
            self.class_correct.index_add_(1, targets, correct.double())
            self.class_count.index_add_(0, targets, torch.ones_like(targets, dtype=torch.float64))
        if self.outcomes:
            self.correct.append(correct.cpu())

    def reduce_across_processes(self) -> None:
        """Under torchrun: every process ends with the totals over all shards."""
        distributed.sum_across(self.totals)
        self.samples = int(distributed.sum_across(torch.tensor([self.samples], dtype=torch.long))[0])
        if self.per_class:
            classes = distributed.max_across(self.class_count.shape[0])
            grow = classes - self.class_count.shape[0]
            self.class_correct = distributed.sum_across(torch.nn.functional.pad(self.class_correct, (0, grow)))
            self.class_count = distributed.sum_across(torch.nn.functional.pad(self.class_count, (0, grow)))
        if self.outcomes:
            self.correct = [distributed.interleave(torch.cat(self.correct, dim=1))]

    def results(self) -> list[Outcome]:
        """One outcome per row; the first (the reference itself) has no flip rate."""
        self.reduce_across_processes()
        totals = self.totals.cpu().tolist()
        correct = torch.cat(self.correct, dim=1) if self.correct else None
        counts = self.class_count.cpu()
        rows = []
        for row, (hits, loss, flips) in enumerate(totals):
            rows.append(Outcome(
                accuracy=hits / self.samples, loss=loss / self.samples, samples=self.samples,
                flip_rate=flips / self.samples if row else None,
                class_accuracy=(self.class_correct[row].cpu() / counts).tolist() if self.per_class else None,
                class_samples=counts.long().tolist() if self.per_class else None,  # NaN accuracy where absent
                correct=correct[row] if correct is not None else None))
        return rows
