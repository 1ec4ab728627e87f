"""One self-contained HTML report from the per-block table.

Figures are embedded as base64 PNG data URIs and the CSS is inline, so the file opens offline,
can be mailed or attached to a paper's supplement, and needs no JavaScript. The report only
assembles: verdicts come from ``probe.scoring.verdict``, figures from ``reports.figures``, and the
sections of the analyses (degradation, skipping, ...) from ``reports.sections``.

It reads in the order a reader asks: the answer first (which blocks carry the network, which it
skips, the rule behind them, the figure of what deleting each block costs), then the per-block
table and figures, the analyses' sections, and last the run record, folded in a ``<details>``
element and holding only the settings that apply to the run (`applicable_settings`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path

import jinja2
import pandas as pd

from probe.scoring.tasks import TASKS
from probe.scoring.verdict import UNSUPPORTED, VerdictRule, classify, cost_column, per_token, summarize
from probe.errors import ProbeError
from probe.scoring.cost import cost_named
from probe.scoring.results import table_info
from probe.loading.text import TEXT_DATASETS
from probe.files import write_text
from reports import figures
from reports.embed import data_uri, render_png
from reports.sections import Section, format_cell, is_number

__all__ = ["applicable_settings", "render_report", "write_report"]

_TEMPLATES = Path(__file__).resolve().parent / "templates"
_ENV = jinja2.Environment(
    loader=jinja2.FileSystemLoader(_TEMPLATES),
    autoescape=True,
    undefined=jinja2.StrictUndefined,
    trim_blocks=True,
    lstrip_blocks=True,
)

# The run record: these first, in this order; any other config keys follow in the order given.
_CONFIG_ORDER = ("model", "checkpoint", "dataset", "task", "samples", "mode", "seed", "date", "versions")

# Which settings apply to which runs (`applicable_settings`), by RunConfig's field names and the
# entries probe.ablate adds ("images": how the images were read).
# The windows of token ids probe cuts its own text corpora into (probe.loading.text).
_TEXT_SETTINGS = ("seq_len",)
# How images are read and laid out, and how a model is trained here (only image classifiers are).
_IMAGE_SETTINGS = ("image_size", "normalize", "in_channels", "images", "channels_last", "download",
                   "epochs", "train_batch_size", "lr", "momentum", "weight_decay")
# Read by one analysis only: setting -> its section (probe.commands.config.SECTIONS).
_SECTION_SETTINGS = {"degradation_depths": ("degradation",), "random_draws": ("skipping",),
                     "curve_points": ("skipping",), "bootstrap": ("uncertainty", "lm"), "level": ("uncertainty", "lm"),
                     "spans": ("lm",), "greedy_steps": ("lm",)}
# Where refitted BatchNorm statistics come from: used by --bn-recalibrate and the recalibration section.
_CALIBRATION_SETTINGS = ("calibration_samples", "calibration_root")
# Switches that only turn something on: off, they did nothing in this run.
_SWITCHES = ("download", "allow_pickle")
# probe.ablate's words for BN recalibration ("off (trained ...)", "on (...); ..."), which say
# what the raw `bn_recalibrate` flag says, and more.
_RECALIBRATION_WORDS = "BN recalibration"

_RATIO_WORDS = (
    "The ratio is ||F(x)|| / ||s(x)||: at the residual addition out = F(x) + s(x), the size of what "
    "the block's branch F adds, divided by the size of the shortcut s(x) it is added to (the "
    "block's input, or at a stage change what the shortcut makes of it: a projection or a "
    "zero-padded subsample, as the run's shortcuts say), each norm taken over one "
    "sample's whole activation and averaged over the samples."
)

# How each column is printed (specs of reports.sections.format_cell); other numbers get ".4g".
# Accuracy-like shares are shown in % and their differences in percentage points (pp); the
# drift of the outputs (a relative change) in %.
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
    "loss_increase_se": ".4f",
    "perplexity": ".4g",
    "perplexity_ratio": ".4f",
    "token_accuracy": "pct",
    "token_accuracy_drop": "pp",
    "token_flip_rate": "pct",
    "tokens": ",.0f",
    "drift": "pct",
    "drift_se": "pct",
    "kl": ".4g",
    "detections_kept": "pct",
    "detections_lost": "pct",
    "detections_lost_se": "pct",
    "detections": ".2f",
    "map50": ".3f",
    "map50_95": ".3f",
    "map50_drop": "pp",
}
_PERCENT = {"accuracy", "flip_rate", "token_accuracy", "token_flip_rate", "drift", "drift_se", "detections_kept",
            "detections_lost", "detections_lost_se"}
_POINTS = {"accuracy_drop", "noise", "token_accuracy_drop", "map50_drop"}
# The per-block table's first columns, in this order; the others follow as the table has them.
_FIRST = ["position", "block", "verdict", "ratio", "ratio_std", "accuracy_drop", "noise",
          "flip_rate", "accuracy", "loss", "loss_increase", "cosine", "cosine_std",
          "branch_norm", "branch_norm_std", "shortcut_norm", "shortcut_norm_std",
          "samples", "mode"]
_FIRST_CONTINUOUS = ["position", "block", "verdict", "ratio", "ratio_std", "{cost}", "{cost}_se", "noise", "kl",
                     "perplexity_ratio", "token_accuracy_drop", "token_flip_rate", "accuracy_drop", "loss",
                     "loss_increase", "perplexity", "token_accuracy", "accuracy", "cosine", "cosine_std",
                     "branch_norm", "branch_norm_std", "shortcut_norm", "shortcut_norm_std", "samples", "tokens",
                     "mode"]


def _format(column: str, cost: str) -> str:
    if column == "noise":  # in the cost's unit: points of accuracy, the loss itself, % of the outputs
        return cost_named(cost).noise_spec
    return _FORMATS.get(column, ".4g")


def _header(column: str, cost: str = "accuracy_drop") -> str:
    if column == "noise":
        return cost_named(cost).noise_header
    if column in _PERCENT:
        return f"{column.replace('_', ' ')} (%)"
    if column in _POINTS:
        return f"{column.replace('_', ' ')} (pp)"
    return column.replace("_", " ")


def _table(df: pd.DataFrame, cost: str = "accuracy_drop") -> dict:
    first = _FIRST if cost == "accuracy_drop" else list(dict.fromkeys(c.format(cost=cost) for c in _FIRST_CONTINUOUS))
    columns = [c for c in first if c in df.columns] + [c for c in df.columns if c not in first]
    rows = []
    for _, row in df.iterrows():
        rows.append({
            "verdict": str(row.get("verdict", "")),
            "cells": [{"text": format_cell(row[c], _format(c, cost)),
                       "cls": ("num " if is_number(row[c]) else "") + c}
                      for c in columns],
        })
    return {"headers": [_header(c, cost) for c in columns], "rows": rows}


# What the per-block table's columns mean, by cost column (classification: the template's note).
_TABLE_NOTES = {
    "accuracy_drop": "",  # the template's own note
    "loss_increase": "One row per residual block, in forward order. The loss increase{unit} is the loss with the "
                     "block deleted minus the intact model's, with its standard error (se) over the samples and "
                     "the noise band the verdict uses, in the same unit; a positive increase means the network is "
                     "worse without the block.",
    "drift": "One row per residual block, in forward order. Drift is how far the outputs move from the intact "
             "model's when the block is deleted (||outputs - intact|| / ||intact|| per sample, averaged), in % of "
             "their size, with its standard error (se) over the samples and the noise band the verdict uses, "
             "also in %. KL, where the outputs carry logits, is the mean divergence of the deleted model's "
             "prediction from the intact one's, in nats.",
    "detections_lost": "One row per residual block, in forward order. Detections kept is the share of the "
                       "reference's detections (the ground truth where the images have it, else the intact model's "
                       "own) the model still makes with the block deleted, matched one to one at IoU 0.5 or more "
                       "with the same class; detections lost is what the deletion loses beyond the intact model's "
                       "own misses, with its standard error (se) over the images and the noise band the verdict "
                       "uses; all in %. Detections are per image; mAP50 and mAP50-95 are against the same reference, "
                       "and the mAP50 drop in points. Drift is how far the raw outputs move, in % of their size.",
}


def _table_note(table: pd.DataFrame, cost: str) -> str:
    """What the per-block table's columns mean ("" for classification: the template says it)."""
    note = _TABLE_NOTES.get(cost, "").format(unit=" (nats per token)" if per_token(table) else "")
    if cost == "loss_increase" and per_token(table):
        note += (" Token accuracy and token flip rate (share of predicted tokens that changed) are in %, the token "
                 "accuracy drop in percentage points (pp); the perplexity ratio is the perplexity with the block "
                 "deleted over the intact model's.")
    elif cost == "loss_increase" and "accuracy" in table.columns:
        note += " Accuracy is in %, the accuracy drop in percentage points (pp)."
    return note


def _empty(value) -> bool:
    """None, "", or an empty tuple, list, set or mapping: a setting that says nothing."""
    if value is None:
        return True
    if isinstance(value, str):
        return value.strip() == ""
    return isinstance(value, (tuple, list, set, frozenset, Mapping)) and len(value) == 0


def applicable_settings(config: Mapping, *, task_name: str, recalibrated: bool | None = None,
                        sections_run: Collection[str] = (),
                        setting_sections: Mapping[str, Collection[str]] | None = None) -> dict:
    """The settings of `config` that apply to this run, in the order the run record lists them.

    config: the run's settings, as `probe.ablate` hands them to `write_report` (every RunConfig
    field that is set, and what the run found: checkpoint, device, samples, images, task,
    shortcuts, "BN recalibration", seconds, threads, versions, date), or any dict of settings.
    task_name: the run's task: "classification", "lm", "drift"; any other name is a task of the
    user's ("custom").
    recalibrated: whether BatchNorm statistics were refitted for the deletions (--bn-recalibrate);
    None: as the config's `bn_recalibrate` says.
    sections_run: the analysis sections that ran (names of the registry of analyses); a section
    that did not run reads none of its settings.
    setting_sections: {setting: the sections that read it} for the settings that belong to
    analyses (`probe.ablate` derives it from each analysis's declared option groups); None: the
    built-in analyses' (`_SECTION_SETTINGS`).

    Each rule reads the run itself (its task, its data, its sections, its recalibration), never
    the model's name:

    - empty values (None, "", empty tuples, lists, dicts) are left out;
    - the run is on text when its task is "lm" or its data set is one of probe's text corpora
      (`probe.loading.text.TEXT_DATASETS`). `seq_len` applies only to text that probe cut into
      windows (not to a data set of the user's, ``package.module:function``, which brings its own
      sequences); image settings (image_size, normalize, in_channels, images, channels_last,
      download) and training settings (epochs, train_batch_size, lr, momentum, weight_decay: only
      image classifiers are trained here) only to runs not on text;
    - a setting read by analyses only when one of their sections ran (`setting_sections`; by
      default degradation_depths: degradation, random_draws and curve_points: skipping, bootstrap
      and level: uncertainty or lm, spans and greedy_steps: lm);
    - calibration_samples and calibration_root only when BatchNorm statistics were refitted: with
      BN recalibration on, or in the recalibration section;
    - switches that only turn something on (download, allow_pickle) only when on;
    - the raw `bn_recalibrate` flag only where no "BN recalibration" entry says it in words.

    Everything else (model, checkpoint, data set and split, task, samples, mode, seed, device,
    precision, threads, timings, versions, and keys this function does not know) applies to every
    run. Keys and values are returned as given; `_CONFIG_ORDER` first, then the config's order.
    """
    if not isinstance(config, Mapping):
        raise ProbeError(f"config must be a dict of run settings, got {type(config).__name__}.")
    dataset = str(config.get("dataset") or "")
    text = task_name == "lm" or dataset in TEXT_DATASETS
    ran = set(sections_run)
    refitted = bool(config.get("bn_recalibrate")) if recalibrated is None else bool(recalibrated)
    owners = _SECTION_SETTINGS if setting_sections is None else setting_sections

    def applies(key, value) -> bool:
        if _empty(value):
            return False
        if key in _TEXT_SETTINGS:
            return text and ":" not in dataset  # a user's data set: probe.commands.inputs.is_user_dataset
        if key in _IMAGE_SETTINGS and text:
            return False
        if key in owners:
            return bool(set(owners[key]) & ran)
        if key in _CALIBRATION_SETTINGS:
            return refitted or "recalibration" in ran
        if key in _SWITCHES:
            return value is True
        if key == "bn_recalibrate":
            return _RECALIBRATION_WORDS not in config
        return True

    keys = [k for k in _CONFIG_ORDER if k in config] + [k for k in config if k not in _CONFIG_ORDER]
    return {key: config[key] for key in keys if applies(key, config[key])}


def _config_items(settings: Mapping) -> list[tuple[str, str]]:
    """The run record's rows (name, value) of the settings `applicable_settings` kept."""
    items = []
    for key, value in settings.items():
        if isinstance(value, Mapping):
            value = ", ".join(f"{k} {v}" for k, v in value.items())
        items.append((str(key).replace("_", " "), str(value)))
    return items


def _task_name(df: pd.DataFrame, kind: str) -> str:
    """The table's task: `table_info(table).task` (a task's name; not one of `TASKS`: "custom"), else
    what its cost column and baseline say (`_baseline`'s kind: a loss of its own is "custom")."""
    name = table_info(df).task
    if name:
        return str(name) if name in TASKS else "custom"
    return "custom" if kind == "loss" else kind


def _ran(section: Section) -> bool:
    """Whether a section's analysis ran: `reports.sections.not_run_section` gives one "Not run: ..."
    paragraph and nothing else."""
    not_run = (len(section.lead) == 1 and str(section.lead[0]).startswith("Not run:")
               and not section.figures and not section.tables)
    return not not_run


def _recalibrated(table: pd.DataFrame) -> bool | None:
    """Whether the table's rows were scored with refitted BatchNorm statistics (its
    `bn_recalibrated` column); None where it does not say (the config then decides)."""
    if "bn_recalibrated" not in table.columns:
        return None
    return bool((table["bn_recalibrated"] == True).any())  # noqa: E712 (elementwise)


def _subject(config: Mapping) -> dict:
    """The model and data set the report is about, for its first lines ({} where not given)."""
    return {key: str(config[key]) for key in ("model", "dataset") if not _empty(config.get(key))}


def _png(draw: Callable, df: pd.DataFrame, width: float, **kwargs) -> str:
    """Draw into a fresh figure, return it as a PNG data URI, and close the figure."""
    return data_uri(render_png(draw, df, width=width, **kwargs))


def _cost_captions(cost: str, z: str, df: pd.DataFrame) -> tuple[str, str]:
    """The captions of the deletion-cost bars and of the ratio-vs-cost scatter, for `cost`."""
    if cost == "drift":
        return ("Each bar is how far the model's outputs move, in % of their size (the relative L2 change "
                "||outputs - intact outputs|| / ||intact outputs||, averaged over the samples), when that one "
                "block's branch is deleted (its output replaced, the shortcut left intact) and everything "
                "else is kept. Tall: the block carries the network; near zero: the outputs hardly notice it. "
                "Drift has no sign. The grey band is the noise for that block "
                f"({z} standard errors of the per-sample drift, never less than the rule's floor): a bar "
                "inside the band counts as no change.",
                "One dot per block: its ratio (horizontal) against how far the outputs move when it is "
                "deleted (vertical, % of their size). If small branches were always safe to delete and "
                "large ones were not, the dots would rise from left to right. Spearman's \u03c1 in the title "
                "measures how well the ratio ranks blocks by their deletion cost: 1 is the same order, 0 no "
                "relation. The blocks that cost most are named.")
    if cost == "detections_lost":
        return ("Each bar is the share of the reference's detections (the ground truth where the images have it, "
                "else the intact model's own) that the detector no longer makes when that one block's branch is "
                "deleted (its output replaced, the shortcut left intact), beyond those the intact model misses; "
                "detections are matched one to one at IoU 0.5 or more with the same class. Above zero: the block "
                "carries detections; below zero (against a ground truth only): the detector finds more of it "
                f"without the block. The grey band around zero is the noise for that block ({z} standard errors "
                "of the paired per-image difference): a bar inside the band is indistinguishable from no change "
                "on these images.",
                "One dot per block: its ratio (horizontal) against the share of the reference's detections lost "
                "when it is deleted (vertical, %). If small branches were always safe to delete and large ones "
                "were not, the dots would rise from left to right. Spearman's \u03c1 in the title measures how "
                "well the ratio ranks blocks by their deletion cost: 1 is the same order, 0 no relation. The "
                "blocks that cost most are named.")
    if cost == "loss_increase":
        unit = " (mean NLL per token, in nats)" if per_token(df) else ""
        return ("Each bar is the increase of the loss" + unit + " when that one block's branch is deleted "
                "(its output replaced, the shortcut left intact) and everything else is kept. Above zero: "
                "the block was doing useful work; below zero: the network is better without it. The grey "
                f"band around zero is the noise for that block ({z} standard errors of the paired per-sample "
                "loss difference): a bar inside the band is indistinguishable from no change on this many "
                "samples.",
                "One dot per block: its ratio (horizontal) against the loss increase when it is deleted "
                "(vertical). If small branches were always safe to delete and large ones were not, the "
                "dots would rise from left to right. Spearman's \u03c1 in the title measures how well the "
                "ratio ranks blocks by their deletion cost: 1 is the same order, 0 no relation. The blocks "
                "that cost most are named.")
    return ("Each bar is the test accuracy lost, in percentage points, when that one block's "
            "branch is deleted (its output replaced, the shortcut left intact) and everything "
            "else is kept. Above zero: the block was doing useful work; below zero: the network "
            "is better without it. The grey band around zero is the noise for that block "
            f"({z} standard errors of the paired accuracy difference): a bar inside the band is "
            "indistinguishable from no change on this many samples.",
            "One dot per block: its ratio (horizontal) against the accuracy lost when it is "
            "deleted (vertical, percentage points). If small branches were always safe to delete "
            "and large ones were not, the dots would rise from left to right. Spearman's \u03c1 in "
            "the title measures how well the ratio ranks blocks by their deletion cost: 1 is the "
            "same order, 0 no relation. The blocks that cost most are named.")


def _figures(table: pd.DataFrame, rule: VerdictRule, cost: str = "accuracy_drop") -> list[dict]:
    width = figures.block_figure_width(len(table))
    z = f"{rule.noise_z:g}"
    bars, scatter = _cost_captions(cost, z, table)
    specs = [
        (figures.ratio_per_block, width, {"max_ratio": rule.max_ratio},
         "Branch size per block",
         "Each bar is one residual block, in the order the data flows through the network. "
         f"Its height is the block's ratio. {_RATIO_WORDS} The error bar is one standard deviation of "
         "that ratio across samples. A bar near 0 means the block passes its input on almost "
         "unchanged; a bar near 1 means the branch is as large as the signal it is added to. "
         f"The dashed line is the rule's threshold ({rule.max_ratio:g}) for calling a branch "
         "small. Colours are the verdicts from the rule above."),
        (figures.drop_per_block, width, {"cost": cost},
         "What deleting each block costs", bars),
        (figures.ratio_vs_drop, figures.SCATTER_WIDTH, {"max_ratio": rule.max_ratio, "cost": cost},
         "Does branch size predict deletion cost?", scatter),
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
                    "src": _png(draw, table, inches, **kwargs),
                    # The answer shows what deleting each block costs, coloured by verdict.
                    "key": draw is figures.drop_per_block})
    return out


def _answer(table: pd.DataFrame, summary: dict, cost: str = "accuracy_drop") -> dict:
    by_name = table.set_index(table["block"].astype(str))
    # How the answer words a block's cost (`probe.scoring.cost`): its name, what deleting a
    # helping block does, the cost in a few words.
    record = cost_named(cost)
    name, effect, short = record.name, record.effect, record.short
    unit = " nats per token" if per_token(table) else ""

    def entry(block: str) -> dict:
        row = by_name.loc[block]
        value = format_cell(row[cost], record.spec)
        return {"block": block,
                "effect": effect.format(value, unit=unit),
                "short": short.format(value),
                "noise": format_cell(row["noise"], _format("noise", cost)) + ("%" if cost == "drift" else ""),
                "ratio": format_cell(row["ratio"], ".4g")}

    rho = summary["spearman_rho"]
    return {
        "helps_most": [entry(b) for b in summary["helps_most"]],
        "skipped": [entry(b) for b in summary["skipped"]],
        "hurts": [entry(b) for b in summary["hurts"]],
        "counts": summary["counts"],
        "blocks": summary["blocks"],
        "cost": name,
        "rho": "undefined (a column is constant)" if math.isnan(rho) else f"{rho:.2f}",
    }


def _baseline(baseline: Mapping, cost: str, df: pd.DataFrame) -> dict:
    """The intact model's numbers as the report's header shows them, for the table's task:
    `kind` picks the sentence (classification, lm, drift, or a loss of the user's task)."""
    if cost == "accuracy_drop":
        required, kind = ("accuracy", "loss", "samples"), "classification"
    elif cost == "drift":
        required, kind = ("samples",), "drift"
    elif cost == "detections_lost":
        required, kind = ("detections_kept", "detections", "reference_detections", "map50", "map50_95", "samples"), \
            "detection"
    elif "perplexity" in baseline or per_token(df):
        required, kind = ("loss", "perplexity", "token_accuracy", "tokens", "samples"), "lm"
    else:
        required, kind = ("loss", "samples"), "loss"
    missing = [k for k in required if k not in baseline]
    if missing:
        raise ProbeError(f"baseline needs key(s) {missing}; got {sorted(baseline)}.")
    formats = {"accuracy": _FORMATS["accuracy"], "loss": _FORMATS["loss"], "samples": _FORMATS["samples"],
               "perplexity": ".4g", "token_accuracy": "pct", "tokens": ",.0f", "detections_kept": "pct",
               "detections": ".1f", "reference_detections": ",.0f", "map50": ".3f", "map50_95": ".3f"}
    shown = {key: format_cell(baseline[key], spec) for key, spec in formats.items() if key in baseline}
    return {"kind": kind, "task": str(table_info(df).task or ""), **shown}


def render_report(df: pd.DataFrame, *, baseline: Mapping, config: Mapping,
                  rule: VerdictRule | None = None, title: str = "probe report",
                  sections: Sequence[Section] = (), warning: str | None = None,
                  setting_sections: Mapping[str, Collection[str]] | None = None) -> str:
    """The whole report as one HTML string (see module docstring).

    df: per-block table (one row per block; columns as in docs/api.md); its
    cost column (`probe.scoring.verdict.cost_column`: accuracy_drop, loss_increase or drift) is what the
    answer, the figures and the table show. baseline: the unablated model's numbers, as the
    table's `table_info(table).baseline` holds them for its task: {"accuracy", "loss", "samples"} for
    classification; {"loss", "perplexity", "token_accuracy", "tokens", "samples"} for a language
    model; {"samples"} for drift; {"loss", "samples"} (and "accuracy") for a task of your own.
    config: the run's settings (model, checkpoint, dataset, samples, mode, seed, date, versions,
    and any other keys), listed in the run record at the end of the report: only those that apply
    to this run (`applicable_settings`, which reads the task from the table, whether BatchNorm
    statistics were refitted from its `bn_recalibrated` column or else the config's
    `bn_recalibrate`, and which of `sections` ran).
    rule: the verdict rule the report describes; given, the verdicts are recomputed with it; else
    the table's own `verdict` column is shown with the rule that made it (`table_info(table).rule`, set by
    `probe.scoring.verdict.classify`; VerdictRule() for a table read back from a CSV), and only a table
    without verdicts is classified here, by VerdictRule().
    sections: one `reports.sections.Section` per analysis, shown after the per-block table and
    figures and listed in a table of contents.
    warning: why the data cannot support verdicts (`probe.scoring.verdict.chance_warning`; default the
    `table_info(table).unsupported`): the answer then gives it instead of verdicts, and
    every block's verdict is "unsupported".

    The report reads in the order a reader asks: the answer first (the intact model's numbers,
    which blocks help, which are skipped, the figure of what deleting each block costs, the rule,
    how well the ratio ranks the blocks), then the per-block table, the other per-block figures,
    the analyses' sections, and last the run record, folded.
    """
    if not isinstance(baseline, Mapping):
        raise ProbeError(f"baseline must be a dict of the intact model's numbers, got {type(baseline).__name__}.")
    cost = cost_column(df) if isinstance(df, pd.DataFrame) else "accuracy_drop"
    shown_baseline = _baseline(baseline, cost, df)
    if not isinstance(config, Mapping):
        raise ProbeError(f"config must be a dict of run settings, got {type(config).__name__}.")
    warning = warning or table_info(df).unsupported
    classified = rule is None and {"noise", "verdict"} <= set(df.columns)
    table = df.copy() if classified else classify(df, rule=rule)
    rule = table_info(table).rule or VerdictRule()  # the rule of the verdicts shown
    if warning:
        table["verdict"] = UNSUPPORTED
    if "position" in table.columns:
        table = table.sort_values("position", kind="stable")
    table = table.reset_index(drop=True)
    summary = summarize(table, n=5)
    sections = list(sections)
    settings = applicable_settings(config, task_name=_task_name(df, shown_baseline["kind"]),
                                   recalibrated=_recalibrated(table),
                                   sections_run=[section.id for section in sections if _ran(section)],
                                   setting_sections=setting_sections)
    shown_figures = _figures(table, rule, cost)
    return _ENV.get_template("report.html").render(
        title=title,
        subject=_subject(config),
        config=_config_items(settings),
        baseline=shown_baseline,
        rule=rule.describe(cost=cost),
        answer=_answer(table, summary, cost),
        key_figures=[fig for fig in shown_figures if fig["key"]],
        figures=[fig for fig in shown_figures if not fig["key"]],
        table=_table(table, cost),
        table_note=_table_note(table, cost),
        ratio_words=_RATIO_WORDS,
        sections=sections,
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
