"""Figures of the per-block table and of the analyses; each is ``(df, *, ax=None) -> Axes``.

The functions only draw columns that already exist (computing stays in probe/analyses); the
optional ``verdict`` and ``noise`` columns from ``analyses.classify`` add colour and a noise
band. Blocks are drawn in forward order (by ``position`` when present). With ``ax=None`` a new
figure is made through pyplot, so it shows in notebooks; nothing here calls ``plt.show``, and
only the Agg-safe object API is used, so the functions work headless.
"""

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
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from probe.scoring.verdict import UNSUPPORTED, VERDICTS, cost_column, per_token, rank_correlation
from probe.errors import ProbeError

__all__ = [
    "COSTS",
    "SCATTER_WIDTH",
    "VERDICT_COLORS",
    "block_figure_width",
    "cka_heatmap",
    "cka_size",
    "class_drop_heatmap",
    "class_service_heatmap",
    "cosine_per_block",
    "cost_axis",
    "cost_of",
    "curve_metric",
    "degradation_curve",
    "deletion_curves",
    "drop_intervals",
    "drop_per_block",
    "heatmap_size",
    "interval_columns",
    "proxy_correlations",
    "ratio_per_block",
    "ratio_vs_drop",
    "recalibration_effect",
    "refinement_profile",
    "representation_accuracy",
]

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
COSTS = ("accuracy_drop", "loss_increase", "drift")


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
    if cost == "drift":
        return "output drift", "%" if short else "% of the outputs' size", 100.0
    if cost == "loss_increase":
        return "loss increase", "nats per token" if per_token(df) else "the task's loss", 1.0
    return "accuracy drop", "points" if short else "percentage points", 100.0


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


# --- figures of the analyses (analyses/*.py); each takes that analysis's tidy table ----------

_PLAIN_NET = _PALETTE[3]     # vermilion
_RESIDUAL_NET = _PALETTE[0]  # blue
_ORDER_STYLES = {
    "ratio": {"color": _PALETTE[2], "label": "smallest ratio first"},
    "drop": {"color": _PALETTE[0], "label": "smallest single-block drop first"},
    "random": {"color": "#555555", "label": "random order"},
}


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


def degradation_curve(df: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Error (%) against depth, plain vs residual nets, training (dashed) and test (solid).

    The figure of He et al. 2016 (Fig. 1 and 6) at the end of training: a plain net whose
    *training* error rises with depth cannot blame overfitting.
    """
    _require(df, ("depth", "residual", "train_error", "test_error"), "degradation_curve")
    ax = _axes(ax, SCATTER_WIDTH)
    for residual, color, name in ((False, _PLAIN_NET, "plain"), (True, _RESIDUAL_NET, "residual")):
        rows = df[df["residual"].astype(bool) == residual].sort_values("depth")
        if rows.empty:
            continue
        depth = rows["depth"].to_numpy(float)
        ax.plot(depth, rows["train_error"].to_numpy(float) * 100, color=color, linestyle="--", marker="s",
                label=f"{name}, training error")
        ax.plot(depth, rows["test_error"].to_numpy(float) * 100, color=color, linestyle="-", marker="o",
                label=f"{name}, test error")
    ax.set_xticks(sorted(df["depth"].unique()))
    ax.set_xlabel("depth (layers)")
    ax.set_ylabel("error (%)")
    ax.set_ylim(bottom=0)
    ax.set_title("Error against depth: plain vs residual networks")
    ax.legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return ax


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


def _truths(df: pd.DataFrame) -> list[str]:
    """The correlation columns of a proxies table: spearman_<truth>, in table order."""
    return [c for c in df.columns if str(c).startswith("spearman_")]


def proxy_correlations(df: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Spearman rho of each cheap proxy with the measured cost (one bar per `spearman_<truth>`
    column: accuracy drop and loss increase for classification, the task's cost otherwise), and
    the proxy's cost in seconds.

    A row whose correlations are all NaN is either the measured cost itself (the last such row,
    which only gives its time, in the title) or a proxy that does not apply to the task; neither
    gets bars.
    """
    truths = _truths(df)
    _require(df, ("proxy", "seconds", *(truths or ["spearman_accuracy_drop"])), "proxy_correlations")
    ax = _axes(ax, SCATTER_WIDTH)
    proxies = df[df[truths].notna().any(axis=1)].reset_index(drop=True)
    truth = df[df[truths].isna().all(axis=1)].tail(1)
    y = np.arange(len(proxies))
    height = 0.76 / len(truths)
    for index, column in enumerate(truths):
        offset = (index - (len(truths) - 1) / 2) * height
        label = "vs " + column[len("spearman_"):].replace("_", " ")
        values = pd.to_numeric(proxies[column], errors="coerce").fillna(0.0).to_numpy(float)
        ax.barh(y + offset, values, height=height, color=_PALETTE[index % len(_PALETTE)], label=label)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{p}\n({s:.2g} s)" for p, s in zip(proxies["proxy"], proxies["seconds"])],
                       fontsize="small")
    ax.invert_yaxis()
    ax.axvline(0.0, color="#333333", linewidth=0.8)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Spearman rank correlation with the measured deletion cost")
    title = "How well does each cheap signal rank the blocks?"
    if len(truth) and np.isfinite(truth["seconds"].iloc[0]):
        title += f"\n(measuring every deletion took {truth['seconds'].iloc[0]:.2g} s)"
    ax.set_title(title)
    ax.legend(frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    return ax


def interval_columns(df: pd.DataFrame, cost: str | None = None) -> tuple[str, str, str]:
    """(cost, low, high) columns of an intervals table (`analyses.uncertainty`): accuracy_drop
    with drop_low / drop_high, or a continuous cost with <cost>_low / <cost>_high."""
    if cost is None:
        cost = next((c for c in COSTS if f"{c}_low" in df.columns), None) or cost_of(df)
    if cost == "accuracy_drop":
        return cost, "drop_low", "drop_high"
    return cost, f"{cost}_low", f"{cost}_high"


def drop_intervals(df: pd.DataFrame, *, ax: Axes | None = None, cost: str | None = None) -> Axes:
    """Each block's deletion cost with its bootstrap interval, coloured by `verdict_ci`: the
    accuracy drop in points, or the task's cost (`interval_columns`: loss increase, drift in %)."""
    cost, low_column, high_column = interval_columns(df, cost)
    _require(df, ("block", cost, low_column, high_column), "drop_intervals")
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


# --- figures of the representation analysis (analyses/representation) ------------------------

_LENS = _PALETTE[1]  # orange
_STEP = "#333333"


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


# --- the lm analysis (analyses.lm): layers and sublayers of a language model ---------------------

__all__ += ["agreement_intervals", "greedy_curves", "layer_similarity_plot", "logit_lens_plot",
            "span_plot"]

_LM_LAYER = _PALETTE[0]  # blue: whole layers
_LM_SUBLAYERS = [_PALETTE[1], _PALETTE[2], _PALETTE[4], _PALETTE[7]]  # orange, green, purple, grey
_LM_COST = "#333333"
_GREEDY_STYLES = {
    "greedy": {"color": _PALETTE[0], "marker": "o", "label": "greedy (SLEB): re-scored after each removal"},
    "single_loss": {"color": _PALETTE[2], "marker": "s",
                    "label": "one shot: smallest single-layer loss increase first"},
    "block_influence": {"color": _PALETTE[3], "marker": "^", "label": "one shot: lowest block influence first (ShortGPT)"},
}


def _layer_axis(ax: Axes, indices: np.ndarray, label: str = "layer (0-based, forward order)") -> None:
    step = max(1, math.ceil(len(indices) / _MAX_LABELS))
    ax.set_xticks(indices[::step])
    ax.set_xlabel(label)


def layer_similarity_plot(df: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Block influence 1 - cos(stream in, stream out) per layer (line with dots) and per sublayer
    (one dashed series per `sublayer` name: self_attn, mlp, ...), against the layer index; with a
    `loss_increase` column, the loss increase of deleting each layer alone on a right axis.

    Columns: kind ("layer"/"sublayer"), layer_index, block_influence; optional sublayer,
    loss_increase (the `analyses.lm` per-unit table).
    """
    _require(df, ("kind", "layer_index", "block_influence"), "layer_similarity_plot")
    layers = df[df["kind"] == "layer"].sort_values("layer_index")
    ax = _axes(ax, block_figure_width(len(layers)))
    x = layers["layer_index"].to_numpy(float)
    handles = ax.plot(x, layers["block_influence"].to_numpy(float), color=_LM_LAYER, marker="o", markersize=4,
                      linewidth=1.6, label="whole layer")
    sublayers = df[df["kind"] == "sublayer"]
    if len(sublayers) and "sublayer" in sublayers.columns:
        for i, (name, rows) in enumerate(sublayers.groupby("sublayer", sort=False)):
            rows = rows.sort_values("layer_index")
            handles += ax.plot(rows["layer_index"].to_numpy(float), rows["block_influence"].to_numpy(float),
                               color=_LM_SUBLAYERS[i % len(_LM_SUBLAYERS)], marker="s", markersize=3,
                               linestyle="--", linewidth=1.0, label=f"sublayer {name or '(unnamed)'}")
    ax.set_ylim(bottom=0)
    ax.set_ylabel("block influence\n1 - cos(stream in, stream out)")
    _layer_axis(ax, x)
    if "loss_increase" in layers.columns and layers["loss_increase"].notna().any():
        right = ax.twinx()
        handles += right.plot(x, layers["loss_increase"].to_numpy(float), color=_LM_COST, linestyle=":",
                              marker="x", markersize=4, linewidth=1.2, label="loss increase, layer deleted alone")
        right.set_ylabel("loss increase when deleted\n(nats per token)")
        right.grid(False)
    ax.set_title("How much each layer turns the residual stream (ShortGPT's block influence)")
    ax.legend(handles=handles, frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.1, 1.0),
              borderaxespad=0.0)
    return ax


def _layers_deleted_axes(ax: Axes, xlabel: str, ylabel: str, title: str) -> Axes:
    """Labels of a plot against a number of layers deleted (whole numbers), its legend outside."""
    ax.set_xlabel(xlabel)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    _outside_legend(ax)
    return ax


def span_plot(df: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """For each span length n: the loss after deleting the span of n layers with the smallest
    angular distance (Gromov et al.'s pick) and after deleting the best span by measured loss,
    with the intact model's loss as a horizontal line.

    Columns: n, loss_by_angle, loss_by_loss; optional baseline_loss (`analyses.lm.span_summary`).
    """
    _require(df, ("n", "loss_by_angle", "loss_by_loss"), "span_plot")
    df = df.sort_values("n")
    ax = _axes(ax, SCATTER_WIDTH)
    n = df["n"].to_numpy(float)
    ax.plot(n, df["loss_by_angle"].to_numpy(float), color=_PALETTE[3], marker="o", markersize=4,
            label="span with the smallest angular distance (Gromov et al.)")
    ax.plot(n, df["loss_by_loss"].to_numpy(float), color=_PALETTE[0], marker="s", markersize=4, linestyle="--",
            label="best span by measured loss")
    if "baseline_loss" in df.columns and df["baseline_loss"].notna().any():
        ax.axhline(float(df["baseline_loss"].iloc[0]), color="#555555", linewidth=1.0, linestyle=":",
                   label="intact model")
    return _layers_deleted_axes(ax, "consecutive layers deleted together (n)",
                                "loss after the deletion\n(nats per token)", "Deleting a span of n consecutive layers")


def greedy_curves(df: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Perplexity (log scale) against the number k of layers deleted, one line per order:
    greedy (SLEB, re-scored after each removal) and the one-shot orders.

    Columns: order, k, perplexity (`analyses.lm.greedy_deletion`).
    """
    _require(df, ("order", "k", "perplexity"), "greedy_curves")
    ax = _axes(ax, SCATTER_WIDTH)
    for order, rows in df.groupby("order", sort=False):
        rows = rows.sort_values("k")
        style = _GREEDY_STYLES.get(order, {"color": "#555555", "marker": "o", "label": str(order)})
        ax.plot(rows["k"].to_numpy(float), rows["perplexity"].to_numpy(float), color=style["color"],
                marker=style["marker"], markersize=4, linewidth=1.4, label=style["label"])
    values = pd.to_numeric(df["perplexity"], errors="coerce")
    if (values > 0).all() and np.isfinite(values).all() and values.max() / values.min() > 3:
        ax.set_yscale("log")
    return _layers_deleted_axes(ax, "layers deleted together (k)", "perplexity",
                                "Perplexity as more and more layers are deleted")


def logit_lens_plot(df: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """The logit lens per stream (the embeddings, then after each layer): its next-token loss on
    the left axis, its top-1 agreement with the model's final prediction (%) on the right.

    Columns: layer_index (-1: the embeddings), loss, agreement (`analyses.lm.logit_lens`).
    """
    _require(df, ("layer_index", "loss", "agreement"), "logit_lens_plot")
    df = df.sort_values("layer_index")
    ax = _axes(ax, block_figure_width(len(df)))
    x = df["layer_index"].to_numpy(float)
    handles = ax.plot(x, df["loss"].to_numpy(float), color=_LM_LAYER, marker="o", markersize=4,
                      label="lens loss (next-token NLL)")
    ax.set_ylabel("loss of the lens\n(nats per token)")
    right = ax.twinx()
    handles += right.plot(x, df["agreement"].to_numpy(float) * 100, color=_LENS, marker="s", markersize=3,
                          linestyle="--", label="agrees with the final top-1 token")
    right.set_ylim(0, 102)
    right.set_ylabel("agreement with the model's\nfinal prediction (%)")
    right.grid(False)
    indices = x.astype(int)
    step = max(1, math.ceil(len(indices) / _MAX_LABELS))
    ax.set_xticks(x[::step])
    ax.set_xticklabels(["emb" if i < 0 else str(i) for i in indices[::step]])
    ax.set_xlabel("stream read: the embeddings (emb), then the output of each layer (0-based)")
    ax.set_title("What the model would predict if it stopped after each layer (logit lens)")
    ax.legend(handles=handles, frameon=False, fontsize="small", loc="upper left", bbox_to_anchor=(1.1, 1.0),
              borderaxespad=0.0)
    return ax


def agreement_intervals(df: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Spearman rho of each cheap score with the measured deletion cost, one row per (kind,
    score), with its bootstrap interval as a horizontal bar.

    Columns: kind, score, spearman; optional low, high (`analyses.lm.score_agreement`).
    """
    _require(df, ("kind", "score", "spearman"), "agreement_intervals")
    df = df.reset_index(drop=True)
    ax = _axes(ax, SCATTER_WIDTH)
    y = np.arange(len(df))
    rho = pd.to_numeric(df["spearman"], errors="coerce").to_numpy(float)
    colors = [_LM_LAYER if kind == "layer" else _LM_SUBLAYERS[0] for kind in df["kind"]]
    if {"low", "high"} <= set(df.columns):
        low = pd.to_numeric(df["low"], errors="coerce").to_numpy(float)
        high = pd.to_numeric(df["high"], errors="coerce").to_numpy(float)
        for i in np.flatnonzero(np.isfinite(low) & np.isfinite(high)):
            ax.plot([low[i], high[i]], [y[i], y[i]], color=colors[i], linewidth=2.5, alpha=0.5,
                    solid_capstyle="butt")
    ax.scatter(rho, y, c=colors, s=40, zorder=3)
    ax.set_yticks(y)
    ax.set_yticklabels([f"{score} ({kind}s)" for kind, score in zip(df["kind"], df["score"])], fontsize="small")
    ax.invert_yaxis()
    ax.axvline(0.0, color="#333333", linewidth=0.8)
    ax.set_xlim(-1.05, 1.05)
    ax.set_xlabel("Spearman rank correlation with the measured loss increase\n(each unit deleted alone; bars: "
                  "bootstrap interval)")
    ax.set_title("Do the cheap scores rank layers as their deletion cost does?")
    return ax
