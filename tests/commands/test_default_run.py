"""Smoke test: the README's main command on the built-in default, from a cold cache.

Trains the default ResNet-56 on digits (and the degradation section's plain-20, resnet-20 and
plain-56) once, then checks what a user gets: the terminal table, 27 rows, a full report.
"""

import os
import subprocess
import sys

import pandas as pd
import pytest


@pytest.mark.slow  # trains the default models from a cold cache
def test_default_run_end_to_end(tmp_path):
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache")}
    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "probe.ablate", "--out", str(out), "--no-progress"],
                            env=env, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "27 residual blocks" in result.stdout and "skipped blocks" in result.stdout
    table = pd.read_csv(out / "blocks.csv")
    assert len(table) == 27
    assert list(table["block"][:3]) == ["layer1.0", "layer1.1", "layer1.2"]
    # The science on the default (Veit et al. 2016, Chang et al. 2018): a well-trained net whose
    # first block of each stage carries far more than the blocks after it.
    first_of_stage = table[table["block"].isin(["layer1.0", "layer2.0", "layer3.0"])]
    rest = table[~table["block"].isin(first_of_stage["block"])]
    assert first_of_stage["accuracy_drop"].mean() > rest["accuracy_drop"].mean()
    assert (table["verdict"] == "skipped").sum() >= 5
    html = (out / "report.html").read_text()
    for section in ("degradation", "skipping", "attribution", "uncertainty", "recalibration"):
        assert f'id="{section}"' in html, section
    assert (tmp_path / "cache" / "probe" / "models").is_dir()  # trained once, cached
