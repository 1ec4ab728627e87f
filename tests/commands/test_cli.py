"""python -m probe.ablate end to end on a tiny model, and its one-line errors."""

import subprocess
import sys

import pandas as pd
import pytest
import torch

from probe import ablate
from probe.loading.checkpoints import save_checkpoint
from probe.loading.models import cifar_resnet


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "resnet20.pt"
    save_checkpoint(cifar_resnet(20, num_classes=10, in_channels=1), path)
    return path


@pytest.mark.slow  # whole runs of the command, every analysis
def test_cli_writes_table_and_report(tmp_path, checkpoint, capsys):
    out = tmp_path / "run"
    code = ablate.main(["--model", "resnet20", "--checkpoint", str(checkpoint), "--limit", "40",
                        "--batch-size", "16", "--out", str(out), "--no-progress"])
    assert code == 0
    table = pd.read_csv(out / "blocks.csv")
    assert list(table["block"]) == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    assert (table["samples"] == 40).all()
    for column in ("ratio", "cosine", "accuracy_drop", "flip_rate", "verdict", "noise"):
        assert table[column].notna().all(), column
    html = (out / "report.html").read_text()
    assert "layer3.2" in html and "data:image/png;base64," in html
    printed = capsys.readouterr().out
    assert "baseline: accuracy" in printed and "9 residual blocks" in printed
    assert not list(out.glob(".*.tmp"))  # atomic writes leave no temporaries


@pytest.mark.slow  # the command in a subprocess
@pytest.mark.parametrize("argv,message", [
    (["--checkpoint", "/nonexistent/model.pt"], "/nonexistent/model.pt"),
    (["--dataset", "cifar11"], "cifar10"),
    (["--model", "resnet57"], "resnet56"),
    (["--limit", "0"], "--limit"),
])
def test_cli_errors_are_one_line(argv, message, tmp_path):
    result = subprocess.run([sys.executable, "-m", "probe.ablate", *argv, "--out", str(tmp_path / "o"),
                             "--no-progress"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("probe.ablate: error:"), result.stderr
    assert message in lines[0]
    assert "Traceback" not in result.stderr


def test_out_that_is_a_file_is_refused(tmp_path, checkpoint, capsys):
    target = tmp_path / "file.txt"
    target.write_text("keep me")
    code = ablate.main(["--model", "resnet20", "--checkpoint", str(checkpoint), "--out", str(target)])
    assert code == 2
    assert "is a file" in capsys.readouterr().err
    assert target.read_text() == "keep me"


def test_list_blocks(checkpoint, capsys):
    assert ablate.main(["--model", "resnet20", "--checkpoint", str(checkpoint), "--list-blocks"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].split() == ["name", "module", "branch", "shortcut", "output_shape"]
    assert len(lines) == 1 + 9
    assert lines[4].split()[:4] == ["layer2.0", "layer2.0", "layer2.0.bn2", "layer2.0.shortcut"]
    assert "(1, 32, 8, 8)" in lines[4]  # digits are 16x16; stage 2 halves them


@pytest.mark.slow  # whole runs of the command, every analysis
def test_blocks_spec_limits_the_run_and_every_analysis_to_the_named_blocks(tmp_path, checkpoint, capsys):
    out = tmp_path / "run"
    code = ablate.main(["--model", "resnet20", "--checkpoint", str(checkpoint), "--limit", "16",
                        "--blocks-spec", "layer1.0=bn2; layer2.0=bn2,shortcut", "--out", str(out), "--no-progress"])
    assert code == 0
    assert "not run" not in capsys.readouterr().err  # every analysis takes the spec's blocks
    named = ["layer1.0", "layer2.0"]
    table = pd.read_csv(out / "blocks.csv")
    assert list(table["block"]) == named
    assert list(table["shortcut"]) == ["identity", "layer2.0.shortcut"]
    assert list(pd.read_csv(out / "recalibration.csv")["block"]) == ["layer1.0", "layer1.0", "layer2.0", "layer2.0"]
    assert list(pd.read_csv(out / "drop_intervals.csv")["block"]) == named
    assert set(pd.read_csv(out / "attribution.csv")["block"]) == set(named)
    curves = pd.read_csv(out / "deletion_curves.csv")
    assert curves["k"].max() == 2 and set(curves["removed"].dropna()) == set(named)
    export = pd.read_csv(out / "pruned_export.csv")
    skipped = pd.read_csv(out / "skipping.csv").set_index("state").loc["skipped blocks removed", "blocks_removed"]
    # A pruned copy only where a block is skipped; then its original counts the two named blocks.
    assert export.empty if skipped == 0 else list(export["blocks"])[0] == 2


@pytest.mark.slow  # whole runs of the command, every analysis
def test_bf16_autocast_gives_close_numbers(tmp_path, checkpoint):
    tables = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        assert ablate.main(["--model", "resnet20", "--checkpoint", str(checkpoint), "--limit", "32",
                            "--precision", precision, "--out", str(out), "--no-progress",
                            "--skip", "skipping", "attribution", "uncertainty", "recalibration"]) == 0
        tables[precision] = pd.read_csv(out / "blocks.csv")
    # bf16 keeps 8 bits of mantissa: ratios agree to a few percent, not to float32 precision.
    assert tables["bf16"]["ratio"].to_numpy() == pytest.approx(tables["fp32"]["ratio"].to_numpy(), rel=0.05)
    assert not tables["bf16"]["ratio"].equals(tables["fp32"]["ratio"])


def test_plain_model_is_refused_before_training(tmp_path, capsys):
    code = ablate.main(["--model", "plain20", "--out", str(tmp_path / "o"), "--no-progress"])
    assert code == 2
    error = capsys.readouterr().err
    assert "no residual blocks found in CifarResNet" in error
    assert "trained" not in error


def test_out_that_cannot_be_created_is_refused(checkpoint, capsys):
    # /proc refuses new folders even to root: the same path a non-writable --out takes.
    code = ablate.main(["--model", "resnet20", "--checkpoint", str(checkpoint), "--out", "/proc/probe-out"])
    assert code == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("probe.ablate: error: cannot create --out folder '/proc/probe-out'")
    assert len(error.splitlines()) == 1
