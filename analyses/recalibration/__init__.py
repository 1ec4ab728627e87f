"""Does a deleted block's cost survive BatchNorm recalibration?

    python -m analyses.recalibration --out runs/recalibration

Deleting a block shifts every activation after it, and each BatchNorm downstream still
normalises with statistics from the intact network. EagleEye (Li et al. 2020) showed that after
pruning, re-estimating those statistics on a little training data changes which pruned networks
look good. Here every block is deleted alone twice: with the trained statistics, and with
statistics recalibrated on held-out training data for that deletion (`probe.deletion.batchnorm`). A
block whose cost shrinks a lot was mostly hurting through stale statistics; one whose cost stays
is doing computation the network needs.

For another task (`probe.scoring.tasks`) the comparison is of its own cost (`probe.scoring.verdict.cost_column`):
the loss increase, or the drift of the outputs from the intact model's (recalibrated rows: from
the intact model recalibrated alike).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd
from torch import nn

from analyses.registry import Analysis, Job
from probe.commands.config import RunConfig
from probe.commands.inputs import load_inputs
from probe.deletion.evaluation import sweep_table
from probe.deletion.store import OutcomeStore
from probe.deletion.block_table import check_table
from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError
from probe.deletion.batchnorm import batchnorm_layers
from probe.scoring.results import table_info
from probe.scoring.tasks import Classification, Task, resolve_task
from probe.scoring.verdict import cost_column

__all__ = ["COLUMNS", "RecalibrationResult", "recalibration"]

# The sweep's own columns, which a reused per-block table must have.
_SWEEP_COLUMNS = ["block", "position", "accuracy", "loss", "accuracy_drop", "loss_increase", "flip_rate", "samples",
                  "mode"]
COLUMNS = ["block", "position", "accuracy", "loss", "accuracy_drop", "loss_increase", "flip_rate", "samples",
           "baseline_accuracy", "baseline_loss", "mode", "bn_recalibrated"]


@dataclass(frozen=True)
class RecalibrationResult:
    """table: two rows per block (bn_recalibrated False, then True), documented on `recalibration`."""

    table: pd.DataFrame

    def tables(self) -> dict[str, pd.DataFrame]:
        """{file stem: table}: recalibration.csv."""
        return {"recalibration": self.table}


def recalibration(model: nn.Module, data: Iterable, *, calibration: Iterable, table: pd.DataFrame | None = None,
                  mode: str = "zero", blocks: Sequence[str | Block] | None = None,
                  task: str | Task | Callable | None = None, progress: bool = True,
                  store: OutcomeStore | None = None) -> RecalibrationResult:
    """Single-block deletions with and without BN recalibration, in one long table.

    Its table has two rows per block (bn_recalibrated False, then True); columns `COLUMNS`, as in
    `probe.sweep`, plus baseline_accuracy and baseline_loss: what each row is compared with.
    Rows with trained statistics are compared with the model as given; recalibrated rows with
    the intact model recalibrated on the same calibration data (so the refit alone costs nothing).
    table: an existing sweep table without recalibration (e.g. `python -m probe.ablate`'s),
    reused for the False rows instead of sweeping again. blocks: the blocks the table covers
    (names or Blocks, e.g. from a spec); all discovered when None.

    task: what the outputs mean (`probe.scoring.tasks`; classification by default). For other tasks the
    columns are block, position, the task's sweep columns (`probe.deletion.evaluation.sweep_table`: lm:
    loss, perplexity, token_accuracy, loss_increase, loss_increase_se, perplexity_ratio,
    token_accuracy_drop, token_flip_rate, tokens; drift: drift, drift_se, kl with logits; your
    own: loss, loss_increase, loss_increase_se, accuracy and accuracy_drop with correctness),
    samples, baseline_loss (only for tasks with a loss increase: the intact model's loss each
    row is compared with), mode, bn_recalibrated; `probe.scoring.verdict.cost_column` names the cost
    column (the standard error columns are kept).
    store: the job's outcomes (`probe.deletion.store.OutcomeStore`): deletions it holds (the
    sweep's, recalibrated or not) are not evaluated again.
    """
    if not batchnorm_layers(model):
        raise ProbeError(f"{type(model).__name__} has no BatchNorm layer with running statistics: there is "
                         "nothing to recalibrate.")
    if calibration is None:
        raise ProbeError("recalibration needs calibration batches (held-out data to refit BatchNorm statistics on).")
    task = resolve_task(task)
    blocks = resolve_blocks(model, blocks)
    reusable = table is not None and not ("bn_recalibrated" in table and table["bn_recalibrated"].any())
    if table is not None and cost_column(table) != task.cost:
        raise ProbeError(f"recalibration: the per-block table holds {cost_column(table)} (a table of another task), "
                         f"but the task {task.name!r} measures {task.cost}; pass the task the table was made "
                         "with (task=).")
    store = store if store is not None else OutcomeStore(blocks)

    def swept(refit_on: Iterable | None) -> pd.DataFrame:
        evaluation = store.evaluate(model, data, [[block] for block in blocks], mode=mode, calibration=refit_on,
                                    task=task, progress=progress)
        return sweep_table(blocks, evaluation, mode=mode, recalibrated=refit_on is not None)

    refit = swept(calibration)
    if isinstance(task, Classification):
        columns, needed = COLUMNS, _SWEEP_COLUMNS
    else:
        values = [c for c in refit.columns if c not in ("block", "position", "mode", "samples", "bn_recalibrated")]
        baseline = ["baseline_loss"] if "loss_increase" in values else []
        columns = ["block", "position", *values, "samples", *baseline, "mode", "bn_recalibrated"]
        needed = ["block", "position", *values, "samples", "mode"]
    if reusable:
        plain = check_table(table, needed, "recalibration", model, blocks=blocks).assign(bn_recalibrated=False)
    else:
        plain = swept(None)
    both = pd.concat([_with_baseline(plain, table if reusable else plain, columns),
                      _with_baseline(refit, refit, columns)], ignore_index=True)
    both["bn_recalibrated"] = both["bn_recalibrated"].astype(bool)
    return RecalibrationResult(both.sort_values(["position", "bn_recalibrated"], kind="stable")
                               .reset_index(drop=True))


def _with_baseline(rows: pd.DataFrame, source: pd.DataFrame, columns: Sequence[str] = COLUMNS) -> pd.DataFrame:
    """`rows` in `columns`, with the baseline they were compared with (`table_info(source)`); a table
    read back from CSV has no attrs: its baseline is recovered from any row (accuracy + drop)."""
    baseline = table_info(source).baseline or None
    if baseline is None:
        baseline = {}
        if "accuracy" in rows and "accuracy_drop" in rows:
            baseline["accuracy"] = float((rows["accuracy"] + rows["accuracy_drop"]).iloc[0])
        if "loss" in rows and "loss_increase" in rows:
            baseline["loss"] = float((rows["loss"] - rows["loss_increase"]).iloc[0])
    added = {f"baseline_{key}": baseline.get(key) for key in ("accuracy", "loss") if f"baseline_{key}" in columns}
    return rows.assign(**added)[list(columns)]


def _in_job(job: Job) -> RecalibrationResult:
    if job.calibration is None and batchnorm_layers(job.model):
        raise ProbeError("no held-out data to refit BatchNorm statistics on: the evaluated data is the only "
                         "pool (an image folder, or --split train); give --calibration-root FOLDER, or "
                         "--bn-recalibrate to set calibration samples apart from the evaluated ones.")
    return recalibration(job.model, job.data, calibration=job.calibration, table=job.table, mode=job.config.mode,
                         blocks=job.blocks, task=job.task, progress=job.progress, store=job.store)


def _alone(config: RunConfig, out: Path, progress: bool) -> RecalibrationResult:
    # This analysis is the comparison itself: it always needs calibration data.
    inputs = load_inputs(replace(config, bn_recalibrate=True), progress=progress)
    return recalibration(inputs.model, inputs.data, calibration=inputs.calibration, mode=config.mode,
                         blocks=inputs.blocks, task=resolve_task(config.task), progress=progress)


ANALYSIS = Analysis(
    name="recalibration", order=60, in_job=_in_job, alone=_alone, options=("model", "ablation"),
    summary="each block's cost with BatchNorm statistics refitted for the deletion (EagleEye)",
    needs_calibration=True)
