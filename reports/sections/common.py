"""What every section shares: the Section, Figure and Table records the template renders, cell formatting, cost words."""

from __future__ import annotations

import importlib
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
import numpy as np
import pandas as pd

from probe.scoring.cost import COSTS
from reports.embed import data_uri, render_png

__all__ = ["Figure", "PNG", "ReportContext", "Section", "Table", "format_cell", "is_number", "not_run_section"]


@dataclass(frozen=True)
class ReportContext:
    """What every section needs from its run besides the analysis's result.

    cost: the per-block table's cost column (`probe.scoring.verdict.cost_column`: accuracy_drop,
    loss_increase or drift), which the sections show; recalibrated: the run refitted BatchNorm
    statistics for every deletion (`--bn-recalibrate`); calibration_samples: on how many samples.
    """

    cost: str = "accuracy_drop"
    recalibrated: bool = False
    calibration_samples: int | None = None


@dataclass(frozen=True)
class PNG:
    """One figure an analysis's command writes as a PNG file: `draw(df, **options)` into `name`."""

    name: str
    draw: object  # a figure function of reports.figures: (df, *, ax=None, ...) -> Axes
    df: pd.DataFrame
    options: dict = field(default_factory=dict)


@dataclass
class Figure:
    title: str
    caption: str
    src: str  # a data: URI, so the report stays one file
    alt: str = ""


@dataclass
class Table:
    caption: str
    headers: list[str]
    rows: list[list[dict]]  # cells: {"text", "cls"}


@dataclass
class Section:
    """A titled part of the report; `id` is its anchor in the table of contents."""

    id: str
    title: str
    lead: list[str] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


_MISSING = "\u2013"


def format_cell(value, spec: str | None) -> str:
    """How every table of the report prints a value. spec: "pct" (a share, shown in %), "pp" (a
    difference of shares, in signed percentage points), "pm" (a +- band, in points), "pm" and a
    format spec (a +- band as that spec prints it, e.g. "pm.4f"), a format spec, or None (shown
    as is). Missing values (None, "", NaN) are a dash; booleans yes/no."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if not isinstance(value, numbers.Real) or spec is None:
        return _MISSING if value is None or (isinstance(value, str) and value == "") else str(value)
    value = float(value)
    if math.isnan(value):
        return _MISSING
    if spec == "pct":
        return f"{value * 100:.2f}"
    if spec == "pp":
        return f"{value * 100:+.2f}"
    if spec == "pm":
        return f"\u00b1{value * 100:.2f}"
    if spec.startswith("pm"):
        return "\u00b1" + format(value, spec[2:])
    if spec.endswith("d"):
        return format(int(round(value)), spec)  # counts: "d" and ",d" need an int
    return format(value, spec)


def is_number(value) -> bool:
    """A real number (numpy scalars included), not a boolean: what is right-aligned."""
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _cell(value, spec: str | None) -> dict:
    """One table cell of `format_cell`, right-aligned when it is a number."""
    return {"text": format_cell(value, spec), "cls": "num" if is_number(value) and spec is not None else ""}


def _table(df: pd.DataFrame, columns: Mapping[str, tuple[str, str | None]], caption: str) -> Table:
    """columns: {column: (header, spec)} in display order."""
    rows = [[_cell(row[c], spec) for c, (_, spec) in columns.items()] for _, row in df.iterrows()]
    return Table(caption=caption, headers=[header for header, _ in columns.values()], rows=rows)


def _figure(draw, df: pd.DataFrame, title: str, caption: str, **size) -> Figure:
    return Figure(title=title, caption=caption, src=data_uri(render_png(draw, df, **size)), alt=title)


def _bn_note(recalibrated: bool, calibration_samples: int | None = None) -> str:
    if recalibrated:
        amount = f"{calibration_samples} " if calibration_samples else ""
        return ("BatchNorm statistics: recalibrated. After each deletion the BatchNorm layers re-estimated their "
                f"running mean and variance on {amount}held-out samples (never among the evaluated ones) "
                "with the deletion in place, before evaluating (the model itself was restored exactly "
                "afterwards).")
    return ("BatchNorm statistics: as trained (not recalibrated after deletions). Numbers with recalibrated "
            "statistics are in the BatchNorm section when it was run.")


def _recalibrated(df: pd.DataFrame) -> bool:
    return bool(len(df)) and "bn_recalibrated" in df.columns and bool(df["bn_recalibrated"].iloc[0])


# {column: (header, spec)} of every task's sweep columns, in display order.
_TASK_COLUMNS = {
    "loss": ("loss", ".4f"), "perplexity": ("perplexity", ".4g"), "token_accuracy": ("token accuracy (%)", "pct"),
    "accuracy": ("accuracy (%)", "pct"), "loss_increase": ("loss increase", "+.4f"),
    "loss_increase_se": ("its standard error", ".4f"), "perplexity_ratio": ("perplexity ratio", ".4f"),
    "token_accuracy_drop": ("token accuracy drop (pp)", "pp"), "accuracy_drop": ("accuracy drop (pp)", "pp"),
    "drift": ("drift (%)", "pct"), "drift_se": ("its standard error (%)", "pct"), "kl": ("KL (nats)", ".4g"),
    "token_flip_rate": ("token flip rate (%)", "pct"), "flip_rate": ("flip rate (%)", "pct"),
}


# (the cost in words, header of its column, format spec), by cost column (`probe.scoring.cost`)
_COST_WORDS = {column: (cost.long_name, cost.header, cost.spec) for column, cost in COSTS.items()}


def _present(columns: Mapping[str, tuple[str, str | None]], df: pd.DataFrame) -> dict:
    """`columns` restricted to those `df` has, in the same order."""
    return {c: spec for c, spec in columns.items() if c in df.columns}


def _amount(value, cost: str) -> str:
    """One cost in a sentence: "+1.25 points", "+0.0123" (loss), "3.40%" (drift)."""
    if cost == "accuracy_drop":
        return f"{format_cell(value, 'pp')} points"
    if cost == "drift":
        return f"{format_cell(value, 'pct')}%"
    return format_cell(value, "+.4f")


def _cost_header(cost: str) -> tuple[str, str]:
    """(header, spec) of a cost column in a section's table."""
    _, header, spec = _COST_WORDS.get(cost, (cost, cost.replace("_", " "), ".4g"))
    return header, spec


def not_run_section(id: str, reason: str) -> Section:
    """The section of an analysis that did not run, saying why (so a reader knows it is missing),
    under the heading its page gives (`reports/sections/<id>.py`: TITLE; else its name)."""
    try:
        title = getattr(importlib.import_module(f"reports.sections.{id}"), "TITLE", id)
    except ImportError:
        title = id
    return Section(id=id, title=title, lead=[f"Not run: {reason}"])
