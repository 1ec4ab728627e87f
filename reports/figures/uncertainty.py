"""Bootstrap intervals of each block's cost, and per-class costs."""

from __future__ import annotations

import warnings
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.patches import Patch

from reports.figures.common import COSTS, VERDICT_COLORS, _LEGEND_ORDER, _PLAIN, _axes, _block_ticks, _cost_unit, _forward, _require, block_figure_width, cost_axis, cost_of, heatmap_size

__all__ = ["class_drop_heatmap", "interval_plot", "plotted_interval"]


def plotted_interval(df: pd.DataFrame, cost: str | None = None) -> tuple[str, str, str]:
    """(cost, low, high) columns of an intervals table (`analyses.uncertainty`): accuracy_drop
    with drop_low / drop_high, or a continuous cost with <cost>_low / <cost>_high."""
    if cost is None:
        cost = next((c for c in COSTS if f"{c}_low" in df.columns), None) or cost_of(df)
    if cost == "accuracy_drop":
        return cost, "drop_low", "drop_high"
    return cost, f"{cost}_low", f"{cost}_high"


def interval_plot(df: pd.DataFrame, *, ax: Axes | None = None, cost: str | None = None) -> Axes:
    """Each block's deletion cost with its bootstrap interval, coloured by `verdict_ci`: the
    accuracy drop in points, or the task's cost (`plotted_interval`: loss increase, drift in %)."""
    cost, low_column, high_column = plotted_interval(df, cost)
    _require(df, ("block", cost, low_column, high_column), "interval_plot")
    scale = cost_axis(cost, df)[1]
    df = _forward(df)
    ax = _axes(ax, block_figure_width(len(df)))
    x = np.arange(len(df))
    drop = df[cost].to_numpy(float) * scale
    low, high = df[low_column].to_numpy(float) * scale, df[high_column].to_numpy(float) * scale
    colors = ([VERDICT_COLORS.get(v, _PLAIN) for v in df["verdict_ci"]] if "verdict_ci" in df.columns
              else [_PLAIN] * len(df))
    ax.vlines(x, low, high, colors=colors, linewidth=2.5)
    ax.scatter(x, drop, c=colors, s=28, zorder=3, edgecolors="white", linewidths=0.5)
    ax.axhline(0.0, color="#333333", linewidth=0.8)
    _block_ticks(ax, df["block"])
    level = f"{df['level'].iloc[0]:.0%} " if "level" in df.columns and len(df) else ""
    name, unit, _ = _cost_unit(cost, df, short=True)
    ax.set_ylabel(f"{name} when deleted\n({unit}, {level}bootstrap interval)")
    ax.set_title("Deletion cost of each block, with its uncertainty")
    present = [v for v in _LEGEND_ORDER if "verdict_ci" in df.columns and v in set(df["verdict_ci"])]
    if present:
        ax.legend(handles=[Patch(color=VERDICT_COLORS[v], label=v) for v in present], frameon=False,
                  fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return ax


def class_drop_heatmap(df: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Heatmap of the accuracy drop (points) for every block (rows, forward order) and class."""
    _require(df, ("block", "class", "accuracy_drop"), "class_drop_heatmap")
    order = _forward(df.drop_duplicates("block"))["block"].tolist()
    grid = df.pivot_table(index="block", columns="class", values="accuracy_drop", aggfunc="first").loc[order] * 100
    if ax is None:
        size = heatmap_size(df)
        _, ax = plt.subplots(figsize=(size["width"], size["height"]), layout="constrained")
    limit = float(np.nanmax(np.abs(grid.to_numpy(float)))) if grid.size else 1.0
    limit = limit if np.isfinite(limit) and limit > 0 else 1.0
    annotate = grid.size <= 160
    with warnings.catch_warnings():
        # seaborn 0.13 calls Colormap.set_bad, which matplotlib 3.11 marks pending-deprecated.
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        sns.heatmap(grid, ax=ax, cmap="vlag", center=0.0, vmin=-limit, vmax=limit, annot=annotate, fmt=".0f",
                    annot_kws={"fontsize": "x-small"}, linewidths=0.3, linecolor="white",
                    cbar_kws={"label": "accuracy drop (points)"})
    ax.set_xlabel("class")
    ax.set_ylabel("deleted block")
    ax.set_title("Which classes lose accuracy when each block is deleted")
    ax.tick_params(axis="y", labelsize="small")
    return ax
