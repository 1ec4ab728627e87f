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

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BASELINE = {"accuracy": 0.9825, "loss": 0.0612, "samples": 400}
CONFIG = {
    "model": "resnet20",
    "checkpoint": "runs/resnet20/model.pt",
    "dataset": "digits16",
    "samples": 400,
    "mode": "zero",
    "seed": 0,
    "date": "2024-05-01T12:00:00Z",
    "versions": {"torch": "2.4.0", "probe": "0.1.0"},
}


def table() -> pd.DataFrame:
    """Six blocks in shuffled row order (position gives forward order); verdicts by hand:
    helps, skipped, hurts, neutral, skipped, helps (see tests/core/scoring/test_verdict.py)."""
    df = pd.DataFrame({
        "block": ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"],
        "position": [0, 1, 2, 3, 4, 5],
        "branch_norm": [12.0, 2.0, 9.0, 6.0, 1.0, 3.0],
        "branch_norm_std": [1.0, 0.5, 0.9, 0.6, 0.1, 0.3],
        "shortcut_norm": [10.0] * 6,
        "shortcut_norm_std": [0.5] * 6,
        "ratio": [1.2, 0.2, 0.9, 0.6, 0.1, 0.3],
        "ratio_std": [0.1, 0.05, 0.2, 0.1, 0.02, 0.04],
        "cosine": [-0.3, 0.05, -0.1, 0.2, 0.0, -0.5],
        "cosine_std": [0.05, 0.1, 0.02, 0.03, 0.01, 0.2],
        "accuracy": 0.0,  # set below: baseline - drop
        "loss": [0.4, 0.07, 0.05, 0.0612, 0.06, 0.15],
        "accuracy_drop": [0.10, 0.0025, -0.04, 0.0, -0.0025, 0.03],
        "loss_increase": [0.3388, 0.0088, -0.0112, 0.0, -0.0012, 0.0888],
        "flip_rate": [0.16, 0.01, 0.09, 0.0, 0.0025, 0.04],
        "samples": [400] * 6,
        "mode": ["zero"] * 6,
    })
    df["accuracy"] = BASELINE["accuracy"] - df["accuracy_drop"]
    return df.iloc[[3, 0, 5, 1, 4, 2]].reset_index(drop=True)  # not in forward order


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
    # header: configuration and baseline
    for value in ["resnet20", "runs/resnet20/model.pt", "digits16", "2024-05-01T12:00:00Z",
                  "torch 2.4.0", "98.25%"]:
        assert value in text
    # the answer, in the order summarize gives
    answer = text.split("The answer", 1)[1].split("Figures", 1)[0]
    assert answer.index("layer1.0") < answer.index("layer3.1")  # helps most
    assert "&rho; = 0.26" in answer
    # the ratio is explained to a reader who never saw the code
    assert "||F(x)|| / ||s(x)||" in text
    # table: accuracy in %, drop in points, one row per block in forward order
    body = text.split("Per-block table", 1)[1]
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
