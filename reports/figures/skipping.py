"""The deletion curves: blocks deleted together, in the orders the skipping analysis tries."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from probe.scoring.verdict import per_token
from reports.figures.common import SCATTER_WIDTH, _PALETTE, _axes, _require

__all__ = ["curve_metric", "deletion_curves"]


_ORDER_STYLES = {
    "ratio": {"color": _PALETTE[2], "label": "smallest ratio first"},
    "drop": {"color": _PALETTE[0], "label": "smallest single-block drop first"},
    "random": {"color": "#555555", "label": "random order"},
}


def curve_metric(df: pd.DataFrame, metric: str | None = None) -> str:
    """What the deletion curves draw: accuracy where the table has it, else the drift of the
    outputs, else the loss."""
    if metric is not None:
        return metric
    return next((c for c in ("accuracy", "drift", "loss") if c in df.columns), "accuracy")


def deletion_curves(df: pd.DataFrame, *, ax: Axes | None = None, metric: str | None = None) -> Axes:
    """Accuracy (%) against the number k of blocks deleted together, one line per order; for a
    table without accuracy (another task), the drift of the outputs (%) or the loss (`metric`,
    found by itself when None).

    Random orders are drawn as their mean with the range over draws shaded (Veit et al. 2016,
    Fig. 5a); the fixed orders as lines with markers.
    """
    metric = curve_metric(df, metric)
    _require(df, ("order", "draw", "k", metric), "deletion_curves")
    scale = 100.0 if metric in ("accuracy", "drift") else 1.0
    ax = _axes(ax, SCATTER_WIDTH)
    for order, style in _ORDER_STYLES.items():
        rows = df[df["order"] == order]
        if rows.empty:
            continue
        by_k = rows.groupby("k")[metric]
        k = np.asarray(sorted(rows["k"].unique()), dtype=float)
        mean = by_k.mean().reindex(k).to_numpy(float) * scale
        draws = rows["draw"].nunique()
        if order == "random":
            low = by_k.min().reindex(k).to_numpy(float) * scale
            high = by_k.max().reindex(k).to_numpy(float) * scale
            ax.fill_between(k, low, high, color=style["color"], alpha=0.2, linewidth=0,
                            label=f"range over {draws} random orders")
            ax.plot(k, mean, color=style["color"], linestyle=":", linewidth=2,
                    label=f"random order (mean of {draws})")
        else:
            label = style["label"] if metric == "accuracy" or order != "drop" else "smallest single-block cost first"
            ax.plot(k, mean, color=style["color"], marker="o", markersize=3, label=label)
    ax.set_xlabel("blocks deleted together (k)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if metric == "accuracy":
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 102)
        ax.set_title("Accuracy as more and more blocks are deleted")
    elif metric == "drift":
        ax.set_ylabel("output drift from the intact model\n(% of the outputs' size)")
        ax.set_ylim(bottom=0)
        ax.set_title("How far the outputs move as more and more blocks are deleted")
    else:
        name = metric.replace("_", " ")
        ax.set_ylabel(name + (" (nats per token)" if per_token(df) else ""))
        ax.set_title(f"{name[:1].upper()}{name[1:]} as more and more blocks are deleted")
    ax.legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return ax
