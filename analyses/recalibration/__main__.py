"""`python -m analyses.recalibration`: writes recalibration.csv and recalibration.png into --out."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import analyses.recalibration
from analyses.recalibration import recalibration
from probe.commands.runner import run_analysis_command
from probe.commands.config import RunConfig
from probe.files import write_tables
from probe.commands.inputs import load_inputs
from probe.scoring.tasks import resolve_task
from reports import figures
from reports.embed import write_png


def main(argv: list[str] | None = None) -> int:
    return run_analysis_command("recalibration", analyses.recalibration.__doc__, ("model", "ablation"), _write, argv)


def _write(config: RunConfig, out: Path, progress: bool) -> list[Path]:
    # This analysis is the comparison itself: it always needs calibration data.
    inputs = load_inputs(replace(config, bn_recalibrate=True), progress=progress)
    task = resolve_task(config.task)
    table = recalibration(inputs.model, inputs.data, inputs.calibration, mode=config.mode, blocks=inputs.blocks,
                          task=task, progress=progress)
    order = table.drop_duplicates("block")["block"]
    wide = table.pivot(index="block", columns="bn_recalibrated", values=task.cost).loc[order]
    # The cost as the report shows it: accuracy in percentage points, drift in %, a loss as it is.
    scale, digits, names = {
        "accuracy_drop": (100, 2, ("drop (pp)", "drop recalibrated (pp)")),
        "drift": (100, 2, ("drift (%)", "drift recalibrated (%)")),
    }.get(task.cost, (1, 4, ("loss increase", "loss increase recalibrated")))
    print((wide * scale).round(digits).rename(columns=dict(zip((False, True), names))).to_string())
    written = write_tables(out, {"recalibration": table})
    written.append(write_png(out / "recalibration.png", figures.recalibration_effect, table, cost=task.cost,
                             width=figures.block_figure_width(table["block"].nunique())))
    return written


if __name__ == "__main__":
    raise SystemExit(main())
