"""`measure`: how large each block's branch F(x) is next to its shortcut s(x), over a data set.

Statistics are reduced inside the hooks to per-sample scalars and summed into small float64
accumulators on the model's device (no `.item()` per batch, one transfer at the end), so memory
does not grow with the data set. Sums are what `all_reduce` needs to combine processes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd
import torch
from torch import nn

from probe import distributed
from probe.batches import batches, explained_misfit, model_device
from probe.blocks import Block, resolve_blocks
from probe.hooks import attached, model_preserved, tap_pairs

# Per-sample quantities, in accumulator column order after the count.
QUANTITIES = ("branch_norm", "shortcut_norm", "ratio", "cosine")
# Columns of the table `measure` returns (see README, "Output columns").
COLUMNS = ["block", "position", "branch", "shortcut",
           *[c for q in QUANTITIES for c in (q, q + "_std")], "samples", "nonfinite"]


class _Moments:
    """count, sum and sum of squares of each quantity, per class: a (classes, 1 + 2q) tensor."""

    def __init__(self, device: torch.device) -> None:
        self.sums = torch.zeros(1, 1 + 2 * len(QUANTITIES), dtype=torch.float64, device=device)
        self.nonfinite = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, values: torch.Tensor, classes: torch.Tensor, num_classes: int) -> None:
        # values: (batch, quantities); a sample with a NaN/Inf anywhere is counted apart.
        finite = torch.isfinite(values).all(dim=1)
        self.nonfinite += (~finite).sum()
        values = torch.where(finite.unsqueeze(1), values, torch.zeros_like(values)).double()
        rows = torch.cat([finite.double().unsqueeze(1), values, values.square()], dim=1)
        if num_classes > self.sums.shape[0]:
            grown = self.sums.new_zeros(num_classes, self.sums.shape[1])
            grown[: self.sums.shape[0]] = self.sums
            self.sums = grown
        self.sums.index_add_(0, classes, rows)

    def reduce_across_processes(self) -> None:
        """Under torchrun: every process ends with the totals over all shards."""
        classes = distributed.max_across(self.sums.shape[0])
        if classes > self.sums.shape[0]:
            self.sums = torch.nn.functional.pad(self.sums, (0, 0, 0, classes - self.sums.shape[0]))
        distributed.sum_across(self.sums)
        distributed.sum_across(self.nonfinite)


def pair_statistics(branch: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """Per-sample (||F||, ||s||, ||F||/||s||, cos(F, s)) on flattened samples: (batch, 4)."""
    f = branch.reshape(len(branch), 1, -1).float()  # (batch, 1, elements)
    s = shortcut.reshape(len(shortcut), -1, 1).float()  # (batch, elements, 1)
    f_norm = torch.linalg.vector_norm(f, dim=(1, 2))
    s_norm = torch.linalg.vector_norm(s, dim=(1, 2))
    dot = torch.bmm(f, s).reshape(-1)  # no (batch, elements) temporary
    ratio = f_norm / s_norm
    cosine = dot / (f_norm * s_norm).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.stack([f_norm, s_norm, ratio, cosine], dim=1)


def measure(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
            per_class: bool = False, progress: bool = True) -> pd.DataFrame:
    """Branch and shortcut statistics of every residual block over `data`.

    Returns one row per block in forward order (with `per_class=True`, one row per block and
    class, with a `class` column). Columns: see `COLUMNS` and the README.
    """
    chosen = resolve_blocks(model, blocks)
    device = model_device(model)
    moments = {block.name: _Moments(device) for block in chosen}
    current = {"classes": torch.zeros(0, dtype=torch.long), "num_classes": 1}

    def record(block: Block, branch: torch.Tensor, shortcut: torch.Tensor) -> None:
        moments[block.name].add(pair_statistics(branch, shortcut), current["classes"], current["num_classes"])

    with model_preserved(model), attached() as handles, torch.no_grad():
        tap_pairs(model, chosen, record, handles)
        for inputs, targets in batches(data, device, progress=progress, desc="measure"):
            if per_class:
                current["classes"] = targets
                current["num_classes"] = max(current["num_classes"], int(targets.max()) + 1)
            else:
                current["classes"] = torch.zeros_like(targets)
            with explained_misfit(inputs):
                model(inputs)
    for accumulator in moments.values():
        accumulator.reduce_across_processes()
    return _table(chosen, moments, per_class)


def _table(blocks: Sequence[Block], moments: dict[str, _Moments], per_class: bool) -> pd.DataFrame:
    rows = []
    for block in blocks:
        sums = moments[block.name].sums.cpu()
        groups = range(len(sums)) if per_class else [None]
        for group in groups:
            totals = sums[group] if group is not None else sums.sum(dim=0)
            row = {"block": block.name, "position": block.position, "branch": block.branch,
                   "shortcut": block.shortcut or "identity"}
            if per_class:
                row["class"] = group
            row.update(_mean_std(totals))
            row["nonfinite"] = int(moments[block.name].nonfinite) if not per_class else None
            rows.append(row)
    columns = COLUMNS[:4] + (["class"] if per_class else []) + COLUMNS[4:]
    table = pd.DataFrame(rows, columns=columns)
    if per_class:
        table = table[table["samples"] > 0].drop(columns="nonfinite").reset_index(drop=True)
    return table


def _mean_std(totals: torch.Tensor) -> dict[str, float]:
    """Means and sample standard deviations from (count, sums..., sums of squares...)."""
    count = float(totals[0])
    q = len(QUANTITIES)
    out: dict[str, float] = {}
    for i, name in enumerate(QUANTITIES):
        total, squares = float(totals[1 + i]), float(totals[1 + q + i])
        mean = total / count if count else float("nan")
        variance = (squares - count * mean * mean) / (count - 1) if count > 1 else float("nan")
        out[name] = mean
        out[name + "_std"] = max(variance, 0.0) ** 0.5 if count > 1 else float("nan")
    out["samples"] = int(count)
    return out


def branch_means(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """Each block's branch output averaged elementwise over `data`: {block name: (C, H, W)}."""
    chosen = resolve_blocks(model, blocks)
    device = model_device(model)
    sums: dict[str, torch.Tensor] = {}
    count = torch.zeros((), dtype=torch.float64, device=device)

    def record(block: Block, branch: torch.Tensor, _shortcut: torch.Tensor) -> None:
        batch_sum = branch.double().sum(dim=0)
        sums[block.name] = sums[block.name] + batch_sum if block.name in sums else batch_sum

    with model_preserved(model), attached() as handles, torch.no_grad():
        tap_pairs(model, chosen, record, handles)
        for inputs, _targets in batches(data, device, progress=progress, desc="branch means"):
            count += len(inputs)
            model(inputs)
    distributed.sum_across(count)
    for name in sorted(sums):  # the same order in every process
        distributed.sum_across(sums[name])
    return {name: (total / count).float() for name, total in sums.items()}
