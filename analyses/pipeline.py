"""The analyses of a `python -m probe.ablate` run: run each chosen one and write its tables.

`probe.ablate` measures and sweeps the model, then hands the results here; every analysis
reuses them where it can (the per-block table, the single-block sweep with per-sample outcomes
and its timing) so a run does not repeat work. An analysis that fails with a ProbeError (say,
a block the export cannot trace) is reported as not run, with the reason, and the others still
run. Drawing the report's sections is the entry point's job (see docs/architecture.md).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from torch import nn

from analyses import registry
from analyses.registry import Job
from probe.commands.config import RunConfig
from probe.errors import ProbeError
from probe.files import write_tables
from probe.scoring.results import Evaluation
from probe.deletion.store import OutcomeStore
from probe.scoring.tasks import Task, resolve_task

__all__ = ["SECTIONS", "AnalysisOutputs", "choose_sections", "run_analyses"]



def __getattr__(name: str):
    # SECTIONS: every analysis, in report order; read from the registry when asked for, so that
    # importing the pipeline imports no analysis.
    if name == "SECTIONS":
        return registry.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class AnalysisOutputs:
    """What the analyses of one run gave: results by section, and why the others did not run."""

    results: dict[str, object] = field(default_factory=dict)  # section -> its analysis's result, in report order
    reasons: dict[str, str] = field(default_factory=dict)  # section -> why it was not run
    files: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def choose_sections(config: RunConfig) -> tuple[list[str], dict[str, str]]:
    """(sections to run, {section: why it is not run}) for a RunConfig.

    Default: every registered analysis, except those whose declaration leaves them out unless
    asked (`Analysis.off_by_default`: degradation when the model came from a checkpoint or
    weights). `config.sections` names them explicitly; `config.skip` leaves some out.
    """
    known = registry.registered()
    unknown = [s for s in (*(config.sections or ()), *config.skip) if s not in {a.name for a in known}]
    if unknown:
        raise ProbeError(f"unknown section(s) {unknown}; the sections are {', '.join(a.name for a in known)}.")
    explicit = tuple(config.sections) if config.sections else None
    chosen, reasons = [], {}
    for analysis in known:
        name = analysis.name
        off = analysis.off_by_default(config) if explicit is None else None
        if name in config.skip:
            reasons[name] = "left out with --skip."
        elif explicit is not None and name not in explicit:
            reasons[name] = "not among --sections."
        elif off:
            reasons[name] = off
        else:
            chosen.append(name)
    return chosen, reasons


def run_analyses(model: nn.Module, data: Iterable, table: pd.DataFrame, evaluation: Evaluation, *,
                 config: RunConfig, out: Path, device: str, calibration: Iterable | None, sweep_seconds: float,
                 measure_seconds: float | None = None, blocks: Sequence | None = None, task: str | Task | Callable | None = None,
                 progress: bool = True, store: OutcomeStore | None = None) -> AnalysisOutputs:
    """Run the chosen analyses on a probe.ablate run's results; write their CSVs into `out`.

    table: the classified per-block table; evaluation: its single-block sweep with per-class
    accuracies and per-sample outcomes; calibration: held-out training batches (needed by the
    recalibration section, and used everywhere when `config.bn_recalibrate`); blocks: the
    table's blocks (those of `--blocks-spec`; discovered when None), handed to every analysis.
    sweep_seconds, measure_seconds: how long the sweep and measure behind `table` took (NaN when
    unknown), the cost the attribution section gives the truth and the table's ratio and cosine;
    without measure_seconds, attribution measures again to time it.
    A table whose verdicts are "unsupported" (the intact model is at chance) keeps them: the
    analyses measure, but call no block skipped.
    task: what the outputs mean (`probe.scoring.tasks`), handed to every analysis; None takes the
    evaluation's (`Evaluation.task`), else `config.task`. An analysis that does not apply to the
    task (`Analysis.applies`: degradation trains classifiers of its own, lm deletes decoder
    layers) is not run, with the reason.
    store: the job's outcomes so far (`probe.deletion.store.OutcomeStore`, holding the sweep's);
    each analysis evaluates its sets through it, counted under its name (`store.counts`).
    """
    if task is None:
        task = evaluation.task if getattr(evaluation, "task", None) is not None else config.task
    task = resolve_task(task)
    chosen, reasons = choose_sections(config)
    outputs = AnalysisOutputs(reasons=dict(reasons))
    job = Job(model=model, data=data, table=table, evaluation=evaluation, config=config, task=task, out=out,
              device=device, calibration=calibration, blocks=blocks, sweep_seconds=sweep_seconds,
              measure_seconds=measure_seconds, progress=progress,
              store=store if store is not None else OutcomeStore(blocks))
    for name in chosen:
        analysis = registry.get(name)
        why_not = analysis.applies(task, config)
        if why_not:
            outputs.reasons[name] = why_not
            continue
        start = time.perf_counter()
        job.store.stage = name
        try:
            result = analysis.in_job(job)
        except ProbeError as error:
            print(f"probe.ablate: {name} not run: {error}", file=sys.stderr)
            outputs.reasons[name] = f"it failed: {error}"
        else:
            outputs.results[name] = result
            outputs.files.extend(write_tables(out, result.tables()))
            # Other files it wrote, when it could (a pruned model is not saved when the export is impossible).
            outputs.files.extend(out / file for file in analysis.files if (out / file).exists())
        outputs.seconds[name] = time.perf_counter() - start
    return outputs
