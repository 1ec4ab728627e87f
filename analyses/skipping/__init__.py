"""Which blocks can go: remove every skipped block at once, deletion curves, and a pruned export.

    python -m analyses.skipping --out runs/skipping

1. **Remove the skipped blocks together.** The verdict rule (`probe.scoring.verdict`) calls a block
   skipped when its branch is small and deleting it *alone* costs nothing beyond noise. Deleting
   them all at once is the real test: small effects can add up.
2. **Deletion curves** (Veit et al. 2016, Fig. 5a): accuracy as k = 0..N blocks are deleted
   together, in three orders: ascending branch/shortcut ratio, ascending single-block accuracy
   drop (the "truth" order), and random (several seeded draws; the figure shows their mean and
   range). Every point of every curve is evaluated in one data pass. For another task
   (`probe.scoring.tasks`) the curves follow its own numbers (the loss increase, or the drift of the
   outputs) and the "drop" order is by its cost column (`probe.scoring.verdict.cost_column`).
3. **Pruned export** (`probe.deletion.surgery`): a deep copy of the model in which each skipped block
   computes only its shortcut path (the branch's modules are gone), checked against
   `probe.ablated` on the data, saved with `torch.save`, and measured for size and speed
   against the original.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from torch import nn

from analyses.registry import Analysis, Job
from probe.commands.config import RunConfig
from probe.commands.inputs import load_inputs
from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError
from probe.deletion.store import OutcomeStore
from probe.scoring.results import Outcome
from probe.deletion.surgery import EXPORT_COLUMNS, export_pruned
from probe.deletion.block_table import block_table, check_table
from probe.scoring.tasks import Classification, Task, resolve_task
from probe.scoring.verdict import VerdictRule, cost_column

__all__ = ["ORDERS", "SkippingResult", "curve_ks", "deletion_orders", "skipping"]

ORDERS = ("ratio", "drop", "random")
NOTHING_SKIPPED = "no block is skipped, so the pruned model would be the model itself; none was saved or timed."

SUMMARY_COLUMNS = ["state", "blocks_removed", "removed", "accuracy", "loss", "accuracy_drop", "flip_rate",
                   "samples", "mode", "bn_recalibrated"]
CURVE_COLUMNS = ["order", "draw", "k", "removed", "accuracy", "loss", "accuracy_drop", "samples", "mode",
                 "bn_recalibrated"]

@dataclass(frozen=True)
class SkippingResult:
    """The three tables of the skipping analysis.

    summary: two rows, `state` "all blocks" and "skipped blocks removed": blocks_removed (count),
        removed (names, space-separated), accuracy, loss, accuracy_drop (vs. all blocks),
        flip_rate, samples, mode, bn_recalibrated.
    curves: one row per (order, draw, k): order ("ratio", "drop", "random"), draw (0..draws-1;
        always 0 for the two fixed orders), k (blocks deleted: the first k of the order), removed
        (the k-th block of the order; "" at k = 0), accuracy, loss, accuracy_drop (vs. k = 0),
        samples, mode, bn_recalibrated.
    Other tasks: in both tables the task's sweep columns (`probe.scoring.tasks.Task.row`, as in
        `probe.deletion.evaluation.sweep_table`) take the place of accuracy ... flip_rate, vs. the intact
        model; the intact rows ("all blocks", k = 0) have 0 for the standard error and flip rate
        columns (a state compared with itself). lm: loss, perplexity, token_accuracy,
        loss_increase, loss_increase_se, perplexity_ratio, token_accuracy_drop,
        token_flip_rate, tokens; drift: drift, drift_se (and kl with logits); your own: loss,
        loss_increase, loss_increase_se (accuracy, accuracy_drop when it returns correctness).
        The summary has no flip_rate column then, unless the task's row has one.
    export: two rows, `model` "original" and "pruned": blocks (blocks that still compute a branch), parameters,
        bytes (parameter and buffer storage), seconds_per_batch (fastest of several runs, the two
        models alternating in one process), batch_size, parameters_ratio / bytes_ratio / time_ratio (pruned / original),
        max_abs_difference (pruned logits vs. `probe.ablated`), path (where the pruned model was
        saved, or ""), bn_recalibrated. Empty when no export was asked for, or none was possible.
    export_note: why `export` is empty although it was asked for (say, blocks from a spec whose
        branch is no module's output: there is nothing to cut out); "" otherwise.
    """

    summary: pd.DataFrame
    curves: pd.DataFrame
    export: pd.DataFrame
    export_note: str = ""

    def tables(self) -> dict[str, pd.DataFrame]:
        """{file stem: table}: skipping.csv, deletion_curves.csv, pruned_export.csv."""
        return {"skipping": self.summary, "deletion_curves": self.curves, "pruned_export": self.export}


def deletion_orders(table: pd.DataFrame, *, random_draws: int = RunConfig.random_draws,
                    seed: int = 0) -> list[tuple[str, int, list[str]]]:
    """(order, draw, block names in deletion order) for every deletion curve.

    "ratio": smallest branch/shortcut ratio first. "drop": smallest single-block accuracy drop
    first, ties broken by the smaller loss increase (a finer measure of the same harm), then by
    position; for a table of another task (`probe.scoring.verdict.cost_column`: `loss_increase` or
    `drift`), smallest cost first, ties by position. "random": `random_draws` permutations from
    numpy's generator seeded with `seed`.
    """
    if not isinstance(random_draws, int) or random_draws < 0:
        raise ProbeError(f"random_draws must be a whole number >= 0, got {random_draws!r}.")
    forward = table.sort_values("position", kind="stable") if "position" in table else table
    names = forward["block"].astype(str).tolist()
    by_ratio = forward.sort_values("ratio", kind="stable")["block"].astype(str).tolist()
    cost = cost_column(forward)
    if cost == "accuracy_drop":
        keys = ["accuracy_drop", "loss_increase"] if "loss_increase" in forward else ["accuracy_drop"]
    else:
        keys = [cost]
    by_drop = forward.sort_values(keys, kind="stable")["block"].astype(str).tolist()
    rng = np.random.default_rng(seed)
    orders = [("ratio", 0, by_ratio), ("drop", 0, by_drop)]
    orders += [("random", draw, [names[i] for i in rng.permutation(len(names))]) for draw in range(random_draws)]
    return orders


def curve_ks(blocks: int, points: int | None = None) -> list[int]:
    """The k (blocks deleted together) at which curves are evaluated: every k from 1 to `blocks`,
    or about `points` of them spread evenly (always including 1 and `blocks`)."""
    if points is not None and (not isinstance(points, int) or points < 2):
        raise ProbeError(f"curve points must be a whole number >= 2 (or None for every k), got {points!r}.")
    if points is None or points >= blocks:
        return list(range(1, blocks + 1))
    return sorted({1, *(int(k) for k in np.round(np.linspace(0, blocks, points))[1:])})


def skipping(model: nn.Module, data: Iterable, *, table: pd.DataFrame | None = None,
             rule: VerdictRule | None = None, mode: str = "zero", calibration: Iterable | None = None,
             random_draws: int = RunConfig.random_draws, seed: int = 0,
             curve_points: int | None = RunConfig.curve_points,
             export_path: str | Path | None = None, export: bool = True, blocks: Sequence[str | Block] | None = None,
             task: str | Task | Callable | None = None, progress: bool = True,
             store: OutcomeStore | None = None) -> SkippingResult:
    """Remove the skipped blocks together, draw deletion curves, and export the pruned model.

    table: the per-block table (`probe.block_table`, or `blocks.csv` of
    `python -m probe.ablate`) with block, position, ratio, accuracy_drop and the verdict
    inputs; computed when None. Its verdicts are recomputed with `rule`. The summary and every
    curve point come from one `probe.evaluate_ablations` call; `calibration` recalibrates BN per set.
    curve_points: evaluate each curve at about this many k (`curve_ks`) instead of every k:
    each point costs up to a forward pass, and a deep network has many blocks.
    blocks: the blocks the table covers (names or Blocks, e.g. from a spec); all discovered when None.
    task: what the outputs mean (`probe.scoring.tasks`; classification by default). A table handed in
    must be of the same task: its cost column (`probe.scoring.verdict.cost_column`) is the task's, with
    its standard error (`loss_increase_se`, `drift_se`) in place of flip_rate.
    store: the job's outcomes (`probe.deletion.store.OutcomeStore`): a set it holds (a single
    deletion of the sweep, every block deleted at the end of each order) is not evaluated again;
    each set is evaluated once in any case. With no skipped block there is no pruned model to
    export: `export` is empty and `export_note` says so.
    """
    rule = rule or VerdictRule()
    task = resolve_task(task)
    every = resolve_blocks(model, blocks)
    if table is None:
        table = block_table(model, data, mode=mode, calibration=calibration, rule=rule, blocks=every, task=task,
                            progress=progress)
    table = check_table(table, _table_columns(table, task), "skipping", model, blocks=every, rule=rule)
    skipped = table.loc[table["verdict"] == "skipped", "block"].astype(str).tolist()
    orders = deletion_orders(table, random_draws=random_draws, seed=seed)
    # Block objects, not names: each set is then used as given, without finding the blocks again.
    by_name = {block.name: block for block in every}
    ks = curve_ks(len(by_name), curve_points)
    # k = 0 is the baseline itself; each other k is a prefix of the order (nested sets). No point
    # lies past the one where every block of the order is deleted.
    ks = [k for k in ks if k <= min((len(names) for _, _, names in orders), default=len(by_name))]
    sets = [[by_name[n] for n in skipped]] + [[by_name[n] for n in names[:k]] for _, _, names in orders for k in ks]
    store = store if store is not None else OutcomeStore(every)
    baseline, results = store.evaluate(model, data, sets, mode=mode, calibration=calibration, task=task,
                                       progress=progress)
    recal = calibration is not None
    summary, curves = (_classification_tables if isinstance(task, Classification) else _task_tables)(
        task, baseline, results, skipped, orders, ks)
    summary = summary.assign(mode=mode, bn_recalibrated=recal)
    curves = curves.assign(mode=mode, bn_recalibrated=recal)
    if isinstance(task, Classification):
        summary, curves = summary[SUMMARY_COLUMNS], curves[CURVE_COLUMNS]
    exported, note = pd.DataFrame(columns=EXPORT_COLUMNS), ""
    if export and not skipped:  # the pruned model would be the model itself: nothing to save or time
        note = NOTHING_SKIPPED
    elif export:
        try:
            _, exported = export_pruned(model, data, sets[0], path=export_path, calibration=calibration,
                                        total_blocks=len(every), progress=False)
        except ProbeError as error:  # the curves and the summary need no export: keep them, say why
            note = str(error)
            warnings.warn(f"no pruned model exported: {note}", stacklevel=2)
    return SkippingResult(summary=summary, curves=curves, export=exported, export_note=note)


def _table_columns(table: pd.DataFrame, task: Task) -> list[str]:
    """The columns `skipping` needs in a per-block table of `task`; ProbeError when the table is
    of another task."""
    cost = cost_column(table)
    if cost != task.cost:
        raise ProbeError(f"skipping: the per-block table holds {cost} (a table of another task), but the task "
                         f"{task.name!r} measures {task.cost}; pass the task the table was made with (task=).")
    if cost == "accuracy_drop":
        return ["block", "position", "ratio", "accuracy_drop", "flip_rate", "samples"]
    return ["block", "position", "ratio", cost, f"{cost}_se", "samples"]


def _classification_tables(task: Task, baseline: Outcome, results: list[Outcome], skipped: list[str],
                           orders: list[tuple[str, int, list[str]]], ks: list[int]) -> tuple[pd.DataFrame, ...]:
    after = results[0]
    summary = pd.DataFrame([
        {"state": "all blocks", "blocks_removed": 0, "removed": "", "accuracy": baseline.accuracy,
         "loss": baseline.loss, "accuracy_drop": 0.0, "flip_rate": 0.0, "samples": baseline.samples},
        {"state": "skipped blocks removed", "blocks_removed": len(skipped), "removed": " ".join(skipped),
         "accuracy": after.accuracy, "loss": after.loss,
         "accuracy_drop": baseline.accuracy - after.accuracy, "flip_rate": after.flip_rate,
         "samples": after.samples},
    ])
    rows, next_result = [], iter(results[1:])
    for order, draw, names in orders:
        rows.append({"order": order, "draw": draw, "k": 0, "removed": "", "accuracy": baseline.accuracy,
                     "loss": baseline.loss, "accuracy_drop": 0.0, "samples": baseline.samples})
        for k in ks:
            result = next(next_result)
            rows.append({"order": order, "draw": draw, "k": k, "removed": names[k - 1],
                         "accuracy": result.accuracy, "loss": result.loss,
                         "accuracy_drop": baseline.accuracy - result.accuracy, "samples": result.samples})
    return summary, pd.DataFrame(rows)


def _intact_row(task: Task, baseline: Outcome) -> dict:
    """The task's columns of the intact model against itself: no standard error, no flips."""
    return {key: 0.0 if value is None and (key.endswith("_se") or key.endswith("flip_rate")) else value
            for key, value in task.row(baseline, baseline).items()}


def _task_tables(task: Task, baseline: Outcome, results: list[Outcome], skipped: list[str],
                 orders: list[tuple[str, int, list[str]]], ks: list[int]) -> tuple[pd.DataFrame, ...]:
    intact = _intact_row(task, baseline)
    columns = list(intact)
    after = results[0]
    summary = pd.DataFrame([
        {"state": "all blocks", "blocks_removed": 0, "removed": "", **intact, "samples": baseline.samples},
        {"state": "skipped blocks removed", "blocks_removed": len(skipped), "removed": " ".join(skipped),
         **task.row(baseline, after), "samples": after.samples},
    ], columns=["state", "blocks_removed", "removed", *columns, "samples"])
    rows, next_result = [], iter(results[1:])
    for order, draw, names in orders:
        rows.append({"order": order, "draw": draw, "k": 0, "removed": "", **intact, "samples": baseline.samples})
        for k in ks:
            result = next(next_result)
            rows.append({"order": order, "draw": draw, "k": k, "removed": names[k - 1],
                         **task.row(baseline, result), "samples": result.samples})
    return summary, pd.DataFrame(rows, columns=["order", "draw", "k", "removed", *columns, "samples"])


def _in_job(job: Job) -> SkippingResult:
    config = job.config
    return skipping(job.model, job.data, table=job.table, mode=config.mode, calibration=job.recalibration_data,
                    random_draws=config.random_draws, seed=config.seed, curve_points=config.curve_points,
                    export_path=job.out / "pruned_model.pt", blocks=job.blocks, task=job.task, progress=job.progress,
                    store=job.store)


def _alone(config: RunConfig, out: Path, progress: bool) -> SkippingResult:
    inputs = load_inputs(config, progress=progress)
    return skipping(inputs.model, inputs.data, mode=config.mode, calibration=inputs.calibration,
                    random_draws=config.random_draws, seed=config.seed, curve_points=config.curve_points,
                    export_path=out / "pruned_model.pt", blocks=inputs.blocks, task=resolve_task(config.task),
                    progress=progress)


ANALYSIS = Analysis(
    name="skipping", order=20, in_job=_in_job, alone=_alone, options=("model", "ablation", "skipping"),
    summary="delete the skipped blocks together; deletion curves by ratio, by cost and at random; a pruned export",
    files=("pruned_model.pt",))
