"""Evaluate the model with sets of blocks deleted: the engine behind `probe.sweep`, the analyses
and the CLI's per-block table.

Two engines give the same `probe.results.Evaluation`:

- without calibration data, every set is evaluated in one data pass. The loop runs batches
  outside and ablations inside: each batch is loaded once, its unablated predictions are the
  reference for the flip rate, and one hook per block stays attached for the whole pass
  (switched on for the blocks being deleted). Where the model can be cut at its blocks
  (`probe.suffix`), a deletion reruns only the network from its earliest block on, fed from the
  baseline pass; a model fx cannot trace whose blocks lie in one stack of layers (a
  transformer) replays the layers before the deletion from the baseline pass (`probe.replay`);
  otherwise it runs the whole forward. Counts are summed on the device.
- with calibration data (`calibration=`), `probe.recalibrate.evaluate_recalibrated` refits the
  BatchNorm statistics for each set before evaluating it.

Tables built from an evaluation record which engine ran in a boolean `bn_recalibrated` column.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from probe.ablation import branch_replacement, check_mode
from probe.batches import batches, class_targets, explained_misfit, input_dtype, model_device, read_again
from probe.blocks import Block, resolve_blocks
from probe.hooks import attached, model_preserved, replace_branches
from probe.measurement import branch_means
from probe.recalibrate import evaluate_recalibrated
from probe.replay import layer_runner_for
from probe.results import Evaluation
from probe.suffix import InPlaceError, runner_for
from probe.tally import Tally
from probe.tasks import Classification, Task, resolve_task

__all__ = ["COLUMNS", "evaluate_ablations", "single_block_sweep", "sweep", "sweep_table"]

# The classification task's sweep columns; other tasks: see `sweep_table` and the README.
COLUMNS = ["block", "position", "mode", "accuracy", "loss", "accuracy_drop", "loss_increase",
           "flip_rate", "samples"]


def sweep(model: nn.Module, data: Iterable, *, mode: str = "zero", blocks: Sequence[str | Block] | None = None,
          means: Mapping[str, torch.Tensor] | None = None, task: str | Task | Callable | None = None,
          fast: bool = True, progress: bool = True) -> pd.DataFrame:
    """Ablate every block alone (mode "zero" or "mean") and compare with the unablated model.

    Returns one row per block in forward order, with the task's columns (`sweep_table`);
    `df.attrs["baseline"]` holds the unablated model's numbers. For classification (the
    default): accuracies are fractions in [0, 1]; `loss` is the mean cross-entropy; `flip_rate`
    is the share of samples whose predicted class changes. task: see `probe.tasks`.
    `fast=False` runs a full forward per ablation (same numbers, slower; for checking).
    """
    check_mode(mode)
    chosen = resolve_blocks(model, blocks, data=data)
    evaluation = evaluate_ablations(model, data, [[block] for block in chosen], mode=mode, means=means,
                                    task=task, fast=fast, progress=progress)
    return sweep_table(chosen, evaluation, mode=mode)


def single_block_sweep(model: nn.Module, data: Iterable, *, mode: str = "zero",
                       calibration: Iterable | None = None, per_class: bool = False, outcomes: bool = False,
                       blocks: Sequence[str | Block] | None = None, task: str | Task | Callable | None = None,
                       progress: bool = True) -> tuple[pd.DataFrame, Evaluation]:
    """`sweep`'s table (plus `bn_recalibrated`) and the evaluation it came from.

    The evaluation carries per-class accuracies and per-sample outcomes when asked, so the
    uncertainty analysis can reuse this one pass instead of sweeping again. blocks: the blocks
    to delete one at a time (names or Blocks, e.g. from a spec); all discovered when None.
    """
    blocks = resolve_blocks(model, blocks, data=data)
    evaluation = evaluate_ablations(model, data, [[block] for block in blocks], mode=mode, calibration=calibration,
                                    per_class=per_class, outcomes=outcomes, task=task, progress=progress)
    return sweep_table(blocks, evaluation, mode=mode, recalibrated=calibration is not None), evaluation


def sweep_table(blocks: Sequence[Block], evaluation: Evaluation, *, mode: str,
                recalibrated: bool | None = None) -> pd.DataFrame:
    """One row per block deleted alone, from an evaluation of single-block sets.

    Columns: block, position, mode, the task's columns (`probe.tasks.Task.row`; for
    classification `COLUMNS`), samples. Per task:
      classification: accuracy, loss, accuracy_drop, loss_increase, flip_rate
      lm:             loss (mean NLL per token), perplexity, token_accuracy, loss_increase,
                      loss_increase_se, perplexity_ratio, token_accuracy_drop, token_flip_rate, tokens
      drift:          drift (mean relative L2 change of the outputs), drift_se, kl (with logits)
      your own:       loss, loss_increase, loss_increase_se (accuracy, accuracy_drop when it
                      returns correctness)
    `recalibrated` (True/False) adds the `bn_recalibrated` column; None leaves it out, as
    `probe.sweep` does. `attrs["baseline"]` holds the numbers the rows are compared with (with
    BN recalibration: the intact model recalibrated; then `attrs["trained_baseline"]` holds the
    intact model as given); `attrs["task"]` the task's name.
    """
    baseline, results = evaluation
    task = evaluation.task or Classification()
    rows = [{"block": block.name, "position": block.position, "mode": mode, **task.row(baseline, result),
             "samples": result.samples} for block, result in zip(blocks, results)]
    columns = ["block", "position", "mode", *task.row(baseline, baseline).keys(), "samples"]
    table = pd.DataFrame(rows, columns=columns)
    if recalibrated is not None:
        table["bn_recalibrated"] = recalibrated
    table.attrs["baseline"] = task.metrics(baseline)
    if evaluation.trained_baseline is not None:  # recalibrated: the intact model as given, for the record
        table.attrs["trained_baseline"] = task.metrics(evaluation.trained_baseline)
    if not isinstance(task, Classification):
        table.attrs["task"] = task.name
    return table


def evaluate_ablations(model: nn.Module, data: Iterable, ablation_sets: Sequence[Sequence[str | Block]], *,
                       mode: str = "zero", means: Mapping[str, torch.Tensor] | None = None,
                       calibration: Iterable | None = None, fast: bool = True, per_class: bool = False,
                       outcomes: bool = False, task: str | Task | Callable | None = None,
                       progress: bool = True) -> Evaluation:
    """The task's numbers (classification: accuracy, loss, flip rate) with each set of blocks
    ablated together.

    Returns an `Evaluation`: (baseline, one `Outcome` per set). With `per_class=True` each
    outcome also has `class_accuracy` and `class_samples` (classification); with
    `outcomes=True` also per-sample `sample_loss` and `sample_weight` (and `correct` for
    classification), one entry per sample in data order (for bootstrap intervals: O(samples)
    memory). With `calibration` (held-out batches), BatchNorm statistics are refitted for each
    set before it is evaluated, and the baseline is the intact model refitted on the same
    batches (the model as given is then the evaluation's `trained_baseline`). task: what the
    outputs mean and how samples are scored (`probe.tasks`; classification by default).
    """
    check_mode(mode)
    task = resolve_task(task)
    if calibration is not None:
        return evaluate_recalibrated(model, data, ablation_sets, calibration, mode=mode, means=means, fast=fast,
                                     per_class=per_class, outcomes=outcomes, task=task, progress=progress)
    named = {b.name: b for b in resolve_blocks(model, [b for s in ablation_sets for b in s], data=data,
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
    names = [frozenset(block.name for block in s) for s in sets]
    # Where a set holds the one before it (the points of a deletion curve), it runs on from the
    # network of that set rather than from the intact one.
    contained = [i + 1 < len(sets) and bool(names[i]) and names[i] <= names[i + 1] for i in range(len(sets))]
    tally = Tally(len(sets) + 1, device, task, per_class=per_class, outcomes=outcomes)
    with model_preserved(model), attached() as handles, torch.no_grad():
        # Set to this call's replacement only while the model is held: runners are shared.
        runner = None
        if fast and involved:  # a traced graph's suffixes, else replayed layers, else full forwards
            runner = runner_for(model, involved, replacement) or layer_runner_for(model, involved)
        replace_branches(model, involved, replacement, handles,
                         active=lambda block: block.name in active)
        for batch in batches(data, device, dtype=input_dtype(model), progress=progress,
                             desc=f"sweep ({len(sets)} ablations)"):
            outputs = None
            with explained_misfit(batch):
                if runner is not None:
                    try:
                        outputs, cache = runner.baseline(batch.inputs)
                    except InPlaceError:
                        runner = None  # the cache cannot be trusted: full forwards from here on
                if runner is None:
                    outputs = batch.run(model)
            labels = class_targets(batch) if tally.per_class else None
            reference = task.score(outputs, batch)
            tally.add(0, reference, None, labels)
            intact = outputs if task.needs_reference else None
            previous = None  # the last set's (names, outputs, cache), when the next set contains it
            for row, ablation_set in enumerate(sets, start=1):
                active.clear()
                active.update(block.name for block in ablation_set)
                ablated_outputs = None
                if runner is not None and ablation_set:
                    try:
                        ablated_outputs, previous = _set_outputs(runner, ablation_set, cache, previous,
                                                                 keep=contained[row - 1])
                    except InPlaceError:
                        runner = None  # as above: full forwards from here on
                if ablated_outputs is None:
                    ablated_outputs = batch.run(model)
                active.clear()
                tally.add(row, task.score(ablated_outputs, batch, intact), reference, labels)
    baseline, *results = tally.results()
    return Evaluation(baseline, results, task=task)


def _set_outputs(runner, ablation_set: list[Block], cache: tuple, previous: tuple | None, *,
                 keep: bool) -> tuple[object, tuple | None]:
    """The outputs with `ablation_set` deleted, and (names, outputs, cache) of that network when
    `keep` (the next set holds this one). Deleting a block changes nothing before it, so a set
    that holds `previous`'s set runs from its earliest new block on, fed from `previous`'s cache."""
    names = frozenset(block.name for block in ablation_set)
    start = ablation_set
    if previous is not None and previous[0] <= names:
        start = [block for block in ablation_set if block.name not in previous[0]]
        if not start:  # the same set again
            return previous[1], previous if keep else None
        cache = previous[2]
    first = runner.first(start)
    if keep and hasattr(runner, "chained_suffix"):
        outputs, kept = runner.chained_suffix(first, cache, ablation_set)
        return outputs, (names, outputs, kept)
    return runner.suffix(first, cache, ablation_set), None
