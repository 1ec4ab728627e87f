"""BatchNorm recalibration: re-estimate BN running statistics for an ablated network.

Deleting a block's branch shifts the distribution of every activation after it, while each
BatchNorm still normalises with the mean and variance it saw in training. Part of the damage a
deletion does can therefore be a stale-statistics artefact rather than lost computation
(EagleEye, Li et al. 2020: "adaptive BN"). Recalibrating means: with the ablation in place, run
held-out training data through the network with the BatchNorm layers in train mode and
`momentum=None` (a cumulative average over batches), under `torch.no_grad`, then evaluate.

    with recalibrated(model, calibration_loader, ["layer2.1"]):
        ...  # model has layer2.1 deleted *and* BN statistics fitted to that network
    # here every BN buffer, momentum and training flag is bit-identical to before

`evaluate_recalibrated` is `probe.evaluate_ablations` with a recalibration per ablation set.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils import _pytree as pytree
from tqdm.auto import tqdm

from probe.ablation import ablated, check_mode
from probe.batches import batches, class_targets, explained_misfit, input_dtype, model_device
from probe.blocks import Block, resolve_blocks
from probe.errors import ProbeError
from probe.hooks import model_preserved, restoring
from probe.measurement import branch_means
from probe.results import Evaluation
from probe.tally import Tally
from probe.tasks import Scores, Task, resolve_task

__all__ = ["batchnorm_layers", "evaluate_recalibrated", "recalibrate_batchnorm", "recalibrated"]


def batchnorm_layers(model: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """(qualified name, module) of every BatchNorm that keeps running statistics."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.track_running_stats
            and module.running_mean is not None]


def recalibrate_batchnorm(model: nn.Module, data: Iterable, blocks: Sequence[str | Block] = (), *,
                          mode: str = "zero", means: Mapping[str, torch.Tensor] | None = None,
                          progress: bool = False) -> int:
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
    with model_preserved(model), torch.no_grad(), _ablated(model, blocks, mode, means), \
            restoring(put_momenta_back):
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
def recalibrated(model: nn.Module, data: Iterable, blocks: Sequence[str | Block] = (), *,
                 mode: str = "zero", means: Mapping[str, torch.Tensor] | None = None,
                 progress: bool = False) -> Iterator[nn.Module]:
    """Within the body, `model` has `blocks` ablated and BN statistics recalibrated on `data`.

    On exit (also on an exception or KeyboardInterrupt) every BN buffer is copied back from a
    saved clone, so the model is bit-identical to before; momenta and flags are restored too.
    """
    chosen = resolve_blocks(model, list(blocks)) if blocks else []
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
        recalibrate_batchnorm(model, data, chosen, mode=mode, means=means, progress=progress)
        with _ablated(model, chosen, mode, means):
            yield model


def _ablated(model: nn.Module, blocks: Sequence[str | Block], mode: str,
             means: Mapping[str, torch.Tensor] | None) -> contextlib.AbstractContextManager:
    # No blocks: no ablation, and no block search (a plain network has no blocks to find).
    return ablated(model, list(blocks), mode=mode, means=means) if blocks else contextlib.nullcontext(model)


def evaluate_recalibrated(model: nn.Module, data: Iterable, ablation_sets: Sequence[Sequence[str | Block]],
                          calibration: Iterable, *, mode: str = "zero",
                          means: Mapping[str, torch.Tensor] | None = None, per_class: bool = False,
                          outcomes: bool = False, task: str | Task | Callable | None = None,
                          progress: bool = True) -> Evaluation:
    """As `probe.evaluate_ablations`, but each set is evaluated after BN recalibration.

    Every set gets its own recalibration on `calibration` (one calibration pass and one
    evaluation pass per set), and is compared with the intact model recalibrated on the same
    data: its `baseline`, the reference for drops and `flip_rate`. Comparing with the trained
    statistics instead would count the refit itself as the deletion's effect. The intact model
    as given is the evaluation's `trained_baseline`. Tasks that compare outputs (`drift`) keep
    the reference's outputs for the whole data on the CPU: O(samples x output size) memory.
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
    trained = Tally(1, device, task, per_class=per_class, outcomes=outcomes)
    _score_pass(model, data, task, trained, 0, None)
    tally = Tally(len(sets) + 1, device, task, per_class=per_class, outcomes=outcomes)
    with recalibrated(model, calibration, [], progress=False):
        reference = _score_pass(model, data, task, tally, 0, None)
    for row, ablation_set in enumerate(tqdm(sets, desc="sweep with BN recalibration", disable=not progress,
                                            leave=False), start=1):
        with recalibrated(model, calibration, ablation_set, mode=mode, means=means, progress=False):
            _score_pass(model, data, task, tally, row, reference)
    baseline, *results = tally.results()
    return Evaluation(baseline, results, trained_baseline=trained.results()[0], task=task)


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
