"""What each block does to the representation: probes, logit lens, refinement, CKA, classes served."""

from __future__ import annotations

import math
import warnings
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Patch, Rectangle

from reports.figures.common import VERDICT_COLORS, _LEGEND_ORDER, _MAX_LABELS, _PALETTE, _PLAIN, _axes, _block_ticks, _colors, _forward, _outside_legend, _require, _stage_boundaries, _std, block_figure_width
from reports.figures.uncertainty import class_drop_heatmap

__all__ = ["cka_heatmap", "cka_size", "class_service_heatmap", "refinement_profile", "representation_accuracy"]


_LENS = _PALETTE[1]  # orange


_STEP = "#333333"


def representation_accuracy(df: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Per block, the linear probe's test accuracy (%, dots coloured by `verdict` when present)
    and the logit lens accuracy where the head applies; dotted lines between stages.

    Columns: block, probe_accuracy; optional position, stage, verdict, lens_accuracy.
    """
    _require(df, ("block", "probe_accuracy"), "representation_accuracy")
    df = _forward(df)
    ax = _axes(ax, block_figure_width(len(df)))
    x = np.arange(len(df))
    probe = df["probe_accuracy"].to_numpy(float) * 100
    ax.plot(x, probe, color=_PLAIN, linewidth=1.2, zorder=2)
    ax.scatter(x, probe, c=_colors(df), s=30, edgecolors="white", linewidths=0.5, zorder=3)
    handles = [Line2D([], [], color=_PLAIN, marker="o", label="linear probe (test)")]
    if "lens_accuracy" in df.columns and df["lens_accuracy"].notna().any():
        lens = df["lens_accuracy"].to_numpy(float) * 100
        handles += ax.plot(x, lens, color=_LENS, marker="s", markersize=4, linewidth=1.2,
                           label="the model's head (logit lens)")
    if "stage" in df.columns:
        _stage_boundaries(ax, df["stage"])
    _block_ticks(ax, df["block"])
    ax.set_ylabel("accuracy on the evaluation data (%)")
    ax.set_ylim(top=101)
    ax.set_title("Where class information becomes linearly readable")
    present = set(df["verdict"]) if "verdict" in df.columns else set()
    handles += [Patch(color=VERDICT_COLORS[v], label=f"dot: {v}") for v in _LEGEND_ORDER if v in present]
    _outside_legend(ax, handles)
    return ax


def refinement_profile(df: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Bars of `grad_cosine` (mean cos(F(h), dL/dh), `grad_cosine_std` as error bars) per block,
    "n/a" where it is NaN, and `step_ratio` (||F(h)||/||h||) as a line on the right axis."""
    _require(df, ("block", "grad_cosine", "step_ratio"), "refinement_profile")
    df = _forward(df)
    ax = _axes(ax, block_figure_width(len(df)))
    x = np.arange(len(df))
    cosine = df["grad_cosine"].to_numpy(float)
    yerr = _std(df, "grad_cosine_std")
    ax.bar(x, np.nan_to_num(cosine), width=0.8, color=_PLAIN, yerr=yerr,
           error_kw={"elinewidth": 1.0, "capsize": 2, "ecolor": "#333333"}, label="cos(F(h), dL/dh)")
    for i in np.flatnonzero(np.isnan(cosine)):
        ax.text(i, 0, "n/a", rotation=90, ha="center", va="bottom", fontsize="x-small", color="#555555")
    ax.axhline(0.0, color="#333333", linewidth=0.8)
    spread = yerr if yerr is not None else 0.0
    low, high = np.nanmin([*(cosine - spread), 0.0]), np.nanmax([*(cosine + spread), 0.0])
    # Room above the bars for the "n/a" labels, also when every cosine is negative.
    ax.set_ylim(min(-0.05, 1.15 * low), max(0.05, 1.15 * high, -0.35 * low))
    ax.set_ylabel("cos(F(h), dL/dh)\n(negative: the block moves h down the loss)")
    if "stage" in df.columns:
        _stage_boundaries(ax, df["stage"])
    _block_ticks(ax, df["block"])
    right = ax.twinx()
    right.plot(x, df["step_ratio"].to_numpy(float), color=_STEP, marker="o", markersize=3, linewidth=1.2,
               label="||F(h)|| / ||h||")
    right.set_ylim(bottom=0)
    right.set_ylabel("step size ||F(h)|| / ||h||")
    right.grid(False)
    ax.set_title("Does each block step down the loss, and how far?")
    bars, labels = ax.get_legend_handles_labels()
    line, line_label = right.get_legend_handles_labels()
    ax.legend(bars + line, labels + line_label, frameon=False, fontsize="small", loc="upper left",
              bbox_to_anchor=(1.08, 1.0), borderaxespad=0.0)
    return ax


def cka_size(df: pd.DataFrame) -> dict[str, float]:
    """{"width", "height"} in inches for `cka_heatmap` of `df`: a square that grows with blocks."""
    blocks = df["block_a"].nunique() if "block_a" in df.columns else 1
    side = float(min(13.0, max(4.5, 2.0 + 0.3 * blocks)))
    return {"width": side + 1.5, "height": side}


def cka_heatmap(df: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Linear CKA between every pair of blocks (rows and columns in forward order), with solid
    lines between stages (from `stage_a`, when present)."""
    _require(df, ("block_a", "block_b", "cka"), "cka_heatmap")
    order_by = "position_a" if "position_a" in df.columns else None
    firsts = df.drop_duplicates("block_a")
    if order_by:
        firsts = firsts.sort_values(order_by, kind="stable")
    order = firsts["block_a"].tolist()
    grid = df.pivot_table(index="block_a", columns="block_b", values="cka", aggfunc="first").reindex(
        index=order, columns=order)
    if ax is None:
        size = cka_size(df)
        _, ax = plt.subplots(figsize=(size["width"], size["height"]), layout="constrained")
    step = max(1, math.ceil(len(order) / _MAX_LABELS))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PendingDeprecationWarning)  # as in class_drop_heatmap
        sns.heatmap(grid, ax=ax, cmap="mako", vmin=0.0, vmax=1.0, square=True, annot=len(order) <= 10, fmt=".2f",
                    annot_kws={"fontsize": "x-small"}, xticklabels=step, yticklabels=step,
                    cbar_kws={"label": "linear CKA", "shrink": 0.8})
    if "stage_a" in df.columns:
        _stage_boundaries(ax, firsts["stage_a"], horizontal=True, color="white")
    ax.set_xlabel("block (forward order)")
    ax.set_ylabel("block (forward order)")
    ax.tick_params(labelsize="small")
    ax.set_title("How similar the blocks' outputs are (linear CKA)")
    return ax


def class_service_heatmap(df: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """`class_drop_heatmap`, with a box around each block's most served class: `rank` 1, when
    deleting the block costs that class accuracy."""
    _require(df, ("block", "class", "accuracy_drop", "rank"), "class_service_heatmap")
    ax = class_drop_heatmap(df, ax=ax)
    rows = _forward(df.drop_duplicates("block"))["block"].tolist()
    columns = sorted(df["class"].unique())
    served = df[(df["rank"] == 1) & (df["accuracy_drop"] > 0)]
    for block, cls in zip(served["block"], served["class"]):
        # Heatmap cell (row r, column c) spans x in [c, c + 1], y in [r, r + 1].
        ax.add_patch(Rectangle((columns.index(cls), rows.index(block)), 1, 1, fill=False, edgecolor="black",
                               linewidth=1.6))
    ax.set_title("Which classes lose accuracy when each block is deleted\n(boxed: the class each block serves most)")
    return ax
