"""Figures (seaborn) and the self-contained HTML report, built from per-block DataFrames.

`reports.figures` draws tables, `reports.sections` turns each analysis's tables into a report
section, `reports.html` assembles one HTML file with every figure embedded (`reports.embed`).
"""

from reports.figures import *  # noqa: F403 (the figure functions: reports.figures.__all__)
from reports.figures import __all__ as _figure_names
from reports.html import render_report, write_report

__all__ = [*_figure_names, "render_report", "write_report"]
