"""Figures of the per-block table and of the analyses; each is ``(df, *, ax=None) -> Axes``.

One module per analysis (``reports.figures.skipping``, ...) and what they share in
``reports.figures.common``; every figure function is importable from here. The functions only
draw columns that already exist (computing stays in probe/analyses); the optional ``verdict``
and ``noise`` columns add colour and a noise band. Blocks are drawn in forward order (by
``position`` when present). With ``ax=None`` a new figure is made through pyplot, so it shows in
notebooks; nothing here calls ``plt.show``, and only the Agg-safe object API is used.
"""

from reports.figures.common import COSTS, SCATTER_WIDTH, VERDICT_COLORS, block_figure_width, cost_axis, cost_of, heatmap_size
from reports.figures.attribution import proxy_correlations
from reports.figures.blocks import cosine_per_block, drop_per_block, ratio_per_block, ratio_vs_drop
from reports.figures.degradation import degradation_curve
from reports.figures.detection import detection_pictures, detections_per_block, drift_vs_detections, pictures_size
from reports.figures.lm import agreement_intervals, greedy_curves, layer_similarity_plot, logit_lens_plot, span_plot
from reports.figures.recalibration import recalibration_effect
from reports.figures.representation import cka_heatmap, cka_size, class_service_heatmap, refinement_profile, representation_accuracy
from reports.figures.skipping import curve_metric, deletion_curves
from reports.figures.uncertainty import class_drop_heatmap, interval_plot, plotted_interval

__all__ = ["COSTS", "SCATTER_WIDTH", "VERDICT_COLORS", "agreement_intervals", "block_figure_width", "cka_heatmap", "cka_size", "class_drop_heatmap", "class_service_heatmap", "cosine_per_block", "cost_axis", "cost_of", "curve_metric", "degradation_curve", "deletion_curves", "detection_pictures", "detections_per_block", "drift_vs_detections", "interval_plot", "drop_per_block", "greedy_curves", "heatmap_size", "plotted_interval", "layer_similarity_plot", "logit_lens_plot", "pictures_size", "proxy_correlations", "ratio_per_block", "ratio_vs_drop", "recalibration_effect", "refinement_profile", "representation_accuracy", "span_plot"]
