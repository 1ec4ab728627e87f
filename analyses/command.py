"""`python -m analyses.NAME`: one command for every registered analysis.

Each analysis package's `__main__` calls `main_for(NAME)`: the options its declaration names
(`analyses.registry.Analysis.options`), then the analysis alone on its own inputs; its tables
are written as CSV, the figures of its report page (`reports/sections/NAME.py`: `figure_files`)
as PNG, and its terminal summary (`terminal`) is printed. An entry point's helper
(docs/architecture.md): only the `__main__` modules import it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from analyses import registry
from probe.commands.config import RunConfig
from probe.commands.runner import run_analysis_command
from probe.files import write_tables
from probe.scoring.tasks import resolve_task
from reports.embed import write_png

__all__ = ["main_for"]


def main_for(name: str, argv: list[str] | None = None) -> int:
    """Run `python -m analyses.NAME` with `argv` (None: the command line); the exit code."""
    analysis = registry.get(name)
    about = importlib.import_module(f"analyses.{name}").__doc__ or analysis.summary
    page = importlib.import_module(f"reports.sections.{name}")

    def body(config: RunConfig, out: Path, progress: bool) -> list[Path]:
        result = analysis.alone(config, out, progress)
        task = resolve_task(config.task)
        print(page.terminal(result, task))
        written = write_tables(out, result.tables())
        written += [write_png(out / png.name, png.draw, png.df, **png.options) for png in page.figure_files(result, task)]
        return written

    return run_analysis_command(name, about, analysis.options, body, argv)
