"""The per-block table: `probe.measure` joined with the single-block sweep and classified.

This is the table `python -m probe.ablate` writes as blocks.csv and every analysis reads: one
row per block in forward order, the verdict computed once, by `probe.scoring.verdict.classify`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import pandas as pd
from torch import nn

from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError
from probe.deletion.evaluation import single_block_sweep
from probe.instrument.measurement import measure
from probe.scoring.results import Evaluation
from probe.scoring.tasks import Classification, Task
from probe.scoring.verdict import UNSUPPORTED, VerdictRule, chance_warning, classify

__all__ = ["block_table", "check_table", "join_block_table", "unsupported_reason"]


def join_block_table(stats: pd.DataFrame, sweep: pd.DataFrame, *, rule: VerdictRule | None = None,
                     unsupported: str | None = None) -> pd.DataFrame:
    """`stats` (from `probe.measure`) joined with `sweep` (one row per deleted block), with the
    `noise` and `verdict` columns of `rule`; `attrs["baseline"]` is the sweep's.

    unsupported: why the data cannot support a verdict (`probe.scoring.verdict.chance_warning`); every
    block's verdict is then "unsupported", and `attrs["unsupported"]` says why.
    """
    joined = stats.merge(sweep.drop(columns="samples"), on=["block", "position"])
    # The noise band needs the samples each deletion was evaluated on. Measuring can count
    # otherwise (a block module called k times per forward; non-finite norms left out): then
    # measure's count is kept beside it.
    measured = joined["samples"]
    joined["samples"] = joined["block"].map(sweep.set_index("block")["samples"]).astype(measured.dtype)
    if not measured.equals(joined["samples"]):
        joined.insert(joined.columns.get_loc("samples") + 1, "measured_samples", measured)
    table = classify(joined, rule=rule)
    if unsupported:
        table["verdict"] = UNSUPPORTED
        table.attrs["unsupported"] = unsupported
    table.attrs.update({key: dict(value) for key, value in sweep.attrs.items() if key.endswith("baseline")})
    if "task" in sweep.attrs:
        table.attrs["task"] = sweep.attrs["task"]
    return table


def block_table(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
                mode: str = "zero", calibration: Iterable | None = None, rule: VerdictRule | None = None,
                task: str | Task | Callable | None = None, progress: bool = True) -> pd.DataFrame:
    """The per-block table `python -m probe.ablate` writes: measure + single deletions + verdict.

    calibration: held-out batches to refit BatchNorm statistics after each deletion.
    `attrs["baseline"]` holds the unablated model's numbers (classification: accuracy, loss and
    samples). A classifier at chance gets no verdicts (see `join_block_table`'s
    `unsupported`). task: see `probe.scoring.tasks`; the sweep's columns and the verdict's cost follow it.
    """
    blocks = resolve_blocks(model, blocks, data=data)
    stats = measure(model, data, blocks=blocks, progress=progress)
    sweep, evaluation = single_block_sweep(model, data, mode=mode, calibration=calibration, per_class=True,
                                           blocks=blocks, task=task, progress=progress)
    return join_block_table(stats, sweep, rule=rule, unsupported=unsupported_reason(evaluation, rule))


def unsupported_reason(evaluation: Evaluation, rule: VerdictRule | None = None, *,
                       num_classes: int | None = None) -> str | None:
    """Why `evaluation` cannot support block verdicts (its intact model is at chance), or None.
    Needs the per-class counts (`per_class=True`) to know the most frequent class. A classifier
    has a chance level; another task answers through its `no_verdict` (a detector that finds
    too little of the ground truth). Chance is the data's: `num_classes` classes (default: those
    with samples), not the model's outputs, which may be more."""
    baseline = evaluation.baseline
    if evaluation.task is not None and not isinstance(evaluation.task, Classification):
        no_verdict = getattr(evaluation.task, "no_verdict", None)  # a duck-typed task may lack it
        return no_verdict(baseline) if no_verdict is not None else None
    counts = baseline.class_samples
    present = sum(1 for count in counts if count) if counts else 0
    classes = num_classes or (present if present >= 2 else None)  # one class alone: chance is 100%
    return chance_warning(baseline.accuracy, baseline.samples, counts, num_classes=classes, rule=rule)


def check_table(table: pd.DataFrame, columns: Sequence[str], what: str, model: nn.Module, *,
                blocks: Sequence[str | Block] | None = None, rule: VerdictRule | None = None) -> pd.DataFrame:
    """`table` in forward order, validated: the needed columns, one row per block of `model`
    (per block of `blocks`, when the table covers chosen blocks or blocks from a spec).

    With `rule`, the verdicts are recomputed by it (a table read back from blocks.csv may have
    been classified by another rule), unless they are "unsupported": no rule can draw a verdict
    from a model at chance.
    """
    if not isinstance(table, pd.DataFrame):
        raise ProbeError(f"{what} needs the per-block table (a DataFrame), got {type(table).__name__}.")
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise ProbeError(f"{what} needs column(s) {missing} in the per-block table; it has "
                         f"{list(table.columns)}. Build it with probe.block_table.")
    names = [block.name for block in resolve_blocks(model, blocks)]
    if sorted(map(str, table["block"])) != sorted(names):
        whose = "the model's blocks" if blocks is None else "the blocks asked for"
        raise ProbeError(f"{what}: the table's blocks {list(table['block'])[:5]}... are not {whose} "
                         f"{names[:5]}...; was it computed on another model, or on other blocks "
                         "(pass those as blocks=)?")
    order = {name: i for i, name in enumerate(names)}
    ordered = table.assign(_order=table["block"].map(order)).sort_values("_order").drop(columns="_order") \
        .reset_index(drop=True)
    if rule is None or ("verdict" in ordered and (ordered["verdict"] == UNSUPPORTED).all()):
        return ordered
    return classify(ordered, rule=rule)
