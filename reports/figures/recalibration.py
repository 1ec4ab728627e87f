"""Each block's cost with its trained BatchNorm statistics and recalibrated."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from reports.figures.common import _PALETTE, _axes, _block_ticks, _forward, _require, block_figure_width, cost_axis, cost_of

__all__ = ["recalibration_effect"]


def recalibration_effect(df: pd.DataFrame, *, ax: Axes | None = None, cost: str | None = None) -> Axes:
    """Per block, the deletion cost with trained BN statistics and after recalibration: the
    accuracy drop in points, or the task's cost (`cost_of`: loss increase, drift in %)."""
    cost = cost_of(df, cost)
    _require(df, ("block", cost, "bn_recalibrated"), "recalibration_effect")
    label, scale = cost_axis(cost, df)
    order = _forward(df.drop_duplicates("block"))["block"].reset_index(drop=True)
    ax = _axes(ax, block_figure_width(len(order)))
    x = np.arange(len(order))
    width = 0.4
    for offset, recal, color, name in ((-width / 2, False, _PALETTE[3], "trained BN statistics"),
                                       (width / 2, True, _PALETTE[0], "BN statistics recalibrated")):
        rows = df[df["bn_recalibrated"].astype(bool) == recal].set_index("block").reindex(order)
        ax.bar(x + offset, rows[cost].to_numpy(float) * scale, width=width, color=color, label=name)
    ax.axhline(0.0, color="#333333", linewidth=0.8)
    _block_ticks(ax, order)
    ax.set_ylabel(label)
    ax.set_title("Deletion cost with and without BatchNorm recalibration")
    ax.legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return ax
