"""The logit lens (nostalgebraist 2020): the final norm and the unembedding
(`probe.discovery.decoder.lens_parts`) applied to the residual stream after each layer."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import pandas as pd
from torch import nn

from analyses.lm.stream import Sums, stream_pass
from analyses.lm.units import layers_of
from probe.discovery.decoder import DecoderLayers, lens_parts
from probe.discovery.find import Block

LENS_COLUMNS = ["stream", "layer_index", "loss", "perplexity", "token_accuracy", "agreement", "tokens"]


def lens_table(stack: DecoderLayers, sums: Sums) -> pd.DataFrame:
    rows = []
    for row, (loss, units, correct, agree) in enumerate(sums.lens.tolist()):
        units = max(units, 1.0)
        rows.append({"stream": "embeddings" if row == 0 else stack.names[row - 1], "layer_index": row - 1,
                     "loss": loss / units, "perplexity": math.exp(loss / units) if loss / units < 700 else math.inf,
                     "token_accuracy": correct / units, "agreement": agree / units, "tokens": int(units)})
    return pd.DataFrame(rows, columns=LENS_COLUMNS)


def logit_lens(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
               progress: bool = True) -> pd.DataFrame:
    """The logit lens: the final norm and the unembedding (`lens_parts`) applied to the residual
    stream entering the first layer and after every layer, scored as the model's own output.

    Columns: stream ("embeddings", the stream entering the first layer, or the layer after which
    it is read), layer_index (-1 for the embeddings), loss (mean next-token NLL per token, as the
    lm task scores it: predicted positions, padding excluded), perplexity, token_accuracy (top-1
    next-token accuracy), agreement (share of the scored positions where the lens's top-1 token
    is the model's own final top-1 token), tokens. After the last layer the lens is the model's
    own output when its head is the final norm and the unembedding and nothing else (agreement 1).
    """
    stack = layers_of(model, data, blocks)
    parts = lens_parts(model, stack.names)
    return lens_table(stack, stream_pass(model, data, stack, sublayers=False, lens=parts, progress=progress))
