"""What every figure shares: the palette, verdict colours, the cost axis of a table, block ticks, sizes."""

from __future__ import annotations

import math
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.patches import Patch

from probe.scoring.cost import COSTS as COST_RECORDS, LOSS_INCREASE, cost_named
from probe.scoring.verdict import UNSUPPORTED, VERDICTS, cost_column, per_token
from probe.errors import ProbeError

__all__ = ["COSTS", "SCATTER_WIDTH", "VERDICT_COLORS", "block_figure_width", "cost_axis", "cost_of", "heatmap_size"]


# Colour-blind safe (seaborn "colorblind"): helping blocks stand out, skipped ones recede.
_PALETTE = sns.color_palette("colorblind")


VERDICT_COLORS = {
    "helps": _PALETTE[0],    # blue
    "skipped": "#9a9a9a",    # grey
    "hurts": _PALETTE[3],    # vermilion
    "neutral": _PALETTE[5],  # tan
    UNSUPPORTED: "#d0d0d0",  # light grey: no verdict (the intact model is at chance)
}


_LEGEND_ORDER = (*VERDICTS, UNSUPPORTED)


_PLAIN = _PALETTE[0]


_MAX_LABELS = 32  # more block names than this on one axis are thinned


_ANNOTATE = 3     # ratio_vs_drop names this many most important blocks


# What deleting a block costs, by cost column (`probe.scoring.verdict.cost_column`): classification
# counts accuracy, a language model or a user's loss the loss increase, unlabelled data the drift
# of the outputs. The figures draw the cost column they are given (`cost=`) or find one (`cost_of`).
COSTS = tuple(COST_RECORDS)


def cost_of(df: pd.DataFrame, cost: str | None = None) -> str:
    """The cost column a figure of `df` draws: `cost` when given; else the table's verdict cost
    (`probe.scoring.verdict.cost_column`) when it has it; else the first of `COSTS` it has (an analysis
    table carries the cost without its standard error); else accuracy_drop."""
    if cost is not None:
        return cost
    if not isinstance(df, pd.DataFrame):
        return "accuracy_drop"
    found = cost_column(df)
    if found in df.columns:
        return found
    return next((c for c in COSTS if c in df.columns), "accuracy_drop")


def cost_axis(cost: str, df: pd.DataFrame | None = None) -> tuple[str, float]:
    """(axis label, factor from the column to the plotted number) of a cost column:
    accuracy_drop in percentage points, drift in % of the outputs' size, loss_increase as is
    (nats per token for a language model's table)."""
    name, unit, scale = _cost_unit(cost, df)
    return f"{name} when deleted\n({unit})", scale


def _cost_unit(cost: str, df: pd.DataFrame | None = None, short: bool = False) -> tuple[str, str, float]:
    """(the cost in words, its unit, factor from the column to the plotted number)."""
    record = cost_named(cost)
    if record is LOSS_INCREASE and per_token(df):  # a language model's loss: the mean NLL per token
        return record.axis_name, "nats per token", record.scale
    return record.axis_name, record.short_unit if short else record.axis_unit, record.scale


def _require(df: pd.DataFrame, columns: tuple[str, ...], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ProbeError(f"{what} needs a pandas DataFrame, got {type(df).__name__}.")
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ProbeError(
            f"{what} needs column(s) {', '.join(map(repr, missing))}; the table has "
            f"{', '.join(map(str, df.columns)) or '(none)'}."
        )


def _forward(df: pd.DataFrame) -> pd.DataFrame:
    """Rows in forward order, index 0..n-1 (the x position of each block)."""
    if "position" in df.columns:
        df = df.sort_values("position", kind="stable")
    return df.reset_index(drop=True)


# Width in inches of figures with one point per something (scatter plots, curves).
SCATTER_WIDTH = 8.0


def _axes(ax: Axes | None, width: float) -> Axes:
    if ax is not None:
        return ax
    with sns.axes_style("whitegrid"):
        _, ax = plt.subplots(figsize=(width, 4.2), layout="constrained")
    return ax


def _colors(df: pd.DataFrame) -> list:
    if "verdict" not in df.columns:
        return [_PLAIN] * len(df)
    return [VERDICT_COLORS.get(v, _PLAIN) for v in df["verdict"]]


def _verdict_legend(ax: Axes, df: pd.DataFrame, extra: list | None = None) -> None:
    handles = list(extra or [])
    if "verdict" in df.columns:
        present = set(df["verdict"])
        handles += [Patch(color=VERDICT_COLORS[v], label=v) for v in _LEGEND_ORDER if v in present]
    if handles:
        # Outside the axes, on the right: a legend inside would hide bars or dots.
        ax.legend(handles=handles, frameon=False, fontsize="small", loc="upper left",
                  bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)


def _block_ticks(ax: Axes, names: pd.Series) -> None:
    """Block names under the bars, rotated; every k-th name when there are many."""
    n = len(names)
    step = max(1, math.ceil(n / _MAX_LABELS))
    ticks = np.arange(0, n, step)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(names.iloc[i]) for i in ticks], rotation=60, ha="right",
                       rotation_mode="anchor", fontsize="small")
    ax.set_xlim(-0.6, n - 0.4)
    ax.set_xlabel("block (forward order)" + (f", one name per {step} blocks" if step > 1 else ""))


def _std(df: pd.DataFrame, column: str) -> np.ndarray | None:
    if column not in df.columns:
        return None
    # A NaN std (one sample) draws no error bar rather than breaking the plot.
    return pd.to_numeric(df[column], errors="coerce").fillna(0.0).to_numpy(float)


def _bars(ax: Axes, df: pd.DataFrame, column: str, std: str | None, scale: float = 1.0) -> None:
    heights = pd.to_numeric(df[column], errors="coerce").to_numpy(float) * scale
    yerr = _std(df, std) if std else None
    ax.bar(np.arange(len(df)), heights, color=_colors(df), width=0.8,
           yerr=None if yerr is None else yerr * scale,
           error_kw={"elinewidth": 1.0, "capsize": 2, "ecolor": "#333333"})


def block_figure_width(n: int) -> float:
    """Width in inches of a figure with one slot per block, or per layer: the one width rule of
    figures that grow with the model (the others are SCATTER_WIDTH wide)."""
    return float(min(16.0, max(6.0, 2.0 + 0.3 * n)))


def heatmap_size(df: pd.DataFrame) -> dict[str, float]:
    """{"width", "height"} in inches for `class_drop_heatmap` of `df`: rows grow with blocks."""
    blocks = df["block"].nunique() if "block" in df.columns else 1
    classes = df["class"].nunique() if "class" in df.columns else 1
    return {"width": float(min(14.0, max(6.0, 2.5 + 0.55 * classes))),
            "height": float(min(16.0, max(3.0, 1.2 + 0.28 * blocks)))}


def _stage_boundaries(ax: Axes, stages: pd.Series, *, horizontal: bool = False, color: str = "#555555") -> None:
    """A dotted line between consecutive blocks of different stages (x = i - 0.5; also y with
    `horizontal`, for a block-by-block heatmap whose cell i spans i..i+1)."""
    values = stages.to_numpy()
    changes = [i for i in range(1, len(values)) if values[i] != values[i - 1]]
    for i in changes:
        if horizontal:
            ax.axvline(i, color=color, linewidth=1.5)
            ax.axhline(i, color=color, linewidth=1.5)
        else:
            ax.axvline(i - 0.5, color=color, linestyle=":", linewidth=1.2, zorder=0.5)


def _outside_legend(ax: Axes, handles: list | None = None) -> None:
    ax.legend(handles=handles, frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0),
              borderaxespad=0.0)
