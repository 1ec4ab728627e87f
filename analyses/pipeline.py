"""The analyses of a default `python -m probe.ablate` run: run each, write its tables, build its section.

`probe.ablate.run` measures and sweeps the model, then hands the results here; every analysis
reuses them where it can (the per-block table, the single-block sweep with per-sample outcomes
and its timing) so the default run does not repeat work. An analysis that fails with a
ProbeError (say, a block the export cannot trace) becomes a "not run" section naming the reason,
and the rest of the report is still written.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from torch import nn

from probe.errors import ProbeError

__all__ = ["SECTIONS", "AnalysisOutputs", "calibration_for", "choose_sections", "run_analyses"]

# Every analysis section of the report, in report order.
SECTIONS = ("degradation", "skipping", "attribution", "uncertainty", "recalibration")


@dataclass
class AnalysisOutputs:
    sections: list = field(default_factory=list)  # reports.sections.Section, in report order
    files: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)


def choose_sections(config) -> tuple[list[str], dict[str, str]]:
    """(sections to run, {section: why it is not run}) for a RunConfig.

    Default: all of them, except degradation when the model came from a checkpoint or weights
    (degradation trains its own plain and residual nets: only a run that trains is asked for it).
    `config.sections` names them explicitly; `config.skip` leaves some out.
    """
    explicit = tuple(config.sections) if config.sections else None
    unknown = [s for s in (*(explicit or ()), *config.skip) if s not in SECTIONS]
    if unknown:
        raise ProbeError(f"unknown section(s) {unknown}; the sections are {', '.join(SECTIONS)}.")
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


def run_analyses(model: nn.Module, data: Iterable, table: pd.DataFrame, evaluation: tuple[dict, list[dict]], *,
                 config, out: Path, device: str, calibration: Iterable | None, sweep_seconds: float,
                 blocks: Sequence | None = None, progress: bool = True) -> AnalysisOutputs:
    """Run the chosen analyses on a probe.ablate run's results; write CSVs into `out`.

    table: the classified per-block table; evaluation: its single-block sweep with per-class
    accuracies and per-sample outcomes; calibration: held-out training batches (needed by the
    recalibration section, and used everywhere when `config.bn_recalibrate`); blocks: the
    table's blocks (those of `--blocks-spec`; discovered when None), handed to every analysis.
    """
    from analyses import _cli
    from reports import sections as build

    chosen, reasons = choose_sections(config)
    outputs = AnalysisOutputs()
    recal = calibration if config.bn_recalibrate else None
    samples = _samples(calibration)

    def degradation() -> object:
        from analyses.degradation import degradation as analyse, summary_lines

        result = analyse(tuple(config.degradation_depths), dataset=config.dataset, epochs=config.epochs,
                         seed=config.seed, device=device, data_root=config.data_root, download=config.download,
                         batch_size=config.batch_size, progress=progress)
        outputs.files.extend(_cli.write_tables(out, {"degradation": result}))
        return build.degradation_section(result, lines=summary_lines(result))

    def skipping() -> object:
        from analyses.skipping import skipping as analyse

        result = analyse(model, data, table, mode=config.mode, calibration=recal, random_draws=config.random_draws,
                         seed=config.seed, curve_points=config.curve_points, export_path=out / "pruned_model.pt",
                         blocks=blocks, progress=progress)
        outputs.files.extend(_cli.write_tables(out, {"skipping": result.summary, "deletion_curves": result.curves,
                                                     "pruned_export": result.export}))
        if (out / "pruned_model.pt").exists():  # not when the export was impossible or could not be saved
            outputs.files.append(out / "pruned_model.pt")
        return build.skipping_section(result, calibration_samples=samples if recal is not None else None)

    def attribution() -> object:
        from analyses.attribution import attribution as analyse

        result = analyse(model, data, table, truth_seconds=sweep_seconds, mode=config.mode, blocks=blocks,
                         progress=progress)
        outputs.files.extend(_cli.write_tables(out, {"attribution": result.scores, "proxies": result.summary}))
        return build.attribution_section(result)

    def uncertainty() -> object:
        from analyses.uncertainty import uncertainty as analyse

        result = analyse(model, data, table, resamples=config.bootstrap, seed=config.seed, evaluation=evaluation,
                         blocks=blocks, progress=progress)
        outputs.files.extend(_cli.write_tables(out, {"drop_intervals": result.intervals,
                                                     "class_drops": result.per_class}))
        return build.uncertainty_section(result)

    def recalibration() -> object:
        from analyses.recalibration import recalibration as analyse

        result = analyse(model, data, calibration, table=table, mode=config.mode, blocks=blocks, progress=progress)
        outputs.files.extend(_cli.write_tables(out, {"recalibration": result}))
        return build.recalibration_section(result, calibration_samples=samples)

    runners = {"degradation": degradation, "skipping": skipping, "attribution": attribution,
               "uncertainty": uncertainty, "recalibration": recalibration}
    for name in SECTIONS:
        if name not in chosen:
            outputs.sections.append(build.not_run_section(name, reasons[name]))
            continue
        start = time.perf_counter()
        try:
            outputs.sections.append(runners[name]())
        except ProbeError as error:
            print(f"probe.ablate: {name} not run: {error}", file=sys.stderr)
            outputs.sections.append(build.not_run_section(name, f"it failed: {error}"))
        outputs.seconds[name] = time.perf_counter() - start
    return outputs


def _samples(calibration: Iterable | None) -> int | None:
    if calibration is None:
        return None
    try:
        return len(calibration.dataset)  # type: ignore[attr-defined]
    except (AttributeError, TypeError):
        return None


def calibration_for(config, *, needed: Sequence[str]):
    """Held-out training batches for BN recalibration, or None when no section needs them.

    The first `calibration_samples` training samples (at most `limit`, so quick runs stay quick).
    """
    if not (config.bn_recalibrate or "recalibration" in needed):
        return None
    from analyses._cli import calibration_loader, positive

    positive("calibration_samples", config.calibration_samples)
    samples = min(config.calibration_samples, config.limit) if config.limit else config.calibration_samples
    return calibration_loader(config.dataset, samples=samples, batch_size=config.batch_size, seed=config.seed,
                              data_root=config.data_root, download=config.download)
