"""`python -m analyses.representation`: writes linear_probes.csv, logit_lens.csv, refinement.csv,
cka.csv, block_classes.csv and representation.csv, with their figures (representation_accuracy.png,
refinement.png, cka.png, block_classes.png; for a task without class labels only those of the tables
that apply), into --out."""

from __future__ import annotations

from pathlib import Path

import analyses.representation
from analyses.representation import representation, story
from probe.commands.runner import run_analysis_command
from probe.commands.config import RunConfig
from probe.files import write_tables
from probe.commands.inputs import load_inputs, train_loader
from probe.scoring.tasks import Classification, resolve_task
from reports import figures
from reports.embed import write_png


def main(argv: list[str] | None = None) -> int:
    return run_analysis_command("representation", analyses.representation.__doc__, ("model", "ablation"), _write,
                                argv)


def _write(config: RunConfig, out: Path, progress: bool) -> list[Path]:
    inputs = load_inputs(config, progress=progress)
    task = resolve_task(config.task)
    # Only the linear probes (classification) are fitted on training data.
    train = train_loader(config, model=inputs.model) if isinstance(task, Classification) else None
    result = representation(inputs.model, inputs.data, train_data=train, mode=config.mode,
                            calibration=inputs.calibration, blocks=inputs.blocks, task=task, progress=progress)
    columns = ["block", "ratio", task.cost, "probe_accuracy", "probe_gain", "lens_accuracy", "grad_cosine",
               "step_ratio", "cka_next"]
    shown = result.summary[[c for c in columns if c in result.summary.columns]]
    if not isinstance(task, Classification):  # the columns of tables that do not apply are all NaN
        shown = shown.dropna(axis="columns", how="all")
    print(shown.to_string(index=False, float_format="{:.3f}".format))
    print("\n".join(["", *story(result), ""]))
    written = write_tables(out, result.tables())
    width = figures.block_figure_width(len(result.summary))
    # A figure of each table that applies to the task (`result.notes` says why the others are empty).
    if len(result.probes):
        written.append(write_png(out / "representation_accuracy.png", figures.representation_accuracy,
                                 result.summary, width=width))
    if len(result.refinement):
        written.append(write_png(out / "refinement.png", figures.refinement_profile, result.refinement,
                                 width=width))
    written.append(write_png(out / "cka.png", figures.cka_heatmap, result.cka, **figures.cka_size(result.cka)))
    if len(result.classes):
        written.append(write_png(out / "block_classes.png", figures.class_service_heatmap, result.classes,
                                 **figures.heatmap_size(result.classes)))
    return written


if __name__ == "__main__":
    raise SystemExit(main())
