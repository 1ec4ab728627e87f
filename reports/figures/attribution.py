"""How well each cheap proxy ranks blocks against the measured cost."""

from __future__ import annotations

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from reports.figures.common import SCATTER_WIDTH, _PALETTE, _axes, _require

__all__ = ["proxy_correlations"]


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
