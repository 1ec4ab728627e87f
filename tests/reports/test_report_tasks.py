"""The terminal answer, the report and its figures for every task: each shows the task's cost
column (`probe.scoring.verdict.cost_column`) with its own words and units, and the task's baseline.

Per-task tables are built by hand (the columns `probe.deletion.evaluation.sweep_table` gives each task,
joined with `probe.measure`'s); the end-to-end test runs `python -m probe.ablate --task drift` on
a two-head model of `tests/tiny_models.py`.
"""

from __future__ import annotations

import html
import math
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402

from probe import ablate  # noqa: E402
from probe.errors import ProbeError  # noqa: E402
from probe.scoring.verdict import VerdictRule, classify, cost_column  # noqa: E402
from reports import figures, sections  # noqa: E402
from reports.html import render_report, write_report  # noqa: E402
from report_fixtures import BASELINE, CONFIG, table as classification_table  # noqa: E402

LM_LOSS = 2.53125  # exactly representable: "2.5312" at four decimals
LM_BASELINE = {"loss": LM_LOSS, "perplexity": math.exp(LM_LOSS), "token_accuracy": 0.412, "tokens": 1024,
               "samples": 8}


def _measured(blocks: list[str], ratios: list[float]) -> dict:
    """probe.measure's columns for blocks with these ratios."""
    n = len(blocks)
    return {"block": blocks, "position": list(range(n)), "branch": [f"{b}.f" for b in blocks],
            "shortcut": ["identity"] * n, "branch_norm": [r * 10 for r in ratios], "branch_norm_std": [0.1] * n,
            "shortcut_norm": [10.0] * n, "shortcut_norm_std": [0.2] * n, "ratio": ratios,
            "ratio_std": [0.01] * n, "cosine": [-0.2, 0.0, 0.1, -0.4][:n], "cosine_std": [0.05] * n}


def lm_table() -> pd.DataFrame:
    """Four blocks of a language model: l0 helps, l1 skipped, l2 hurts, l3 neutral."""
    increase = [0.5, 0.00001, -0.2, 0.01]
    se = [0.05, 0.00002, 0.01, 0.01]
    loss = [LM_LOSS + i for i in increase]
    df = pd.DataFrame({
        **_measured(["l0", "l1", "l2", "l3"], [0.9, 0.1, 0.8, 0.7]), "mode": "zero",
        "loss": loss, "perplexity": np.exp(loss), "token_accuracy": [0.30, 0.412, 0.45, 0.41],
        "loss_increase": increase, "loss_increase_se": se, "perplexity_ratio": np.exp(increase),
        "token_accuracy_drop": [0.112, 0.0, -0.038, 0.002], "token_flip_rate": [0.25, 0.001, 0.1, 0.02],
        "tokens": 1024, "samples": 8})
    df.attrs = {"baseline": dict(LM_BASELINE), "task": "lm"}
    return classify(df)


def drift_table(kl: bool = False) -> pd.DataFrame:
    """Three blocks, no labels: d0 helps (30% drift), d1 skipped (no drift), d2 neutral."""
    df = pd.DataFrame({**_measured(["d0", "d1", "d2"], [0.9, 0.05, 0.8]), "mode": "zero",
                       "drift": [0.3, 0.0, 0.02], "drift_se": [0.01, 0.0, 0.005], "samples": 12})
    if kl:
        df.insert(df.columns.get_loc("samples"), "kl", [0.12, 0.0, 0.001])
    df.attrs = {"baseline": {"samples": 12}, "task": "drift"}
    return classify(df)


def custom_table() -> pd.DataFrame:
    """A user's loss with correctness: c0 helps, c1 skipped."""
    df = pd.DataFrame({**_measured(["c0", "c1"], [0.7, 0.2]), "mode": "zero", "loss": [1.5, 0.5000001],
                       "loss_increase": [1.0, 0.0000001], "loss_increase_se": [0.1, 0.0],
                       "accuracy": [0.5, 0.9], "accuracy_drop": [0.4, 0.0], "samples": 20})
    df.attrs = {"baseline": {"loss": 0.5, "accuracy": 0.9, "samples": 20}, "task": "tests.mod:squared_error"}
    return classify(df)


@pytest.fixture(autouse=True)
def _close():
    yield
    plt.close("all")


def _text(page: str) -> str:
    """The report without its images (base64 could spell anything) and tags, whitespace folded."""
    page = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "", page)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def _per_block_headers(page: str) -> list[str]:
    body = page.split('id="blocks"', 1)[1].split("</section>", 1)[0]  # the per-block table's section only
    return [html.unescape(h) for h in re.findall(r"<th>([^<]*)</th>", body)]


def _run_record(page: str) -> dict[str, str]:
    """The run record's rows, {name: value}, from the report's last section."""
    record = page.split('<section id="run"', 1)[1]
    return {html.unescape(k): html.unescape(v) for k, v in re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", record)}


def _order(page: str) -> list[str]:
    """The ids of the report's sections, in page order."""
    return re.findall(r'<section id="([\w-]+)"', page)


# --- the tables are what the tasks give ----------------------------------------------------------


def test_hand_tables_have_their_task_cost():
    assert cost_column(lm_table()) == "loss_increase"
    assert cost_column(drift_table()) == "drift"
    assert cost_column(custom_table()) == "loss_increase"
    assert list(lm_table()["verdict"]) == ["helps", "skipped", "hurts", "neutral"]
    assert list(drift_table()["verdict"]) == ["helps", "skipped", "neutral"]
    assert list(custom_table()["verdict"]) == ["helps", "skipped"]


# --- the terminal answer ---------------------------------------------------------------------------


CLASSIFICATION_SUMMARY = """\
baseline: accuracy 98.25%, loss 0.0612 on 400 samples; 6 residual blocks

blocks that help most (all 2 that help; deleting one alone costs the most accuracy):
          ratio  cosine accuracy_drop flip_rate verdict
block                                                  
layer1.0  1.200  -0.300     +10.0 pts     16.0%   helps
layer3.1  0.300  -0.500      +3.0 pts      4.0%   helps

skipped blocks (2): layer3.0, layer1.1
rule: {rule}
Spearman rank correlation of ratio with accuracy drop: +0.26"""


def test_classification_summary_is_unchanged():
    df = classify(classification_table())
    df.attrs["baseline"] = BASELINE
    assert ablate.format_summary(df) == CLASSIFICATION_SUMMARY.format(rule=VerdictRule().describe())


def test_lm_summary_in_nats_with_standard_errors():
    text = ablate.format_summary(lm_table())
    lines = text.splitlines()
    assert lines[0] == ("baseline: loss 2.5312 (perplexity 12.57), token accuracy 41.2% on 8 sequences "
                        "(1,024 tokens); 4 residual blocks")
    assert "blocks that help most (the one that helps; deleting one alone raises the loss the most):" in text
    (row,) = [line for line in lines if line.startswith("l0 ")]
    assert "+0.5000 \u00b1 0.0500 nats" in row and "helps" in row
    assert "25.0%" in row  # token flip rate
    assert "skipped blocks (1): l1" in lines
    assert f"rule: {VerdictRule().describe(cost='loss_increase')}" in lines
    assert lines[-1].startswith("Spearman rank correlation of ratio with loss increase: ")
    assert "accuracy drop" not in text and "pts" not in text


def test_drift_summary_in_percent():
    text = ablate.format_summary(drift_table(kl=True))
    lines = text.splitlines()
    assert lines[0] == ("baseline: the intact model's outputs on 12 samples (drift is measured against them); "
                        "3 residual blocks")
    assert "blocks that help most (the one that helps; deleting one alone moves the outputs the most):" in text
    (row,) = [line for line in lines if line.startswith("d0 ")]
    assert "30.0 \u00b1 1.0%" in row and "0.12" in row  # drift in %, KL as it is
    assert "skipped blocks (1): d1" in lines
    assert f"rule: {VerdictRule().describe(cost='drift')}" in lines
    assert lines[-1] == "Spearman rank correlation of ratio with drift: +1.00"  # ranks 3, 1, 2 both
    assert "accuracy" not in text and "loss" not in text


def test_summary_says_how_many_helping_blocks_it_lists():
    # Six blocks that all help; the answer lists the five costliest and says so.
    drift = [0.3, 0.25, 0.2, 0.15, 0.1, 0.4]
    names = [f"d{i}" for i in range(6)]
    df = pd.DataFrame({"block": names, "position": range(6), "branch": [f"{b}.f" for b in names],
                       "shortcut": "identity", "ratio": [0.9] * 6, "cosine": [0.0] * 6, "mode": "zero",
                       "drift": drift, "drift_se": [0.001] * 6, "samples": 12})
    df.attrs = {"baseline": {"samples": 12}, "task": "drift"}
    df = classify(df)
    assert list(df["verdict"]) == ["helps"] * 6
    lines = ablate.format_summary(df).splitlines()
    start = lines.index("blocks that help most (5 of the 6 that help; deleting one alone moves the outputs the most):")
    listed = [line.split()[0] for line in lines[start + 3:start + 8]]  # after the header and the index line
    assert listed == ["d5", "d0", "d1", "d2", "d3"] and lines[start + 8] == ""  # d4, the cheapest, left out


def test_custom_summary_names_the_task():
    text = ablate.format_summary(custom_table())
    assert text.splitlines()[0] == ("baseline: loss 0.5000, accuracy 90.00% on 20 samples "
                                    "(task tests.mod:squared_error); 2 residual blocks")
    (row,) = [line for line in text.splitlines() if line.startswith("c0 ")]
    assert "+1.0000 \u00b1 0.1000" in row and "nats" not in row and "+40.0 pts" in row
    assert "Spearman rank correlation of ratio with loss increase" in text


def test_unsupported_summary_keeps_the_task_baseline():
    df = drift_table()
    df.attrs["unsupported"] = "no verdict for a reason"
    text = ablate.format_summary(df)
    assert text.splitlines()[0].startswith("baseline: the intact model's outputs on 12 samples")
    assert "WARNING: no verdict for a reason" in text


def test_recalibration_words_per_task():
    df = lm_table()
    df.attrs["trained_baseline"] = dict(LM_BASELINE, loss=2.75, perplexity=math.exp(2.75), token_accuracy=0.4)
    assert ablate._recalibration_words(df, "12 samples") == (
        "on (12 samples); intact model as given: loss 2.7500 (perplexity 15.64), token accuracy 40.0%; "
        "recalibrated: loss 2.5312 (perplexity 12.57), token accuracy 41.2%")
    drift = drift_table()
    drift.attrs["trained_baseline"] = {"samples": 12}
    assert ablate._recalibration_words(drift, "12 samples") == (
        "on (12 samples); each deletion is compared with the intact model recalibrated the same way")
    assert ablate._recalibration_words(drift_table(), None).startswith("asked for, but nothing was refitted")
    classified = classify(classification_table())
    classified.attrs = {"baseline": BASELINE, "trained_baseline": dict(BASELINE, accuracy=0.97)}
    assert ablate._recalibration_words(classified, "x") == (
        "on (x); intact model as given: accuracy 97.00%, recalibrated 98.25%")


# --- figures ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("make,cost,scale,word", [
    (lm_table, "loss_increase", 1.0, "loss increase"),
    (drift_table, "drift", 100.0, "drift"),
])
def test_cost_figures_draw_the_cost_column(make, cost, scale, word):
    df = make()
    ax = figures.drop_per_block(df)
    (bars,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    assert [p.get_height() for p in bars.patches] == pytest.approx((df[cost] * scale).tolist())
    assert word in ax.get_ylabel() and "accuracy" not in ax.get_ylabel()
    scatter = figures.ratio_vs_drop(df)
    assert np.asarray(scatter.collections[0].get_offsets())[:, 1] == pytest.approx((df[cost] * scale).to_numpy())
    assert word in scatter.get_ylabel()


def test_lm_axis_is_in_nats_per_token_and_drift_band_starts_at_zero():
    assert "nats per token" in figures.drop_per_block(lm_table()).get_ylabel()
    ax = figures.drop_per_block(drift_table())
    (band,) = [c for c in ax.collections if c.get_label() == "noise band"]
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.0) and ys.max() == pytest.approx(5.0)  # the rule's 5% floor


def test_a_table_without_accuracy_names_the_missing_cost():
    with pytest.raises(ProbeError, match="'drift'"):
        figures.drop_per_block(drift_table().drop(columns=["drift", "drift_se"]), cost="drift")


# --- the report ------------------------------------------------------------------------------------


def test_drift_report_shows_drift_and_no_accuracy(tmp_path):
    df = drift_table(kl=True)
    path = write_report(tmp_path / "report.html", df, baseline=df.attrs["baseline"], config=dict(CONFIG, task="drift"))
    page = path.read_text()
    text = _text(page)
    assert "accuracy" not in text.lower()
    headers = _per_block_headers(page)
    assert "drift (%)" in headers and "drift se (%)" in headers and "noise (%)" in headers and "kl" in headers
    assert not [h for h in headers if "accuracy" in h or "flip" in h]
    assert "its own outputs on 12 samples are the reference" in text
    assert "d0 : deleting it moves the outputs by 30.00% of their size (noise \u00b15.00%)" in text
    assert "d1 (ratio 0.05, drift 0.00%)" in text
    assert "Spearman rank correlation between the ratio and the drift" in text
    assert html.escape(VerdictRule().describe(cost="drift")) in page
    assert page.count("<img ") == 4
    assert ">30.00<" in page  # drift in % in the per-block table


def detection_table() -> pd.DataFrame:
    """Three blocks of a detector against a ground truth the intact model finds 96% of: y0 helps
    (loses 16 points of it), y1 skipped, y2 neutral (finds a little more of it without the block)."""
    lost = [0.16, 0.0, -0.01]
    df = pd.DataFrame({**_measured(["y0", "y1", "y2"], [0.9, 0.05, 0.8]), "mode": "zero",
                       "detections_kept": [0.96 - v for v in lost], "detections_lost": lost,
                       "detections_lost_se": [0.02, 0.0, 0.01], "detections": [2.5, 2.7, 2.75],
                       "map50": [0.8, 0.96, 0.97], "map50_95": [0.6, 0.8, 0.81], "map50_drop": [0.16, 0.0, -0.01],
                       "drift": [0.05, 0.001, 0.02], "samples": 40})
    df.attrs = {"baseline": {"detections": 2.7, "detections_kept": 0.96, "reference_detections": 105, "map50": 0.96,
                             "map50_95": 0.81, "samples": 40}, "task": "detection"}
    return classify(df)


def test_detection_report_says_nothing_of_accuracy(tmp_path):
    df = detection_table()
    assert list(df["verdict"]) == ["helps", "skipped", "neutral"]
    page = render_report(df, baseline=df.attrs["baseline"], config=dict(CONFIG, task="detection"))
    text = _text(page)
    assert "accuracy" not in text.lower()  # neither the captions nor the table's note speak of it
    assert "Each bar is the share of the reference's detections" in text
    assert "Detections kept is the share of the reference's detections" in text
    headers = _per_block_headers(page)
    assert {"detections lost (%)", "detections lost se (%)", "noise (%)", "detections kept (%)",
            "map50 drop (pp)", "drift (%)"} <= set(headers)
    assert ">16.00<" in page and ">80.00<" in page  # lost and kept (96% - 16%) of y0, in %


def test_lm_report_shows_the_loss_increase(tmp_path):
    df = lm_table()
    page = render_report(df, baseline=df.attrs["baseline"], config=CONFIG)
    text = _text(page)
    assert ("Unablated model: loss 2.5312 nats per token (perplexity 12.57), token accuracy 41.20%, on 8 "
            "sequences (1,024 predicted tokens).") in text
    assert "l0 : deleting it changes the loss by +0.5000 nats per token (noise \u00b10.1000)" in text
    assert "l2 (loss -0.2000, noise \u00b10.0200)" in text  # hurts
    assert "between the ratio and the loss increase" in text
    headers = _per_block_headers(page)
    assert len(headers) == len(set(headers))
    assert headers[:8] == ["position", "block", "verdict", "ratio", "ratio std", "loss increase",
                           "loss increase se", "noise"]
    assert "token accuracy (%)" in headers and "token accuracy drop (pp)" in headers
    assert "accuracy drop (pp)" not in headers and "accuracy (%)" not in headers
    assert html.escape(VerdictRule().describe(cost="loss_increase")) in page


def test_custom_report_baseline_names_the_task():
    df = custom_table()
    text = _text(render_report(df, baseline=df.attrs["baseline"], config={}))
    # (tags fold to a space: "<strong>0.5000</strong>," reads "0.5000 ,")
    assert "Unablated model: loss 0.5000 , accuracy 90.00%, on 20 samples (task tests.mod:squared_error)." in text
    assert "c0 : deleting it changes the loss by +1.0000 (noise \u00b10.2000)" in text


def test_report_baseline_must_fit_the_task():
    with pytest.raises(ProbeError, match=r"baseline needs key\(s\) \['loss', 'perplexity'"):
        render_report(lm_table(), baseline={"samples": 8}, config={})
    render_report(drift_table(), baseline={"samples": 12}, config={})  # drift needs nothing else


def test_classification_report_keeps_its_words():
    page = render_report(classification_table(), baseline=BASELINE, config=CONFIG)
    text = _text(page)
    assert "Unablated model: test accuracy 98.25% , loss 0.0612, on 400 samples." in text
    assert "layer1.0 : deleting it costs +10.00 points of accuracy (noise \u00b14.00); ratio 1.2" in text
    assert "between the ratio and the accuracy drop" in text
    assert "Accuracy and flip rate (share of predictions that changed) are in %" in text
    assert _per_block_headers(page)[5:8] == ["accuracy drop (pp)", "noise (pp)", "flip rate (%)"]


# --- the answer first; the run record lists what applies to the task ------------------------------

# What probe.ablate hands write_report: every RunConfig field that is set (the image and the
# language-model ones alike), then what the run found.
RUN_SETTINGS = {"split": "test", "mode": "zero", "device": "cpu", "seed": 0, "save_every": 8, "precision": "fp32",
                "download": False, "allow_pickle": False, "bn_recalibrate": False, "calibration_samples": 256,
                "random_draws": 3, "curve_points": 14, "bootstrap": 1000, "level": 0.95,
                "degradation_depths": (20, 56), "seq_len": 256, "spans": (1, 2, 4, 8), "greedy_steps": 4,
                "BN recalibration": "off (trained BatchNorm statistics)", "versions": {"torch": "2.4.0"}}
LANGUAGE_SETTINGS = {"seq len", "spans", "greedy steps"}
IMAGE_SETTINGS = {"images", "image size", "normalize", "in channels", "channels last", "epochs", "lr"}


def test_lm_report_answers_first_and_records_only_language_model_settings():
    df = lm_table()
    config = {**RUN_SETTINGS, "model": "smollm2", "dataset": "pydoc", "task": "lm", "seq_len": 128,
              "image_size": 32, "normalize": "imagenet", "in_channels": 3, "channels_last": False, "epochs": 5,
              "lr": 0.1, "images": "32x32, 3 channel(s)", "samples": "the first 8 windows"}
    built = [sections.Section(id="lm", title="Layers", lead=["The layer analysis ran."]),
             sections.not_run_section("degradation", "it trains classifiers of its own.")]
    page = render_report(df, baseline=df.attrs["baseline"], config=config, sections=built)
    assert _order(page) == ["answer", "blocks", "figures", "lm", "degradation", "run"]
    assert re.findall(r"<h2>([^<]*)</h2>", page)[0] == "The answer"
    answer = page.split('<section id="answer"', 1)[1].split("</section>", 1)[0]
    assert "Unablated model: loss <strong>2.5312</strong>" in answer and "<code>l0</code>" in answer
    assert "<code>l1</code>" in answer and html.escape(VerdictRule().describe(cost="loss_increase")) in answer
    record = _run_record(page)
    assert record["seq len"] == "128" and record["spans"] == "(1, 2, 4, 8)" and record["greedy steps"] == "4"
    # the layer analysis bootstraps its score agreement: its resamples and level apply
    assert record["bootstrap"] == "1000" and record["level"] == "0.95"
    assert not IMAGE_SETTINGS & set(record)
    # analyses that did not run, recalibration that was off, switches that were off: not recorded
    assert not {"random draws", "curve points", "degradation depths", "calibration samples",
                "download", "allow pickle", "bn recalibrate"} & set(record)
    assert record["BN recalibration"] == "off (trained BatchNorm statistics)" and record["model"] == "smollm2"


@pytest.mark.parametrize("make,task", [(classification_table, "classification"), (drift_table, "drift"),
                                       (custom_table, "tests.mod:squared_error")])
def test_image_reports_record_no_language_model_settings(make, task):
    df = make()
    baseline = df.attrs.get("baseline") or BASELINE
    config = {**RUN_SETTINGS, "model": "resnet20", "dataset": "digits", "task": task, "image_size": 16,
              "images": "16x16, 1 channel(s), normalization train-split", "samples": "all 360 samples"}
    built = [sections.Section(id="uncertainty", title="How sure", lead=["ran"])]
    page = render_report(df, baseline=baseline, config=config, sections=built)
    assert _order(page) == ["answer", "blocks", "figures", "uncertainty", "run"]
    record = _run_record(page)
    assert not LANGUAGE_SETTINGS & set(record)
    assert record["images"] == "16x16, 1 channel(s), normalization train-split" and record["image size"] == "16"
    assert record["bootstrap"] == "1000" and record["level"] == "0.95"  # the uncertainty section ran
    assert "random draws" not in record and "calibration samples" not in record


# --- sections of the analyses for other tasks ------------------------------------------------------


class _Result:
    def __init__(self, **tables):
        self.__dict__.update(tables)


def test_drift_sections_use_the_drift_columns():
    blocks = ["d0", "d1"]
    summary = pd.DataFrame({"state": ["all blocks", "skipped blocks removed"], "blocks_removed": [0, 1],
                            "removed": ["", "d1"], "drift": [0.0, 0.001], "drift_se": [0.0, 0.0005], "samples": 12,
                            "mode": "zero", "bn_recalibrated": False})
    curves = pd.DataFrame([{"order": o, "draw": 0, "k": k, "removed": "", "drift": 0.1 * k, "drift_se": 0.0,
                            "samples": 12} for o in ("ratio", "drop", "random") for k in range(3)])
    skipping = sections.skipping_section(_Result(summary=summary, curves=curves, export=pd.DataFrame(),
                                                 export_note="none"), cost="drift")
    assert "moves the outputs by 0.10% of their size" in skipping.lead[0]
    assert skipping.tables[0].headers == ["network", "blocks deleted", "drift (%)", "its standard error (%)"]
    axis = figures.deletion_curves(curves)
    assert "drift" in axis.get_ylabel() and "smallest single-block cost first" in \
        [t.get_text() for t in axis.get_legend().get_texts()]

    intervals = pd.DataFrame({"block": blocks, "position": [0, 1], "ratio": [0.9, 0.05], "drift": [0.3, 0.0],
                              "drift_low": [0.25, 0.0], "drift_high": [0.35, 0.0], "level": 0.95, "resamples": 50,
                              "samples": 12, "skipped": [False, True], "verdict_ci": ["helps", "skipped"],
                              "verdict": ["helps", "skipped"], "bn_recalibrated": False})
    uncertainty = sections.uncertainty_section(_Result(intervals=intervals, per_class=pd.DataFrame(
        columns=["block", "position", "class", "samples", "baseline_accuracy", "accuracy", "accuracy_drop"])))
    assert len(uncertainty.figures) == 1 and uncertainty.notes  # no per-class heatmap, and why
    assert uncertainty.tables[0].headers[2:5] == ["drift (%)", "interval low (%)", "interval high (%)"]
    assert [row[2]["text"] for row in uncertainty.tables[0].rows] == ["30.00", "0.00"]

    proxies = pd.DataFrame({"proxy": ["ratio", "gradient_x_activation", "measured drop (sweep)"],
                            "spearman_drift": [0.5, np.nan, np.nan], "seconds": [0.1, np.nan, 2.0],
                            "bn_recalibrated": False})
    attribution = sections.attribution_section(_Result(summary=proxies, notes={"gradient_x_activation": "no grad"}))
    assert attribution.tables[0].headers == ["signal", "\u03c1 vs drift", "seconds"]
    assert "Best ranking of the drift: ratio" in " ".join(attribution.lead)
    assert attribution.notes == ["No gradient_x_activation: no grad"]
    axis = figures.proxy_correlations(proxies)
    assert "2 s" in axis.get_title() and [t.get_text() for t in axis.get_legend().get_texts()] == ["vs drift"]

    recal = pd.DataFrame([{"block": b, "position": i, "drift": d, "drift_se": 0.0, "samples": 12, "mode": "zero",
                           "bn_recalibrated": r} for i, b in enumerate(blocks)
                          for r, d in ((False, 0.3 - 0.1 * i), (True, 0.2 - 0.1 * i))])
    recalibration = sections.recalibration_section(recal, cost="drift")
    assert recalibration.tables[0].headers == ["block", "drift (%), trained statistics",
                                               "drift (%), recalibrated"]
    assert "Mean drift of the outputs: 25.00% with trained statistics, 15.00% after recalibration" in \
        " ".join(recalibration.lead)
    bars = figures.recalibration_effect(recal)
    assert "drift" in bars.get_ylabel()


def test_representation_section_leaves_out_what_does_not_apply():
    summary = pd.DataFrame({"block": ["d0", "d1"], "position": [0, 1], "stage": [1, 1], "ratio": [0.9, 0.05],
                            "drift": [0.3, 0.0], "verdict": ["helps", "skipped"], "probe_accuracy": np.nan,
                            "probe_gain": np.nan, "lens_accuracy": np.nan, "grad_cosine": np.nan,
                            "step_ratio": np.nan, "cka_previous": [np.nan, 0.5], "cka_next": [0.5, np.nan],
                            "top_class": pd.array([pd.NA, pd.NA], dtype="Int64"), "top_class_drop": np.nan,
                            "bn_recalibrated": False})
    cka = pd.DataFrame([{"block_a": a, "position_a": i, "stage_a": 1, "block_b": b, "position_b": j, "stage_b": 1,
                         "cka": 1.0 if i == j else 0.5, "samples": 12}
                        for i, a in enumerate(["d0", "d1"]) for j, b in enumerate(["d0", "d1"])])
    notes = {"probes": "linear probes need labels.", "lens": "the lens needs labels.",
             "classes": "classes need labels.", "refinement": "drift has no loss."}
    result = _Result(summary=summary, lens=pd.DataFrame(columns=["block", "applicable", "reason"]),
                     probes=pd.DataFrame(), refinement=pd.DataFrame(), classes=pd.DataFrame(), cka=cka, notes=notes)
    section = sections.representation_section(result, lines=["No refinement: drift has no loss."])
    assert [f.title for f in section.figures] == ["Similarity of the blocks' outputs"]
    assert section.tables[0].headers == ["block", "stage", "ratio", "deletion cost: drift (%)", "verdict",
                                         "CKA with previous", "CKA with next"]
    assert section.notes == ["Linear probes need labels.", "The lens needs labels.", "Classes need labels."]


# --- end to end --------------------------------------------------------------------------------------

ANALYSES = ["degradation", "skipping", "attribution", "uncertainty", "representation", "recalibration"]


def test_cli_drift_on_a_two_head_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    code = ablate.main(["--model", "tiny_models:two_head_model", "--dataset", "tiny_models:unlabelled_images",
                        "--task", "drift", "--out", str(out), "--no-progress", "--bootstrap", "20",
                        "--skip", "degradation", "skipping", "attribution", "representation", "recalibration"])
    assert code == 0
    printed = capsys.readouterr().out
    assert printed.startswith("baseline: the intact model's outputs on 12 samples (drift is measured against "
                              "them); 3 residual blocks")
    assert "Spearman rank correlation of ratio with drift" in printed
    table = pd.read_csv(out / "blocks.csv")
    assert list(table["block"]) == ["block0", "block1", "block2"]
    assert {"drift", "drift_se", "noise", "verdict"} <= set(table.columns)
    assert not [c for c in table.columns if "accuracy" in c or "flip" in c]
    zeroed = table.set_index("block").loc["block1"]
    assert zeroed["drift"] == 0.0 and zeroed["ratio"] == 0.0 and zeroed["verdict"] == "skipped"
    assert table.set_index("block").loc["block0", "drift"] > 0
    page = (out / "report.html").read_text()
    assert "accuracy" not in _text(page).lower()
    assert "drift (%)" in _per_block_headers(page)
    intervals = pd.read_csv(out / "drop_intervals.csv")  # the uncertainty section ran, in drift
    assert {"drift", "drift_low", "drift_high"} <= set(intervals.columns)
    assert 'id="uncertainty"' in page and "No deletion cost per class" in page


def test_cli_drift_with_batchnorm_recalibration(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "run"
    code = ablate.main(["--model", "tiny_models:two_head_batchnorm_model", "--dataset",
                        "tiny_models:unlabelled_images", "--task", "drift", "--bn-recalibrate",
                        "--calibration-samples", "6", "--out", str(out), "--no-progress",
                        "--skip", *[a for a in ANALYSES if a != "recalibration"]])
    assert code == 0
    capsys.readouterr()
    table = pd.read_csv(out / "blocks.csv")
    assert table["bn_recalibrated"].all() and table.set_index("block").loc["block1", "drift"] == 0.0
    text = _text((out / "report.html").read_text())
    assert ("BN recalibration on (the first 6 samples of tiny_models:unlabelled_images split 'train'); each "
            "deletion is compared with the intact model recalibrated the same way") in text
    assert "Each drift is measured against the outputs of the intact model treated alike" in text
    assert "block drift (%), trained statistics drift (%), recalibrated" in text
    assert "accuracy" not in text.lower()
