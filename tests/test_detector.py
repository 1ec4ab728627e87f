"""The detector-shaped example (probe/examples/darknet.py): a Darknet-53-style backbone with two heads
and no labels, probed with drift."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from torch.utils.data import DataLoader

import probe
from probe.examples.darknet import ResidualUnit, darknet_tiny, random_images

ROOT = Path(__file__).resolve().parent.parent
UNITS = ["stages.0.1", "stages.1.1", "stages.1.2", "stages.2.1", "stages.2.2"]


def without_unit(model, name: str):
    """A copy of `model` whose unit `name` passes its input through: the deletion, by hand."""
    deleted = copy.deepcopy(model)
    unit = deleted.get_submodule(name)
    assert isinstance(unit, ResidualUnit)
    unit.forward = lambda x: x
    return deleted


def drift_by_hand(intact: list[torch.Tensor], deleted: list[torch.Tensor]) -> torch.Tensor:
    difference = sum((d - i).double().flatten(1).square().sum(dim=1) for d, i in zip(deleted, intact))
    size = sum(i.double().flatten(1).square().sum(dim=1) for i in intact)
    return difference.sqrt() / size.sqrt()


def test_darknet_units_are_the_blocks():
    assert [b.name for b in probe.find_blocks(darknet_tiny())] == UNITS


def test_drift_of_each_unit_by_hand():
    model = darknet_tiny()
    unit = model.get_submodule("stages.1.2")
    with torch.no_grad():  # a branch that ends in a BatchNorm with zero scale and shift is exactly zero
        unit.expand[1].weight.zero_()
        unit.expand[1].bias.zero_()
    data = DataLoader(random_images(), batch_size=10)
    table = probe.block_table(model, data, task="drift", progress=False).set_index("block")
    images = random_images().tensors[0]
    with torch.no_grad():
        intact = model(images)
        for name in UNITS:
            expected = drift_by_hand(intact, without_unit(model, name)(images))
            assert table.loc[name, "drift"] == pytest.approx(float(expected.mean()), rel=1e-5, abs=1e-12)
    assert table.loc["stages.1.2", "drift"] == 0.0
    assert table.loc["stages.1.2", "ratio"] == 0.0
    assert table.loc["stages.1.2", "verdict"] == "skipped"
    assert "accuracy" not in table.columns and "kl" not in table.columns


def test_fast_drift_sweep_equals_naive_on_darknet():
    model = darknet_tiny()
    data = DataLoader(random_images(), batch_size=16)
    fast = probe.sweep(model, data, task="drift", progress=False)
    naive = probe.sweep(model, data, task="drift", fast=False, progress=False)
    pd.testing.assert_frame_equal(fast, naive, rtol=1e-6, atol=1e-9)


@pytest.mark.slow  # the CLI end to end in a subprocess
def test_darknet_from_the_command_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "probe.ablate", "--model", "probe.examples.darknet:darknet_tiny", "--dataset",
         "probe.examples.darknet:random_images", "--task", "drift", "--out", str(tmp_path / "out"), "--no-progress",
         "--skip", "degradation", "skipping", "attribution", "uncertainty", "representation", "recalibration"],
        capture_output=True, text=True, timeout=300, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]
    written = pd.read_csv(tmp_path / "out" / "blocks.csv")
    expected = probe.sweep(darknet_tiny(), DataLoader(random_images(), batch_size=256), task="drift", progress=False)
    assert list(written["block"]) == UNITS
    pd.testing.assert_series_equal(written["drift"], expected["drift"], check_exact=False, rtol=1e-5)
