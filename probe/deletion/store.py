"""One job's outcomes: every set of deleted blocks evaluated once, whoever asks for it.

A `python -m probe.ablate` job asks for the same deletions many times: the sweep's single
deletions are the first points of every deletion curve, the curves of several orders all end
with every block deleted, a language model's single layers are its spans of length 1 and the
first step of the greedy search. An `OutcomeStore` keeps every `Outcome` the job computed,
keyed by the set of deleted blocks and by everything else that fixes its numbers: the model,
the data (the very object: the same batches in the same order), the deletion mode (and the
branch means handed in), the calibration data of a recalibration, the task, and the autocast
precision in force. `evaluate` has `probe.evaluate_ablations`'s signature and result; it hands
only the sets not yet known to the engine, in the order asked, and answers the rest from what
it holds. An outcome does not depend on the other sets of the pass that computed it (each set's
sums are its own, `probe.scoring.tally`; tests/core/deletion/test_store.py checks it), so a kept
outcome is the one a new pass would give, to the last bit.

The empty set (nothing deleted) is the intact model compared with itself: no flips, no loss
difference; it is not run again where the engine's rows tell how the task scores a deletion.

Per stage (`stage`, set by the job before each analysis) it counts the sets asked for, the sets
evaluated, and the forward-equivalents of work: one per pass of the intact model over the data,
and for each evaluated set the share of the network it ran again (the blocks from where its
suffix starts, over all blocks; 1 for the engine that runs whole forwards), calibration passes
in proportion to their samples.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

from probe.batches import model_device
from probe.deletion.evaluation import evaluate_ablations, fast_path_note
from probe.discovery.find import Block
from probe.scoring.results import Evaluation, Outcome
from probe.scoring.tasks import Task, resolve_task

__all__ = ["OutcomeStore", "StageCount"]


@dataclass
class StageCount:
    """What one stage of a job asked for and what it cost: sets asked for (each time asked),
    sets evaluated (computed in this run), and forward-equivalents of work done."""

    asked: int = 0
    evaluated: int = 0
    forwards: float = 0.0

    def words(self) -> str:
        return f"({self.asked} sets asked, {self.evaluated} evaluated, {self.forwards:.1f} forward-equivalents)"


class OutcomeStore:
    """The outcomes of one job's evaluations; see the module docstring.

    blocks: every block of the model in forward order (the job's), for the work counts; without,
    the blocks seen in the sets stand for the network.
    """

    def __init__(self, blocks: Sequence[Block] | None = None) -> None:
        self._outcomes: dict[tuple, dict[frozenset[str], Outcome]] = {}
        self._baselines: dict[tuple, tuple[Outcome, Outcome | None]] = {}
        self._empty: dict[tuple, Outcome] = {}  # the intact model run as a set, where it had to be
        self._held: dict[int, object] = {}  # what the keys name by id: kept alive, so no id is reused
        self._same: dict[int, int] = {}  # data -> the data it stands for (`same_data`)
        self._positions = {block.name: block.position for block in blocks or ()}
        self._total = len(self._positions) or None
        self.stage = "other"
        self.counts: dict[str, StageCount] = {}

    # -- the engine's API -------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, data: Iterable, ablation_sets: Sequence[Sequence[str | Block]], *,
                 mode: str = "zero", means: Mapping[str, torch.Tensor] | None = None,
                 calibration: Iterable | None = None, per_class: bool = False, outcomes: bool = False,
                 task: str | Task | Callable | None = None, progress: bool = True,
                 base: Sequence[str | Block] = (), engine: Callable[..., Evaluation] | None = None) -> Evaluation:
        """`probe.evaluate_ablations(model, data, ablation_sets, ...)`, evaluating only the sets
        this store does not hold yet (with the detail asked for: per_class, outcomes). base:
        blocks every set deletes, handed on to the engine (`evaluate_ablations`'s `base`) with
        the sets it evaluates. engine: what evaluates them (default `probe.evaluate_ablations`)."""
        engine = engine or evaluate_ablations
        task = resolve_task(task)
        context = self._context(model, data, mode, means, calibration, task)
        known = self._outcomes.setdefault(context, {})
        keys = [_names(s) for s in ablation_sets]
        count = self.counts.setdefault(self.stage, StageCount())
        count.asked += len(keys)
        wanted: dict[frozenset[str], Sequence] = {}
        for key, given in zip(keys, ablation_sets):
            if key and key not in wanted and not _detailed(known.get(key), per_class, outcomes, task):
                wanted[key] = given
        if wanted or context not in self._baselines:
            based = {"base": list(base)} if base and wanted and calibration is None else {}
            self._run(engine, model, data, list(wanted.values()), context, count, mode=mode, means=means,
                      calibration=calibration, per_class=per_class, outcomes=outcomes, task=task, progress=progress,
                      **based)
        if any(not key for key in keys) and context not in self._empty and self._prediction(context) is None:
            # No deletion tells yet how the task scores one against the intact model: run it.
            self._run(engine, model, data, [[]], context, count, mode=mode, means=means, calibration=calibration,
                      per_class=per_class, outcomes=outcomes, task=task, progress=progress)
        baseline, trained = self._baselines[context]
        results = [known[key] if key else self._intact_as_set(context, baseline) for key in keys]
        return _together(Evaluation(baseline, results, trained_baseline=trained, task=task))

    def _run(self, engine: Callable[..., Evaluation], model: nn.Module, data: Iterable, sets: list, context: tuple,
             count: StageCount, **options) -> None:
        evaluation = engine(model, data, sets, **options)
        baseline, trained = evaluation.baseline, evaluation.trained_baseline
        self._baselines.setdefault(context, (_own(baseline), trained))
        known = self._outcomes[context]
        for ablation_set, outcome in zip(sets, evaluation.sets):
            key = _names(ablation_set)
            if key:
                known[key] = _own(outcome)
            else:
                self._empty[context] = _own(outcome)
        count.evaluated += len(sets)
        count.forwards += self._work(model, sets, options["calibration"], evaluation, options.get("base", ()))

    def record(self, model: nn.Module, data: Iterable, ablation_sets: Sequence[Sequence[str | Block]],
               evaluation: Evaluation, *, mode: str = "zero", means: Mapping[str, torch.Tensor] | None = None,
               calibration: Iterable | None = None, task: str | Task | Callable | None = None,
               computed: bool = True) -> None:
        """Keep an evaluation made elsewhere (the job's sweep) as if `evaluate` had made it on
        `data`; the caller vouches that it is what the engine gives on `data` now. computed:
        whether this run computed it (False: read back from a run folder), for the counts."""
        task = resolve_task(task)
        context = self._context(model, data, mode, means, calibration, task)
        known = self._outcomes.setdefault(context, {})
        self._baselines.setdefault(context, (_own(evaluation.baseline), evaluation.trained_baseline))
        sets = [list(s) for s in ablation_sets]
        known.update((_names(s), _own(outcome)) for s, outcome in zip(sets, evaluation.sets) if _names(s))
        count = self.counts.setdefault(self.stage, StageCount())
        count.asked += len(sets)
        if computed:
            count.evaluated += len(sets)
            count.forwards += self._work(model, sets, calibration, evaluation)

    def same_data(self, data: Iterable, as_data: Iterable) -> None:
        """Declare that `data` gives the very batches `as_data` gives (another loader over the
        same samples, batch size and order): outcomes kept for one serve the other."""
        self._held.update((id(value), value) for value in (data, as_data))
        self._same[id(data)] = self._same.get(id(as_data), id(as_data))

    # -- keys -------------------------------------------------------------------------------------
    def _context(self, model, data, mode, means, calibration, task: Task) -> tuple:
        """Everything but the set that fixes an outcome's numbers."""
        self._held.update((id(value), value) for value in (model, data, means, calibration))
        device = model_device(model).type
        autocast = (torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)
                    if torch.is_autocast_enabled(device) else None)
        return (id(model), self._same.get(id(data), id(data)), mode, id(means) if means is not None else None,
                id(calibration) if calibration is not None else None, _task_key(task), autocast)

    # -- the intact model as a set ----------------------------------------------------------------
    def _prediction(self, context: tuple) -> bool | None:
        """Whether the task's rows have a flip rate, as the engine's rows in `context` show
        (None: no row yet)."""
        for outcome in self._outcomes.get(context, {}).values():
            return outcome.flip_rate is not None
        return None

    def _intact_as_set(self, context: tuple, baseline: Outcome) -> Outcome:
        """The outcome of deleting nothing: the intact model scored against itself, as the
        engine's sums give it (no flips; paired differences of zero: a standard error of 0)."""
        if context in self._empty:
            return self._empty[context]
        paired = baseline.samples >= 2 and (baseline.units or 0) > 0
        return replace(baseline, flip_rate=0.0 if self._prediction(context) else None,
                       loss_increase_se=0.0 if paired else float("nan"))

    # -- work -------------------------------------------------------------------------------------
    def _work(self, model: nn.Module, sets: list, calibration: Iterable | None, evaluation: Evaluation,
              base: Sequence = ()) -> float:
        """Forward-equivalents of one engine call on `sets` (module docstring)."""
        note = fast_path_note(model)
        engine = note.engine if note is not None else "full"
        shares = []
        based = _names(base) if engine in ("suffix", "replay") else frozenset()
        if based and all(based <= _names(s) for s in sets):
            shares.append(self._share(base, based))  # the base's network, run once unscored
        else:
            based = frozenset()
        previous: frozenset[str] = based  # as the engine runs on from the set before, or from the base
        for index, ablation_set in enumerate(sets):
            names = _names(ablation_set)
            start = names - previous if previous and previous <= names and engine != "full" else names
            held = index + 1 < len(sets) and names and names <= _names(sets[index + 1])
            previous = names if held else based
            shares.append(1.0 if engine == "full" or not names else self._share(ablation_set, start))
        if calibration is None:
            return 1.0 + sum(shares)
        ratio = _samples(calibration) / max(evaluation.baseline.samples, 1) if _samples(calibration) else 1.0
        # The model as given, the intact model refitted (a calibration pass and an evaluation
        # pass), then per set its refit and its evaluation.
        return 1.0 + (1.0 + ratio) * (1.0 + sum(shares))

    def _share(self, ablation_set: Sequence, start: frozenset[str]) -> float:
        for block in ablation_set:
            if isinstance(block, Block):
                self._positions.setdefault(block.name, block.position)
        if not start:
            return 0.0  # the set before, again: its outputs serve
        total = self._total or (max(self._positions.values(), default=0) + 1)
        positions = [self._positions[name] for name in start if name in self._positions]
        return (total - min(positions)) / total if positions else 1.0

    def words(self) -> dict[str, str]:
        """{stage: "(A sets asked, E evaluated, F forward-equivalents)"} for the report's run record."""
        return {stage: count.words() for stage, count in self.counts.items()}

    def numbers(self) -> dict[str, dict]:
        """{stage: {"asked", "evaluated", "forward_equivalents"}}."""
        return {stage: {"asked": c.asked, "evaluated": c.evaluated, "forward_equivalents": round(c.forwards, 2)}
                for stage, c in self.counts.items()}


def _names(ablation_set: Iterable[str | Block]) -> frozenset[str]:
    return frozenset(block.name if isinstance(block, Block) else str(block) for block in ablation_set)


def _detailed(outcome: Outcome | None, per_class: bool, outcomes: bool, task: Task) -> bool:
    """Whether a kept outcome has the detail asked for."""
    if outcome is None:
        return False
    if per_class and task.per_class and outcome.class_accuracy is None:
        return False
    return not (outcomes and outcome.sample_loss is None)


def _own(outcome: Outcome) -> Outcome:
    """An outcome as kept: its non-finite count only when it had some (a pass marks every row
    when any row had some; `_together` marks them again for the sets asked for together)."""
    return replace(outcome, nonfinite=None) if outcome.nonfinite == 0 else outcome


def _together(evaluation: Evaluation) -> Evaluation:
    """As one pass over these states gives it: where any state left units out as non-finite,
    every outcome counts them (0 where it had none)."""
    states = [evaluation.baseline, *evaluation.sets]
    if not any(outcome.nonfinite for outcome in states):
        return evaluation

    def marked(outcome: Outcome) -> Outcome:
        return outcome if outcome.nonfinite is not None else replace(outcome, nonfinite=0)

    return dataclasses.replace(evaluation, baseline=marked(evaluation.baseline),
                               sets=[marked(outcome) for outcome in evaluation.sets])


def _task_key(task: Task) -> tuple:
    """A task's identity: its class and settings (objects among them by identity)."""
    settings = tuple(sorted((name, value if isinstance(value, (int, float, str, bool, type(None))) else id(value))
                            for name, value in vars(task).items()))
    return type(task).__module__, type(task).__qualname__, settings


def _samples(data: Iterable) -> int | None:
    try:
        return len(data.dataset)
    except (AttributeError, TypeError):
        return None
