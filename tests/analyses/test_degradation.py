"""Degradation: trained through the cache (a rerun trains nothing), evaluated exactly as probe.train does."""

from __future__ import annotations

import pytest

import probe.loading.cache
from analyses.degradation import COLUMNS, DegradationResult, degradation
from reports.sections.degradation import summary_lines
from analyses.degradation.__main__ import main
from probe.loading.datasets import load_dataset, make_loader
from probe.errors import ProbeError
from probe.loading.checkpoints import load_checkpoint
from probe.loading.models import build_model
from probe.loading.training import evaluate

QUICK = dict(epochs=1, limit=32, progress=False)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CLI would otherwise pick 2 threads


def test_table_equals_evaluating_the_cached_checkpoints(monkeypatch):
    result = degradation([8], **QUICK)
    assert isinstance(result, DegradationResult) and result.tables() == {"degradation": result.table}
    table = result.table
    assert list(table.columns) == COLUMNS
    assert table[["depth", "residual", "model"]].values.tolist() == [[8, False, "plain8"], [8, True, "resnet8"]]
    for _, row in table.iterrows():
        model = load_checkpoint(build_model(row["model"], num_classes=10, in_channels=1), row["checkpoint"]).eval()
        for split in ("train", "test"):
            loader = make_loader(load_dataset("digits", split=split), limit=32)
            loss, accuracy = evaluate(model, loader)
            assert row[f"{split}_accuracy"] == accuracy and row[f"{split}_loss"] == pytest.approx(loss)
            assert row[f"{split}_error"] == pytest.approx(1 - accuracy)
    assert not table["bn_recalibrated"].any() and (table["epochs"] == 1).all()

    def no_training(*args, **kwargs):
        raise AssertionError("a cached model was trained again")

    monkeypatch.setattr(probe.loading.cache, "train_model", no_training)
    again = degradation([8], **QUICK).table
    assert again.drop(columns="checkpoint").equals(table.drop(columns="checkpoint"))


def test_summary_lines_say_what_the_table_shows():
    import pandas as pd

    table = pd.DataFrame({"depth": [20, 20, 56, 56], "residual": [False, True, False, True],
                          "train_accuracy": [0.99, 0.995, 0.40, 1.0]})
    lines = summary_lines(table)
    assert lines[0] == "plain-56 trains to 40.0% training accuracy, 59.0 points below plain-20's 99.0%."
    assert lines[2] == "depth 56: the residual net trains to 100.0%, the plain net to 40.0% (+60.0 points for the shortcuts)."


@pytest.mark.parametrize("depths", [[21], [], [4]])
def test_bad_depths(depths):
    with pytest.raises(ProbeError, match="depth" if depths else "at least one"):
        degradation(depths, **QUICK)


def test_cli_writes_csv_and_png(tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["--depths", "8", "--epochs", "1", "--limit", "32", "--out", str(out), "--no-progress"]) == 0
    assert (out / "degradation.csv").read_text().startswith("depth,residual,model,")
    assert (out / "degradation.png").read_bytes().startswith(b"\x89PNG")
    assert "resnet8" in capsys.readouterr().out


def test_cli_error_is_one_line(tmp_path, capsys):
    assert main(["--depths", "9", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("python -m analyses.degradation: error:") and "9" in err[0]
