"""What deleting layers and sublayers costs: sets of units evaluated once each, and each unit
deleted alone."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pandas as pd
from torch import nn

from analyses.lm.units import LM, layers_of
from probe.deletion.block_table import check_table
from probe.deletion.store import OutcomeStore
from probe.discovery.decoder import DecoderLayers
from probe.discovery.find import Block
from probe.errors import ProbeError
from probe.scoring.results import Outcome
from probe.scoring.verdict import cost_column, per_token

DELETION_COLUMNS = ["kind", "unit", "loss", "perplexity", "token_accuracy", "loss_increase", "loss_increase_se"]


class Deletions:
    """Outcomes of deleting sets of units (layers or blocks), evaluated once each: a set asked for
    again (the single layers in the spans, the greedy search and the one-shot orders, a block the
    job's sweep deleted) is reused from `store` (`probe.deletion.store.OutcomeStore`)."""

    def __init__(self, model: nn.Module, data: Iterable, stack: DecoderLayers, progress: bool,
                 store: OutcomeStore | None = None) -> None:
        self.model, self.data, self.progress = model, data, progress
        self.units = {name: blocks for name, blocks in stack.blocks.items()}
        self.units.update({block.name: [block] for block in stack.every_block})
        self.store = store if store is not None else OutcomeStore(stack.every_block)
        self.baseline: Outcome | None = None

    def outcomes(self, sets: Sequence[Sequence[str]], base: Sequence[str] = ()) -> list[Outcome]:
        """One outcome per set of units; the empty set is the intact model. base: units every
        set deletes (a greedy step's removed layers): the sets run on from that network."""
        ablations = [self._blocks(units) for units in sets]
        evaluation = self.store.evaluate(self.model, self.data, [a for a in ablations if a], task=LM,
                                         base=self._blocks(base), progress=self.progress)
        self.baseline = evaluation.baseline
        found = iter(evaluation.sets)
        return [next(found) if ablation else self.baseline for ablation in ablations]

    def _blocks(self, units: Sequence[str]) -> list[Block]:
        return sorted({block.name: block for unit in units for block in self.units[unit]}.values(),
                      key=lambda b: b.position)

    def row(self, outcome: Outcome) -> dict:
        """loss, perplexity, token_accuracy, loss_increase, loss_increase_se of one outcome."""
        full = LM.row(self.baseline, outcome)
        se = full["loss_increase_se"]
        return {"loss": full["loss"], "perplexity": full["perplexity"], "token_accuracy": full["token_accuracy"],
                "loss_increase": full["loss_increase"], "loss_increase_se": float("nan") if se is None else se}


def check_lm_table(table: pd.DataFrame, model: nn.Module, stack: DecoderLayers) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame) and (cost_column(table) != "loss_increase" or not per_token(table)):
        raise ProbeError("the lm analysis needs a per-block table of the lm task (loss, perplexity, loss_increase); "
                         f"this one has {list(table.columns)}. Build it with probe.block_table(..., task='lm').")
    return check_table(table, ["block", "position", "loss", "loss_increase"], "the lm analysis", model,
                       blocks=stack.every_block)


def single_deletion_table(deletions: Deletions, stack: DecoderLayers, table: pd.DataFrame | None) -> pd.DataFrame:
    """Each layer deleted alone, and each block (from `table` when given, else evaluated)."""
    units = [("layer", name) for name in stack.names]
    units += [] if table is not None else [("sublayer", block.name) for block in stack.every_block]
    outcomes = deletions.outcomes([[unit] for _, unit in units])
    rows = [{"kind": kind, "unit": unit, **deletions.row(outcome)} for (kind, unit), outcome in zip(units, outcomes)]
    if table is not None:
        for _, row in table.iterrows():
            rows.append({"kind": "sublayer", "unit": row["block"], "loss": row["loss"],
                         "perplexity": row.get("perplexity", math.exp(row["loss"]) if row["loss"] < 700 else math.inf),
                         "token_accuracy": row.get("token_accuracy", float("nan")),
                         "loss_increase": row["loss_increase"],
                         "loss_increase_se": row.get("loss_increase_se", float("nan"))})
    return pd.DataFrame(rows, columns=DELETION_COLUMNS)


def single_deletions(model: nn.Module, data: Iterable, *, table: pd.DataFrame | None = None,
                     blocks: Sequence[str | Block] | None = None, progress: bool = True) -> pd.DataFrame:
    """What deleting each layer alone (both its blocks) and each sublayer alone costs.

    Columns: kind ("layer" or "sublayer"), unit (name), loss (mean NLL per token), perplexity,
    token_accuracy, loss_increase (over the intact model), loss_increase_se. table: a per-block
    table of the lm task (`probe.block_table(..., task="lm")`), whose rows are used for the
    sublayers instead of evaluating them again; `attrs["baseline"]` holds the intact model's
    numbers (`probe.scoring.tasks.LanguageModeling.metrics`).
    """
    stack = layers_of(model, data, blocks)
    table = check_lm_table(table, model, stack) if table is not None else None
    deletions = Deletions(model, data, stack, progress)
    result = single_deletion_table(deletions, stack, table)
    result.attrs["baseline"] = LM.metrics(deletions.baseline)
    return result
