"""`python -m analyses.degradation`: writes degradation.csv and degradation.png into --out."""

from __future__ import annotations

from pathlib import Path

import analyses.degradation
from analyses.degradation import degradation, summary_lines
from probe.batches import device_for
from probe.commands.runner import run_analysis_command
from probe.commands.config import RunConfig
from probe.files import write_tables
from reports import figures
from reports.embed import write_png


def main(argv: list[str] | None = None) -> int:
    return run_analysis_command("degradation", analyses.degradation.__doc__, ("degradation",), _write, argv)


def _write(config: RunConfig, out: Path, progress: bool) -> list[Path]:
    table = degradation(config.degradation_depths, dataset=config.dataset, epochs=config.epochs, seed=config.seed,
                        device=str(device_for(config.device)), data_root=config.data_root, download=config.download,
                        limit=config.limit, batch_size=config.batch_size, progress=progress)
    shown = table[["depth", "model", "train_accuracy", "test_accuracy", "train_loss", "test_loss"]]
    print(shown.to_string(index=False, float_format="{:.4f}".format))
    print("\n".join(summary_lines(table)))
    written = write_tables(out, {"degradation": table})
    written.append(write_png(out / "degradation.png", figures.degradation_curve, table))
    return written


if __name__ == "__main__":
    raise SystemExit(main())
