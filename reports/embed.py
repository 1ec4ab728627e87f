"""Figures as PNG bytes and base64 data URIs: what lets the report be one self-contained file."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from probe.files import atomic_write
from reports.figures import SCATTER_WIDTH

__all__ = ["data_uri", "render_png", "write_png"]

HEIGHT = 4.2  # inches; wide enough figures read at the report's 1100 px column width
DPI = 110


def render_png(draw: Callable, df: pd.DataFrame, *, width: float = SCATTER_WIDTH, height: float = HEIGHT,
               **kwargs) -> bytes:
    """PNG bytes of `draw(df, ax=<fresh axes>, **kwargs)`; the figure is closed afterwards.

    A pyplot-free Figure: no GUI backend is involved and nothing is registered with pyplot, so
    rendering never adds to plt.get_fignums(); plt.close releases it all the same.
    """
    with sns.axes_style("whitegrid"), sns.plotting_context("notebook", font_scale=0.9):
        fig = Figure(figsize=(width, height), layout="constrained")
        try:
            draw(df, ax=fig.add_subplot(), **kwargs)
            buffer = io.BytesIO()
            fig.savefig(buffer, format="png", dpi=DPI)
        finally:
            plt.close(fig)
    return buffer.getvalue()


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def write_png(path: str | Path, draw: Callable, df: pd.DataFrame, **kwargs) -> Path:
    """Draw `draw(df, ax=..., **kwargs)` (sizes as `render_png`) into a PNG file, atomically."""
    png = render_png(draw, df, **kwargs)
    return atomic_write(Path(path), lambda tmp: tmp.write_bytes(png))
