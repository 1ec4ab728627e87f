"""Figures of the detection analysis: what each block carries of the detections, drift against
it, and the boxes of the intact and the ablated model on a few images."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from probe.scoring.verdict import rank_correlation
from reports.figures.common import (SCATTER_WIDTH, _PALETTE, _axes, _bars, _block_ticks, _colors, _forward, _require,
                                    _verdict_legend, block_figure_width)

__all__ = ["detection_pictures", "detections_per_block", "drift_vs_detections", "pictures_size"]

_NAMED = 12  # drift_vs_detections names every block up to this many, else the costliest few
_VIEW_TITLES = {"intact": "intact model", "costliest": "costliest block deleted",
                "skipped": "a skipped block deleted"}


def detections_per_block(df: pd.DataFrame, *, ax: Axes | None = None) -> Axes:
    """Bars: the share of the reference detections lost when each block is deleted (%), its
    standard error as error bars, coloured by verdict; black diamonds: the mAP50 drop in
    points, on the same axis."""
    _require(df, ("block", "detections_lost", "map50_drop"), "detections_per_block")
    df = _forward(df)
    ax = _axes(ax, block_figure_width(len(df)))
    _bars(ax, df, "detections_lost", "detections_lost_se" if "detections_lost_se" in df.columns else None,
          scale=100.0)
    x = np.arange(len(df))
    drop = pd.to_numeric(df["map50_drop"], errors="coerce").to_numpy(float) * 100
    ax.scatter(x, drop, marker="D", s=22, color="black", zorder=3)
    ax.axhline(0.0, color="#333333", linewidth=0.8)
    _block_ticks(ax, df["block"])
    ax.set_ylabel("lost when deleted\n(% of detections; mAP50: points)")
    ax.set_title("What the detector loses when one block's branch is deleted")
    _verdict_legend(ax, df, [Line2D([], [], marker="D", linestyle="", color="black", label="mAP50 drop")])
    return ax


def drift_vs_detections(df: pd.DataFrame, *, ax: Axes | None = None, max_drift: float | None = None) -> Axes:
    """One dot per block: the drift of the raw outputs when it is deleted (x, %) against the
    share of detections lost (y, %), coloured by verdict; Spearman's rho in the title.
    max_drift: the drift the verdict rule calls unchanged, drawn as a dashed line."""
    _require(df, ("block", "drift", "detections_lost"), "drift_vs_detections")
    df = _forward(df)
    ax = _axes(ax, SCATTER_WIDTH)
    x = pd.to_numeric(df["drift"], errors="coerce").to_numpy(float) * 100
    y = pd.to_numeric(df["detections_lost"], errors="coerce").to_numpy(float) * 100
    ax.scatter(x, y, c=_colors(df), s=40, edgecolors="white", linewidths=0.5, zorder=3)
    named = df.index if len(df) <= _NAMED else df["detections_lost"].nlargest(3).index
    for i in named:
        ax.annotate(str(df.loc[i, "block"]), (x[i], y[i]), textcoords="offset points", xytext=(4, 4),
                    fontsize="x-small")
    extra = []
    if max_drift is not None:
        extra.append(ax.axvline(max_drift * 100, color="#333333", linestyle="--", linewidth=1,
                                label=f"drift called unchanged (< {max_drift:.0%})"))
    ax.set_xlabel("drift of the raw outputs when deleted (% of their size)")
    ax.set_ylabel("detections lost when deleted (%)")
    # Room for the names at the right; negative shares (a ground truth found better) stay in view.
    finite_x, finite_y = x[np.isfinite(x)], y[np.isfinite(y)]
    right = max([*finite_x, *([max_drift * 100] if max_drift is not None else []), 1e-9])
    ax.set_xlim(0, right * 1.15)
    low = min([0.0, *finite_y])
    ax.set_ylim(low - 0.05 * (max([*finite_y, 1e-9]) - low), None)
    ax.axhline(0.0, color="#333333", linewidth=0.8)
    rho = rank_correlation(df, "drift", "detections_lost")
    ax.set_title("Drift against detections lost" + ("" if np.isnan(rho) else f" (Spearman \u03c1 = {rho:+.2f})"))
    _verdict_legend(ax, df, extra)
    return ax


def pictures_size(views: pd.DataFrame, images: Sequence[np.ndarray]) -> dict[str, float]:
    """{"width", "height"} in inches for `detection_pictures`: about 3.2 inches per picture."""
    columns, rows = max(len(views), 1), max(len(images), 1)
    aspect = max((image.shape[0] / image.shape[1] for image in images), default=1.0)
    return {"width": float(min(16.0, 0.4 + 3.2 * columns)), "height": float(min(24.0, 0.6 + 3.2 * aspect * rows))}


def detection_pictures(df: pd.DataFrame, *, images: Sequence[np.ndarray], views: pd.DataFrame,
                       ax: Axes | None = None) -> Axes:
    """A grid on one axes: a row per image, a column per view (`views`: the intact model, a
    block deleted), each picture with its model's boxes (`df`: image, view, x1, y1, x2, y2,
    score, name), coloured by class, labelled with the class and the score."""
    _require(df, ("image", "view", "x1", "y1", "x2", "y2", "score"), "detection_pictures")
    _require(views, ("view", "block"), "detection_pictures")
    ax = _axes(ax, pictures_size(views, images)["width"])
    height = max((image.shape[0] for image in images), default=1)
    width = max((image.shape[1] for image in images), default=1)
    gap = 0.06 * width
    labels = sorted(set(df["label"])) if "label" in df.columns else []
    color = {label: _PALETTE[i % len(_PALETTE)] for i, label in enumerate(labels)}
    for c, view in enumerate(views.itertuples()):
        left = c * (width + gap)
        lost = getattr(view, "detections_lost", np.nan)
        title = _VIEW_TITLES.get(view.view, view.view) + (f"\n{view.block}" if view.block else "") + (
            f" ({lost:.1%} of detections lost)" if view.block and pd.notna(lost) else "")
        ax.text(left + width / 2, -gap * 0.3, title, ha="center", va="bottom", fontsize="small")
        for r, image in enumerate(images):
            top = r * (height + gap)
            ax.imshow(image, extent=(left, left + image.shape[1], top + image.shape[0], top), interpolation="nearest")
            mine = df[(df["view"] == view.view) & (df["image"] == r)]
            for box in mine.itertuples():
                # Boxes reaching past the picture are drawn to its edge, not into the next one.
                x1, x2 = np.clip([box.x1, box.x2], 0, image.shape[1])
                y1, y2 = np.clip([box.y1, box.y2], 0, image.shape[0])
                edge = color.get(getattr(box, "label", None), _PALETTE[0])
                ax.add_patch(Rectangle((left + x1, top + y1), x2 - x1, y2 - y1, fill=False, edgecolor=edge,
                                       linewidth=1.2))
                name = getattr(box, "name", "")
                ax.text(left + x1, top + y1, f"{name} {box.score:.2f}".strip(), fontsize=5, color="white",
                        va="bottom", clip_on=True,
                        bbox={"facecolor": edge, "edgecolor": "none", "pad": 0.5, "alpha": 0.8})
    columns, rows = max(len(views), 1), max(len(images), 1)
    ax.set_xlim(-gap / 2, columns * (width + gap) - gap / 2)
    ax.set_ylim(rows * (height + gap) - gap / 2, -gap * 1.6)
    ax.set_aspect("equal")
    ax.axis("off")
    return ax
