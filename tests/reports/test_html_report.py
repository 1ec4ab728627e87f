"""Figures draw exactly the table's numbers; the HTML report is complete and self-contained."""

from __future__ import annotations

import base64
import html
import os
import re

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from matplotlib.colors import to_rgba  # noqa: E402
from matplotlib.container import BarContainer  # noqa: E402

from probe.scoring.verdict import VerdictRule, classify  # noqa: E402
from probe.errors import ProbeError  # noqa: E402
from reports import (  # noqa: E402
    VERDICT_COLORS,
    cosine_per_block,
    drop_per_block,
    ratio_per_block,
    ratio_vs_drop,
    render_report,
    write_report,
)
from report_fixtures import BASELINE, CONFIG, table  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def forward() -> pd.DataFrame:
    return table().sort_values("position").reset_index(drop=True)


def bars(ax) -> BarContainer:
    (container,) = [c for c in ax.containers if isinstance(c, BarContainer)]
    return container


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_ratio_per_block_draws_ratio_in_forward_order() -> None:
    df = classify(table())
    ax = ratio_per_block(df, max_ratio=0.5)
    container = bars(ax)
    assert [p.get_height() for p in container.patches] == forward()["ratio"].tolist()
    assert [p.get_x() + p.get_width() / 2 for p in container.patches] == pytest.approx(range(6))
    assert [t.get_text() for t in ax.get_xticklabels()] == forward()["block"].tolist()
    # error bars span ratio +/- ratio_std
    segments = container.errorbar.lines[2][0].get_segments()
    spans = np.array([(s[0][1], s[1][1]) for s in segments])
    r, sd = forward()["ratio"].to_numpy(), forward()["ratio_std"].to_numpy()
    np.testing.assert_allclose(spans, np.stack([r - sd, r + sd], axis=1))
    # colour by verdict: layer1.0 helps, layer1.1 skipped
    assert container.patches[0].get_facecolor() == to_rgba(VERDICT_COLORS["helps"])
    assert container.patches[1].get_facecolor() == to_rgba(VERDICT_COLORS["skipped"])
    assert any(line.get_ydata()[0] == 0.5 for line in ax.get_lines())


def test_drop_per_block_in_points_with_noise_band() -> None:
    df = classify(table())
    fig, ax = plt.subplots()
    assert drop_per_block(df, ax=ax) is ax
    heights = [p.get_height() for p in bars(ax).patches]
    assert heights == pytest.approx([10.0, 0.25, -4.0, 0.0, -0.25, 3.0])
    colours = [p.get_facecolor() for p in bars(ax).patches]
    verdicts = ["helps", "skipped", "hurts", "neutral", "skipped", "helps"]
    assert colours == [to_rgba(VERDICT_COLORS[v]) for v in verdicts]
    # the band: +noise (points) over each block's slot, noise = 4, 1, 3, 0.25, 0.5, 2
    (band,) = [c for c in ax.collections if c.get_label() == "noise band"]
    top = band.get_paths()[0].vertices[:, 1].max()
    assert top == pytest.approx(4.0)
    assert sorted({t.get_text() for t in ax.get_legend().get_texts()}) == sorted(
        ["noise band", "helps", "skipped", "hurts", "neutral"])


def test_drop_per_block_without_verdict_is_plain() -> None:
    ax = drop_per_block(table())
    heights = [p.get_height() for p in bars(ax).patches]
    assert heights == pytest.approx((forward()["accuracy_drop"] * 100).tolist())
    assert len({p.get_facecolor() for p in bars(ax).patches}) == 1


def test_ratio_vs_drop_offsets_log_scale_rho_and_labels() -> None:
    ax = ratio_vs_drop(classify(table()))
    offsets = np.asarray(ax.collections[0].get_offsets())
    assert offsets[:, 0].tolist() == forward()["ratio"].tolist()
    assert offsets[:, 1] == pytest.approx((forward()["accuracy_drop"] * 100).to_numpy())
    assert ax.get_xscale() == "log"  # 0.1 .. 1.2 spans more than a decade
    assert "0.26" in ax.get_title()  # rho = 9/35 = 0.257
    # the three largest drops are named: layer1.0 (10), layer3.1 (3), layer1.1 (0.25)
    assert [t.get_text() for t in ax.texts] == ["layer1.0", "layer3.1", "layer1.1"]


def test_ratio_vs_drop_linear_when_within_a_decade() -> None:
    df = table().assign(ratio=lambda d: 0.2 + d["position"] * 0.1)  # 0.2 .. 0.7
    assert ratio_vs_drop(df).get_xscale() == "linear"


def test_cosine_per_block_heights() -> None:
    ax = cosine_per_block(table())
    assert [p.get_height() for p in bars(ax).patches] == forward()["cosine"].tolist()
    assert ax.get_ylim() == pytest.approx((-1.05, 1.05))


def test_many_blocks_thin_the_labels() -> None:
    n = 40
    df = pd.DataFrame({"block": [f"b{i}" for i in range(n)], "position": range(n),
                       "ratio": np.linspace(0.1, 1.0, n)})
    ax = ratio_per_block(df)
    labels = [t.get_text() for t in ax.get_xticklabels()]
    assert labels == [f"b{i}" for i in range(0, n, 2)]
    assert len(bars(ax).patches) == n


def test_figure_missing_column_names_it() -> None:
    with pytest.raises(ProbeError, match="'cosine'"):
        cosine_per_block(table().drop(columns="cosine"))


def _section(text: str, id: str) -> str:
    """The HTML of the report's section `id` (no section nests in another)."""
    return text.split(f'<section id="{id}"', 1)[1].split("</section>", 1)[0]


def _run_record(text: str) -> dict[str, str]:
    """The run record's rows, {name: value} as the reader sees them."""
    return {html.unescape(k): html.unescape(v) for k, v in re.findall(r"<dt>(.*?)</dt><dd>(.*?)</dd>", text)}


def _images(text: str) -> list[bytes]:
    sources = re.findall(r'<img src="data:image/png;base64,([A-Za-z0-9+/=]+)"', text)
    return [base64.b64decode(s, validate=True) for s in sources]


def test_render_report_is_complete_and_self_contained() -> None:
    text = render_report(table(), baseline=BASELINE, config=CONFIG, title="ResNet-20 on digits")
    assert plt.get_fignums() == []
    assert text.lstrip().startswith("<!DOCTYPE html>")
    assert "<title>ResNet-20 on digits</title>" in text
    for block in table()["block"]:
        assert block in text
    assert html.escape(VerdictRule().describe()) in text
    images = _images(text)
    assert len(images) == 4 == text.count("<img ")
    assert all(img.startswith(PNG_SIGNATURE) for img in images)
    assert not re.search(r'(src|href)\s*=\s*["\']?\s*(https?:)?//', text)
    assert "http://" not in text and "https://" not in text
    assert "<script" not in text.lower() and "<link" not in text.lower()
    # the run record (configuration) and the baseline
    for value in ["resnet20", "runs/resnet20/model.pt", "digits16", "2024-05-01T12:00:00Z",
                  "torch 2.4.0", "98.25%"]:
        assert value in text
    # the answer, in the order summarize gives
    answer = _section(text, "answer")
    assert answer.index("layer1.0") < answer.index("layer3.1")  # helps most
    assert "&rho; = 0.26" in answer
    # the ratio is explained to a reader who never saw the code
    assert "||F(x)|| / ||s(x)||" in text
    # table: accuracy in %, drop in points, one row per block in forward order
    body = _section(text, "blocks")
    assert "88.25" in body and "+10.00" in body and "\u00b14.00" in body
    rows = re.findall(r'<tr class="(\w+)">', body)
    assert rows == ["helps", "skipped", "hurts", "neutral", "skipped", "helps"]
    assert [body.index(f">{b}<") for b in forward()["block"]] == sorted(
        body.index(f">{b}<") for b in forward()["block"])


def test_render_report_escapes_user_text() -> None:
    config = dict(CONFIG, model="<script>alert(1)</script>")
    text = render_report(table(), baseline=BASELINE, config=config, title="a < b")
    assert "<script>" not in text
    assert "&lt;script&gt;" in text and "<title>a &lt; b</title>" in text


def test_render_report_shows_the_tables_own_verdicts(monkeypatch) -> None:
    # Classified once, where the table was built: without a rule the report classifies nothing again.
    import reports.html

    df = classify(table(), rule=VerdictRule(max_ratio=0.25, noise_z=100.0))
    monkeypatch.setattr(reports.html, "classify", lambda *args, **kwargs: pytest.fail("classified again"))
    rows = re.findall(r'<tr class="(\w+)">', render_report(df, baseline=BASELINE, config={}))
    assert rows == ["neutral", "skipped", "neutral", "neutral", "skipped", "neutral"]


def test_a_classified_table_is_described_by_the_rule_that_classified_it() -> None:
    """Without a rule, the verdicts shown and the rule described (its words, the dashed line)
    are those of the rule that classified the table, not the default's."""
    rule = VerdictRule(max_ratio=0.25, noise_z=100.0)
    text = render_report(classify(table(), rule=rule), baseline=BASELINE, config={})
    assert html.escape(rule.describe()) in text
    assert html.escape(VerdictRule().describe()) not in text
    assert "threshold (0.25)" in text


def test_render_report_uses_the_given_rule() -> None:
    rule = VerdictRule(max_ratio=0.25, noise_z=100.0)  # everything within noise
    text = render_report(table(), baseline=BASELINE, config={}, rule=rule)
    assert html.escape(rule.describe()) in text
    assert "No block costs more than noise" in text
    rows = re.findall(r'<tr class="(\w+)">', text)
    assert rows == ["neutral", "skipped", "neutral", "neutral", "skipped", "neutral"]


def test_render_report_without_cosine_has_three_figures() -> None:
    df = table().drop(columns=["cosine", "cosine_std"])
    assert len(_images(render_report(df, baseline=BASELINE, config=CONFIG))) == 3


def test_write_report_atomic_no_temp_files_no_figures(tmp_path) -> None:
    assert plt.get_fignums() == []
    target = tmp_path / "report.html"
    target.write_text("old")
    out = write_report(target, table(), baseline=BASELINE, config=CONFIG)
    assert out == target
    assert os.listdir(tmp_path) == ["report.html"]
    assert plt.get_fignums() == []
    text = target.read_text(encoding="utf-8")
    assert "layer3.1" in text and len(_images(text)) == 4
    # a failing render leaves the previous report and no temporary file
    with pytest.raises(ProbeError, match="baseline"):
        write_report(target, table(), baseline={"accuracy": 0.9}, config=CONFIG)
    assert target.read_text(encoding="utf-8") == text
    assert os.listdir(tmp_path) == ["report.html"]
    # a new directory is created; the file is readable by others like any report
    nested = write_report(tmp_path / "run" / "r.html", table(), baseline=BASELINE, config={})
    assert nested.stat().st_mode & 0o777 == 0o644
    assert os.listdir(tmp_path / "run") == ["r.html"]
    assert plt.get_fignums() == []


# --- the order a reader asks in; the run record lists only what applies --------------------------

# What probe.ablate hands write_report for the default run (resnet56 on digits, classification, BN
# recalibration off): every RunConfig field that is set, the language-model ones included, and what
# the run found.
CLASSIFIER_RUN = {
    "model": "resnet56", "dataset": "digits", "download": False, "allow_pickle": False, "split": "test",
    "mode": "zero", "device": "cpu", "batch_size": 256, "seed": 0, "threads": "2 (--threads)", "out": "/runs/base",
    "degradation_depths": (20, 56), "bn_recalibrate": False, "calibration_samples": 256, "random_draws": 3,
    "curve_points": 14, "bootstrap": 1000, "level": 0.95, "save_every": 8, "precision": "fp32",
    "task": "classification", "seq_len": 256, "spans": (1, 2, 4, 8), "greedy_steps": 4,
    "checkpoint": "/cache/resnet56-digits.pt", "samples": "all 360 samples",
    "images": "16x16, 1 channel(s), normalization train-split", "shortcuts": "25 identity, 2 zero-padding",
    "BN recalibration": "off (trained BatchNorm statistics)", "seconds": {"measure": "0.1", "sweep": "1.6"},
    "versions": {"torch": "2.4.0", "probe": "0.1.0"}, "date": "2024-05-01 12:00",
    "image_size": None, "inputs": None, "targets": "", "skip": (), "sections": None,
}
# The same for smollm2 on pydoc text (task lm), with image and training settings a user might pass.
LM_RUN = {
    "model": "smollm2", "dataset": "pydoc", "split": "test", "mode": "zero", "device": "cpu", "batch_size": 4,
    "seed": 0, "limit": 8, "bn_recalibrate": False, "calibration_samples": 256, "save_every": 8,
    "precision": "fp32", "task": "lm", "seq_len": 128, "spans": (1, 2), "greedy_steps": 3, "image_size": 32,
    "normalize": "imagenet", "in_channels": 3, "channels_last": True, "download": True, "epochs": 5, "lr": 0.1,
    "random_draws": 3, "curve_points": 14, "bootstrap": 1000, "level": 0.95, "degradation_depths": (20, 56),
    "checkpoint": "/cache/smollm2.gguf", "samples": "the first 8 windows", "shortcuts": "60 identity",
    "BN recalibration": "off (trained BatchNorm statistics)", "versions": {"torch": "2.4.0"},
}


def _sections_that_ran(*ids: str) -> list:
    """Sections of analyses that ran (a lead paragraph each)."""
    from reports.sections import Section

    return [Section(id=id, title=id, lead=[f"{id} ran."]) for id in ids]


def test_the_report_opens_with_the_answer_and_ends_with_the_run_record() -> None:
    from reports.sections import not_run_section

    built = [*_sections_that_ran("skipping", "uncertainty"), not_run_section("degradation", "left out with --skip.")]
    text = render_report(table(), baseline=BASELINE, config=CLASSIFIER_RUN, sections=built)
    body = text.split("<body>", 1)[1]
    # the first heading after the title is the answer; it opens with the intact model's numbers
    assert re.findall(r"<h2>([^<]*)</h2>", body)[0] == "The answer"
    answer = _section(text, "answer")
    assert answer.index("Unablated model: test accuracy <strong>98.25%</strong>") \
        < answer.index("Blocks that help most") < answer.index("Blocks the network effectively skips") \
        < answer.index("The rule") < answer.index("&rho; = 0.26")
    assert "layer1.0" in answer and "layer3.0" in answer  # helps most; skipped
    assert html.escape(VerdictRule().describe()) in answer
    # the key figure, what deleting each block costs, is in the answer; the other three follow
    (key,) = re.findall(r'<img src="[^"]+" alt="([^"]*)"', answer)
    assert key == "What deleting each block costs"
    assert re.findall(r'<img src="[^"]+" alt="([^"]*)"', _section(text, "figures")) == [
        "Branch size per block", "Does branch size predict deletion cost?", "Direction of each branch"]
    # then the per-block table, the figures, the analyses, and the run record last, folded
    order = [text.index(f'<section id="{id}"') for id in
             ("answer", "blocks", "figures", "skipping", "uncertainty", "degradation", "run")]
    assert order == sorted(order)
    assert text.rindex("</section>") > text.index('<section id="run"') > text.rindex('class="analysis"')
    record = _section(text, "run")
    assert record.count("<details>") == 1 and "<summary>" in record
    assert text.count('<dl class="config">') == 1 and text.index('<dl class="config">') > text.index('id="run"')
    # nothing of the run record comes before the answer but the model and data set it is about
    head = text.split('<section id="answer"', 1)[0]
    assert "resnet56" in head and "digits" in head and 'href="#run"' in head
    for value in ("/cache/resnet56-digits.pt", "all 360 samples", "25 identity", "2024-05-01 12:00", "fp32"):
        assert value not in head and value in record, value
    assert "<script" not in text.lower()


def test_a_classifiers_run_record_has_no_language_model_or_unused_settings() -> None:
    from reports.sections import not_run_section

    built = [*_sections_that_ran("skipping", "uncertainty"), not_run_section("degradation", "left out with --skip."),
             not_run_section("recalibration", "left out with --skip.")]
    text = render_report(table(), baseline=BASELINE, config=CLASSIFIER_RUN, sections=built)
    assert list(_run_record(text)) == [
        "model", "checkpoint", "dataset", "task", "samples", "mode", "seed", "date", "versions", "split", "device",
        "batch size", "threads", "out", "random draws", "curve points", "bootstrap", "level", "save every",
        "precision", "images", "shortcuts", "BN recalibration", "seconds"]
    record = _section(text, "run")
    for gone in ("seq len", "spans", "greedy steps", "inputs", "targets", "image size", "degradation depths",
                 "calibration samples", "bn recalibrate", "download", "allow pickle", "skip", "not given"):
        assert f"<dt>{gone}</dt>" not in record, gone
    # the values shown are those given
    assert _run_record(text)["images"] == "16x16, 1 channel(s), normalization train-split"
    assert _run_record(text)["seconds"] == "measure 0.1, sweep 1.6"
    assert _run_record(text)["BN recalibration"] == "off (trained BatchNorm statistics)"


def test_applicable_settings_of_a_classifier() -> None:
    from reports.html import applicable_settings

    shown = applicable_settings(CLASSIFIER_RUN, task_name="classification",
                                sections_run=["degradation", "skipping", "uncertainty", "recalibration"])
    assert not {"seq_len", "spans", "greedy_steps", "inputs", "targets", "image_size", "skip", "sections",
                "download", "allow_pickle", "bn_recalibrate"} & set(shown)
    # each analysis that ran brings its settings, the recalibration section its calibration samples
    assert {k: shown[k] for k in ("degradation_depths", "random_draws", "curve_points", "bootstrap", "level",
                                  "calibration_samples")} == {
        "degradation_depths": (20, 56), "random_draws": 3, "curve_points": 14, "bootstrap": 1000, "level": 0.95,
        "calibration_samples": 256}
    assert shown["images"] == CLASSIFIER_RUN["images"] and list(shown)[:4] == ["model", "checkpoint", "dataset", "task"]
    # no analysis ran: none of their settings; recalibration off: no calibration samples
    bare = applicable_settings(CLASSIFIER_RUN, task_name="classification")
    assert not {"degradation_depths", "random_draws", "curve_points", "bootstrap", "level",
                "calibration_samples"} & set(bare)
    # recalibration on: where its samples came from; a switch that is on is shown
    on = applicable_settings(dict(CLASSIFIER_RUN, bn_recalibrate=True, calibration_root="/data/train",
                                  download=True, allow_pickle=True), task_name="classification")
    assert on["calibration_samples"] == 256 and on["calibration_root"] == "/data/train"
    assert on["download"] is True and on["allow_pickle"] is True
    # the table says nothing was refitted: no calibration settings, whatever the config asked
    assert "calibration_samples" not in applicable_settings(dict(CLASSIFIER_RUN, bn_recalibrate=True),
                                                            task_name="classification", recalibrated=False)
    # without probe.ablate's words for it, the raw flag says whether BatchNorm was recalibrated
    words = {k: v for k, v in CLASSIFIER_RUN.items() if k != "BN recalibration"}
    assert applicable_settings(words, task_name="classification")["bn_recalibrate"] is False


def test_applicable_settings_follow_the_sections_that_read_them() -> None:
    from reports.html import applicable_settings

    # A setting read by a section of the caller's registry is listed only when that section ran.
    config = {"model": "m", "dataset": "digits", "my_threshold": 0.3, "spans": (1, 2)}
    owners = {"my_threshold": ("mine",), "spans": ("lm",)}
    ran = applicable_settings(config, task_name="classification", sections_run=["mine"], setting_sections=owners)
    assert ran == {"model": "m", "dataset": "digits", "my_threshold": 0.3}
    assert "my_threshold" not in applicable_settings(config, task_name="classification", setting_sections=owners)


def test_the_command_derives_each_analysis_settings_from_its_option_groups() -> None:
    from probe.ablate import _setting_sections

    owners = _setting_sections()
    assert owners["degradation_depths"] == ("degradation",)
    assert owners["random_draws"] == ("skipping",) and owners["curve_points"] == ("skipping",)
    assert owners["bootstrap"] == ("uncertainty", "lm") and owners["greedy_steps"] == ("lm",)
    assert "mode" not in owners and "seed" not in owners  # the job's own settings apply to every run


def test_applicable_settings_of_a_language_model() -> None:
    from reports.html import applicable_settings

    shown = applicable_settings(LM_RUN, task_name="lm", sections_run=["lm", "uncertainty"])
    assert {k: shown[k] for k in ("seq_len", "spans", "greedy_steps", "bootstrap", "level")} == {
        "seq_len": 128, "spans": (1, 2), "greedy_steps": 3, "bootstrap": 1000, "level": 0.95}
    assert not {"image_size", "normalize", "in_channels", "channels_last", "download", "epochs", "lr",
                "images", "random_draws", "curve_points", "degradation_depths", "calibration_samples",
                "bn_recalibrate"} & set(shown)
    assert shown["model"] == "smollm2" and shown["samples"] == "the first 8 windows"
    # the lm section did not run: no spans, no greedy steps; the windows still apply
    assert {"seq_len"} == {"seq_len", "spans", "greedy_steps"} & set(applicable_settings(LM_RUN, task_name="lm"))
    # a data set of the user's brings its own sequences: no windows of probe's
    assert "seq_len" not in applicable_settings(dict(LM_RUN, dataset="mine.data:tokens"), task_name="lm")
    # text is text whatever the task: drift of a language model on probe's text
    drift = applicable_settings(LM_RUN, task_name="drift")
    assert drift["seq_len"] == 128 and "image_size" not in drift


def test_applicability_follows_the_run_not_the_model_name() -> None:
    from reports.html import applicable_settings

    # a model named like a classifier, run as a language model on text, and the other way round
    lm = applicable_settings(dict(LM_RUN, model="resnet56"), task_name="lm", sections_run=["lm"])
    assert lm["seq_len"] == 128 and lm["spans"] == (1, 2) and "image_size" not in lm
    image = applicable_settings(dict(CLASSIFIER_RUN, model="smollm2", image_size=32), task_name="classification",
                                sections_run=["lm"])
    assert "seq_len" not in image and image["image_size"] == 32
    # a task of the user's on images keeps the image settings; drift too
    for task in ("mine.tasks:squared_error", "drift"):
        assert applicable_settings(dict(CLASSIFIER_RUN, image_size=32), task_name=task)["image_size"] == 32


def test_applicable_settings_leave_out_empty_values_and_keep_unknown_keys() -> None:
    from reports.html import applicable_settings

    shown = applicable_settings({"model": "m", "weights": None, "note": "", "skip": (), "spans_seen": [],
                                 "seconds": {}, "blocks_spec": "  ", "limit": 0, "extra": "kept"},
                                task_name="classification")
    assert shown == {"model": "m", "limit": 0, "extra": "kept"}
    with pytest.raises(ProbeError, match="config must be a dict"):
        applicable_settings([("model", "m")], task_name="classification")


def test_render_report_reads_the_task_and_the_recalibration_from_the_table() -> None:
    # the table is a classifier's and says its deletions were recalibrated: a config that claims
    # a language model with recalibration off shows no windows, and the calibration samples
    df = table().assign(bn_recalibrated=True)
    config = dict(CLASSIFIER_RUN, task="lm", bn_recalibrate=False)
    record = _run_record(render_report(df, baseline=BASELINE, config=config))
    assert "seq len" not in record and record["calibration samples"] == "256"
    assert "calibration samples" not in _run_record(render_report(table(), baseline=BASELINE, config=config))


def test_a_section_that_did_not_run_reads_no_settings() -> None:
    from reports.html import _ran
    from reports.sections import not_run_section

    assert not _ran(not_run_section("skipping", "left out with --skip."))
    assert all(_ran(section) for section in _sections_that_ran("skipping", "lm"))
    text = render_report(table(), baseline=BASELINE, config=CLASSIFIER_RUN,
                         sections=[not_run_section("skipping", "it failed: no data.")])
    assert "random draws" not in _run_record(text)
    assert _run_record(render_report(table(), baseline=BASELINE, config=CLASSIFIER_RUN,
                                     sections=_sections_that_ran("skipping")))["random draws"] == "3"
