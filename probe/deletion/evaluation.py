"""Evaluate the model with sets of blocks deleted: the engine behind `probe.sweep`, the analyses
and the CLI's per-block table.

Two engines give the same `probe.scoring.results.Evaluation`:

- without calibration data, every set is evaluated in one data pass. The loop runs batches
  outside and ablations inside: each batch is loaded once, its unablated predictions are the
  reference for the flip rate, and one hook per block stays attached for the whole pass
  (switched on for the blocks being deleted). Where the model can be cut at its blocks
  (`probe.deletion.fast_suffix`), a deletion reruns only the network from its earliest block on, fed from the
  baseline pass; a model fx cannot trace whose blocks lie in one stack of layers (a
  transformer) replays the layers before the deletion from the baseline pass (`probe.deletion.fast_replay`);
  otherwise it runs the whole forward. Counts are summed on the device. A fast engine is used
  only where it computes what the model's forward computes now (its hooks, its attributes): else
  the next one runs, and `fast_path_note(model)` says which ran and why not a faster one.
  Every forward gets a copy of the batch's inputs, never the caller's tensors (a model may write
  into its input: `probe.batches.InputCopies`).
- with calibration data (`calibration=`), `probe.deletion.batchnorm.evaluate_recalibrated` refits the
  BatchNorm statistics for each set before evaluating it.

Tables built from an evaluation record which engine ran in a boolean `bn_recalibrated` column.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
from torch import nn
from torch.utils import _pytree as pytree

from probe.deletion.ablated import branch_replacement, check_mode
from probe.batches import (Batch, InputCopies, batches, class_targets, explained_misfit, input_dtype, model_device,
                           read_again)
from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError
from probe.instrument.hooks import attached, model_preserved, replace_branches
from probe.instrument.measurement import branch_means
from probe.deletion.batchnorm import evaluate_recalibrated
from probe.deletion.fast_replay import layer_runner_for
from probe.scoring.results import Evaluation
from probe.deletion.fast_suffix import InPlaceError, forget_runners, suffix_runner
from probe.scoring.tally import Tally
from probe.scoring.tasks import Classification, Task, resolve_task

__all__ = ["COLUMNS", "FastPathNote", "evaluate_ablations", "fast_path_note", "single_block_sweep", "sweep",
           "sweep_table"]

# The classification task's sweep columns; other tasks: see `sweep_table` and docs/api.md.
COLUMNS = ["block", "position", "mode", "accuracy", "loss", "accuracy_drop", "loss_increase",
           "flip_rate", "samples"]


def sweep(model: nn.Module, data: Iterable, *, mode: str = "zero", blocks: Sequence[str | Block] | None = None,
          means: Mapping[str, torch.Tensor] | None = None, task: str | Task | Callable | None = None,
          fast: bool = True, stack: int = 1, progress: bool = True) -> pd.DataFrame:
    """Ablate every block alone (mode "zero" or "mean") and compare with the unablated model.

    Returns one row per block in forward order, with the task's columns (`sweep_table`);
    `df.attrs["baseline"]` holds the unablated model's numbers. For classification (the
    default): accuracies are fractions in [0, 1]; `loss` is the mean cross-entropy; `flip_rate`
    is the share of samples whose predicted class changes. task: see `probe.scoring.tasks`.
    `fast=False` runs a full forward per ablation (same numbers, slower; for checking). stack:
    ablations per forward (see `evaluate_ablations`).
    """
    check_mode(mode)
    chosen = resolve_blocks(model, blocks, data=data)
    evaluation = evaluate_ablations(model, data, [[block] for block in chosen], mode=mode, means=means,
                                    task=task, fast=fast, stack=stack, progress=progress)
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

    Columns: block, position, mode, the task's columns (`probe.scoring.tasks.Task.row`; for
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
                       outcomes: bool = False, task: str | Task | Callable | None = None, stack: int = 1,
                       progress: bool = True, base: Sequence[str | Block] = ()) -> Evaluation:
    """The task's numbers (classification: accuracy, loss, flip rate) with each set of blocks
    ablated together.

    Returns an `Evaluation`: (baseline, one `Outcome` per set). With `per_class=True` each
    outcome also has `class_accuracy` and `class_samples` (classification); with
    `outcomes=True` also per-sample `sample_loss` and `sample_weight` (and `correct` for
    classification), one entry per sample in data order (for bootstrap intervals: O(samples)
    memory). With `calibration` (held-out batches), BatchNorm statistics are refitted for each
    set before it is evaluated, and the baseline is the intact model refitted on the same
    batches (the model as given is then the evaluation's `trained_baseline`). task: what the
    outputs mean and how samples are scored (`probe.scoring.tasks`; classification by default).
    stack: evaluate up to this many sets in one forward, their copies of the batch stacked
    (one suffix from the group's earliest block; each copy's deletions by hooks on its rows).
    More arithmetic, fewer kernel launches: for a GPU whose small forwards are launch-bound
    (`benchmarks/sweep_throughput.py --stack`); the same numbers. Models whose blocks cannot be
    cut out (`probe.deletion.fast_suffix`) evaluate one set at a time.
    base: blocks every set deletes (a greedy search's deletions so far): where the engine can,
    that network is run once per batch, unscored, and each set runs on from it, from its earliest
    block not in `base`. The same numbers, less arithmetic.
    """
    if isinstance(stack, bool) or not isinstance(stack, int) or stack < 1:
        raise ProbeError(f"stack must be a whole number >= 1 (sets per forward), got {stack!r}.")
    check_mode(mode)
    task = resolve_task(task)
    if calibration is not None:
        _notes[model] = FastPathNote("recalibrated", "with calibration data, probe.deletion.batchnorm runs its own "
                                     "passes")
        return evaluate_recalibrated(model, data, ablation_sets, calibration, mode=mode, means=means, fast=fast,
                                     per_class=per_class, outcomes=outcomes, task=task, progress=progress)
    named = {b.name: b for b in resolve_blocks(model, [b for s in (*ablation_sets, base) for b in s], data=data,
                                               unique=False)}  # one discovery; sets may share blocks
    sets = [[named[b.name if isinstance(b, Block) else b] for b in s] for s in ablation_sets]
    base_set = [named[b.name if isinstance(b, Block) else b] for b in base]
    base_names = frozenset(block.name for block in base_set)
    if not sets or not base_names or not all(base_names <= {block.name for block in s} for s in sets):
        base_set = []  # a base must be held by every set
    involved = list({block.name: block for s in sets for block in s}.values())
    if mode == "mean" and means is None and involved:
        means = branch_means(model, data, blocks=involved, progress=progress)
        data = read_again(data)
    device = model_device(model)
    # Cut points are needed only where ablations start: the involved blocks' modules. (Blocks
    # given as Block objects, e.g. from a spec, then need no discovery at all.)
    replacement = branch_replacement(mode, means)
    rows = _Rows(replacement)  # the hooks' replacement: whole outputs, or a stacked forward's rows
    active: set[str] = set()
    names = [frozenset(block.name for block in s) for s in sets]
    # Where a set holds the one before it (the points of a deletion curve), it runs on from the
    # network of that set rather than from the intact one.
    contained = [i + 1 < len(sets) and bool(names[i]) and names[i] <= names[i + 1] for i in range(len(sets))]
    tally = Tally(len(sets) + 1, device, task, per_class=per_class, outcomes=outcomes)
    copies = InputCopies()  # the model may write into its input: never into the caller's tensors
    with model_preserved(model), attached() as handles, torch.no_grad():
        # Chosen (and set to this call's replacement) only while the model is held: runners are shared.
        engine = _Engine(model, involved, replacement, copies, fast)
        replace_branches(model, involved, rows, handles, active=lambda block: block.name in active)
        stacking = stack > 1 and hasattr(engine.runner, "stacked_suffix")
        try:
            for batch in batches(data, device, dtype=input_dtype(model), progress=progress,
                                 desc=f"sweep ({len(sets)} ablations)"):
                with explained_misfit(batch):
                    outputs, cache = engine.intact(batch)
                labels = class_targets(batch) if tally.per_class else None
                reference = task.score(outputs, batch)
                tally.add(0, reference, None, labels)
                intact = outputs if task.needs_reference else None
                if stacking and hasattr(engine.runner, "stacked_suffix"):
                    stacking = _score_stacked(engine.runner, rows, sets, stack, cache, outputs, batch, task, tally,
                                              reference, labels, active)
                    if stacking:
                        continue
                # The last set's (names, outputs, cache), when the next set contains it; else the base's.
                previous = based = _base_state(engine, base_set, cache, active, batch)
                for row, ablation_set in enumerate(sets, start=1):
                    active.clear()
                    active.update(block.name for block in ablation_set)
                    ablated_outputs = None
                    if engine.runner is not None and ablation_set:
                        try:
                            ablated_outputs, previous = _set_outputs(engine.runner, ablation_set, cache, previous,
                                                                     keep=contained[row - 1])
                            previous = previous or based
                        except InPlaceError as error:
                            engine.give_up(f"{error} (batch {batch.number})")  # whole forwards from here on
                    if ablated_outputs is None:
                        ablated_outputs = copies.run(model, batch)
                    active.clear()
                    tally.add(row, task.score(ablated_outputs, batch, intact), reference, labels)
        finally:
            _notes[model] = engine.note()
    baseline, *results = tally.results()
    return Evaluation(baseline, results, task=task)


@dataclass(frozen=True)
class FastPathNote:
    """How the last `evaluate_ablations` (or `sweep`) call on a model evaluated its sets: for the
    run record, and for a user wondering why a sweep was slower than expected.

    engine: "suffix" (compiled suffixes of a trace, `probe.deletion.fast_suffix`), "replay" (the
            layers before a deletion answered from the baseline pass, `probe.deletion.fast_replay`),
            "full" (one whole forward of the model per set), or "recalibrated" (BatchNorm
            recalibration: `probe.deletion.batchnorm` chooses its own passes).
    reason: why not a faster engine (e.g. "the model itself carries forward hooks, which a traced
            copy of its forward does not run"); None when the fastest one ran. An engine given
            up part-way (a cached value written in place) leaves "full" and the reason, with the
            batch it happened in; the batches before were evaluated by the engine given up, to the
            same numbers.
    inputs_copied: the model wrote into its own input, so each forward got a fresh copy of
            the batch (the caller's data is never given to the model).
    """

    engine: str
    reason: str | None = None
    inputs_copied: bool = False


_notes: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fast_path_note(model: nn.Module) -> FastPathNote | None:
    """The `FastPathNote` of the last `evaluate_ablations` call on `model` (None before any)."""
    return _notes.get(model)


class _Engine:
    """The fast runner of one `evaluate_ablations` call (None: whole forwards) and what its note
    will say. The runner is used only while it computes what the model's forward computes."""

    def __init__(self, model: nn.Module, involved: list[Block], replacement: Callable, copies: InputCopies,
                 fast: bool) -> None:
        self.model, self.involved, self.replacement, self.copies = model, involved, replacement, copies
        self.runner, self.verify, self.name, self.reason = None, False, "full", None
        if not fast:
            self.reason = "fast=False was asked for"
        elif not involved:
            self.reason = "no set deletes a block"
        else:
            self._choose()

    def _choose(self) -> None:
        choice = suffix_runner(self.model, self.involved, self.replacement)
        self.runner, self.verify, self.reason = choice.runner, choice.verify, choice.reason
        self.name = "suffix"
        if self.runner is None:
            self.runner = layer_runner_for(self.model, self.involved)
            self.name = "replay" if self.runner is not None else "full"
            if self.runner is None:
                self.reason += "; and the blocks are not all in one stack of layers, which could be replayed"

    def intact(self, batch: Batch) -> tuple[object, tuple | None]:
        """The intact model's outputs on `batch`, and the runner's cache (None without one)."""
        if self.runner is not None:
            try:
                outputs, cache = self.runner.baseline(self.copies.inputs(batch))
                if not self.verify:
                    return outputs, cache
                self.verify = False
                whole = self.copies.run(self.model, batch)
                if _same_outputs(outputs, whole):
                    return outputs, cache
                # Something the trace read but its record of the model could not see has changed
                # (an object without a __dict__): trace the model as it is now.
                forget_runners(self.model)
                self._choose()
                if self.name == "suffix":
                    self.reason = "traced again: the cached trace no longer gave the model's outputs"
                if self.runner is None:
                    return whole, None
                return self.runner.baseline(self.copies.inputs(batch))
            except InPlaceError as error:
                self.give_up(f"{error} (batch {batch.number})")
        return self.copies.run(self.model, batch), None

    def give_up(self, why: str) -> None:
        """Whole forwards from now on: the runner's cache cannot be trusted."""
        given_up = f"the {self.name} engine was given up for whole forwards: {why}"
        self.runner, self.name = None, "full"
        self.reason = f"{self.reason}; {given_up}" if self.reason else given_up

    def note(self) -> FastPathNote:
        return FastPathNote(self.name, self.reason, self.copies.written)


class _Rows:
    """The branch replacement of the hooks: `replacement(block, output)` on the whole output, or,
    while `groups` is set (a stacked forward of `size`-sample copies), on the rows of the copies
    whose set deletes the block; the other rows keep the branch."""

    def __init__(self, replacement: Callable) -> None:
        self.replacement = replacement
        self.groups: dict[str, list[int]] | None = None
        self.size = 0

    def __call__(self, block: Block, output: torch.Tensor) -> torch.Tensor:
        if self.groups is None:
            return self.replacement(block, output)
        replaced = output.clone()
        for copy in self.groups.get(block.name, ()):
            rows = slice(copy * self.size, (copy + 1) * self.size)
            replaced[rows] = self.replacement(block, output[rows])
        return replaced


def _score_stacked(runner, rows: _Rows, sets: list[list[Block]], stack: int, cache: tuple, outputs: object,
                   batch, task: Task, tally: Tally, reference, labels, active: set[str]) -> bool:
    """Score every set into `tally`, `stack` sets per forward. False (nothing added) when the
    first stacked copy does not reproduce its set run alone: a cached value that is no batch of
    activations was stacked; the caller then evaluates one set at a time."""
    intact = outputs if task.needs_reference else None
    checked = False
    for start in range(0, len(sets), stack):
        group = [(row, s) for row, s in enumerate(sets[start:start + stack], start=start + 1) if s]
        if not group:
            continue
        rows.groups, rows.size = {}, batch.size
        for copy, (_, ablation_set) in enumerate(group):
            for block in ablation_set:
                rows.groups.setdefault(block.name, []).append(copy)
        active.update(rows.groups)
        try:
            stacked = runner.stacked_suffix(runner.first([b for _, s in group for b in s]), cache, len(group),
                                            batch.size)
        finally:
            rows.groups = None
            active.clear()
        copies = [_copy_of(stacked, copy, batch.size, len(group)) for copy in range(len(group))]
        if not checked:
            active.update(block.name for block in group[0][1])
            try:
                alone = runner.suffix(runner.first(group[0][1]), cache, group[0][1])
            finally:
                active.clear()
            if not _same_outputs(alone, copies[0]):
                return False
            checked = True
        for (row, _), copy in zip(group, copies):
            tally.add(row, task.score(copy, batch, intact), reference, labels)
    for row, ablation_set in enumerate(sets, start=1):
        if not ablation_set:  # the intact model
            tally.add(row, task.score(outputs, batch, intact), reference, labels)
    return True


def _copy_of(stacked: object, copy: int, size: int, copies: int) -> object:
    rows = slice(copy * size, (copy + 1) * size)
    return pytree.tree_map(lambda leaf: leaf[rows] if isinstance(leaf, torch.Tensor) and leaf.dim() > 0
                           and leaf.shape[0] == size * copies else leaf, stacked)


def _same_outputs(a: object, b: object) -> bool:
    leaves_a, leaves_b = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(leaves_a) == len(leaves_b) and all(
        torch.allclose(x.float(), y.float(), rtol=1e-4, atol=1e-5) if isinstance(x, torch.Tensor)
        and isinstance(y, torch.Tensor) and x.shape == y.shape else x is y or x == y
        for x, y in zip(leaves_a, leaves_b))


def _base_state(engine: _Engine, base: list[Block], cache: tuple, active: set[str], batch) -> tuple | None:
    """(names, outputs, cache) of the network with `base` deleted, for the sets to run on from;
    None without a base, or where the engine cannot keep a network's cache."""
    if not base or engine.runner is None or not hasattr(engine.runner, "chained_suffix"):
        return None
    active.update(block.name for block in base)
    try:
        outputs, kept = engine.runner.chained_suffix(engine.runner.first(base), cache, base)
    except InPlaceError as error:
        engine.give_up(f"{error} (batch {batch.number})")
        return None
    finally:
        active.clear()
    return frozenset(block.name for block in base), outputs, kept


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
