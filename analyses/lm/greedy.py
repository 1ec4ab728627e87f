"""SLEB's greedy layer deletion against two one-shot orders (single-layer loss, block influence)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
from torch import nn

from analyses.lm.deletions import Deletions, single_deletion_table
from analyses.lm.influence import similarity_table
from analyses.lm.stream import stream_pass
from analyses.lm.units import LM, layers_of
from probe.discovery.decoder import DecoderLayers
from probe.discovery.find import Block
from probe.errors import ProbeError
from probe.scoring.results import Outcome

ORDERS = ("greedy", "single_loss", "block_influence")
GREEDY_COLUMNS = ["order", "k", "removed", "layers", "loss", "perplexity", "token_accuracy", "loss_increase"]


def check_steps(steps: int | None, count: int) -> int:
    if steps is None:
        return max(1, count // 2)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= count:
        raise ProbeError(f"greedy steps must be between 1 and the number of layers ({count}), got {steps!r}.")
    return int(steps)


def greedy_table(deletions: Deletions, stack: DecoderLayers, steps: int, layers: pd.DataFrame) -> pd.DataFrame:
    names = stack.names
    baseline = deletions.outcomes([[]])[0]
    rows = []

    def add(order: str, k: int, removed: str, chosen: list[str], outcome: Outcome) -> None:
        row = deletions.row(outcome)
        rows.append({"order": order, "k": k, "removed": removed, "layers": " ".join(chosen),
                     **{c: row[c] for c in ("loss", "perplexity", "token_accuracy", "loss_increase")}})

    # SLEB: re-score every remaining layer with the removed ones, one evaluation pass per step.
    removed: list[str] = []
    add("greedy", 0, "", [], baseline)
    for k in range(1, steps + 1):
        remaining = [name for name in names if name not in removed]
        outcomes = deletions.outcomes([[*removed, name] for name in remaining], base=removed)
        best = min(range(len(remaining)), key=lambda i: (outcomes[i].loss, i))  # ties: the earlier layer
        removed.append(remaining[best])
        add("greedy", k, remaining[best], removed, outcomes[best])
    # One-shot orders: ranked once, cheapest first (ties: forward order).
    by_layer = layers[layers["kind"] == "layer"].set_index("unit")
    orders = {"single_loss": sorted(names, key=lambda n: (by_layer.loc[n, "loss_increase"], names.index(n))),
              "block_influence": sorted(names, key=lambda n: (by_layer.loc[n, "block_influence"], names.index(n)))}
    for order, ranked in orders.items():
        outcomes = deletions.outcomes([ranked[:k] for k in range(1, steps + 1)])
        add(order, 0, "", [], baseline)
        for k, outcome in enumerate(outcomes, start=1):
            add(order, k, ranked[k - 1], ranked[:k], outcome)
    table = pd.DataFrame(rows, columns=GREEDY_COLUMNS)
    table.attrs["baseline"] = LM.metrics(deletions.baseline)
    return table


def greedy_deletion(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
                    greedy_steps: int | None = None, layers: pd.DataFrame | None = None,
                    progress: bool = True) -> pd.DataFrame:
    """SLEB's greedy layer deletion against two one-shot orders, as loss and perplexity curves.

    greedy: at step k, every remaining layer is deleted together with the k - 1 already removed
    (one evaluation pass per step) and the one giving the lowest loss is removed. single_loss:
    the layers ranked once by their single-layer loss increase, smallest first; block_influence:
    ranked once by block influence, lowest first (ShortGPT). greedy_steps: how many layers to remove
    (default: half of them). layers: the `lm_layers` per-unit table (block_influence and
    loss_increase of each layer), computed here when None.

    Columns: order ("greedy", "single_loss", "block_influence"), k (layers deleted; 0: the intact
    model), removed (the layer removed at step k; "" at k = 0), layers (every layer removed so
    far, space-separated), loss (mean NLL per token), perplexity, token_accuracy, loss_increase
    (over the intact model). `attrs["baseline"]`: the intact model's numbers.
    """
    stack = layers_of(model, data, blocks)
    steps = check_steps(greedy_steps, len(stack.names))
    deletions = Deletions(model, data, stack, progress)
    if layers is None:
        similarity = similarity_table(stack, stream_pass(model, data, stack, sublayers=False, progress=progress))
        layers = similarity.merge(single_deletion_table(deletions, stack, None), on=["kind", "unit"])
    return greedy_table(deletions, stack, steps, layers)
