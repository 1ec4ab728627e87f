"""`python -m analyses.skipping`: writes skipping.csv, deletion_curves.csv, pruned_export.csv,
pruned_model.pt and deletion_curves.png into --out."""

from __future__ import annotations

from pathlib import Path

import analyses.skipping
from analyses.skipping import skipping
from probe.commands.runner import run_analysis_command
from probe.commands.config import RunConfig
from probe.files import write_tables
from probe.commands.inputs import load_inputs
from probe.scoring.tasks import resolve_task
from reports import figures
from reports.embed import write_png


def main(argv: list[str] | None = None) -> int:
    return run_analysis_command("skipping", analyses.skipping.__doc__, ("model", "ablation", "skipping"),
                                _write, argv)


def _write(config: RunConfig, out: Path, progress: bool) -> list[Path]:
    inputs = load_inputs(config, progress=progress)
    result = skipping(inputs.model, inputs.data, mode=config.mode, calibration=inputs.calibration,
                      random_draws=config.random_draws, seed=config.seed, curve_points=config.curve_points,
                      export_path=out / "pruned_model.pt", blocks=inputs.blocks, task=resolve_task(config.task),
                      progress=progress)
    written = write_tables(out, {"skipping": result.summary, "deletion_curves": result.curves,
                                 "pruned_export": result.export})
    written.append(write_png(out / "deletion_curves.png", figures.deletion_curves, result.curves))
    # Accuracy for classification; another task's loss, loss increase or drift.
    shown = [c for c in ("accuracy", "accuracy_drop") if c in result.summary.columns] or \
        [c for c in ("loss", "loss_increase", "drift") if c in result.summary.columns]
    print(result.summary[["state", "blocks_removed", *shown]].to_string(index=False))
    if result.export_note:
        print(f"pruned export: none ({result.export_note})")
        return written
    pruned = result.export.set_index("model").loc["pruned"]
    print(f"pruned export: parameters x{pruned.parameters_ratio:.2f}, bytes x{pruned.bytes_ratio:.2f}, "
          f"time per batch x{pruned.time_ratio:.2f} of the original")
    return written


if __name__ == "__main__":
    raise SystemExit(main())
