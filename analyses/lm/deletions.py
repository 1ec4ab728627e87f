"""What deleting layers and sublayers costs: sets of units evaluated once each, and each unit
deleted alone."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pandas as pd
from torch import nn

from analyses.lm.units import LM, layers_of
from probe.deletion.block_table import check_table
from probe.deletion.evaluation import evaluate_ablations
from probe.discovery.decoder import DecoderLayers
from probe.discovery.find import Block
from probe.errors import ProbeError
from probe.scoring.results import Outcome
from probe.scoring.verdict import cost_column, per_token

DELETION_COLUMNS = ["kind", "unit", "loss", "perplexity", "token_accuracy", "loss_increase", "loss_increase_se"]


class Deletions:
    """Outcomes of deleting sets of units (layers or blocks), evaluated once each: a set asked for
    again (the single layers in the spans, the greedy search and the one-shot orders) is reused."""

    def __init__(self, model: nn.Module, data: Iterable, stack: DecoderLayers, progress: bool) -> None:
        self.model, self.data, self.progress = model, data, progress
        self.units = {name: blocks for name, blocks in stack.blocks.items()}
        self.units.update({block.name: [block] for block in stack.every_block})
        self.cache: dict[frozenset[str], Outcome] = {}
        self.baseline: Outcome | None = None

    def _key(self, units: Sequence[str]) -> frozenset[str]:
        return frozenset(block.name for unit in units for block in self.units[unit])

    def outcomes(self, sets: Sequence[Sequence[str]]) -> list[Outcome]:
        keys = [self._key(units) for units in sets]
        missing = list(dict.fromkeys(k for k in keys if k and k not in self.cache))
        if missing or self.baseline is None:
            by_name = {block.name: block for blocks in self.units.values() for block in blocks}
            ablations = [sorted((by_name[name] for name in key), key=lambda b: b.position) for key in missing]
            evaluation = evaluate_ablations(self.model, self.data, ablations, task=LM, progress=self.progress)
            if self.baseline is None:
                self.baseline = evaluation.baseline
            self.cache.update(zip(missing, evaluation.sets))
        return [self.cache[k] if k else self.baseline for k in keys]

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
