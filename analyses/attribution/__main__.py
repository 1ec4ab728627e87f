"""`python -m analyses.attribution`: writes attribution.csv, proxies.csv and proxies.png into --out."""

from __future__ import annotations

from pathlib import Path

import analyses.attribution
from analyses.attribution import attribution
from probe.commands.runner import run_analysis_command
from probe.commands.config import RunConfig
from probe.files import write_tables
from probe.commands.inputs import load_inputs
from probe.scoring.tasks import resolve_task
from reports import figures
from reports.embed import write_png


def main(argv: list[str] | None = None) -> int:
    return run_analysis_command("attribution", analyses.attribution.__doc__, ("model", "ablation"), _write, argv)


def _write(config: RunConfig, out: Path, progress: bool) -> list[Path]:
    inputs = load_inputs(config, progress=progress)
    result = attribution(inputs.model, inputs.data, mode=config.mode, calibration=inputs.calibration,
                         blocks=inputs.blocks, task=resolve_task(config.task), progress=progress)
    print(result.summary.to_string(index=False, float_format="{:.3f}".format))
    for proxy, why in result.notes.items():
        print(f"no {proxy}: {why}")
    written = write_tables(out, {"attribution": result.scores, "proxies": result.summary})
    written.append(write_png(out / "proxies.png", figures.proxy_correlations, result.summary))
    return written


if __name__ == "__main__":
    raise SystemExit(main())
