"""Figures of the analyses draw exactly their tables' numbers; sections land in the report in order."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402

from reports import figures, sections  # noqa: E402
from reports.html import render_report  # noqa: E402
from report_fixtures import BASELINE, CONFIG, table  # noqa: E402


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def degradation_table() -> pd.DataFrame:
    return pd.DataFrame({
        "depth": [20, 20, 56, 56], "residual": [False, True, False, True], "model": ["plain20", "resnet20",
                                                                                    "plain56", "resnet56"],
        "train_accuracy": [0.99, 0.995, 0.40, 1.0], "test_accuracy": [0.98, 0.985, 0.38, 0.99],
        "train_loss": [0.05, 0.04, 1.6, 0.01], "test_loss": [0.07, 0.06, 1.7, 0.03],
        "train_error": [0.01, 0.005, 0.60, 0.0], "test_error": [0.02, 0.015, 0.62, 0.01], "epochs": 20,
        "checkpoint": "x.pt", "bn_recalibrated": False})


def curves_table() -> pd.DataFrame:
    rows = []
    for order, draw, accs in (("ratio", 0, [0.9, 0.8, 0.5]), ("drop", 0, [0.9, 0.85, 0.5]),
                              ("random", 0, [0.9, 0.6, 0.5]), ("random", 1, [0.9, 0.7, 0.4])):
        for k, acc in enumerate(accs):
            rows.append({"order": order, "draw": draw, "k": k, "removed": "", "accuracy": acc})
    return pd.DataFrame(rows)


def test_degradation_curve_lines():
    ax = figures.degradation_curve(degradation_table())
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["plain, training error"].get_ydata(), [1.0, 60.0])
    np.testing.assert_allclose(lines["residual, test error"].get_ydata(), [1.5, 1.0])
    assert lines["plain, training error"].get_linestyle() == "--"
    assert list(lines["plain, test error"].get_xdata()) == [20, 56]


def test_deletion_curves_mean_and_range_of_random_orders():
    ax = figures.deletion_curves(curves_table())
    lines = {line.get_label(): line for line in ax.get_lines()}
    np.testing.assert_allclose(lines["random order (mean of 2)"].get_ydata(), [90, 65, 45])
    np.testing.assert_allclose(lines["smallest ratio first"].get_ydata(), [90, 80, 50])
    (band,) = [c for c in ax.collections if c.get_label() == "range over 2 random orders"]
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(40) and ys.max() == pytest.approx(90)


def test_proxy_correlations_bars():
    summary = pd.DataFrame({"proxy": ["ratio", "gradient_x_activation", "measured drop (sweep)"],
                            "spearman_accuracy_drop": [0.5, -0.25, np.nan],
                            "spearman_loss_increase": [0.75, 0.9, np.nan], "seconds": [0.1, 0.4, 12.0]})
    ax = figures.proxy_correlations(summary)
    widths = [[p.get_width() for p in c.patches] for c in ax.containers if isinstance(c, BarContainer)]
    assert widths == [[0.5, -0.25], [0.75, 0.9]]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["ratio\n(0.1 s)", "gradient_x_activation\n(0.4 s)"]
    assert "12 s" in ax.get_title()


def test_drop_intervals_segments():
    df = pd.DataFrame({"block": ["b", "a"], "position": [1, 0], "accuracy_drop": [0.01, 0.2],
                       "drop_low": [-0.01, 0.1], "drop_high": [0.03, 0.3], "verdict_ci": ["skipped", "helps"],
                       "level": 0.95})
    ax = figures.interval_plot(df)
    segments = ax.collections[0].get_segments()
    np.testing.assert_allclose([s[:, 1] for s in segments], [[10, 30], [-1, 3]])  # forward order: a, b
    np.testing.assert_allclose(ax.collections[1].get_offsets()[:, 1], [20, 1])


def test_class_drop_heatmap_values():
    df = pd.DataFrame({"block": ["l2", "l2", "l1", "l1"], "position": [1, 1, 0, 0], "class": [0, 1, 0, 1],
                       "accuracy_drop": [0.1, -0.05, 0.0, 0.5]})
    ax = figures.class_drop_heatmap(df)
    mesh = ax.collections[0]
    np.testing.assert_allclose(np.asarray(mesh.get_array()).reshape(2, 2), [[0, 50], [10, -5]])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["l1", "l2"]


def test_recalibration_effect_bars():
    df = pd.DataFrame({"block": ["a", "a", "b", "b"], "position": [0, 0, 1, 1],
                       "bn_recalibrated": [False, True, False, True], "accuracy_drop": [0.3, 0.1, 0.02, 0.0]})
    ax = figures.recalibration_effect(df)
    heights = [[p.get_height() for p in c.patches] for c in ax.containers if isinstance(c, BarContainer)]
    assert heights == [pytest.approx([30, 2]), pytest.approx([10, 0])]


def test_sections_in_the_report_in_order():
    built = [sections.degradation_section(degradation_table(), lines=["plain-56 trains worse."]),
             sections.not_run_section("skipping", "left out with --skip.")]
    text = render_report(table(), baseline=BASELINE, config=CONFIG, sections=built)
    # the answer, the per-block table and figures, the analyses in the order given, the run record last
    assert text.index('id="answer"') < text.index('id="blocks"') < text.index('id="figures"') \
        < text.index('id="degradation"') < text.index('id="skipping"') < text.index('id="run"')
    assert '<a href="#degradation">' in text and '<a href="#blocks">' in text and '<a href="#run">' in text
    assert "Not run: left out with --skip." in text and "plain-56 trains worse." in text
    assert text.count("<img ") == 4 + 1
    degradation = text.split('id="degradation"', 1)[1].split("</section>", 1)[0]
    # accuracies in %, depths as integers, the caption explains the figure to a newcomer
    assert "<td class=\"num\">40.00</td>" in degradation and "<td class=\"num\">56</td>" in degradation
    assert "degradation problem" in degradation and "training error" in degradation


def test_cell_formats():
    assert sections.common._cell(0.1234, "pct")["text"] == "12.34"
    assert sections.common._cell(-0.01, "pp")["text"] == "-1.00"
    assert sections.common._cell(1234567, ",d")["text"] == "1,234,567"
    assert sections.common._cell(float("nan"), ".3f")["text"] == "\u2013"
    assert sections.common._cell(True, None)["text"] == "yes"
