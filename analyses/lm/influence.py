"""Block influence (ShortGPT) of every layer and sublayer, and the angular distance between the
streams entering any two layers (Gromov et al.): tables of one pass over the data."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd
from torch import nn

from analyses.lm.stream import Sums, stream_pass
from analyses.lm.units import layers_of
from probe.discovery.decoder import DecoderLayers, sublayer_of
from probe.discovery.find import Block

SIMILARITY_COLUMNS = ["kind", "unit", "layer", "layer_index", "sublayer", "position", "block_influence",
                      "angular_distance", "tokens"]
ANGLE_COLUMNS = ["start", "n", "end", "first_layer", "last_layer", "angle", "tokens"]


def similarity_table(stack: DecoderLayers, sums: Sums) -> pd.DataFrame:
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
                         "sublayer": sublayer_of(block), "position": block.position, "block_influence": influence,
                         "angular_distance": angle, "tokens": int(sums.tokens)})
    return pd.DataFrame(rows, columns=SIMILARITY_COLUMNS)


def angle_table(stack: DecoderLayers, sums: Sums) -> pd.DataFrame:
    total = max(sums.tokens, 1.0)
    count = len(stack.names)
    grid = (sums.angles / total).tolist()
    rows = [{"start": start, "n": n, "end": start + n, "first_layer": stack.names[start],
             "last_layer": stack.names[start + n - 1], "angle": grid[start][start + n], "tokens": int(sums.tokens)}
            for n in range(1, count + 1) for start in range(count + 1 - n)]
    return pd.DataFrame(rows, columns=ANGLE_COLUMNS)


def layer_similarity(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
                     progress: bool = True) -> pd.DataFrame:
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
    stack = layers_of(model, data, blocks)
    return similarity_table(stack, stream_pass(model, data, stack, progress=progress))


def residual_angles(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
                    progress: bool = True) -> pd.DataFrame:
    """Gromov et al.'s angular distance between the residual stream entering layer `start` and the
    one entering layer `start + n` (the last layer's output when that is L), for every span.

    Columns: start (0-based index of the span's first layer), n (layers in the span), end
    (start + n), first_layer, last_layer (names of the span's first and last layers), angle (mean
    over real tokens of arccos(cos(x_start, x_end)) / pi, in [0, 1]), tokens.
    """
    stack = layers_of(model, data, blocks)
    return angle_table(stack, stream_pass(model, data, stack, sublayers=False, angles=True, progress=progress))
