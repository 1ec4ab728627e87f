"""What each block does to the representation, beside how big its branch is and what deleting it costs.

    python -m analyses.representation --out runs/representation

A block's *output* here is the residual stream right after its addition, F(x) + s(x), before
any activation the block applies after the addition (a ResNet block's final ReLU): the one
tensor every residual architecture has at each block. Its *input* h is s(x) for an identity
shortcut, and the block module's input where the shortcut is a projection. Outputs are pooled
to one vector per sample (`pool`): images averaged over their spatial positions, sequences over
their positions (only the real ones when the batch has an `attention_mask`).

- Linear probes (Alain and Bengio 2016): a logistic regression on each block's standardised
  pooled output, fitted on training data and scored on the evaluation data: where class
  information becomes linearly readable, and whether blocks the deletion rule calls skipped add
  any (`gain`: a block's probe accuracy minus the one before it).
- Logit lens: the model's own head (its last nn.Linear with one output per class) applied to
  each pooled block output of the width it takes: accuracy, and agreement with the model's
  final prediction. It cannot apply to blocks of another width (`reason` says so); it sees the
  sum before the block's last activation, so even the last block can disagree a little.
- Iterative refinement (Jastrzebski et al. 2018): per sample cos(F(h), dL/dh), the branch
  against the gradient of the loss at the block's input, and ||F(h)|| / ||h||. A negative
  cosine means the block moves the features down the loss (-1: straight down the gradient).
- Representation similarity: linear CKA (Kornblith et al. 2019) between the outputs of every
  pair of blocks. Computed exactly while streaming (`CkaAccumulator`): linear CKA needs only
  the features' centred second moments, which are sums over samples, so memory is O(D^2) for
  D pooled features of all blocks together (1,008 for the default ResNet-56: 8 MB), whatever
  the number of samples, and the result equals the all-at-once CKA up to rounding. (This is not
  the minibatch estimator of Nguyen, Raghu and Kornblith 2021, an average of per-batch unbiased
  HSIC estimates, which differs from the full-data value.)
- Block by class: the accuracy each class loses when each block is deleted (from the sweep's
  per-class accuracies), and the classes each block serves most.

Tasks (`probe.scoring.tasks`): linear probes, the logit lens and block by class need class labels, so
only classification has them; for other tasks those tables are empty and
`RepresentationResult.notes` says why. CKA needs no labels and works for every task.
Refinement differentiates the task's own loss (the next-token NLL for `lm`, your own loss);
drift has no loss to descend, so it has no refinement either.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import pandas as pd
from torch import nn

import probe
# Each part in its module; every public name, the tables' columns included, is also importable from here.
from analyses.registry import Analysis, Job
from analyses.representation.classes import CLASSES_COLUMNS, block_classes
from analyses.representation.iterative_refinement import NO_REFINEMENT, REFINEMENT_COLUMNS, refinement
from analyses.representation.lens import LENS_COLUMNS, head_lens
from analyses.representation.outputs import check_reiterable, pool
from analyses.representation.probes import PROBE_COLUMNS, _Rows, linear_probes
from analyses.representation.result import SUMMARY_COLUMNS, RepresentationResult, summary
from analyses.representation.similarity import CKA_COLUMNS, CkaAccumulator, cka
from probe.commands.config import RunConfig
from probe.commands.inputs import load_inputs, train_loader
from probe.deletion.block_table import check_table, join_block_table
from probe.deletion.evaluation import single_block_sweep
from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError
from probe.instrument.stages import stages
from probe.scoring.results import Evaluation
from probe.scoring.tasks import Classification, Task, resolve_task
from probe.scoring.verdict import VerdictRule, cost_column

__all__ = ["CkaAccumulator", "RepresentationResult", "block_classes", "cka", "linear_probes", "head_lens", "pool",
           "refinement", "representation", "stages", "summary"]


def representation(model: nn.Module, data: Iterable, *, train_data: Iterable | None = None,
                   table: pd.DataFrame | None = None, evaluation: Evaluation | None = None,
                   blocks: Sequence[str | Block] | None = None, mode: str = "zero",
                   calibration: Iterable | None = None, rule: VerdictRule | None = None,
                   task: str | Task | Callable | None = None, progress: bool = True) -> RepresentationResult:
    """Every probe of this module on `model`: linear probes (fitted on `train_data`), the logit
    lens, refinement, CKA, the drop per class, and the per-block summary.

    table: the per-block table (ratio, accuracy_drop, verdict), e.g. `python -m probe.ablate`'s;
    evaluation: its single-block sweep with per_class=True, to reuse. Both are computed here
    when evaluation is None (deleting with `mode`, BatchNorm refitted on `calibration` when
    given). blocks: the blocks to probe (names or Blocks, e.g. from a spec); all when None.
    Every call leaves the model as it found it.

    task: what the outputs mean (`probe.scoring.tasks`); None takes the evaluation's task when one is
    given, else classification. Only classification has class labels: for another task the
    probes, lens and classes tables are empty (`RepresentationResult.notes` says why), no
    `train_data` is needed, and a table handed in needs no evaluation (it holds the task's cost).
    """
    task = resolve_task(task if task is not None else getattr(evaluation, "task", None))
    if not isinstance(task, Classification):
        return _without_labels(model, data, task, table=table, evaluation=evaluation, blocks=blocks, mode=mode,
                               calibration=calibration, rule=rule, progress=progress)
    if train_data is None:
        raise ProbeError("representation: the linear probes are fitted on train_data; pass it (training batches).")
    check_reiterable(data, "representation")
    check_reiterable(train_data, "representation")
    chosen = resolve_blocks(model, blocks)
    if evaluation is None:
        sweep, evaluation = single_block_sweep(model, data, mode=mode, calibration=calibration, per_class=True,
                                               blocks=chosen, progress=progress)
        if table is None:
            table = join_block_table(probe.measure(model, data, blocks=chosen, progress=progress), sweep, rule=rule)
    elif table is None:
        raise ProbeError("representation: pass the per-block table together with a precomputed evaluation.")
    _check_cost(table, task)
    table = check_table(table, ["block", "position", "ratio", "accuracy_drop"], "representation", model, blocks=chosen)
    baseline, deletions = evaluation
    if len(deletions) != len(chosen) or "class_accuracy" not in baseline:
        raise ProbeError("representation: the evaluation must hold one single-block deletion per block, in forward "
                         "order, with per-class accuracies (per_class=True).")
    recal = calibration is not None
    if "bn_recalibrated" in table.columns:
        recal = bool(table["bn_recalibrated"].iloc[0])
    probes = linear_probes(model, data, train_data=train_data, blocks=chosen, progress=progress)
    lens = head_lens(model, data, blocks=chosen, progress=progress)
    steps = refinement(model, data, blocks=chosen, progress=progress)
    similarity = cka(model, data, blocks=chosen, progress=progress)
    classes = block_classes(table, evaluation, bn_recalibrated=recal)
    return RepresentationResult(probes=probes, lens=lens, refinement=steps, cka=similarity, classes=classes,
                                summary=summary(table.assign(bn_recalibrated=recal), probes, lens, steps,
                                                similarity, classes))


def _check_cost(table: pd.DataFrame, task: Task) -> None:
    held = cost_column(table)
    if held in table.columns and held != task.cost:
        raise ProbeError(f"representation: the per-block table holds {held} (a table of another task), but the task "
                         f"{task.name!r} measures {task.cost}; pass the task the table was made with (task=).")


def _without_labels(model: nn.Module, data: Iterable, task: Task, *, table: pd.DataFrame | None,
                    evaluation: Evaluation | None, blocks: Sequence[str | Block] | None, mode: str,
                    calibration: Iterable | None, rule: VerdictRule | None, progress: bool) -> RepresentationResult:
    """`representation` for a task without class labels: CKA, refinement (not for drift), and
    empty probes, lens and classes tables with the reason in `notes`."""
    check_reiterable(data, "representation")
    chosen = resolve_blocks(model, blocks)
    if table is None:
        if evaluation is not None:
            raise ProbeError("representation: pass the per-block table together with a precomputed evaluation.")
        sweep, _ = single_block_sweep(model, data, mode=mode, calibration=calibration, blocks=chosen, task=task,
                                      progress=progress)
        table = join_block_table(probe.measure(model, data, blocks=chosen, progress=progress), sweep, rule=rule)
    _check_cost(table, task)
    table = check_table(table, ["block", "position", "ratio", task.cost], "representation", model, blocks=chosen)
    recal = calibration is not None
    if "bn_recalibrated" in table.columns:
        recal = bool(table["bn_recalibrated"].iloc[0])
    labels = f"the task {task.name!r} has no class labels"
    if task.cost == "detections_lost":  # a detector's classes are per box, not per image
        labels = f"the task {task.name!r} has no class label per image (its classes are per box)"
    notes = {"probes": f"linear probes predict class labels, and {labels}.",
             "lens": f"the logit lens scores the model's head against class labels, and {labels}.",
             "classes": f"the drop per class needs class labels, and {labels}."}
    probes = pd.DataFrame(columns=PROBE_COLUMNS)
    lens = pd.DataFrame(columns=LENS_COLUMNS)
    classes = pd.DataFrame(columns=CLASSES_COLUMNS)
    if task.cost in NO_REFINEMENT:
        steps = pd.DataFrame(columns=REFINEMENT_COLUMNS)
        notes["refinement"] = NO_REFINEMENT[task.cost]
    else:
        steps = refinement(model, data, blocks=chosen, task=task, progress=progress)
    similarity = cka(model, data, blocks=chosen, progress=progress)
    return RepresentationResult(probes=probes, lens=lens, refinement=steps, cka=similarity, classes=classes,
                                summary=summary(table.assign(bn_recalibrated=recal), probes, lens, steps,
                                                similarity, classes), notes=notes)


def _in_job(job: Job) -> RepresentationResult:
    # Only the linear probes (classification) are fitted on training data.
    train = train_loader(job.config, model=job.model) if isinstance(job.task, Classification) else None
    return representation(job.model, job.data, train_data=train, table=job.table, evaluation=job.evaluation,
                          blocks=job.blocks, task=job.task, progress=job.progress)


def _alone(config: RunConfig, out: Path, progress: bool) -> RepresentationResult:
    inputs = load_inputs(config, progress=progress)
    task = resolve_task(config.task)
    train = train_loader(config, model=inputs.model) if isinstance(task, Classification) else None
    return representation(inputs.model, inputs.data, train_data=train, mode=config.mode,
                          calibration=inputs.calibration, blocks=inputs.blocks, task=task, progress=progress)


ANALYSIS = Analysis(
    name="representation", order=50, in_job=_in_job, alone=_alone, options=("model", "ablation"),
    summary="linear probes, logit lens, iterative refinement, CKA between blocks, the classes each block serves")
