"""`measure`: how large each block's branch F(x) is next to its shortcut s(x), over a data set.

Statistics are reduced inside the hooks to per-sample scalars and summed into small float64
accumulators on the model's device (no `.item()` per batch, one transfer at the end), so memory
does not grow with the data set. Sums are what `all_reduce` needs to combine processes.

A sample is one (F(x), s(x)) pair of a block: a block module that runs k times per forward
(weights tied: `for _ in range(k): x = self.block(x)`) adds k samples per input, one per call,
each a residual addition on its own input.

A language model's sample is a sequence: with an `attention_mask` (keyword inputs), its norms
and dot product are over the positions the mask keeps (padding counts for nothing, on either
side), and a row with no real token is no sample.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Sequence

import pandas as pd
import torch
from torch import nn
from torch.utils import _pytree as pytree

from probe import distributed
from probe.batches import (Batch, InputCopies, batches, class_targets, dispatched_device, explained_misfit, input_dtype,
                           model_device)
from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError
from probe.instrument.graphs import Captured, capture
from probe.instrument.hooks import attached, model_preserved, tap_pairs
from probe.instrument.residual_stream import token_mask

# Per-sample quantities, in accumulator column order after the count.
QUANTITIES = ("branch_norm", "shortcut_norm", "ratio", "cosine")
# Columns of the table `measure` returns (documented in docs/api.md).
COLUMNS = ["block", "position", "branch", "shortcut",
           *[c for q in QUANTITIES for c in (q, q + "_std")], "samples", "nonfinite"]


class _Moments:
    """Per block and class: count, sums and sums of squares of each quantity.

    One (blocks, classes, 1 + 2q) float64 tensor for all blocks, updated once per batch, so the
    per-block work inside the hooks is only the three reductions over the activations.
    """

    def __init__(self, blocks: int, device: torch.device) -> None:
        # Normal tensors even inside the caller's torch.inference_mode(): they are summed into in
        # place where probe runs, outside it (`probe.instrument.hooks.model_preserved`).
        with torch.inference_mode(False):
            self.sums = torch.zeros(blocks, 1, 1 + 2 * len(QUANTITIES), dtype=torch.float64, device=device)
            self.nonfinite = torch.zeros(blocks, dtype=torch.float64, device=device)

    def add(self, rows: torch.Tensor, values: torch.Tensor, classes: torch.Tensor, num_classes: int,
            real: torch.Tensor | None = None) -> None:
        """values: (blocks seen, batch, quantities) for the blocks at indices `rows`; real: (batch,)
        False for a sample that is no sample (a row of padding only), None: all are."""
        finite = torch.isfinite(values).all(dim=2)  # a sample with a NaN/Inf anywhere is counted apart
        if real is not None:
            self.nonfinite.index_add_(0, rows, (~finite & real).sum(dim=1).double())
            finite &= real
        else:
            self.nonfinite.index_add_(0, rows, (~finite).sum(dim=1).double())
        values = torch.where(finite.unsqueeze(2), values, torch.zeros_like(values)).double()
        terms = torch.cat([finite.double().unsqueeze(2), values, values.square()], dim=2)
        if num_classes > self.sums.shape[1]:
            self.sums = torch.nn.functional.pad(self.sums, (0, 0, 0, num_classes - self.sums.shape[1]))
        width = self.sums.shape[1]
        index = (rows.unsqueeze(1) * width + classes.unsqueeze(0)).reshape(-1)  # (blocks seen * batch)
        self.sums.view(-1, self.sums.shape[2]).index_add_(0, index, terms.reshape(-1, terms.shape[2]))

    def reduce_across_processes(self) -> None:
        """Under torchrun: every process ends with the totals over all shards."""
        classes = distributed.max_across(self.sums.shape[1])
        if classes > self.sums.shape[1]:
            self.sums = torch.nn.functional.pad(self.sums, (0, 0, 0, classes - self.sums.shape[1]))
        distributed.sum_across(self.sums)
        distributed.sum_across(self.nonfinite)


def _flat_pair(branch: torch.Tensor, shortcut: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both as (batch, elements), in one shared element order, as views where possible: norms
    and dot products do not care about the order, so channels_last tensors are read in memory
    order (a reshape in NCHW order would copy each of them)."""
    n = len(branch)
    if (branch.dim() == 4 and not branch.is_contiguous()
            and branch.is_contiguous(memory_format=torch.channels_last)
            and shortcut.is_contiguous(memory_format=torch.channels_last)):
        return branch.permute(0, 2, 3, 1).reshape(n, -1), shortcut.permute(0, 2, 3, 1).reshape(n, -1)
    return branch.reshape(n, -1), shortcut.reshape(n, -1)


def _check_operands(block: Block, branch: torch.Tensor, shortcut: torch.Tensor) -> None:
    """F(x) and s(x) are the two operands of one addition: they have one shape. Two that differ
    were named wrongly (a spec that forgot a stage-change block's projection), not mis-fed data."""
    if branch.shape != shortcut.shape:
        hint = (f"; its shortcut is the block's input here: if the block has a projection, name it "
                f"('{block.module}={block.branch.removeprefix(block.module + '.')},PROJECTION')"
                if block.shortcut is None else "")
        raise ProbeError(f"block {block.name!r}: its branch {block.branch!r} gives shape {tuple(branch.shape)} "
                         f"but its shortcut gives {tuple(shortcut.shape)}, so they cannot be the two operands of "
                         f"its addition{hint}.")


def _real_tokens(branch: torch.Tensor, shortcut: torch.Tensor,
                 mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Both with the positions `mask` (batch, seq) leaves out set to 0 (NaN there too), where they
    are (batch, seq, ...) like it; as they are otherwise (no mask, or not per token)."""
    if mask is None or branch.dim() < 2 or branch.shape[:2] != mask.shape:
        return branch, shortcut
    dropped = ~mask.view(*mask.shape, *(1,) * (branch.dim() - 2))  # (batch, seq, 1, ...)
    return branch.masked_fill(dropped, 0), shortcut.masked_fill(dropped, 0)


def _reduction_parts(branch: torch.Tensor, shortcut: torch.Tensor,
                     mask: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Per-sample ||F||, ||s|| and F.s on flattened samples, over the positions `mask` keeps (a
    language model's real tokens; None: all): three (batch,) float32 tensors."""
    f, s = _flat_pair(*_real_tokens(branch, shortcut, mask))
    wide = torch.promote_types(torch.promote_types(f.dtype, s.dtype), torch.float32)
    # With an explicit dtype the norms accumulate bf16/fp16 activations in fp32 without an
    # upcast copy, and autocast leaves them alone. Wide inputs go without (a faster path on the CPU).
    norms = (torch.linalg.vector_norm(f, dim=1, dtype=None if f.dtype == wide else wide),
             torch.linalg.vector_norm(s, dim=1, dtype=None if s.dtype == wide else wide))
    if f.dtype == s.dtype == wide:
        # One multiply-reduce with no (batch, elements) temporary on the CPU: 4x faster there
        # than a batched matmul; on an H100 all ways ran alike in fp32.
        dot = torch.linalg.vecdot(f, s, dim=1)
    else:
        # Half precision: products in the activations' dtype, summed in fp32. On an H100
        # (ResNet-50, bf16, channels_last) measure took 1.46x a plain forward this way, 2.19x
        # upcasting both first.
        dot = (f * s).sum(dim=1, dtype=wide)
    return tuple(part.float() for part in (*norms, dot))  # float64 models too: one dtype for all blocks


def _reductions(branch: torch.Tensor, shortcut: torch.Tensor) -> torch.Tensor:
    """Per-sample (||F||, ||s||, F.s) on flattened samples: (batch, 3)."""
    return torch.stack(_reduction_parts(branch, shortcut), dim=-1)


def _quantities(reductions: torch.Tensor) -> torch.Tensor:
    """(..., 3) reductions -> (..., 4) quantities: ||F||, ||s||, ||F||/||s||, cos(F, s)."""
    f_norm, s_norm, dot = reductions.unbind(-1)
    cosine = dot / (f_norm * s_norm).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.stack([f_norm, s_norm, f_norm / s_norm, cosine], dim=-1)


def measure(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
            per_class: bool = False, progress: bool = True, graphs: bool | None = None) -> pd.DataFrame:
    """Branch and shortcut statistics of every residual block over `data`.

    Returns one row per block in forward order (with `per_class=True`, one row per block and
    class, with a `class` column; that needs integer class labels). A language model's norms are
    over the positions its `attention_mask` keeps (see the module docstring). Batches may come in any
    form `probe.batches.split_batch` knows (targets are not needed otherwise). Columns: see `COLUMNS` and docs/api.md. A block module run k
    times per forward counts k samples per input (see the module docstring).

    graphs: replay the instrumented forward from a captured graph (`probe.instrument.graphs`) for batches of
    a shape seen before. None (default): on a CUDA device outside autocast, where a forward is
    bound by launching kernels; a model that cannot be captured is measured eagerly, and one
    whose replay differs from its eager forward too, with a warning. True: also on a CPU
    (replayed as fx code: no faster, the same path as on a GPU) and in autocast; ProbeError
    when it cannot be used. False: never. A capture is checked against the eager forward on the
    batch it was captured on; replays then run the same kernels.
    """
    chosen = resolve_blocks(model, blocks, data=data)
    device = model_device(model)
    moments = _Moments(len(chosen), device)
    row_of = {block.name: row for row, block in enumerate(chosen)}
    # block row -> this batch's reductions, three (batch,) tensors per call of the block's module
    seen: dict[int, list[tuple]] = {}
    mask: list[torch.Tensor | None] = [None]  # the batch's real tokens (batch, seq), or None: every position
    copies = InputCopies()  # the model may write into its input: never into the caller's tensors

    def record(block: Block, branch: torch.Tensor, shortcut: torch.Tensor) -> None:
        _check_operands(block, branch, shortcut)
        here = mask[0] if mask[0] is None else mask[0].to(branch.device)  # a dispatched model's layers: any device
        parts = _reduction_parts(branch, shortcut, here)
        seen.setdefault(row_of[block.name], []).append(tuple(part.to(device) for part in parts))

    def eager(batch: Batch) -> list[tuple[list[int], int, torch.Tensor]]:
        """(rows, calls, (rows, 3, calls * batch) reductions) of one forward, per calls group."""
        seen.clear()
        mask[0] = token_mask(batch)  # read from the batch given: a replay's own inputs while capturing
        copies.run(model, batch)
        # One stack per group of blocks (not one per block).
        return [(rows, calls, torch.stack([part for r in rows for part in _joined(seen[r])]).view(len(rows), 3, -1))
                for calls, rows in _rows_by_calls(seen).items()]

    with model_preserved(model), attached() as handles, torch.no_grad():
        tap_pairs(model, chosen, record, handles)
        # A dispatched model's hooks move weights and activations between devices: no capture.
        replays = _Replays(eager, False if dispatched_device(model) is not None and not graphs
                           else _graphs_wanted(graphs, device))
        num_classes = 1
        for batch in batches(data, device, dtype=input_dtype(model), progress=progress, desc="measure"):
            labels = class_targets(batch) if per_class else None
            groups = replays.reductions(batch)
            if per_class and groups:
                num_classes = max(num_classes, int(labels.max()) + 1)
            classes = labels if per_class else torch.zeros(batch.size, dtype=torch.long, device=device)
            real = _real_rows(batch)
            for rows, calls, reductions in groups:  # (blocks, 3, calls * batch) -> (.., 3)
                moments.add(torch.tensor(rows, device=device), _quantities(reductions.transpose(1, 2)),
                            classes.repeat(calls) if calls > 1 else classes, num_classes,
                            real.repeat(calls) if real is not None and calls > 1 else real)
    moments.reduce_across_processes()
    return _table(chosen, moments, per_class)


def _real_rows(batch: Batch) -> torch.Tensor | None:
    """(batch,) bool: the rows with at least one real token; None without an attention mask."""
    mask = token_mask(batch)
    return None if mask is None else mask.any(dim=1)


def _graphs_wanted(graphs: bool | None, device: torch.device) -> bool | None:
    """True (asked for), None (use them if they work), False (not here, or not asked for)."""
    if graphs not in (None, True, False):
        raise ProbeError(f"graphs must be True, False or None (on a GPU outside autocast), got {graphs!r}.")
    if graphs is None:  # autocast's weight cache and a capture do not mix: only when asked for
        return None if device.type == "cuda" and not torch.is_autocast_enabled("cuda") else False
    return graphs


class _Replays:
    """Per batch shape: the eager forward for its first two batches, a replay from then on.

    The second batch of a shape is also captured, and its replay checked against its eager
    numbers. A model whose forward cannot be captured, or whose replay differs, is measured
    eagerly for the rest of the call (a replay that differs also warns: the model's Python does
    more than its shapes say); a ProbeError when graphs were asked for. Only batches whose
    inputs are tensors, in a model whose blocks each run once per forward; at most
    `MAX_CAPTURED` shapes per call, as each graph keeps a forward's activations on the GPU.
    """

    MAX_CAPTURED = 2

    def __init__(self, eager: Callable[[Batch], list], wanted: bool | None) -> None:
        self.eager, self.wanted = eager, wanted
        self.seen_shapes: dict[tuple, int] = {}
        self.captured: dict[tuple, tuple[Captured, list[int]]] = {}

    def reductions(self, batch: Batch) -> list[tuple[list[int], int, torch.Tensor]]:
        if self.wanted is False:
            return self._eager(batch)
        leaves, spec = pytree.tree_flatten(batch.inputs)
        if not all(isinstance(leaf, torch.Tensor) for leaf in leaves):
            self._off(f"batch {batch.number}'s inputs are not all tensors ({batch.describe()})")
            return self._eager(batch)
        key = (spec, *((tuple(leaf.shape), leaf.stride(), leaf.dtype) for leaf in leaves))
        if key in self.captured:
            captured, rows = self.captured[key]
            return [(rows, 1, captured.run(*leaves))]
        groups = self._eager(batch)
        self.seen_shapes[key] = self.seen_shapes.get(key, 0) + 1
        if self.seen_shapes[key] == 2 and len(self.captured) < self.MAX_CAPTURED:  # a shape that comes back
            self._capture(key, batch, spec, leaves, groups)
        return groups

    def _eager(self, batch: Batch) -> list:
        with explained_misfit(batch):  # data the model cannot take: one line saying so
            return self.eager(batch)

    def _capture(self, key: tuple, batch: Batch, spec, leaves: list, groups: list) -> None:
        if len(groups) != 1 or groups[0][1] != 1:
            self._off("a block module runs more than once per forward")
            return
        rows, _, expected = groups[0]

        def forward(*values: torch.Tensor) -> torch.Tensor:
            (_, _, stacked), = self.eager(dataclasses.replace(batch, inputs=pytree.tree_unflatten(list(values), spec)))
            return stacked

        try:
            captured = capture(forward, *leaves)
            replayed = captured.run(*leaves)
        except ProbeError:
            raise
        except Exception as error:  # a forward that syncs with the host, an op capture does not allow
            text = (str(error).strip().splitlines() or [""])[0][:200]
            self._off(f"its forward cannot be captured ({type(error).__name__}: {text})")
            return
        # The same kernels on the same input: equal up to rounding, at the scale of the largest
        # reduction (a dot product near zero next to large norms); NaN where the sample had NaN.
        scale = float(expected.nan_to_num(0.0, 0.0, 0.0).abs().max())
        if replayed.shape != expected.shape or not torch.allclose(replayed, expected, rtol=1e-4,
                                                                  atol=1e-5 * scale + 1e-12, equal_nan=True):
            self._off("a replay of its forward differs from the forward itself (Python code that depends "
                      "on more than the input shapes?)", warn=True)
            return
        self.captured[key] = (captured, rows)

    def _off(self, reason: str, *, warn: bool = False) -> None:
        """Eager from here on; ProbeError when graphs were asked for, a warning when `warn`."""
        if self.wanted:
            raise ProbeError(f"measure: graphs=True, but {reason}; use graphs=None or False.")
        if warn:  # from _capture, under reductions, under measure: the warning names measure's caller
            warnings.warn(f"measure: no graph replay for this model: {reason}; measured eagerly.", stacklevel=5)
        self.wanted, self.captured = False, {}


def _rows_by_calls(seen: dict[int, list[tuple]]) -> dict[int, list[int]]:
    """Block rows grouped by how often their module ran in this forward (almost always once)."""
    groups: dict[int, list[int]] = {}
    for row in sorted(seen):
        groups.setdefault(len(seen[row]), []).append(row)
    return groups


def _joined(calls: list[tuple]) -> tuple:
    """One block's reductions over all calls of its module: three (calls * batch,) tensors."""
    return calls[0] if len(calls) == 1 else tuple(torch.cat(part) for part in zip(*calls))


def _table(blocks: Sequence[Block], moments: _Moments, per_class: bool) -> pd.DataFrame:
    sums, nonfinite = moments.sums.cpu(), moments.nonfinite.cpu()  # (blocks, classes, 1 + 2q)
    if not per_class:
        sums = sums.sum(dim=1, keepdim=True)
    classes = sums.shape[1]
    columns: dict[str, object] = {
        "block": [b.name for b in blocks for _ in range(classes)],
        "position": [b.position for b in blocks for _ in range(classes)],
        "branch": [b.branch for b in blocks for _ in range(classes)],
        "shortcut": [b.shortcut or "identity" for b in blocks for _ in range(classes)],
    }
    if per_class:
        columns["class"] = list(range(classes)) * len(blocks)
    columns.update(_mean_std(sums.reshape(-1, sums.shape[2])))
    if not per_class:
        columns["nonfinite"] = nonfinite.long().numpy()
    table = pd.DataFrame(columns)  # one construction: assigning column by column costs ms
    if per_class:
        table = table[table["samples"] > 0].reset_index(drop=True)
    return table


def _mean_std(totals: torch.Tensor) -> dict[str, object]:
    """Means and sample standard deviations from rows of (count, sums..., sums of squares...)."""
    count = totals[:, 0]
    q = len(QUANTITIES)
    out: dict[str, object] = {}
    for i, name in enumerate(QUANTITIES):
        total, squares = totals[:, 1 + i], totals[:, 1 + q + i]
        mean = total / count  # nan where nothing was counted
        variance = (squares - count * mean * mean) / (count - 1)
        std = torch.where(count > 1, variance.clamp_min(0).sqrt(), torch.nan)
        out[name], out[name + "_std"] = mean.numpy(), std.numpy()
    out["samples"] = count.long().numpy()
    return out


def branch_means(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
                 progress: bool = True) -> dict[str, torch.Tensor]:
    """Each block's branch output averaged elementwise over `data`: {block name: (C, H, W)}.

    The mean is over every call of the block's module (twice per input for a module run twice).
    A language model's branch (batch, seq, hidden) is averaged per position over the sequences
    whose attention mask keeps that position: padding counts for nothing (a position no sequence
    reaches averages to 0).
    """
    chosen = resolve_blocks(model, blocks, data=data)
    device = model_device(model)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, torch.Tensor] = {}  # how many outputs were summed, per block (per position with a mask)
    mask: list[torch.Tensor | None] = [None]  # the batch's real tokens (batch, seq), or None: every position

    def record(block: Block, branch: torch.Tensor, _shortcut: torch.Tensor) -> None:
        kept = mask[0]
        if kept is not None and branch.dim() >= 2 and branch.shape[:2] == kept.shape:
            real = kept.to(branch.device).view(*kept.shape, *(1,) * (branch.dim() - 2))  # (batch, seq, 1, ...)
            batch_sum = branch.double().masked_fill(~real, 0).sum(dim=0)
            count = real.double().sum(dim=0).expand_as(batch_sum).contiguous()
        else:
            batch_sum = branch.double().sum(dim=0)
            count = torch.full_like(batch_sum, float(len(branch)))
        sums[block.name] = sums[block.name] + batch_sum if block.name in sums else batch_sum
        counts[block.name] = counts[block.name] + count if block.name in counts else count

    copies = InputCopies()  # the model may write into its input: never into the caller's tensors
    with model_preserved(model), attached() as handles, torch.no_grad():
        tap_pairs(model, chosen, record, handles)
        for batch in batches(data, device, dtype=input_dtype(model), progress=progress, desc="branch means"):
            mask[0] = token_mask(batch)
            with explained_misfit(batch):
                copies.run(model, batch)
    names = sorted(sums)  # the same order in every process
    for name in names:
        distributed.sum_across(sums[name])
        distributed.sum_across(counts[name])
    return {name: (sums[name] / counts[name].clamp(min=1)).float() for name in sums}
