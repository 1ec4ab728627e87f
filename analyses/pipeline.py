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

from analyses.attribution import attribution
from analyses.degradation import degradation
from analyses.lm import lm_layers
from analyses.recalibration import recalibration
from analyses.representation import representation
from analyses.skipping import skipping
from analyses.uncertainty import uncertainty
from probe.commands.config import SECTIONS, RunConfig
from probe.errors import ProbeError
from probe.files import write_tables
from probe.deletion.batchnorm import batchnorm_layers
from probe.commands.inputs import train_loader
from probe.scoring.results import Evaluation
from probe.scoring.tasks import Classification, LanguageModeling, Task, resolve_task

__all__ = ["SECTIONS", "AnalysisOutputs", "choose_sections", "run_analyses"]


@dataclass
class AnalysisOutputs:
    """What the analyses of one run gave: results by section, and why the others did not run."""

    results: dict[str, object] = field(default_factory=dict)  # section -> its analysis's result, in SECTIONS order
    reasons: dict[str, str] = field(default_factory=dict)  # section -> why it was not run
    files: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def choose_sections(config: RunConfig) -> tuple[list[str], dict[str, str]]:
    """(sections to run, {section: why it is not run}) for a RunConfig.

    Default: all of them, except degradation when the model came from a checkpoint or weights
    (degradation trains its own plain and residual nets: only a run that trains is asked for it).
    `config.sections` names them explicitly; `config.skip` leaves some out.
    """
    explicit = tuple(config.sections) if config.sections else None
    chosen, reasons = [], {}
    for name in SECTIONS:
        if name in config.skip:
            reasons[name] = "left out with --skip."
        elif explicit is not None and name not in explicit:
            reasons[name] = "not among --sections."
        elif explicit is None and name == "degradation" and (config.checkpoint or config.weights):
            reasons[name] = ("the model came from a checkpoint; degradation trains its own plain and residual "
                             "networks, ask for it with --sections.")
        else:
            chosen.append(name)
    return chosen, reasons


def run_analyses(model: nn.Module, data: Iterable, table: pd.DataFrame, evaluation: Evaluation, *,
                 config: RunConfig, out: Path, device: str, calibration: Iterable | None, sweep_seconds: float,
                 measure_seconds: float | None = None, blocks: Sequence | None = None, task: str | Task | Callable | None = None,
                 progress: bool = True) -> AnalysisOutputs:
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
    evaluation's (`Evaluation.task`), else `config.task`. Degradation (plain vs residual
    classifiers it trains itself) runs for classification only; for another task it is not run,
    with the reason.
    """
    if task is None:
        task = evaluation.task if getattr(evaluation, "task", None) is not None else config.task
    task = resolve_task(task)
    chosen, reasons = choose_sections(config)
    outputs = AnalysisOutputs(reasons=dict(reasons))
    if "degradation" in chosen and not isinstance(task, Classification):
        chosen.remove("degradation")
        outputs.reasons["degradation"] = (f"degradation trains plain and residual classifiers of its own on "
                                          f"{config.dataset}; it does not apply to the task {task.name!r}.")
    if "lm" in chosen and not isinstance(task, LanguageModeling):
        chosen.remove("lm")
        outputs.reasons["lm"] = ("it deletes decoder layers of a causal language model; it applies to the task "
                                 "'lm' only.")
    recal = calibration if config.bn_recalibrate else None

    def run_lm() -> tuple[object, dict]:
        result = lm_layers(model, data, table, blocks=blocks, spans=config.spans, greedy_steps=config.greedy_steps,
                           resamples=config.bootstrap, level=config.level, seed=config.seed,
                           fit=True, progress=progress)
        return result, result.tables()

    def run_degradation() -> tuple[object, dict]:
        result = degradation(config.degradation_depths, dataset=config.dataset, epochs=config.epochs,
                             seed=config.seed, device=device, data_root=config.data_root, download=config.download,
                             batch_size=config.batch_size, progress=progress)
        return result, {"degradation": result}

    def run_skipping() -> tuple[object, dict]:
        result = skipping(model, data, table, mode=config.mode, calibration=recal, random_draws=config.random_draws,
                          seed=config.seed, curve_points=config.curve_points, export_path=out / "pruned_model.pt",
                          blocks=blocks, task=task, progress=progress)
        if (out / "pruned_model.pt").exists():  # not when the export was impossible or could not be saved
            outputs.files.append(out / "pruned_model.pt")
        return result, {"skipping": result.summary, "deletion_curves": result.curves,
                        "pruned_export": result.export}

    def run_attribution() -> tuple[object, dict]:
        result = attribution(model, data, table, truth_seconds=sweep_seconds, measure_seconds=measure_seconds,
                             mode=config.mode, blocks=blocks,
                             task=task, progress=progress)
        return result, {"attribution": result.scores, "proxies": result.summary}

    def run_uncertainty() -> tuple[object, dict]:
        result = uncertainty(model, data, table, resamples=config.bootstrap, level=config.level, seed=config.seed,
                             evaluation=evaluation, blocks=blocks, task=task, progress=progress)
        return result, {"drop_intervals": result.intervals, "class_drops": result.per_class}

    def run_representation() -> tuple[object, dict]:
        # Only the linear probes (classification) are fitted on training data.
        train = train_loader(config, model=model) if isinstance(task, Classification) else None
        result = representation(model, data, train_data=train, table=table, evaluation=evaluation,
                                blocks=blocks, task=task, progress=progress)
        return result, result.tables()

    def run_recalibration() -> tuple[object, dict]:
        if calibration is None and batchnorm_layers(model):
            raise ProbeError("no held-out data to refit BatchNorm statistics on: the evaluated data is the only "
                             "pool (an image folder, or --split train); give --calibration-root FOLDER, or "
                             "--bn-recalibrate to set calibration samples apart from the evaluated ones.")
        result = recalibration(model, data, calibration, table=table, mode=config.mode, blocks=blocks,
                               task=task, progress=progress)
        return result, {"recalibration": result}

    runners: dict[str, Callable[[], tuple[object, dict]]] = {
        "degradation": run_degradation, "skipping": run_skipping, "attribution": run_attribution,
        "uncertainty": run_uncertainty, "representation": run_representation, "recalibration": run_recalibration, "lm": run_lm}
    for name in chosen:
        start = time.perf_counter()
        try:
            result, tables = runners[name]()
        except ProbeError as error:
            print(f"probe.ablate: {name} not run: {error}", file=sys.stderr)
            outputs.reasons[name] = f"it failed: {error}"
        else:
            outputs.results[name] = result
            outputs.files.extend(write_tables(out, tables))
        outputs.seconds[name] = time.perf_counter() - start
    return outputs
