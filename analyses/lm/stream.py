"""One pass over the data with hooks on every layer, reduced to sums inside the hooks (float64,
on the model's device): what block influence, the span angles and the logit lens are made of."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from analyses.lm.units import LM, READER
from probe.batches import batches, explained_misfit, input_dtype, model_device
from probe.discovery.decoder import DecoderLayers
from probe.discovery.find import Block
from probe.errors import ProbeError
from probe.instrument.hooks import attached, model_preserved, outside_inference_mode, tap_pairs
from probe.instrument.residual_stream import LayerStreams, token_mask, token_rows


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
class Sums:
    """What one pass accumulated (float64, on the model's device)."""

    tokens: float
    layers: torch.Tensor  # (L, 2): 1 - cos, angle of each layer's input and output
    blocks: dict[str, torch.Tensor]  # block name -> (2,)
    angles: torch.Tensor | None  # (L + 1, L + 1): [j, m] angle between the streams entering j and m
    lens: torch.Tensor | None  # (L + 1, 4): loss, units, correct, agreeing with the final prediction


@outside_inference_mode  # sums made here are added into inside model_preserved
def stream_pass(model: nn.Module, data: Iterable, stack: DecoderLayers, *, sublayers: bool = True,
                angles: bool = False, lens: tuple[nn.Module, nn.Module] | None = None,
                progress: bool = False) -> Sums:
    """One pass over the data with hooks on every layer (and, `sublayers`, every block).

    Per batch the hooks reduce what they see to sums: each layer's 1 - cos and angle between its
    input and output; with `angles`, the angle between the streams entering every two layers j < m
    (stream L: the last layer's output), which needs the L + 1 streams of one batch at once; with
    `lens` = (final norm, unembedding), the lm score of the lens on the stream entering layer 0
    and after each layer, and its top-1 agreement with the model's prediction. The layers' hooks
    are `probe.instrument.residual_stream.LayerStreams`'.
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
        scores = LM.score(unembed(norm(hidden)).to(device), state["batch"])
        lens_sums[row, 0] += scores.loss.sum()
        lens_sums[row, 1] += scores.weight.double().sum()
        lens_sums[row, 2] += scores.correct.double().sum()
        state["predictions"][row] = scores.prediction

    # A dispatched model's layers may sit on other devices: what they give is summed on the model's.
    def enter(index: int, hidden: torch.Tensor) -> None:
        hidden = hidden.to(device)
        rows = token_rows(hidden, state["mask"], READER)
        state["inputs"][index] = rows
        state["tokens"] = len(rows)
        if angles:
            state["streams"][index] = rows
        if lens is not None and index == 0:
            lens_row(0, hidden)

    def leave(index: int, hidden: torch.Tensor) -> None:
        hidden = hidden.to(device)
        rows = token_rows(hidden, state["mask"], READER)
        layer_sums[index] += _cos_terms(state["inputs"].pop(index), rows)
        if angles and index == count - 1:
            state["streams"][count] = rows
        if lens is not None:
            lens_row(index + 1, hidden)

    def record(block: Block, branch: torch.Tensor, shortcut: torch.Tensor) -> None:
        if not isinstance(branch, torch.Tensor) or not isinstance(shortcut, torch.Tensor):
            raise ProbeError(f"block {block.name!r}: its branch or shortcut is not a tensor; the lm analysis "
                             "cannot compare the stream before and after it.")
        mask, branch, shortcut = state["mask"], branch.to(device), shortcut.to(device)
        block_sums[block.name] += _cos_terms(token_rows(shortcut, mask, READER),
                                             token_rows(shortcut.float() + branch.float(), mask, READER))

    streams = LayerStreams(stack.names, stack.modules, enter, leave, reader=READER)
    with model_preserved(model), attached() as handles, torch.no_grad():
        if sublayers:
            tap_pairs(model, stack.every_block, record, handles)
        streams.attach(handles)
        for batch in batches(data, device, dtype=input_dtype(model), progress=progress, desc="layer streams"):
            state.update(batch=batch, mask=token_mask(batch), inputs={}, streams={}, predictions={})
            streams.start()
            with explained_misfit(batch):
                outputs = batch.run(model)
            streams.check()
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
    return Sums(tokens=total, layers=layer_sums, blocks=block_sums, angles=angle_sums, lens=lens_sums)
