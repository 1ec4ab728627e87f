"""The layer-pruning literature's questions, asked of a causal language model's layers and sublayers.

    python -m analyses.lm --model hf:PATH --out runs/lm

A decoder layer adds two branches to the residual stream (attention, then the MLP: two of probe's
blocks, `model.layers.3[self_attn]` and `model.layers.3[mlp]`); a layer is deleted by deleting
both (`probe.discovery.layers.group_layers`). Papers that prune whole layers ask:

1. **Block influence** (ShortGPT, Men et al. 2024): BI = 1 - cos(h_in, h_out), the cosine between
   the residual stream entering and leaving a layer, per token over the hidden dimension,
   averaged over every real token (attention mask 1) of every sequence. Low BI: the layer barely
   turns the stream, and ShortGPT deletes it. The same per sublayer (its shortcut s(x) against
   s(x) + F(x)), and the angular distance arccos(cos) / pi next to it.
2. **Spans** (Gromov et al. 2024, "The unreasonable ineffectiveness of the deeper layers"): for
   each span length n, the angular distance between the stream entering layer l and the stream
   entering layer l + n (the last layer's output for l + n = L), for every l; their pick is the
   span with the smallest distance. Deleting it is compared with the best span of that length by
   the measured loss (every span evaluated).
3. **Greedy deletion** (SLEB, Song et al. 2024): delete the layer whose removal, together with
   those already removed, gives the lowest loss; re-score every remaining layer after each
   removal. Compared with two one-shot orders: by the single-layer loss increase, and by block
   influence (lowest first), as perplexity curves over the k layers deleted.
4. **Cheap scores against the measured loss**: Spearman's rank correlation of block influence,
   single-layer angular distance (and the per-block ratio ||F(x)|| / ||s(x)|| of a per-block
   table) with the measured loss increase of deleting the layer (or sublayer) alone, with a
   seeded bootstrap interval over the layers.
5. **Logit lens** (nostalgebraist 2020): the model's final norm and unembedding applied to the
   residual stream after each layer: the next-token loss it would give, and how often its top-1
   token is the model's own final prediction.
6. **The finding** (`depth_finding`): do the deep layers other than the last have lower block
   influence, and cost less to delete, than the early ones? One sentence, with the numbers.

Deleting means mode "zero" (a branch's output replaced by zeros: the layer passes its input on).
Every loss is the `lm` task's (`probe.scoring.tasks.LanguageModeling`): mean next-token NLL per token over
the predicted positions, padding excluded through the attention mask. The stream statistics are
reduced inside forward hooks, batch by batch: memory does not grow with the number of sequences.
The data must be re-iterable (a DataLoader or a list): every evaluation passes over it again.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from scipy import stats
from torch import nn
from torch.utils import _pytree as pytree

from analyses.uncertainty import check_bootstrap
from probe.batches import Batch, batches, explained_misfit, input_dtype, model_device
from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError
from probe.deletion.evaluation import evaluate_ablations
from probe.instrument.hooks import attached, model_preserved, tap_pairs
from probe.discovery.layers import group_layers, layer_stack
from probe.scoring.results import Outcome
from probe.deletion.block_table import check_table
from probe.scoring.tasks import LanguageModeling
from probe.scoring.verdict import cost_column, per_token, rank_correlation

__all__ = ["LMResult", "best_spans", "depth_finding", "final_norm", "greedy_deletion", "layer_similarity",
           "lens_parts", "lm_layers", "logit_lens", "residual_angles", "score_agreement", "single_deletions",
           "span_losses", "span_summary"]

LM = LanguageModeling()
ORDERS = ("greedy", "single_loss", "block_influence")

SIMILARITY_COLUMNS = ["kind", "unit", "layer", "layer_index", "sublayer", "position", "block_influence",
                      "angular_distance", "tokens"]
DELETION_COLUMNS = ["kind", "unit", "loss", "perplexity", "token_accuracy", "loss_increase", "loss_increase_se"]
ANGLE_COLUMNS = ["start", "n", "end", "first_layer", "last_layer", "angle", "tokens"]
SPAN_LOSS_COLUMNS = ["n", "start", "first_layer", "last_layer", "angle", "loss", "perplexity", "loss_increase",
                     "loss_increase_se", "by_angle", "by_loss"]
SPAN_COLUMNS = ["n", "spans", "start_by_angle", "angle", "loss_by_angle", "perplexity_by_angle", "start_by_loss",
                "angle_by_loss", "loss_by_loss", "perplexity_by_loss", "same_span", "baseline_loss",
                "baseline_perplexity"]
GREEDY_COLUMNS = ["order", "k", "removed", "layers", "loss", "perplexity", "token_accuracy", "loss_increase"]
AGREEMENT_COLUMNS = ["kind", "score", "spearman", "low", "high", "level", "resamples", "units"]
LENS_COLUMNS = ["stream", "layer_index", "loss", "perplexity", "token_accuracy", "agreement", "tokens"]


@dataclass
class LMResult:
    """What `lm_layers` found; every table's columns:

    layers: one row per layer (kind "layer") and per sublayer (kind "sublayer", one of probe's
        blocks): kind, unit (the layer's name, e.g. "model.layers.3", or the block's,
        "model.layers.3[mlp]"), layer (the layer's name), layer_index (0-based, forward order),
        sublayer (the bracketed part of a block's name, "self_attn", "mlp"; "" for a layer),
        position (the block's forward position; a layer's first block's), block_influence (mean
        over real tokens of 1 - cos(stream in, stream out)), angular_distance (mean of
        arccos(cos) / pi), tokens (real tokens averaged over), and what deleting the unit alone
        does (`probe.scoring.tasks.LanguageModeling`): loss (mean NLL per token), perplexity,
        token_accuracy, loss_increase (over the intact model), loss_increase_se (its standard
        error, from the paired per-sequence differences), ratio (||F(x)|| / ||s(x)|| of a
        sublayer, from the per-block table when it has it; NaN otherwise).
    spans: one row per span length n (`span_summary`).
    span_losses: one row per span of n consecutive layers (`span_losses`).
    greedy: one row per (order, k) (`greedy_deletion`).
    agreement: one row per (kind, cheap score) (`score_agreement`).
    lens: one row per stream: the embeddings and the output of each layer (`logit_lens`); empty
        when the lens does not apply (`notes["lens"]` says why).
    finding: one sentence (`depth_finding`).
    notes: {part: why it is empty, or what to keep in mind}.
    """

    layers: pd.DataFrame
    spans: pd.DataFrame
    span_losses: pd.DataFrame
    greedy: pd.DataFrame
    agreement: pd.DataFrame
    lens: pd.DataFrame
    finding: str
    notes: dict[str, str] = field(default_factory=dict)

    def tables(self) -> dict[str, pd.DataFrame]:
        """{CSV name: table} of every table (probe.files.write_tables writes them)."""
        return {"lm_layers": self.layers, "lm_spans": self.spans, "lm_span_losses": self.span_losses,
                "lm_greedy": self.greedy, "lm_agreement": self.agreement, "lm_logit_lens": self.lens}


# --- the layers ---------------------------------------------------------------------------------


@dataclass
class _Stack:
    """The model's layers in forward order, their blocks and modules."""

    names: list[str]
    blocks: dict[str, list[Block]]
    modules: list[nn.Module]

    @property
    def every_block(self) -> list[Block]:
        return [block for name in self.names for block in self.blocks[name]]


def _example(model: nn.Module, data: Iterable) -> object:
    """The first sequence of the data's first batch: the example discovery runs the model on."""
    batch = next(iter(batches(data, model_device(model), dtype=input_dtype(model))))
    return pytree.tree_map(lambda t: t[:1] if isinstance(t, torch.Tensor) and t.dim() else t, batch.inputs)


def _stack(model: nn.Module, data: Iterable, blocks: Sequence[str | Block] | None) -> _Stack:
    """The layers holding `blocks` (discovered on the data's first sequence when None or names:
    torch.fx cannot trace Hugging Face models)."""
    needs_discovery = blocks is None or any(not isinstance(b, Block) for b in blocks)
    example = _example(model, data) if needs_discovery else None
    chosen = resolve_blocks(model, blocks, example_input=example)
    groups = group_layers(model, chosen)
    names = list(groups)
    if not names:
        raise ProbeError("the model has no residual block: there are no layers to analyse.")
    if layer_stack(model, names) is None:
        raise ProbeError(f"the layers {names[:4]}... are not the consecutive elements of one ModuleList: the "
                         "lm analysis needs a stack of decoder layers (model.layers.0, model.layers.1, ...).")
    return _Stack(names, groups, [model.get_submodule(name) for name in names])


def _sublayer(block: Block) -> str:
    """The sublayer a block's name gives ("self_attn" of "model.layers.3[self_attn]"); "" when none."""
    found = re.search(r"\[([^\]]+)\]$", block.name)
    return found.group(1) if found else ""


# --- one pass over the data, reduced inside hooks -------------------------------------------------


def _hidden_in(args: tuple, kwargs: dict) -> torch.Tensor:
    """A decoder layer's input hidden states: its first positional argument, or `hidden_states=`."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    raise ProbeError("a decoder layer was called without its hidden states as first argument or hidden_states=; "
                     "the lm analysis cannot see the residual stream entering it.")


def _hidden_out(output: object) -> torch.Tensor:
    """A decoder layer's output hidden states: the tensor, or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ProbeError(f"a decoder layer returned a {type(output).__name__}; the lm analysis needs its hidden states "
                     "(a tensor, or a tuple whose first item is one).")


def _mask(batch: Batch) -> torch.Tensor | None:
    """The real tokens of a batch, (batch, seq) bool: its attention mask; None: every position."""
    mask = batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def _rows(hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """A copy of the real tokens' hidden states, (tokens, hidden), in the model's dtype."""
    if hidden.dim() != 3:
        raise ProbeError(f"the lm analysis needs hidden states of shape (batch, seq, hidden); a layer gave "
                         f"{tuple(hidden.shape)}.")
    hidden = hidden.detach()
    if mask is not None and mask.shape == hidden.shape[:2]:
        return hidden[mask]  # boolean indexing copies
    return hidden.reshape(-1, hidden.shape[-1]).clone()


# Elements of float64 temporaries at a time (256 MB): cosines are computed in float64, whose
# 1 - cos keeps its digits for nearly parallel vectors, over chunks of tokens.
_CHUNK_ELEMENTS = 2 ** 25


def _unit64(rows: torch.Tensor) -> torch.Tensor:
    rows = rows.double()
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)


def _cos_terms(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(sum of 1 - cos, sum of arccos(cos) / pi) over the tokens of two (tokens, hidden) row sets."""
    terms = torch.zeros(2, dtype=torch.float64, device=a.device)
    step = max(1, _CHUNK_ELEMENTS // max(1, a.shape[-1]))
    for start in range(0, len(a), step):
        cos = (_unit64(a[start:start + step]) * _unit64(b[start:start + step])).sum(dim=-1).clamp(-1.0, 1.0)
        terms += torch.stack([(1.0 - cos).sum(), (torch.arccos(cos) / math.pi).sum()])
    return terms


def _span_angles(streams: list[torch.Tensor], sums: torch.Tensor) -> None:
    """Add to sums[j, m] the summed arccos(cos) / pi between streams j < m, per token."""
    count = len(streams)
    step = max(1, _CHUNK_ELEMENTS // max(1, count * streams[0].shape[-1]))
    for start in range(0, len(streams[0]), step):
        units = torch.stack([_unit64(stream[start:start + step]) for stream in streams])  # (L + 1, chunk, hidden)
        for n in range(1, count):
            cos = (units[:-n] * units[n:]).sum(dim=-1).clamp(-1.0, 1.0)  # (L + 1 - n, chunk)
            index = torch.arange(count - n, device=sums.device)
            sums[index, index + n] += (torch.arccos(cos) / math.pi).sum(dim=1)


@dataclass
class _Sums:
    """What one pass accumulated (float64, on the model's device)."""

    tokens: float
    layers: torch.Tensor  # (L, 2): 1 - cos, angle of each layer's input and output
    blocks: dict[str, torch.Tensor]  # block name -> (2,)
    angles: torch.Tensor | None  # (L + 1, L + 1): [j, m] angle between the streams entering j and m
    lens: torch.Tensor | None  # (L + 1, 4): loss, units, correct, agreeing with the final prediction


def _stream_pass(model: nn.Module, data: Iterable, stack: _Stack, *, sublayers: bool = True, angles: bool = False,
                 lens: tuple[nn.Module, nn.Module] | None = None, progress: bool = False) -> _Sums:
    """One pass over the data with hooks on every layer (and, `sublayers`, every block).

    Per batch the hooks reduce what they see to sums: each layer's 1 - cos and angle between its
    input and output; with `angles`, the angle between the streams entering every two layers j < m
    (stream L: the last layer's output), which needs the L + 1 streams of one batch at once; with
    `lens` = (final norm, unembedding), the lm score of the lens on the stream entering layer 0
    and after each layer, and its top-1 agreement with the model's prediction.
    """
    device = model_device(model)
    count = len(stack.names)
    layer_sums = torch.zeros(count, 2, dtype=torch.float64, device=device)
    block_sums = {block.name: torch.zeros(2, dtype=torch.float64, device=device) for block in stack.every_block}
    angle_sums = torch.zeros(count + 1, count + 1, dtype=torch.float64, device=device) if angles else None
    lens_sums = torch.zeros(count + 1, 4, dtype=torch.float64, device=device) if lens is not None else None
    tokens = torch.zeros((), dtype=torch.float64, device=device)
    state: dict = {}

    def lens_row(row: int, hidden: torch.Tensor) -> None:
        norm, unembed = lens
        scores = LM.score(unembed(norm(hidden)), state["batch"])
        lens_sums[row, 0] += scores.loss.sum()
        lens_sums[row, 1] += scores.weight.double().sum()
        lens_sums[row, 2] += scores.correct.double().sum()
        state["predictions"][row] = scores.prediction

    def enter(index: int, args: tuple, kwargs: dict) -> None:
        if index in state["seen"]:
            raise ProbeError(f"layer {stack.names[index]} ran twice in one forward; the lm analysis needs each "
                             "layer to run once (a stack of distinct layers).")
        hidden = _hidden_in(args, kwargs)
        rows = _rows(hidden, state["mask"])
        state["seen"].add(index)
        state["inputs"][index] = rows
        state["tokens"] = len(rows)
        if angles:
            state["streams"][index] = rows
        if lens is not None and index == 0:
            lens_row(0, hidden)

    def leave(index: int, output: object) -> None:
        hidden = _hidden_out(output)
        rows = _rows(hidden, state["mask"])
        layer_sums[index] += _cos_terms(state["inputs"].pop(index), rows)
        if angles and index == count - 1:
            state["streams"][count] = rows
        if lens is not None:
            lens_row(index + 1, hidden)

    def record(block: Block, branch: torch.Tensor, shortcut: torch.Tensor) -> None:
        if not isinstance(branch, torch.Tensor) or not isinstance(shortcut, torch.Tensor):
            raise ProbeError(f"block {block.name!r}: its branch or shortcut is not a tensor; the lm analysis "
                             "cannot compare the stream before and after it.")
        mask = state["mask"]
        block_sums[block.name] += _cos_terms(_rows(shortcut, mask), _rows(shortcut.float() + branch.float(), mask))

    with model_preserved(model), attached() as handles, torch.no_grad():
        if sublayers:
            tap_pairs(model, stack.every_block, record, handles)
        for index, module in enumerate(stack.modules):
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, index=index: enter(index, args, kwargs), with_kwargs=True))
            handles.append(module.register_forward_hook(lambda _m, _a, output, index=index: leave(index, output)))
        for batch in batches(data, device, dtype=input_dtype(model), progress=progress, desc="layer streams"):
            state.update(batch=batch, mask=_mask(batch), seen=set(), inputs={}, streams={}, predictions={})
            with explained_misfit(batch):
                outputs = batch.run(model)
            if len(state["seen"]) != count or state["inputs"]:
                missing = [stack.names[i] for i in range(count) if i not in state["seen"] or i in state["inputs"]]
                raise ProbeError(f"the layers {missing[:3]} did not run in a forward; the lm analysis needs every "
                                 "layer to run once per forward.")
            tokens += state["tokens"]
            if angles:
                _span_angles([state["streams"][j] for j in range(count + 1)], angle_sums)
            if lens is not None:
                final = LM.score(outputs, batch).prediction
                valid = final != -1
                for row, prediction in state["predictions"].items():
                    lens_sums[row, 3] += ((prediction == final) & valid).sum().double()
            state.clear()
    total = float(tokens)
    return _Sums(tokens=total, layers=layer_sums, blocks=block_sums, angles=angle_sums, lens=lens_sums)


def _similarity_table(stack: _Stack, sums: _Sums) -> pd.DataFrame:
    total = max(sums.tokens, 1.0)
    rows = []
    for index, name in enumerate(stack.names):
        influence, angle = (sums.layers[index] / total).tolist()
        rows.append({"kind": "layer", "unit": name, "layer": name, "layer_index": index, "sublayer": "",
                     "position": stack.blocks[name][0].position, "block_influence": influence,
                     "angular_distance": angle, "tokens": int(sums.tokens)})
        for block in stack.blocks[name]:
            influence, angle = (sums.blocks[block.name] / total).tolist() if block.name in sums.blocks else (
                float("nan"), float("nan"))
            rows.append({"kind": "sublayer", "unit": block.name, "layer": name, "layer_index": index,
                         "sublayer": _sublayer(block), "position": block.position, "block_influence": influence,
                         "angular_distance": angle, "tokens": int(sums.tokens)})
    return pd.DataFrame(rows, columns=SIMILARITY_COLUMNS)


def _angle_table(stack: _Stack, sums: _Sums) -> pd.DataFrame:
    total = max(sums.tokens, 1.0)
    count = len(stack.names)
    grid = (sums.angles / total).tolist()
    rows = [{"start": start, "n": n, "end": start + n, "first_layer": stack.names[start],
             "last_layer": stack.names[start + n - 1], "angle": grid[start][start + n], "tokens": int(sums.tokens)}
            for n in range(1, count + 1) for start in range(count + 1 - n)]
    return pd.DataFrame(rows, columns=ANGLE_COLUMNS)


def layer_similarity(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
                     progress: bool = False) -> pd.DataFrame:
    """ShortGPT's block influence of every layer and every sublayer, in one pass over the data.

    Columns: kind ("layer" or "sublayer"), unit (the layer's or the block's name), layer,
    layer_index (0-based), sublayer ("self_attn", "mlp", ...; "" for a layer), position (forward
    position of the block; a layer's first block's), block_influence (1 - cos of the stream
    entering and leaving the unit, per token over the hidden dimension, averaged over every real
    token: attention mask 1), angular_distance (arccos(cos) / pi, averaged alike), tokens.
    A layer's stream is its input and output hidden states (forward hooks on the layer module);
    a sublayer's, its shortcut s(x) and s(x) + F(x) at its residual addition.
    blocks: the blocks (names or Blocks); discovered on the data's first sequence when None.
    """
    stack = _stack(model, data, blocks)
    return _similarity_table(stack, _stream_pass(model, data, stack, progress=progress))


def residual_angles(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
                    progress: bool = False) -> pd.DataFrame:
    """Gromov et al.'s angular distance between the residual stream entering layer `start` and the
    one entering layer `start + n` (the last layer's output when that is L), for every span.

    Columns: start (0-based index of the span's first layer), n (layers in the span), end
    (start + n), first_layer, last_layer (names of the span's first and last layers), angle (mean
    over real tokens of arccos(cos(x_start, x_end)) / pi, in [0, 1]), tokens.
    """
    stack = _stack(model, data, blocks)
    return _angle_table(stack, _stream_pass(model, data, stack, sublayers=False, angles=True, progress=progress))


# --- deletions ------------------------------------------------------------------------------------


class _Deletions:
    """Outcomes of deleting sets of units (layers or blocks), evaluated once each: a set asked for
    again (the single layers in the spans, the greedy search and the one-shot orders) is reused."""

    def __init__(self, model: nn.Module, data: Iterable, stack: _Stack, progress: bool) -> None:
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


def _check_lm_table(table: pd.DataFrame, model: nn.Module, stack: _Stack) -> pd.DataFrame:
    if isinstance(table, pd.DataFrame) and (cost_column(table) != "loss_increase" or not per_token(table)):
        raise ProbeError("the lm analysis needs a per-block table of the lm task (loss, perplexity, loss_increase); "
                         f"this one has {list(table.columns)}. Build it with probe.block_table(..., task='lm').")
    return check_table(table, ["block", "position", "loss", "loss_increase"], "the lm analysis", model,
                       blocks=stack.every_block)


def _single_deletions(deletions: _Deletions, stack: _Stack, table: pd.DataFrame | None) -> pd.DataFrame:
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


def single_deletions(model: nn.Module, data: Iterable, table: pd.DataFrame | None = None, *,
                     blocks: Sequence[str | Block] | None = None, progress: bool = False) -> pd.DataFrame:
    """What deleting each layer alone (both its blocks) and each sublayer alone costs.

    Columns: kind ("layer" or "sublayer"), unit (name), loss (mean NLL per token), perplexity,
    token_accuracy, loss_increase (over the intact model), loss_increase_se. table: a per-block
    table of the lm task (`probe.block_table(..., task="lm")`), whose rows are used for the
    sublayers instead of evaluating them again; `attrs["baseline"]` holds the intact model's
    numbers (`probe.scoring.tasks.LanguageModeling.metrics`).
    """
    stack = _stack(model, data, blocks)
    table = _check_lm_table(table, model, stack) if table is not None else None
    deletions = _Deletions(model, data, stack, progress)
    result = _single_deletions(deletions, stack, table)
    result.attrs["baseline"] = LM.metrics(deletions.baseline)
    return result


def _check_spans(spans: Iterable[int] | None, count: int) -> list[int]:
    if spans is None:
        return list(range(1, count))
    chosen = sorted(set(spans))
    bad = [n for n in chosen if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= count]
    if bad:
        raise ProbeError(f"span lengths {bad} are not between 1 and the number of layers ({count}).")
    return [int(n) for n in chosen]


def _span_losses(deletions: _Deletions, stack: _Stack, angles: pd.DataFrame, spans: list[int]) -> pd.DataFrame:
    count = len(stack.names)
    candidates = [(n, start) for n in spans for start in range(count + 1 - n)]
    outcomes = deletions.outcomes([stack.names[start:start + n] for n, start in candidates])
    angle = angles.set_index(["n", "start"])["angle"]
    rows = [{"n": n, "start": start, "first_layer": stack.names[start], "last_layer": stack.names[start + n - 1],
             "angle": float(angle.get((n, start), float("nan"))), **deletions.row(outcome)}
            for (n, start), outcome in zip(candidates, outcomes)]
    table = pd.DataFrame(rows, columns=[c for c in SPAN_LOSS_COLUMNS if c not in ("by_angle", "by_loss")])
    table["by_angle"] = False
    table["by_loss"] = False
    for _, group in table.groupby("n", sort=True):
        # The first (earliest) span wins a tie, in both picks.
        table.loc[group["angle"].idxmin() if group["angle"].notna().any() else group.index[0], "by_angle"] = True
        table.loc[group["loss"].idxmin(), "by_loss"] = True
    table.attrs["baseline"] = LM.metrics(deletions.baseline)
    return table[SPAN_LOSS_COLUMNS]


def span_losses(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
                spans: Iterable[int] | None = None, angles: pd.DataFrame | None = None,
                progress: bool = False) -> pd.DataFrame:
    """Every span of n consecutive layers deleted together, with its angular distance.

    Columns: n, start (0-based index of its first layer), first_layer, last_layer, angle (the
    angular distance between the streams entering layer start and layer start + n:
    `residual_angles`), loss, perplexity, loss_increase, loss_increase_se (deleting the span's
    layers together), by_angle (Gromov et al.'s pick for this n: the smallest angle), by_loss
    (the span whose deletion costs least); ties go to the earliest span. spans: the lengths n
    (default 1..L-1); angles: `residual_angles` already computed (one pass is saved). All spans
    are evaluated in one `probe.evaluate_ablations` call (one pass over the data).
    `attrs["baseline"]`: the intact model's numbers.
    """
    stack = _stack(model, data, blocks)
    if angles is None:
        angles = _angle_table(stack, _stream_pass(model, data, stack, sublayers=False, angles=True,
                                                  progress=progress))
    return _span_losses(_Deletions(model, data, stack, progress), stack, angles,
                        _check_spans(spans, len(stack.names)))


def span_summary(spans: pd.DataFrame) -> pd.DataFrame:
    """One row per span length n of a `span_losses` table: Gromov et al.'s pick against the best.

    Columns: n, spans (how many spans of that length), start_by_angle (first layer index of the
    span with the smallest angular distance), angle (its distance), loss_by_angle,
    perplexity_by_angle (deleting it), start_by_loss (the span whose deletion costs least),
    angle_by_loss (its distance), loss_by_loss, perplexity_by_loss, same_span (both picks agree),
    baseline_loss, baseline_perplexity (the intact model, from `attrs["baseline"]`; NaN without:
    output columns, so the CSV keeps them). `attrs["baseline"]` is the spans table's.
    """
    baseline = spans.attrs.get("baseline", {})
    rows = []
    for n, group in spans.groupby("n", sort=True):
        angle = group[group["by_angle"].astype(bool)].iloc[0]
        loss = group[group["by_loss"].astype(bool)].iloc[0]
        rows.append({"n": int(n), "spans": len(group), "start_by_angle": int(angle["start"]),
                     "angle": angle["angle"], "loss_by_angle": angle["loss"],
                     "perplexity_by_angle": angle["perplexity"], "start_by_loss": int(loss["start"]),
                     "angle_by_loss": loss["angle"], "loss_by_loss": loss["loss"],
                     "perplexity_by_loss": loss["perplexity"], "same_span": int(angle["start"]) == int(loss["start"]),
                     "baseline_loss": baseline.get("loss", float("nan")),
                     "baseline_perplexity": baseline.get("perplexity", float("nan"))})
    summary = pd.DataFrame(rows, columns=SPAN_COLUMNS)
    summary.attrs["baseline"] = dict(baseline)
    return summary


def best_spans(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
               spans: Iterable[int] | None = None, angles: pd.DataFrame | None = None,
               progress: bool = False) -> pd.DataFrame:
    """For each span length n, the span Gromov et al. would delete (smallest angular distance)
    against the span whose deletion really costs least: `span_summary(span_losses(...))`."""
    return span_summary(span_losses(model, data, blocks=blocks, spans=spans, angles=angles, progress=progress))


def _check_steps(steps: int | None, count: int) -> int:
    if steps is None:
        return max(1, count // 2)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or not 1 <= steps <= count:
        raise ProbeError(f"greedy steps must be between 1 and the number of layers ({count}), got {steps!r}.")
    return int(steps)


def _greedy(deletions: _Deletions, stack: _Stack, steps: int, layers: pd.DataFrame) -> pd.DataFrame:
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
        outcomes = deletions.outcomes([[*removed, name] for name in remaining])
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
                    steps: int | None = None, layers: pd.DataFrame | None = None,
                    progress: bool = False) -> pd.DataFrame:
    """SLEB's greedy layer deletion against two one-shot orders, as loss and perplexity curves.

    greedy: at step k, every remaining layer is deleted together with the k - 1 already removed
    (one evaluation pass per step) and the one giving the lowest loss is removed. single_loss:
    the layers ranked once by their single-layer loss increase, smallest first; block_influence:
    ranked once by block influence, lowest first (ShortGPT). steps: how many layers to remove
    (default: half of them). layers: the `lm_layers` per-unit table (block_influence and
    loss_increase of each layer), computed here when None.

    Columns: order ("greedy", "single_loss", "block_influence"), k (layers deleted; 0: the intact
    model), removed (the layer removed at step k; "" at k = 0), layers (every layer removed so
    far, space-separated), loss (mean NLL per token), perplexity, token_accuracy, loss_increase
    (over the intact model). `attrs["baseline"]`: the intact model's numbers.
    """
    stack = _stack(model, data, blocks)
    steps = _check_steps(steps, len(stack.names))
    deletions = _Deletions(model, data, stack, progress)
    if layers is None:
        similarity = _similarity_table(stack, _stream_pass(model, data, stack, sublayers=False, progress=progress))
        layers = similarity.merge(_single_deletions(deletions, stack, None), on=["kind", "unit"])
    return _greedy(deletions, stack, steps, layers)


# --- cheap scores against the measured loss -------------------------------------------------------


def _bootstrap_spearman(x: np.ndarray, y: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Spearman's rho of every resample (rows of `index`); NaN where a resample is constant."""
    rx = stats.rankdata(x[index], axis=1)
    ry = stats.rankdata(y[index], axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(axis=1) / denominator
    rho[denominator < 1e-12] = np.nan
    return rho


def score_agreement(layers: pd.DataFrame, *, resamples: int = 1000, level: float = 0.95,
                    seed: int = 0) -> pd.DataFrame:
    """How well each cheap score ranks the units by their measured single-deletion loss increase.

    layers: the `lm_layers` per-unit table (kind, unit, loss_increase and the scores:
    block_influence, angular_distance, and ratio where it is not all NaN). For each kind
    ("layer", "sublayer") and score: Spearman's rho with loss_increase over the units
    (`probe.scoring.verdict.rank_correlation`, i.e. scipy's), and a percentile bootstrap interval:
    `resamples` resamples of the units with replacement, drawn once per kind as
    `numpy.random.default_rng(seed).integers(0, units, (resamples, units))` (every score of a
    kind sees the same resamples), rho recomputed on each (resamples where a column is constant
    are left out), and the (1 - level) / 2 and (1 + level) / 2 percentiles of the rest.

    Columns: kind, score, spearman, low, high (the interval; NaN when no resample is defined),
    level, resamples, units.
    """
    check_bootstrap(resamples, level)
    rows = []
    for kind in ("layer", "sublayer"):
        units = layers[layers["kind"] == kind].reset_index(drop=True)
        if not len(units):
            continue
        index = np.random.default_rng(seed).integers(0, len(units), (int(resamples), len(units)))
        scores = [s for s in ("block_influence", "angular_distance", "ratio")
                  if s in units.columns and units[s].notna().any()]
        for score in scores:
            pair = units[[score, "loss_increase"]].apply(pd.to_numeric, errors="coerce")
            rho = rank_correlation(pair, score, "loss_increase")
            low = high = float("nan")
            if pair.notna().all().all() and len(units) > 1:
                boot = _bootstrap_spearman(pair[score].to_numpy(float), pair["loss_increase"].to_numpy(float), index)
                boot = boot[np.isfinite(boot)]
                if len(boot):
                    low, high = (float(v) for v in np.percentile(boot, [50 * (1 - level), 50 * (1 + level)]))
            rows.append({"kind": kind, "score": score, "spearman": rho, "low": low, "high": high, "level": level,
                         "resamples": int(resamples), "units": len(units)})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)


# --- logit lens -----------------------------------------------------------------------------------


def final_norm(model: nn.Module, layers: Sequence[str]) -> tuple[str, nn.Module]:
    """(name, module) of the model's final norm: the first normalization module registered after
    the layer stack in the module that holds it (`model.norm` of a Llama's `model`,
    `transformer.ln_f` of GPT-2); ProbeError when there is none."""
    found = layer_stack(model, layers)
    if found is None:
        raise ProbeError("the logit lens needs the decoder layers to be one stack (a ModuleList).")
    stack_name = found[0]
    owner_name, _, child = stack_name.rpartition(".")
    owner = model.get_submodule(owner_name) if owner_name else model
    after = False
    for name, module in owner.named_children():
        if name == child:
            after = True
            continue
        if after and _is_norm(module):
            return (f"{owner_name}.{name}" if owner_name else name), module
    children = ", ".join(name for name, _ in owner.named_children())
    raise ProbeError(f"the logit lens needs the final norm applied after the layer stack {stack_name!r}, but "
                     f"{owner_name or 'the model'} has no normalization module after it (its children: {children}). "
                     "The lens does not apply to this model: it is for pre-norm causal language models (Llama, "
                     "GPT-2); an encoder such as BERT normalises inside its layers.")


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, (nn.LayerNorm, nn.GroupNorm, getattr(nn, "RMSNorm", nn.LayerNorm))) or \
        "norm" in type(module).__name__.lower()


def lens_parts(model: nn.Module, layers: Sequence[str]) -> tuple[nn.Module, nn.Module]:
    """(final norm, unembedding) of a Hugging Face causal LM whose layers are `layers`: the norm
    from `final_norm`, the unembedding `model.get_output_embeddings()`; ProbeError when either is
    missing (say, an encoder without a language-model head: the lens does not apply)."""
    getter = getattr(model, "get_output_embeddings", None)
    unembed = getter() if callable(getter) else None
    if not isinstance(unembed, nn.Module):
        raise ProbeError(f"the logit lens needs the model's unembedding (model.get_output_embeddings()), and "
                         f"{type(model).__name__} has none (not a Hugging Face causal language model with a language-model "
                         "head); the lens does not apply.")
    return final_norm(model, layers)[1], unembed


def _lens_table(stack: _Stack, sums: _Sums) -> pd.DataFrame:
    rows = []
    for row, (loss, units, correct, agree) in enumerate(sums.lens.tolist()):
        units = max(units, 1.0)
        rows.append({"stream": "embeddings" if row == 0 else stack.names[row - 1], "layer_index": row - 1,
                     "loss": loss / units, "perplexity": math.exp(loss / units) if loss / units < 700 else math.inf,
                     "token_accuracy": correct / units, "agreement": agree / units, "tokens": int(units)})
    return pd.DataFrame(rows, columns=LENS_COLUMNS)


def logit_lens(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
               progress: bool = False) -> pd.DataFrame:
    """The logit lens: the final norm and the unembedding (`lens_parts`) applied to the residual
    stream entering the first layer and after every layer, scored as the model's own output.

    Columns: stream ("embeddings", the stream entering the first layer, or the layer after which
    it is read), layer_index (-1 for the embeddings), loss (mean next-token NLL per token, as the
    lm task scores it: predicted positions, padding excluded), perplexity, token_accuracy (top-1
    next-token accuracy), agreement (share of the scored positions where the lens's top-1 token
    is the model's own final top-1 token), tokens. After the last layer the lens is the model's
    own output when its head is the final norm and the unembedding and nothing else (agreement 1).
    """
    stack = _stack(model, data, blocks)
    parts = lens_parts(model, stack.names)
    return _lens_table(stack, _stream_pass(model, data, stack, sublayers=False, lens=parts, progress=progress))


# --- the finding ----------------------------------------------------------------------------------


def _indices(rows: pd.DataFrame) -> str:
    first, last = int(rows["layer_index"].min()), int(rows["layer_index"].max())
    return f"layer {first}" if first == last else f"layers {first}\u2013{last}"


def depth_finding(layers: pd.DataFrame) -> str:
    """Does the layer-pruning literature's finding hold on this model? One sentence, with numbers.

    The finding (ShortGPT, Gromov et al.): deep layers other than the last turn the residual
    stream less (lower block influence) and cost less to delete than early ones. Compared: the
    mean over the first third of the layers (the first max(1, L // 3)) against the mean over as
    many layers right before the last one. It holds when both means are lower for the deep layers.
    layers: the `lm_layers` per-unit table (its kind "layer" rows: layer_index, block_influence,
    loss_increase).
    """
    rows = layers[layers["kind"] == "layer"].sort_values("layer_index").reset_index(drop=True)
    count = len(rows)
    if count < 3:
        return (f"The layer-pruning finding (deep layers but the last matter less) cannot be tested on {count} "
                "layer(s): it needs at least 3.")
    third = max(1, count // 3)
    early, late = rows.iloc[:third], rows.iloc[count - 1 - third:count - 1]
    influence = (late["block_influence"].mean(), early["block_influence"].mean())
    cost = (late["loss_increase"].mean(), early["loss_increase"].mean())
    lower_influence, cheaper = influence[0] < influence[1], cost[0] < cost[1]
    verdict = "holds" if lower_influence and cheaper else "does not hold"
    return (f"The layer-pruning literature's finding {verdict} on this model: the deep layers before the last "
            f"({_indices(late)}, 0-based) have {'lower' if lower_influence else 'no lower'} block influence than "
            f"the first ones ({_indices(early)}): mean {influence[0]:.4f} against {influence[1]:.4f}, and cost "
            f"{'less' if cheaper else 'no less'} to delete one at a time: mean loss increase {cost[0]:+.4f} "
            f"against {cost[1]:+.4f} nats per token.")


# --- everything -----------------------------------------------------------------------------------


def lm_layers(model: nn.Module, data: Iterable, table: pd.DataFrame | None = None, *,
              blocks: Sequence[str | Block] | None = None, spans: Iterable[int] | None = None,
              greedy_steps: int | None = None, resamples: int = 1000, level: float = 0.95, seed: int = 0,
              fit: bool = False, progress: bool = True) -> LMResult:
    """Every part of the analysis (module docstring), sharing its passes over the data.

    One pass with hooks gives the similarities, the span angles and the logit lens; one
    `probe.evaluate_ablations` call evaluates every single layer, single block (unless `table`
    gives them) and span; then one call per greedy step, and one for the one-shot orders. A set
    of layers is evaluated once however many parts ask for it.

    table: the per-block table of the lm task (`probe.block_table(..., task="lm")`, or
    blocks.csv of `python -m probe.ablate --task lm`): its single-block losses are reused and its
    `ratio` column becomes a cheap score. blocks: the blocks (names or Blocks); discovered on the
    data's first sequence when None. spans: the span lengths (default 1..L-1). greedy_steps:
    layers the greedy search removes (default L // 2). resamples, level, seed: the bootstrap of
    `score_agreement`. fit: settings made for deep models (the CLI's defaults) are fitted to this
    one, with a note: span lengths longer than its layers are left out, greedy steps capped at
    its layers - 1; without, they are refused (ProbeError).
    """
    stack = _stack(model, data, blocks)
    count = len(stack.names)
    notes: dict[str, str] = {}
    if fit and spans is not None:
        longer = sorted(n for n in set(spans) if isinstance(n, (int, np.integer)) and n > count)
        if longer:
            notes["spans"] = f"span lengths {longer} left out: the model has {count} layers."
            spans = [n for n in spans if n not in longer]
    if fit and isinstance(greedy_steps, int) and count > 1 and greedy_steps > count - 1:
        notes["greedy"] = f"greedy deletion stops after {count - 1} steps: the model has {count} layers."
        greedy_steps = count - 1
    span_lengths = _check_spans(spans, count)
    steps = _check_steps(greedy_steps, count)
    checked = _check_lm_table(table, model, stack) if table is not None else None
    try:
        parts = lens_parts(model, stack.names)
    except ProbeError as error:
        parts = None
        notes["lens"] = str(error)
    sums = _stream_pass(model, data, stack, angles=True, lens=parts, progress=progress)
    similarity, angles = _similarity_table(stack, sums), _angle_table(stack, sums)
    deletions = _Deletions(model, data, stack, progress)
    # One evaluation pass for every single deletion and every span.
    deletions.outcomes([[name] for name in stack.names]
                       + ([[b.name] for b in stack.every_block] if checked is None else [])
                       + [stack.names[start:start + n] for n in span_lengths for start in range(count + 1 - n)])
    layers = similarity.merge(_single_deletions(deletions, stack, checked), on=["kind", "unit"], how="left")
    ratio = checked.set_index("block")["ratio"] if checked is not None and "ratio" in checked.columns else None
    layers["ratio"] = layers["unit"].map(ratio) if ratio is not None else float("nan")
    layers.loc[layers["kind"] == "layer", "ratio"] = float("nan")
    layers["ratio"] = pd.to_numeric(layers["ratio"], errors="coerce")
    layers.attrs["baseline"] = LM.metrics(deletions.baseline)
    losses = _span_losses(deletions, stack, angles, span_lengths)
    greedy = _greedy(deletions, stack, steps, layers)
    agreement = score_agreement(layers, resamples=resamples, level=level, seed=seed)
    lens = _lens_table(stack, sums) if parts is not None else pd.DataFrame(columns=LENS_COLUMNS)
    if len(lens) and lens["agreement"].iloc[-1] < 1.0 - 1e-9:
        notes["lens_head"] = (f"after the last layer the lens agrees with the model's own prediction on only "
                              f"{lens['agreement'].iloc[-1]:.2%} of the tokens: the model's head does more than the "
                              "final norm and the unembedding (a logit scale or soft-capping?).")
    return LMResult(layers=layers, spans=span_summary(losses), span_losses=losses, greedy=greedy,
                    agreement=agreement, lens=lens, finding=depth_finding(layers), notes=notes)
