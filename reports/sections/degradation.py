"""The degradation section: does depth hurt without shortcuts?"""

from __future__ import annotations

from collections.abc import Sequence
import pandas as pd

from reports import figures
from reports.sections.common import PNG, ReportContext, Section, _figure, _table

__all__ = ["TITLE", "degradation_section", "figure_files", "section", "summary_lines", "terminal"]

TITLE = "Does depth hurt without shortcuts? (degradation)"  # the section's heading, also when it did not run


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
    return Section(id="degradation", title=TITLE,
                   lead=["Plain and residual CIFAR-style networks of several depths were trained identically; "
                         "this shows what the shortcut connections buy. Trained networks are cached, so only the "
                         "first run trains them.", *lines],
                   figures=[fig], tables=[table])


def summary_lines(table: pd.DataFrame) -> list[str]:
    """The finding in words: does the deeper plain net train worse, and what do shortcuts buy?"""
    plain = table[~table["residual"]].set_index("depth")
    residual = table[table["residual"]].set_index("depth")
    lines = []
    if len(plain) >= 2:
        shallow, deep = plain.index.min(), plain.index.max()
        gap = plain.loc[shallow, "train_accuracy"] - plain.loc[deep, "train_accuracy"]
        where = f"{gap * 100:.1f} points below" if gap > 0 else "not below"
        lines.append(f"plain-{deep} trains to {plain.loc[deep, 'train_accuracy']:.1%} training accuracy, "
                     f"{where} plain-{shallow}'s {plain.loc[shallow, 'train_accuracy']:.1%}.")
    for depth in residual.index.intersection(plain.index):
        ours, theirs = residual.loc[depth, "train_accuracy"], plain.loc[depth, "train_accuracy"]
        lines.append(f"depth {depth}: the residual net trains to {ours:.1%}, the plain net to {theirs:.1%} "
                     f"({(ours - theirs) * 100:+.1f} points for the shortcuts).")
    return lines


def section(result, context: ReportContext) -> Section:
    """The report's degradation section, from `analyses.degradation.DegradationResult`."""
    return degradation_section(result.table, lines=summary_lines(result.table))


def figure_files(result, task) -> list[PNG]:
    """The PNG files `python -m analyses.degradation` writes."""
    return [PNG("degradation.png", figures.degradation_curve, result.table)]


def terminal(result, task) -> str:
    """What `python -m analyses.degradation` prints: the table, then the finding in words."""
    shown = result.table[["depth", "model", "train_accuracy", "test_accuracy", "train_loss", "test_loss"]]
    return "\n".join([shown.to_string(index=False, float_format="{:.4f}".format), *summary_lines(result.table)])
