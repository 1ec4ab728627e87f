"""BatchNorm recalibration: re-estimate BN running statistics for an ablated network.

Deleting a block's branch shifts the distribution of every activation after it, while each
BatchNorm still normalises with the mean and variance it saw in training. Part of the damage a
deletion does can therefore be a stale-statistics artefact rather than lost computation
(EagleEye, Li et al. 2020: "adaptive BN"). Recalibrating means: with the ablation in place, run
held-out training data through the network with the BatchNorm layers in train mode and
`momentum=None` (a cumulative average over batches), under `torch.no_grad`, then evaluate.

    with recalibrated(model, calibration_loader, blocks=["layer2.1"]):
        ...  # model has layer2.1 deleted *and* BN statistics fitted to that network
    # here every BN buffer, momentum and training flag is bit-identical to before

`evaluate_recalibrated` is `probe.evaluate_ablations` with a recalibration per ablation set.
Where the model can be cut at its blocks (`probe.deletion.fast_suffix`) it refits, per set, only the
BatchNorm layers from the set's earliest block on: those before it see the same inputs as in
the intact network, so their recalibrated statistics are the intact model's. One calibration
pass then refits every set's suffix, each set's statistics swapped in while its suffix runs, and
one evaluation pass scores every set, as the fast sweep does.

BatchNorm buffers made under `torch.inference_mode()` (inference tensors) can be changed in
place only inside it, and probe runs outside it (`probe.instrument.hooks.model_preserved`):
while recalibrating, each such buffer is swapped for a normal copy, and its values are written
back into the user's own tensor on the way out (`_writable_statistics`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from probe.deletion.ablated import ablated, branch_replacement, check_mode
from probe.batches import batches, class_targets, explained_misfit, input_dtype, model_device
from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError
from probe.instrument.hooks import attached, model_preserved, replace_branches, restoring
from probe.instrument.measurement import branch_means
from probe.scoring.results import Evaluation
from probe.deletion.fast_suffix import InPlaceError, SuffixRunner, runner_for
from probe.scoring.tally import Tally
from probe.scoring.tasks import Scores, Task, resolve_task

__all__ = ["batchnorm_layers", "evaluate_recalibrated", "recalibrate_batchnorm", "recalibrated"]


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """(qualified name, module) of every BatchNorm that keeps running statistics."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            and module.running_mean is not None]


def recalibrate_batchnorm(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] = (),
                          mode: str = "zero", means: Mapping[str, torch.Tensor] | None = None,
                          progress: bool = True) -> int:
    """Replace the BN running statistics of `model` by those of `data`, with `blocks` ablated.

    Changes the model's BN buffers for good (use `recalibrated` to get them back); the momentum
    and training flags are restored. Only BatchNorm layers run in train mode: dropout and the
    like stay in eval mode, so the statistics describe the network that will be evaluated.
    Returns the number of calibration samples. Raises ProbeError when the model has no BN
    layer with running statistics, or `data` is empty.
    """
    check_mode(mode)
    layers = batchnorm_layers(model)
    if not layers:
        raise ProbeError(f"{type(model).__name__} has no BatchNorm layer with running statistics: "
                         "there is nothing to recalibrate; run without BN recalibration.")
    momenta = [(module, module.momentum) for _, module in layers]

    def put_momenta_back() -> None:
        for module, momentum in momenta:
            module.momentum = momentum

    device = model_device(model)
    samples = 0
    with _writable_statistics(model), model_preserved(model), torch.no_grad(), \
            _ablated(model, blocks, mode, means), restoring(put_momenta_back):
        for _, module in layers:
            module.reset_running_stats()
            module.momentum = None  # cumulative average: every batch weighs the same
            module.train()
        for batch in batches(data, device, dtype=input_dtype(model), progress=progress, desc="BN recalibration"):
            with explained_misfit(batch):
                batch.run(model)
            samples += batch.size
    return samples


@contextlib.contextmanager
def recalibrated(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] = (),
                 mode: str = "zero", means: Mapping[str, torch.Tensor] | None = None,
                 progress: bool = True) -> Iterator[nn.Module]:
    """Within the body, `model` has `blocks` ablated and BN statistics recalibrated on `data`.

    On exit (also on an exception or KeyboardInterrupt) every BN buffer is copied back from a
    saved clone, so the model is bit-identical to before; momenta and flags are restored too.
    """
    chosen = resolve_blocks(model, list(blocks)) if blocks else []
    with _writable_statistics(model), _recalibrated(model, data, chosen, mode, means, progress):
        yield model


@contextlib.contextmanager
def _recalibrated(model: nn.Module, data: Iterable, chosen: list[Block], mode: str,
                  means: Mapping[str, torch.Tensor] | None, progress: bool) -> Iterator[nn.Module]:
    saved = {name: {key: buffer.detach().clone() for key, buffer in module.named_buffers(recurse=False)}
             for name, module in batchnorm_layers(model)}
    modules = dict(model.named_modules())

    def put_statistics_back() -> None:
        # No `torch.no_grad()` here (buffers need none): a Ctrl-C on the way out of one would
        # leave grad mode off.
        for name, buffers in saved.items():
            for key, value in buffers.items():
                # copy_ into the same tensor objects: references the user holds stay valid.
                getattr(modules[name], key).copy_(value)

    with restoring(put_statistics_back):
        recalibrate_batchnorm(model, data, blocks=chosen, mode=mode, means=means, progress=progress)
        with _ablated(model, chosen, mode, means):
            yield model


@contextlib.contextmanager
def _writable_statistics(model: nn.Module) -> Iterator[None]:
    """Within the body, every BatchNorm buffer that is an inference tensor is a normal copy of it;
    on the way out, whatever happens, the copy's values go back into the user's own tensor (inside
    inference mode, the only place that allows it) and that tensor into the module."""
    swapped = [(module, key, tensor) for _, module in batchnorm_layers(model)
               for key, tensor in module._buffers.items() if tensor is not None and tensor.is_inference()]
    if not swapped:
        yield
        return

    def put_back() -> None:
        # Safe to run again (`restoring`): a buffer already put back is left alone.
        for module, key, own in swapped:
            current = module._buffers[key]
            if current is not own:
                with torch.inference_mode():
                    own.copy_(current)
                module._buffers[key] = own

    with restoring(put_back):
        with torch.inference_mode(False):  # a clone made here is a normal tensor
            copies = [own.clone() for _, _, own in swapped]
        for (module, key, _), copy in zip(swapped, copies):
            module._buffers[key] = copy
        yield


def _ablated(model: nn.Module, blocks: Sequence[str | Block], mode: str,
             means: Mapping[str, torch.Tensor] | None) -> contextlib.AbstractContextManager:
    # No blocks: no ablation, and no block search (a plain network has no blocks to find).
    return ablated(model, list(blocks), mode=mode, means=means) if blocks else contextlib.nullcontext(model)


def evaluate_recalibrated(model: nn.Module, data: Iterable, ablation_sets: Sequence[Sequence[str | Block]],
                          calibration: Iterable, *, mode: str = "zero",
                          means: Mapping[str, torch.Tensor] | None = None, per_class: bool = False,
                          outcomes: bool = False, task: str | Task | Callable | None = None,
                          fast: bool = True, progress: bool = True) -> Evaluation:
    """As `probe.evaluate_ablations`, but each set is evaluated after BN recalibration.

    Every set gets its own recalibration on `calibration` (one calibration pass and one
    evaluation pass per set), and is compared with the intact model recalibrated on the same
    data: its `baseline`, the reference for drops and `flip_rate`. Comparing with the trained
    statistics instead would count the refit itself as the deletion's effect. The intact model
    as given is the evaluation's `trained_baseline`. fast: refit and rerun only each set's suffix
    (see the module's docstring); `fast=False`, or a model that cannot be cut at its blocks, runs
    one whole calibration pass and one whole evaluation pass per set (same numbers; there, tasks
    that compare outputs (`drift`) keep the reference's outputs for the whole data on the CPU:
    O(samples x output size) memory).
    """
    check_mode(mode)
    task = resolve_task(task)
    for name, given in (("data", data), ("calibration", calibration)):
        if isinstance(given, Iterator):  # read once per set: a generator would be empty after the first
            raise ProbeError(f"BN recalibration reads the {name} once per deleted set, but it is a one-shot "
                             f"{type(given).__name__}; pass a DataLoader or a list of batches.")
    sets = [resolve_blocks(model, s, data=data) if s else [] for s in ablation_sets]
    involved = list({block.name: block for s in sets for block in s}.values())
    if mode == "mean" and means is None and involved:
        means = branch_means(model, data, blocks=involved, progress=progress)
    device = model_device(model)
    with _writable_statistics(model):
        trained = Tally(1, device, task, per_class=per_class, outcomes=outcomes)
        _score_pass(model, data, task, trained, 0, None)
        tally = Tally(len(sets) + 1, device, task, per_class=per_class, outcomes=outcomes)
        if fast and involved and _fast_recalibrated(model, data, sets, calibration, task, mode, means, tally,
                                                    progress):
            return _evaluation(tally, trained, task)
        tally = Tally(len(sets) + 1, device, task, per_class=per_class, outcomes=outcomes)  # a fresh one
        with recalibrated(model, calibration, blocks=[], progress=False):
            reference = _score_pass(model, data, task, tally, 0, None)
        for row, ablation_set in enumerate(tqdm(sets, desc="sweep with BN recalibration", disable=not progress,
                                                leave=False), start=1):
            with recalibrated(model, calibration, blocks=ablation_set, mode=mode, means=means, progress=False):
                _score_pass(model, data, task, tally, row, reference)
    return _evaluation(tally, trained, task)


def _evaluation(tally: Tally, trained: Tally, task: Task) -> Evaluation:
    """The call's outcomes, with one warning for non-finite outputs (the trained model's only
    when the recalibrated states had none)."""
    baseline, *results = tally.results()
    trained_baseline = trained.results(warn=baseline.nonfinite is None)[0]
    return Evaluation(baseline, results, trained_baseline=trained_baseline, task=task)


def _fast_recalibrated(model: nn.Module, data: Iterable, sets: list[list[Block]], calibration: Iterable, task: Task,
                       mode: str, means: Mapping[str, torch.Tensor] | None, tally: Tally, progress: bool) -> bool:
    """Fill `tally` as the per-set passes would, running only each set's suffix; False (the
    model as it was, `tally` to be discarded) when the model cannot be cut at its blocks."""
    involved = list({block.name: block for s in sets for block in s}.values())
    layers = batchnorm_layers(model)
    statistics = _Statistics(layers)
    active: set[str] = set()
    with model_preserved(model), torch.no_grad(), attached() as handles, restoring(statistics.put_back):
        replacement = branch_replacement(mode, means)
        runner = runner_for(model, involved, replacement)
        if runner is None:
            return False
        replace_branches(model, involved, replacement, handles, active=lambda block: block.name in active)
        for name, module in layers:
            handles.append(module.register_forward_pre_hook(lambda m, _args, name=name: statistics.enter(name, m)))
        try:
            device, dtype = model_device(model), input_dtype(model)
            statistics.start_calibration()
            for batch in batches(calibration, device, dtype=dtype, progress=progress,
                                 desc=f"BN recalibration ({len(sets)} sets)"):
                with explained_misfit(batch):
                    _, cache = runner.baseline(batch.inputs)  # the intact model's statistics
                    for row, ablation_set in enumerate(sets, start=1):
                        if ablation_set:  # an empty set is the intact model
                            _suffix(runner, statistics, row, ablation_set, cache, active)
            statistics.start_evaluation()
            for batch in batches(data, device, dtype=dtype, progress=progress,
                                 desc=f"sweep with BN recalibration ({len(sets)} sets)"):
                with explained_misfit(batch):
                    outputs, cache = runner.baseline(batch.inputs)  # the intact model recalibrated
                    labels = class_targets(batch) if tally.per_class else None
                    reference = task.score(outputs, batch)
                    tally.add(0, reference, None, labels)
                    intact = outputs if task.needs_reference else None
                    for row, ablation_set in enumerate(sets, start=1):
                        ablated_outputs = (_suffix(runner, statistics, row, ablation_set, cache, active)
                                           if ablation_set else outputs)
                        tally.add(row, task.score(ablated_outputs, batch, intact), reference, labels)
        except InPlaceError:
            return False  # the cache cannot be trusted: the caller runs whole passes
    return True


def _suffix(runner: SuffixRunner, statistics: _Statistics, row: int, ablation_set: list[Block], cache: tuple,
            active: set[str]) -> object:
    """The set's suffix, with the set's deletions active and its BN statistics in place."""
    active.update(block.name for block in ablation_set)
    statistics.select(row)
    try:
        return runner.suffix(runner.first(ablation_set), cache, ablation_set)
    finally:
        statistics.select(None)
        active.clear()


_STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


class _Statistics:
    """BatchNorm running statistics per ablation set, swapped into each BN layer the set's suffix
    calls (a forward pre-hook: `enter`). Tensors are swapped, not copied: BN updates the set's
    own tensors in place while it calibrates. `put_back` gives every layer its own tensors, with
    the values they had, and its momentum (`model_preserved` restores the flags)."""

    def __init__(self, layers: list[tuple[str, nn.modules.batchnorm._BatchNorm]]) -> None:
        self._layers = dict(layers)
        self._own = {name: {key: getattr(module, key) for key in _STATISTICS} for name, module in layers}
        self._values = {name: {key: tensor.detach().clone() for key, tensor in own.items()}
                        for name, own in self._own.items()}
        self._momenta = {name: module.momentum for name, module in layers}
        self._sets: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        self._row: int | None = None
        self._entered: list[str] = []
        self._calibrating = False

    def start_calibration(self) -> None:
        """Every layer from fresh statistics, a cumulative average (momentum None), train mode."""
        for module in self._layers.values():
            module.reset_running_stats()
            module.momentum = None
            module.train()
        self._calibrating = True

    def start_evaluation(self) -> None:
        for name, module in self._layers.items():
            module.momentum = self._momenta[name]
            module.train(False)
        self._calibrating = False

    def select(self, row: int | None) -> None:
        """Swap the statistics of set `row` in as its suffix runs; None: back to the intact model's."""
        if row is None:
            for name in self._entered:
                self._swap(name, self._own[name])
            self._entered.clear()
        self._row = row

    def enter(self, name: str, module: nn.modules.batchnorm._BatchNorm) -> None:
        if self._row is None or name in self._entered:
            return
        own = self._sets.setdefault(self._row, {})
        if name not in own:
            if not self._calibrating:
                return  # not refitted for this set (not in its suffix): the intact statistics hold
            fresh = {key: torch.empty_like(tensor) for key, tensor in self._own[name].items()}
            own[name] = fresh
            self._swap(name, fresh)
            module.reset_running_stats()  # on the fresh tensors, as in the intact model's
        else:
            self._swap(name, own[name])
        self._entered.append(name)

    def _swap(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        module = self._layers[name]
        for key, tensor in tensors.items():
            module._buffers[key] = tensor

    def put_back(self) -> None:
        # Safe to run again (`probe.instrument.hooks.restoring`): each step sets, never toggles.
        for name, module in self._layers.items():
            for key, tensor in self._own[name].items():
                module._buffers[key] = tensor
                tensor.copy_(self._values[name][key])
            module.momentum = self._momenta[name]


@dataclass
class _Reference:
    """The recalibrated intact model's scores per batch (and its outputs, for tasks that compare them)."""

    scores: list[Scores]
    outputs: list[object] | None


def _score_pass(model: nn.Module, data: Iterable, task: Task, tally: Tally, row: int,
                reference: _Reference | None) -> _Reference:
    """Score every batch of `data` into `tally`'s `row`, in eval mode, against `reference`'s
    batches (the same batches, in the same order); returns this pass's scores."""
    device = model_device(model)
    kept = _Reference([], [] if task.needs_reference and reference is None else None)
    with model_preserved(model), torch.no_grad():
        for number, batch in enumerate(batches(data, device, dtype=input_dtype(model)), start=1):
            with explained_misfit(batch):
                outputs = batch.run(model)
            labels = class_targets(batch) if tally.per_class else None
            intact = None
            if reference is not None:
                if number > len(reference.scores) or len(reference.scores[number - 1].loss) != batch.size:
                    raise ProbeError("the data gave other batches on a second pass; BN recalibration compares passes "
                                     "batch by batch: use a DataLoader with shuffle=False.")
                if reference.outputs is not None:
                    intact = _to(reference.outputs[number - 1], device)
            scores = task.score(outputs, batch, intact)
            tally.add(row, scores, reference.scores[number - 1] if reference is not None else None, labels)
            kept.scores.append(scores)
            if kept.outputs is not None:
                kept.outputs.append(_to(outputs, torch.device("cpu")))
    return kept


def _to(outputs: object, device: torch.device) -> object:
    return pytree.tree_map(lambda leaf: leaf.to(device) if isinstance(leaf, torch.Tensor) else leaf, outputs)
