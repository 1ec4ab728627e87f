"""Figures of the per-block table: ratio, cost of deleting each block, ratio against cost, cosine."""

from __future__ import annotations

import math
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

from probe.scoring.verdict import rank_correlation
from reports.figures.common import SCATTER_WIDTH, _ANNOTATE, _axes, _bars, _block_ticks, _colors, _forward, _require, _verdict_legend, block_figure_width, cost_axis, cost_of

__all__ = ["cosine_per_block", "drop_per_block", "ratio_per_block", "ratio_vs_drop"]


def ratio_per_block(df: pd.DataFrame, *, ax: Axes | None = None,
                    max_ratio: float | None = None) -> Axes:
    """Bars of ``ratio`` (mean ||F(x)||/||s(x)||) per block, ``ratio_std`` as error bars.

    ``max_ratio`` (e.g. the verdict rule's) draws the "small branch" threshold as a line.
    """
    _require(df, ("block", "ratio"), "ratio_per_block")
    df = _forward(df)
    ax = _axes(ax, block_figure_width(len(df)))
    _bars(ax, df, "ratio", "ratio_std")
    extra = []
    if max_ratio is not None:
        line = ax.axhline(max_ratio, color="#333333", linestyle="--", linewidth=1,
                          label=f"small-branch threshold ({max_ratio:g})")
        extra.append(line)
    _block_ticks(ax, df["block"])
    ax.set_ylabel("branch / shortcut ratio\n||F(x)|| / ||s(x)||")
    ax.set_ylim(bottom=0)
    ax.set_title("How large each block's branch is next to its shortcut")
    _verdict_legend(ax, df, extra)
    return ax


def drop_per_block(df: pd.DataFrame, *, ax: Axes | None = None, cost: str | None = None) -> Axes:
    """Bars of what deleting each block alone costs: the accuracy drop in percentage points
    (classification), or the table's other cost (`cost_of`: loss increase, drift in %).

    Coloured by ``verdict`` and with the +/- ``noise`` band shaded, when those columns exist.
    """
    cost = cost_of(df, cost)
    _require(df, ("block", cost), "drop_per_block")
    label, scale = cost_axis(cost, df)
    df = _forward(df)
    ax = _axes(ax, block_figure_width(len(df)))
    _bars(ax, df, cost, None, scale=scale)
    ax.axhline(0.0, color="#333333", linewidth=0.8)
    extra = []
    if "noise" in df.columns and len(df):
        x = np.arange(len(df))
        band = pd.to_numeric(df["noise"], errors="coerce").to_numpy(float) * scale
        # Step edges at +/- 0.5 so each block's band spans exactly its bar slot.
        edges = np.concatenate([x - 0.5, [x[-1] + 0.5]])
        band = np.concatenate([band, band[-1:]])
        # Drift has no sign: its band runs from 0 up.
        lower = np.zeros_like(band) if cost == "drift" else -band
        extra.append(ax.fill_between(edges, lower, band, step="post", color="#777777",
                                     alpha=0.25, linewidth=0, label="noise band", zorder=0.8))
    _block_ticks(ax, df["block"])
    ax.set_ylabel(label)
    ax.set_title("What the network loses when one block's branch is deleted" if cost != "drift"
                 else "How far the outputs move when one block's branch is deleted")
    _verdict_legend(ax, df, extra)
    return ax


def ratio_vs_drop(df: pd.DataFrame, *, ax: Axes | None = None,
                  max_ratio: float | None = None, cost: str | None = None) -> Axes:
    """Scatter of ``ratio`` (x) against the deletion cost (y), one dot per block: the accuracy
    drop in points, or the table's other cost (`cost_of`: loss increase, drift in %).

    x is log-scaled when the ratios span more than one decade. The title gives Spearman's rho
    between the two; the few blocks with the largest cost are named next to their dots.
    """
    cost = cost_of(df, cost)
    _require(df, ("block", "ratio", cost), "ratio_vs_drop")
    label, scale = cost_axis(cost, df)
    df = _forward(df)
    ax = _axes(ax, SCATTER_WIDTH)
    x = pd.to_numeric(df["ratio"], errors="coerce").to_numpy(float)
    y = pd.to_numeric(df[cost], errors="coerce").to_numpy(float) * scale
    ax.scatter(x, y, c=_colors(df), s=36, edgecolors="white", linewidths=0.5, zorder=3)
    finite_x = x[np.isfinite(x)]
    # Log scale only when every ratio can be placed on it (a zero branch cannot).
    if len(finite_x) >= 2 and finite_x.min() > 0 and finite_x.max() / finite_x.min() > 10.0:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.axhline(0.0, color="#333333", linewidth=0.8)
    extra = []
    if max_ratio is not None:
        extra.append(ax.axvline(max_ratio, color="#333333", linestyle="--", linewidth=1,
                                label=f"small-branch threshold ({max_ratio:g})"))
    finite = np.isfinite(x) & np.isfinite(y)
    order = np.argsort(-np.where(finite, y, -np.inf), kind="stable")[: min(_ANNOTATE, finite.sum())]
    scaled = np.log10(x) if ax.get_xscale() == "log" else x
    lo, hi = (scaled[finite].min(), scaled[finite].max()) if finite.any() else (0.0, 0.0)
    for i in order:
        # Names of dots in the right part of the plot go to their left, to stay inside.
        left = hi > lo and (scaled[i] - lo) / (hi - lo) > 0.7
        ax.annotate(str(df["block"].iloc[i]), (x[i], y[i]), xytext=(-4 if left else 4, 4),
                    textcoords="offset points", ha="right" if left else "left",
                    fontsize="small")
    rho = rank_correlation(df, "ratio", cost)
    rho_text = "undefined" if math.isnan(rho) else f"{rho:.2f}"
    ax.set_title(f"Branch size against deletion cost\nSpearman \u03c1 = {rho_text} over "
                 f"{len(df)} blocks")
    ax.margins(x=0.08, y=0.1)  # room for the block names next to the extreme dots
    ax.set_xlabel("branch / shortcut ratio ||F(x)|| / ||s(x)||"
                  + (" (log scale)" if ax.get_xscale() == "log" else ""))
    ax.set_ylabel(label)
    _verdict_legend(ax, df, extra)
    return ax


def cosine_per_block(df: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Bars of ``cosine`` (mean cos(F(x), s(x))) per block, ``cosine_std`` as error bars."""
    _require(df, ("block", "cosine"), "cosine_per_block")
    df = _forward(df)
    ax = _axes(ax, block_figure_width(len(df)))
    _bars(ax, df, "cosine", "cosine_std")
    ax.axhline(0.0, color="#333333", linewidth=0.8)
    ax.set_ylim(-1.05, 1.05)
    _block_ticks(ax, df["block"])
    ax.set_ylabel("cosine of branch and shortcut\ncos(F(x), s(x))")
    ax.set_title("Does each branch add to its shortcut, or push against it?")
    _verdict_legend(ax, df)
    return ax
