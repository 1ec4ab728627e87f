"""Figures (seaborn) and the self-contained HTML report, built from per-block DataFrames.

`reports.figures` draws tables, `reports.sections` turns each analysis's tables into a report
section, `reports.html` assembles one HTML file with every figure embedded (`reports.embed`).
"""

from reports.figures import (
    VERDICT_COLORS,
    class_drop_heatmap,
    cosine_per_block,
    degradation_curve,
    deletion_curves,
    drop_intervals,
    drop_per_block,
    proxy_correlations,
    ratio_per_block,
    ratio_vs_drop,
    recalibration_effect,
)
from reports.html import render_report, write_report

__all__ = [
    "VERDICT_COLORS",
    "class_drop_heatmap",
    "cosine_per_block",
    "degradation_curve",
    "deletion_curves",
    "drop_intervals",
    "drop_per_block",
    "proxy_correlations",
    "ratio_per_block",
    "ratio_vs_drop",
    "recalibration_effect",
    "render_report",
    "write_report",
]
