"""`python -m analyses.uncertainty`: writes drop_intervals.csv, class_drops.csv and their figures
(drop_intervals.png, and class_drops.png for classification) into --out."""

from __future__ import annotations

from pathlib import Path

import analyses.uncertainty
from analyses.uncertainty import uncertainty
from probe.commands.runner import run_analysis_command
from probe.commands.config import RunConfig
from probe.files import write_tables
from probe.commands.inputs import load_inputs
from probe.scoring.tasks import resolve_task
from reports import figures
from reports.embed import write_png


def main(argv: list[str] | None = None) -> int:
    return run_analysis_command("uncertainty", analyses.uncertainty.__doc__, ("model", "ablation", "uncertainty"),
                                _write, argv)


def _write(config: RunConfig, out: Path, progress: bool) -> list[Path]:
    inputs = load_inputs(config, progress=progress)
    task = resolve_task(config.task)
    result = uncertainty(inputs.model, inputs.data, resamples=config.bootstrap, level=config.level, seed=config.seed,
                         mode=config.mode, calibration=inputs.calibration, blocks=inputs.blocks, task=task,
                         progress=progress)
    # accuracy_drop with drop_low/drop_high, or the task's cost with <cost>_low/<cost>_high
    cost, low, high = figures.interval_columns(result.intervals, task.cost)
    shown = result.intervals[["block", "ratio", cost, low, high, "verdict_ci"]]
    print(shown.to_string(index=False, float_format="{:.4f}".format))
    written = write_tables(out, {"drop_intervals": result.intervals, "class_drops": result.per_class})
    written.append(write_png(out / "drop_intervals.png", figures.drop_intervals, result.intervals, cost=cost,
                             width=figures.block_figure_width(len(result.intervals))))
    if len(result.per_class):  # a task without class labels has no per-class table
        written.append(write_png(out / "class_drops.png", figures.class_drop_heatmap, result.per_class,
                                 **figures.heatmap_size(result.per_class)))
    return written


if __name__ == "__main__":
    raise SystemExit(main())
