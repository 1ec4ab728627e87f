"""The degradation section: does depth hurt without shortcuts?"""

from __future__ import annotations

from collections.abc import Sequence
import pandas as pd

from reports import figures
from reports.sections.common import Section, TITLES, _figure, _table

__all__ = ["degradation_section"]


def degradation_section(df: pd.DataFrame, *, lines: Sequence[str] = ()) -> Section:
    """From `analyses.degradation.degradation`."""
    fig = _figure(figures.degradation_curve, df, "Error against depth",
                  "Each point is one network, trained with the same recipe and then evaluated; its height is "
                  "the error (100% minus accuracy). Dashed lines with squares: error on the training data the "
                  "network was fitted to; solid lines with circles: error on held-out test data. Vermilion: "
                  "plain networks (the same stacks of layers with the shortcut connections removed); blue: "
                  "residual networks. If deeper plain networks only overfitted, their training error would "
                  "fall with depth. A dashed vermilion line that rises with depth is the degradation problem "
                  "(He et al. 2016, Fig. 1 and 6): more layers make a plain network harder to optimise, and the "
                  "shortcuts remove the problem.")
    table = _table(df, {"depth": ("depth", "d"), "model": ("model", None),
                        "train_accuracy": ("train accuracy (%)", "pct"), "test_accuracy": ("test accuracy (%)", "pct"),
                        "train_loss": ("train loss", ".4f"), "test_loss": ("test loss", ".4f"),
                        "epochs": ("epochs", "d")},
                   "Final accuracy and mean cross-entropy of each network on the whole training and test splits.")
    return Section(id="degradation", title=TITLES["degradation"],
                   lead=["Plain and residual CIFAR-style networks of several depths were trained identically; "
                         "this shows what the shortcut connections buy. Trained networks are cached, so only the "
                         "first run trains them.", *lines],
                   figures=[fig], tables=[table])
