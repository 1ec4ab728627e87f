"""A language model's layers: similarity, spans, greedy deletion, logit lens, agreement of the scores."""

from __future__ import annotations

import math
import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from reports.figures.common import SCATTER_WIDTH, _MAX_LABELS, _PALETTE, _axes, _outside_legend, _require, block_figure_width
from reports.figures.representation import _LENS

__all__ = ["agreement_intervals", "greedy_curves", "layer_similarity_plot", "logit_lens_plot", "span_plot"]


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
