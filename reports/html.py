"""One self-contained HTML report from the per-block table.

Figures are embedded as base64 PNG data URIs and the CSS is inline, so the file opens offline,
can be mailed or attached to a paper's supplement, and needs no JavaScript. The report only
assembles: verdicts come from ``probe.verdict``, figures from ``reports.figures``, and the
sections of the analyses (degradation, skipping, ...) from ``reports.sections``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import jinja2
import pandas as pd

from probe.verdict import UNSUPPORTED, VerdictRule, classify, summarize
from probe.errors import ProbeError
from probe.files import write_text
from reports import figures
from reports.embed import data_uri, render_png
from reports.sections import Section, format_cell, is_number

__all__ = ["render_report", "write_report"]

_TEMPLATES = Path(__file__).resolve().parent / "templates"
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)

# Shown first, in this order; any other config keys follow in the order given.
_CONFIG_ORDER = ("model", "checkpoint", "dataset", "samples", "mode", "seed", "date", "versions")

_RATIO_WORDS = (
    "The ratio is ||F(x)|| / ||s(x)||: at the residual addition out = F(x) + s(x), the size of what "
    "the block's branch F adds, divided by the size of the shortcut s(x) it is added to (the "
    "block's input, or at a stage change what the shortcut makes of it: a projection or a "
    "zero-padded subsample, as the run's shortcuts say), each norm taken over one "
    "sample's whole activation and averaged over the samples."
)

# How each column is printed (specs of reports.sections.format_cell); other numbers get ".4g".
# Accuracy-like shares are shown in % and their differences in percentage points (pp).
_FORMATS = {
    "accuracy": "pct",
    "flip_rate": "pct",
    "accuracy_drop": "pp",
    "noise": "pm",
    "loss": ".4f",
    "loss_increase": "+.4f",
    "cosine": "+.3f",
    "cosine_std": ".3f",
    "position": ".0f",
    "samples": ".0f",
}
_PERCENT = {"accuracy", "flip_rate"}
_POINTS = {"accuracy_drop", "noise"}


def _header(column: str) -> str:
    if column in _PERCENT:
        return f"{column.replace('_', ' ')} (%)"
    if column in _POINTS:
        return f"{column.replace('_', ' ')} (pp)"
    return column.replace("_", " ")


def _table(df: pd.DataFrame) -> dict:
    first = ["position", "block", "verdict", "ratio", "ratio_std", "accuracy_drop", "noise",
             "flip_rate", "accuracy", "loss", "loss_increase", "cosine", "cosine_std",
             "branch_norm", "branch_norm_std", "shortcut_norm", "shortcut_norm_std",
             "samples", "mode"]
    columns = [c for c in first if c in df.columns] + [c for c in df.columns if c not in first]
    rows = []
    for _, row in df.iterrows():
        rows.append({
            "verdict": str(row.get("verdict", "")),
            "cells": [{"text": format_cell(row[c], _FORMATS.get(c, ".4g")),
                       "cls": ("num " if is_number(row[c]) else "") + c}
                      for c in columns],
        })
    return {"headers": [_header(c) for c in columns], "rows": rows}


def _config_items(config: Mapping) -> list[tuple[str, str]]:
    keys = [k for k in _CONFIG_ORDER if k in config] + [k for k in config if k not in _CONFIG_ORDER]
    items = []
    for key in keys:
        value = config[key]
        if isinstance(value, Mapping):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        elif value is None:
            value = "not given"
        items.append((str(key).replace("_", " "), str(value)))
    return items


def _png(draw: Callable, df: pd.DataFrame, width: float, **kwargs) -> str:
    """Draw into a fresh figure, return it as a PNG data URI, and close the figure."""
    return data_uri(render_png(draw, df, width=width, **kwargs))


def _figures(table: pd.DataFrame, rule: VerdictRule) -> list[dict]:
    width = figures.block_figure_width(len(table))
    z = f"{rule.noise_z:g}"
    specs = [
        (figures.ratio_per_block, width, {"max_ratio": rule.max_ratio},
         "Branch size per block",
         "Each bar is one residual block, in the order the data flows through the network. "
         f"Its height is the block's ratio. {_RATIO_WORDS} The error bar is one standard deviation of "
         "that ratio across samples. A bar near 0 means the block passes its input on almost "
         "unchanged; a bar near 1 means the branch is as large as the signal it is added to. "
         f"The dashed line is the rule's threshold ({rule.max_ratio:g}) for calling a branch "
         "small. Colours are the verdicts from the rule above."),
        (figures.drop_per_block, width, {},
         "What deleting each block costs",
         "Each bar is the test accuracy lost, in percentage points, when that one block's "
         "branch is deleted (its output replaced, the shortcut left intact) and everything "
         "else is kept. Above zero: the block was doing useful work; below zero: the network "
         "is better without it. The grey band around zero is the noise for that block "
         f"({z} standard errors of the paired accuracy difference): a bar inside the band is "
         "indistinguishable from no change on this many samples."),
        (figures.ratio_vs_drop, figures.SCATTER_WIDTH, {"max_ratio": rule.max_ratio},
         "Does branch size predict deletion cost?",
         "One dot per block: its ratio (horizontal) against the accuracy lost when it is "
         "deleted (vertical, percentage points). If small branches were always safe to delete "
         "and large ones were not, the dots would rise from left to right. Spearman's \u03c1 in "
         "the title measures how well the ratio ranks blocks by their deletion cost: 1 is the "
         "same order, 0 no relation. The blocks that cost most are named."),
        (figures.cosine_per_block, width, {},
         "Direction of each branch",
         "Each bar is the mean cosine between a block's branch output F(x) and its shortcut "
         "s(x), taken over each sample's flattened activation; the error bar is one standard "
         "deviation across samples. Near 0: the branch adds something orthogonal to its input; "
         "negative: it partly cancels its input; positive: it reinforces it."),
    ]
    if "cosine" not in table.columns:
        specs = specs[:-1]
    out = []
    for draw, inches, kwargs, title, caption in specs:
        out.append({"title": title, "caption": caption, "alt": title,
                    "src": _png(draw, table, inches, **kwargs)})
    return out


def _answer(table: pd.DataFrame, summary: dict) -> dict:
    by_name = table.set_index(table["block"].astype(str))

    def entry(name: str) -> dict:
        row = by_name.loc[name]
        return {"block": name,
                "drop": format_cell(row["accuracy_drop"], _FORMATS["accuracy_drop"]),
                "noise": format_cell(row["noise"], _FORMATS["noise"]),
                "ratio": format_cell(row["ratio"], ".4g")}

    rho = summary["spearman_rho"]
    return {
        "helps_most": [entry(b) for b in summary["helps_most"]],
        "skipped": [entry(b) for b in summary["skipped"]],
        "hurts": [entry(b) for b in summary["hurts"]],
        "counts": summary["counts"],
        "blocks": summary["blocks"],
        "rho": "undefined (a column is constant)" if math.isnan(rho) else f"{rho:.2f}",
    }


def render_report(df: pd.DataFrame, *, baseline: Mapping, config: Mapping,
                  rule: VerdictRule | None = None, title: str = "probe report",
                  sections: Sequence[Section] = (), warning: str | None = None) -> str:
    """The whole report as one HTML string (see module docstring).

    df: per-block table (one row per block; columns as in docs/architecture.md and the README). baseline: {"accuracy",
    "loss", "samples"} of the unablated model. config: run configuration shown in the header
    (model, checkpoint, dataset, samples, mode, seed, date, versions, and any other keys).
    rule: the verdict rule (default VerdictRule()); verdicts are recomputed with it.
    sections: one `reports.sections.Section` per analysis, shown after the per-block figures
    and listed in a table of contents.
    warning: why the data cannot support verdicts (`probe.verdict.chance_warning`; default the
    table's `attrs["unsupported"]`): the report then opens with it instead of the answer, and
    every block's verdict is "unsupported".
    """
    rule = VerdictRule() if rule is None else rule
    missing = [k for k in ("accuracy", "loss", "samples") if k not in baseline]
    if missing:
        raise ProbeError(f"baseline needs key(s) {missing}; got {sorted(baseline)}.")
    if not isinstance(config, Mapping):
        raise ProbeError(f"config must be a dict of run settings, got {type(config).__name__}.")
    warning = warning or df.attrs.get("unsupported")
    table = classify(df, rule)
    if warning:
        table["verdict"] = UNSUPPORTED
    if "position" in table.columns:
        table = table.sort_values("position", kind="stable")
    table = table.reset_index(drop=True)
    summary = summarize(table, n=5, rule=rule)
    return _ENV.get_template("report.html").render(
        title=title,
        config=_config_items(config),
        baseline={"accuracy": format_cell(baseline["accuracy"], _FORMATS["accuracy"]),
                  "loss": format_cell(baseline["loss"], _FORMATS["loss"]),
                  "samples": format_cell(baseline["samples"], _FORMATS["samples"])},
        rule=rule.describe(),
        answer=_answer(table, summary),
        figures=_figures(table, rule),
        table=_table(table),
        ratio_words=_RATIO_WORDS,
        sections=list(sections),
        warning=warning,
    )


def write_report(path: str | os.PathLike, df: pd.DataFrame, **kwargs) -> Path:
    """Render the report and write it to ``path`` atomically; returns the path.

    The HTML goes to a temporary file in the same directory, which then replaces ``path``
    (``probe.files.write_text``), so a reader never sees a half-written report and a failure
    leaves the old one in place. Keyword arguments are those of ``render_report``.
    """
    html = render_report(df, **kwargs)  # render first: a failure here writes nothing
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return write_text(path, html)
