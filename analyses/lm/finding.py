"""The finding in one sentence: do the deep layers matter less? Prose for the report and the
terminal (the report's own text, kept apart from the numbers)."""

from __future__ import annotations

import pandas as pd


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
