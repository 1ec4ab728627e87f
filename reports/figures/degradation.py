"""The degradation figure: plain against residual networks as depth grows."""

from __future__ import annotations

import pandas as pd
from matplotlib.axes import Axes

from reports.figures.common import SCATTER_WIDTH, _PALETTE, _axes, _require

__all__ = ["degradation_curve"]


_PLAIN_NET = _PALETTE[3]     # vermilion


_RESIDUAL_NET = _PALETTE[0]  # blue


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
