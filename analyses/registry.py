"""The one registry of analyses: each analysis package declares itself once, here it is found.

An analysis package (`analyses/NAME/`) declares `ANALYSIS = Analysis(...)` in its `__init__`:
its name, what it computes in one line, its command's option groups, and two ways to run it:
inside a `python -m probe.ablate` job (`in_job`, reusing the job's per-block table and sweep)
and alone (`alone`, `python -m analyses.NAME`, loading its own inputs). Its report section and
figures live in `reports/sections/NAME.py`, found by the same name. `probe.ablate`, the
pipeline (`analyses.pipeline`) and every `python -m analyses.NAME` read this registry; nothing
else names an analysis (`tests/test_layers.py` checks it).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import analyses
from probe.commands.config import RunConfig
from probe.errors import ProbeError
from probe.scoring.scores import Task

if TYPE_CHECKING:  # annotations only: listing the analyses (`--help`) does not import pandas
    import pandas as pd
    from torch import nn

    from probe.deletion.store import OutcomeStore
    from probe.scoring.results import Evaluation

__all__ = ["Analysis", "Job", "Result", "available", "get", "names", "registered"]


class Result(Protocol):
    """What every analysis returns: a frozen dataclass whose tables are written as CSV files."""

    def tables(self) -> dict[str, pd.DataFrame]:
        """{file stem: table}: each table is written as `<stem>.csv`."""


@dataclass(frozen=True)
class Job:
    """What a `python -m probe.ablate` run hands every analysis: its results so far, its settings.

    table: the classified per-block table; evaluation: the single-block sweep behind it, with
    per-class and per-sample outcomes; calibration: held-out training batches (None when the run
    has none); blocks: the table's blocks; sweep_seconds, measure_seconds: what the sweep and
    measure cost (NaN when unknown); out: the run folder, for files an analysis writes itself;
    store: every outcome the job has computed (`probe.deletion.store.OutcomeStore`): an analysis
    evaluates sets through it, so that no set is evaluated twice in a job.
    """

    model: nn.Module
    data: Iterable
    table: pd.DataFrame
    evaluation: Evaluation
    config: RunConfig
    task: Task
    out: Path
    device: str
    calibration: Iterable | None
    blocks: Sequence | None
    sweep_seconds: float
    measure_seconds: float | None
    progress: bool
    store: OutcomeStore | None = None

    @property
    def recalibration_data(self) -> Iterable | None:
        """The calibration batches when the run refits BatchNorm statistics (`--bn-recalibrate`)."""
        return self.calibration if self.config.bn_recalibrate else None


def _always(_task: Task, _config: RunConfig) -> str | None:
    return None


def _never(_config: RunConfig) -> str | None:
    return None


@dataclass(frozen=True)
class Analysis:
    """One analysis, declared once in its package.

    name: its section id and its command (`python -m analyses.NAME`); summary: what it computes,
    in one line; options: the option groups of `probe.commands.config.add_options` its command
    takes; order: its place in the report (and in `--sections`); in_job: runs it in a probe.ablate job; alone: runs it
    from a RunConfig, loading its own inputs; applies: why it does not apply to a task (None when
    it does); off_by_default: why a job leaves it out unless asked (None when it runs);
    leads_report: its section opens the report; silent_unless_run: no "not run" section when it
    did not run; needs_calibration: a job sets calibration data apart for it; files:
    other files it may write into the run folder.
    """

    name: str
    summary: str
    options: tuple[str, ...]
    order: int
    in_job: Callable[[Job], Result]
    alone: Callable[[RunConfig, Path, bool], Result]
    applies: Callable[[Task, RunConfig], str | None] = _always
    off_by_default: Callable[[RunConfig], str | None] = _never
    leads_report: bool = False
    silent_unless_run: bool = False
    needs_calibration: bool = False
    files: tuple[str, ...] = ()


def registered() -> tuple[Analysis, ...]:
    """Every analysis package's declaration, in report order."""
    found = []
    for info in pkgutil.iter_modules(analyses.__path__):
        if info.ispkg:
            module = importlib.import_module(f"analyses.{info.name}")
            declared = getattr(module, "ANALYSIS", None)
            if not isinstance(declared, Analysis) or declared.name != info.name:
                raise TypeError(f"analyses/{info.name}/__init__.py must declare ANALYSIS = Analysis(name="
                                f"{info.name!r}, ...) (analyses/registry.py)")
            found.append(declared)
    return tuple(sorted(found, key=lambda analysis: analysis.order))


def available() -> tuple[str, ...]:
    """The analyses' names, alphabetically, without importing them (a command's `--help` and
    option choices need no analysis)."""
    return tuple(sorted(info.name for info in pkgutil.iter_modules(analyses.__path__) if info.ispkg))


def names() -> tuple[str, ...]:
    """The analyses' names, in report order."""
    return tuple(analysis.name for analysis in registered())


def get(name: str) -> Analysis:
    """The analysis called `name`; ProbeError naming those that exist otherwise."""
    for analysis in registered():
        if analysis.name == name:
            return analysis
    raise ProbeError(f"no analysis {name!r}; the analyses are {', '.join(names())}.")
