"""An interrupted `python -m probe.ablate` resumes where it stopped and ends with the same table;
its out folder is never left half-written, and belongs to one configuration."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from analyses.attribution import TRUTH
from probe import ablate
from tiny_models import saved_cifar_resnet

SKIP_ANALYSES = ["--skip", "degradation", "skipping", "attribution", "uncertainty", "recalibration"]

pytestmark = pytest.mark.slow  # whole CLI runs, interrupted and resumed


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_cifar_resnet(tmp_path_factory.mktemp("ckpt"), depth=20)


def argv(checkpoint, out, *extra):
    return ["--model", "resnet20", "--checkpoint", str(checkpoint), "--batch-size", "8", "--save-every", "1",
            "--out", str(out), "--no-progress", *SKIP_ANALYSES, *extra]


@pytest.fixture(scope="module")
def uninterrupted(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "run"
    assert ablate.main(argv(checkpoint, out)) == 0
    return (out / "blocks.csv").read_text()


# `python -m probe.ablate`, paused for a minute once it has saved the second sweep piece: the test
# interrupts it there, mid-sweep. Without the pause a fast sweep can finish before the signal lands.
PAUSED_AFTER_SECOND_PIECE = """
import runpy, signal, sys, time
# Ctrl-C as a terminal delivers it, also when the tests run as a background job (whose shell
# starts its commands with SIGINT ignored, which a child would inherit).
signal.signal(signal.SIGINT, signal.default_int_handler)
from probe.commands.run_folder import RunDirectory
save = RunDirectory.save
def save_then_pause(self, name, value):
    save(self, name, value)
    if name == "sweep-1":
        time.sleep(60)
RunDirectory.save = save_then_pause
sys.argv = ["probe.ablate", *sys.argv[1:]]
runpy.run_module("probe.ablate", run_name="__main__", alter_sys=True)
"""


def start(checkpoint, out):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.Popen([sys.executable, "-c", PAUSED_AFTER_SECOND_PIECE, *argv(checkpoint, out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path, process, timeout=120):
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.01)


def assert_nothing_half_written(out):
    assert not list(out.rglob("*.tmp"))
    for piece in (out / "partial").glob("*.pt"):
        torch.load(piece, weights_only=False)  # every saved piece is whole


@pytest.mark.parametrize("how", [signal.SIGINT, signal.SIGKILL])
def test_interrupted_run_resumes_to_the_same_table(how, checkpoint, uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    process = start(checkpoint, out)
    wait_for(out / "partial" / "sweep-1.pt", process)
    process.send_signal(how)
    try:  # a loaded machine can take a while to unwind; a hang fails with what the run printed
        _, stderr = process.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        process.kill()
        pytest.fail(f"the run did not stop within 180 s of signal {how}: {process.communicate()[1][-3000:]}")
    finished = sorted(p.name for p in (out / "partial").glob("sweep-*.pt"))
    assert finished == ["sweep-0.pt", "sweep-1.pt"]  # stopped mid-sweep, nothing after the pause
    assert not (out / "blocks.csv").exists()
    if how == signal.SIGINT:
        assert process.returncode == 130
        assert "rerun the same command to resume" in stderr
    assert_nothing_half_written(out)

    assert ablate.main(argv(checkpoint, out)) == 0
    assert (out / "blocks.csv").read_text() == uninterrupted
    assert_nothing_half_written(out)


def test_resuming_into_another_configuration_is_refused(checkpoint, uninterrupted, tmp_path, capsys):
    out = tmp_path / "run"
    assert ablate.main(argv(checkpoint, out)) == 0
    before = (out / "blocks.csv").read_text()
    assert ablate.main(argv(checkpoint, out, "--mode", "mean")) == 2
    error = capsys.readouterr().err
    assert "another configuration" in error and "mode: 'zero' there, 'mean' now" in error
    assert (out / "blocks.csv").read_text() == before  # nothing overwritten


def test_run_records_its_configuration(checkpoint, uninterrupted, tmp_path):
    import json

    out = tmp_path / "run"
    assert ablate.main(argv(checkpoint, out)) == 0
    record = json.loads((out / "run.json").read_text())
    assert record["model"] == "resnet20" and record["mode"] == "zero" and record["seed"] == 0
    assert len(record["checkpoint_sha256"]) == 16 and record["dataset"] == "digits"
    assert set(record["versions"]) == {"probe", "torch", "torchvision"}
    assert (out / "blocks.csv").read_text() == uninterrupted  # determinism across runs


def test_a_resumed_run_reports_what_its_sweep_cost_when_it_ran(checkpoint, tmp_path, capsys):
    """The attribution section's cost of the truth (the sweep) and of ratio and cosine (measure)
    is the time they took when computed, also after a resume that only loads them."""
    out = tmp_path / "run"
    with_attribution = [a for a in SKIP_ANALYSES if a != "attribution"]
    run = ["--model", "resnet20", "--checkpoint", str(checkpoint), "--batch-size", "8", "--save-every", "1",
           "--out", str(out), "--no-progress", *with_attribution]
    assert ablate.main(run) == 0
    first = pd.read_csv(out / "proxies.csv").set_index("proxy")["seconds"]
    recorded = {name: torch.load(out / "partial" / f"seconds-{name}.pt", weights_only=False)
                for name in ["measure", *(f"sweep-{i}" for i in range(9))]}
    assert first["ratio"] == first["cosine"] == pytest.approx(recorded["measure"])
    assert first[TRUTH] == pytest.approx(sum(recorded[f"sweep-{i}"] for i in range(9)))
    assert ablate.main(run) == 0  # everything up to the sweep is loaded
    again = pd.read_csv(out / "proxies.csv").set_index("proxy")["seconds"]
    assert again["ratio"] == pytest.approx(first["ratio"])
    assert again[TRUTH] == pytest.approx(first[TRUTH])
