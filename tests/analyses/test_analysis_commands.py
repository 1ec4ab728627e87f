"""`python -m analyses.NAME`: --help, tables and figures written to --out, one-line errors; shared pieces."""

from __future__ import annotations

import importlib

import pandas as pd
import pytest
import torch

import probe
from probe.deletion.evaluation import single_block_sweep
from analyses.pipeline import SECTIONS, choose_sections
from probe.commands.config import RunConfig
from probe.loading.checkpoints import save_checkpoint
from probe.loading.models import cifar_resnet

COMMANDS = {
    "skipping": (["skipping.csv", "deletion_curves.csv", "pruned_export.csv"], ["deletion_curves.png"]),
    "attribution": (["attribution.csv", "proxies.csv"], ["proxies.png"]),
    "uncertainty": (["drop_intervals.csv", "class_drops.csv"], ["drop_intervals.png", "class_drops.png"]),
    "recalibration": (["recalibration.csv"], ["recalibration.png"]),
}


@pytest.fixture
def checkpoint(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the CLI would otherwise pick 2 threads
    torch.manual_seed(0)
    path = tmp_path / "resnet8.pt"
    save_checkpoint(cifar_resnet(8, num_classes=10, in_channels=1), path)
    return path


@pytest.mark.parametrize("name", [*COMMANDS, "degradation", "representation"])
def test_help(name, capsys):
    module = importlib.import_module(f"analyses.{name}.__main__")
    with pytest.raises(SystemExit) as exit_:
        module.main(["--help"])
    assert exit_.value.code == 0
    assert f"python -m analyses.{name}" in capsys.readouterr().out


@pytest.mark.parametrize("name", COMMANDS)
def test_command_writes_tables_and_figures(name, checkpoint, tmp_path, capsys):
    out = tmp_path / name
    argv = ["--model", "resnet8", "--checkpoint", str(checkpoint), "--limit", "24", "--batch-size", "12",
            "--calibration-samples", "24", "--out", str(out), "--no-progress"]
    if name == "skipping":
        argv += ["--random-draws", "2"]
    if name == "uncertainty":
        argv += ["--resamples", "100"]
    assert importlib.import_module(f"analyses.{name}.__main__").main(argv) == 0
    tables, pngs = COMMANDS[name]
    for table in tables:
        frame = pd.read_csv(out / table)
        # A pruned export only where a block is skipped: this 24-sample model skips none.
        assert (len(frame) or table == "pruned_export.csv") and "bn_recalibrated" in frame.columns, table
    for png in pngs:
        assert (out / png).read_bytes().startswith(b"\x89PNG"), png
    assert "wrote" in capsys.readouterr().out
    if name == "recalibration":
        assert sorted(pd.read_csv(out / "recalibration.csv")["bn_recalibrated"].unique()) == [False, True]
    if name == "skipping":  # a pruned copy exactly when a block is skipped
        skipped = pd.read_csv(out / "skipping.csv").set_index("state").loc["skipped blocks removed", "blocks_removed"]
        assert (out / "pruned_model.pt").is_file() == (skipped > 0)
        assert pd.read_csv(out / "pruned_export.csv").empty == (skipped == 0)


# The table of each command that names blocks, and its column that holds them.
BLOCK_COLUMN = {"skipping": ("deletion_curves.csv", "removed"), "attribution": ("attribution.csv", "block"),
                "uncertainty": ("drop_intervals.csv", "block"), "recalibration": ("recalibration.csv", "block")}


@pytest.mark.parametrize("name", COMMANDS)
def test_command_covers_just_the_blocks_of_a_spec(name, checkpoint, tmp_path, capsys):
    command = importlib.import_module(f"analyses.{name}.__main__").main
    common = ["--model", "resnet8", "--checkpoint", str(checkpoint), "--limit", "12", "--calibration-samples", "12",
              "--no-progress"]
    out = tmp_path / name
    spec = "layer2.0=bn2,shortcut; layer3.0=bn2,shortcut"
    assert command([*common, "--blocks-spec", spec, "--out", str(out)]) == 0
    table, column = BLOCK_COLUMN[name]
    assert set(pd.read_csv(out / table)[column].dropna()) == {"layer2.0", "layer3.0"}  # resnet8 has layer1.0 too
    assert command([*common, "--blocks-spec", "layer9.0=bn2", "--out", str(tmp_path / "wrong")]) == 2
    assert "layer9.0" in capsys.readouterr().err


@pytest.mark.parametrize("name", COMMANDS)
def test_command_error_is_one_line(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    code = importlib.import_module(f"analyses.{name}.__main__").main(
        ["--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"python -m analyses.{name}: error:") and "missing.pt" in err[0]


def test_single_block_sweep_equals_probe_sweep():
    torch.manual_seed(0)
    model = cifar_resnet(8, num_classes=3, in_channels=1).eval()
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 3, (6,), generator=g)) for _ in range(2)]
    ours, (baseline, results) = single_block_sweep(model, batches, per_class=True, outcomes=True, progress=False)
    theirs = probe.sweep(model, batches, progress=False)
    pd.testing.assert_frame_equal(ours.drop(columns="bn_recalibrated"), theirs)
    assert ours.attrs["baseline"] == theirs.attrs["baseline"]
    assert len(results) == 3 and results[0]["correct"].shape == (12,) and "class_accuracy" in baseline


@pytest.mark.parametrize("kwargs,run,why", [
    ({}, list(SECTIONS), {}),
    ({"checkpoint": "m.pt"}, [name for name in SECTIONS if name != "degradation"], {"degradation": "checkpoint"}),
    ({"checkpoint": "m.pt", "sections": ("degradation", "uncertainty")}, ["degradation", "uncertainty"],
     {"skipping": "--sections"}),
    ({"skip": ("recalibration", "degradation")},
     ["detection", "skipping", "attribution", "uncertainty", "representation", "lm"],
     {"recalibration": "--skip"}),
])
def test_choose_sections(kwargs, run, why):
    chosen, reasons = choose_sections(RunConfig(**kwargs))
    assert chosen == run
    for name, word in why.items():
        assert word in reasons[name]


def test_unknown_section_is_a_probe_error():
    with pytest.raises(probe.ProbeError, match="'figures'"):
        choose_sections(RunConfig(skip=("figures",)))


# Each command with --task drift on a two-head model without labels (tests/tiny_models.py): the
# table that holds the cost, the cost's columns in it, and the figures written (and not written).
DRIFT = {
    "skipping": ("deletion_curves.csv", {"drift", "drift_se"}, ["deletion_curves.png"], []),
    "attribution": ("proxies.csv", {"spearman_drift"}, ["proxies.png"], []),
    "uncertainty": ("drop_intervals.csv", {"drift", "drift_low", "drift_high"}, ["drop_intervals.png"],
                    ["class_drops.png"]),
    "representation": ("representation.csv", {"drift"}, ["cka.png"],
                       ["representation_accuracy.png", "refinement.png", "block_classes.png"]),
    "recalibration": ("recalibration.csv", {"drift", "drift_se", "bn_recalibrated"}, ["recalibration.png"], []),
}


@pytest.mark.parametrize("name", DRIFT)
def test_command_runs_the_drift_task(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / name
    model = "tiny_models:two_head_batchnorm_model" if name == "recalibration" else "tiny_models:two_head_model"
    argv = ["--model", model, "--dataset", "tiny_models:unlabelled_images", "--task", "drift", "--out", str(out),
            "--no-progress"]
    argv += {"skipping": ["--random-draws", "1"], "uncertainty": ["--resamples", "20"]}.get(name, [])
    assert importlib.import_module(f"analyses.{name}.__main__").main(argv) == 0
    table, columns, written, absent = DRIFT[name]
    frame = pd.read_csv(out / table)
    assert columns <= set(frame.columns), frame.columns
    assert not [c for c in frame.columns if "accuracy" in c and frame[c].notna().any()]
    for png in written:
        assert (out / png).read_bytes().startswith(b"\x89PNG"), png
    for png in absent:
        assert not (out / png).exists(), png
    printed = capsys.readouterr().out
    assert "wrote" in printed and "drift" in printed
