"""torchrun with 2 CPU processes (gloo) gives the single-process results."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed_job import dataset, results

HERE = Path(__file__).resolve().parents[1]  # tests/: the shared helpers

pytestmark = pytest.mark.slow  # torchrun: two processes end to end


def close(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            close(a[key], b[key])
    elif isinstance(a, list):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            close(x, y)
    elif isinstance(a, float):
        # Shards batch samples differently, and float32 kernels round per batch composition.
        assert a == pytest.approx(b, rel=1e-4, abs=1e-7, nan_ok=True)
    else:
        assert a == b


def run_torchrun(arguments, env):
    """torchrun with 2 processes, in its own process group so that a hang kills the workers too."""
    torchrun = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    process = subprocess.Popen([torchrun, "--standalone", "--nproc_per_node=2", *arguments], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        log, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, log.decode(errors="replace")[-3000:]
    return log.decode()


def test_two_processes_equal_one(tmp_path):
    out = tmp_path / "two.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE)]), "OMP_NUM_THREADS": "1"}
    run_torchrun([str(HERE / "distributed_job.py"), str(out)], env)
    two = json.loads(out.read_text())
    assert two.pop("world_size") == 2
    single = json.loads(json.dumps(results(torch.utils.data.DataLoader(dataset(), batch_size=4))))
    close(single, two)
    # Per-sample outcomes come back in data order, not rank order.
    assert len(two["baseline"]["correct"]) == 21


def test_torchrun_cli_equals_single_process(tmp_path):
    import pandas as pd

    from probe.loading.checkpoints import save_checkpoint
    from probe.loading.models import cifar_resnet

    torch.manual_seed(0)
    checkpoint = tmp_path / "resnet20.pt"
    save_checkpoint(cifar_resnet(20, num_classes=10, in_channels=1), checkpoint)
    common = ["-m", "probe.ablate", "--model", "resnet20", "--checkpoint", str(checkpoint), "--limit", "50",
              "--batch-size", "8", "--no-progress", "--skip", "degradation", "attribution", "recalibration",
              "--bn-recalibrate", "--calibration-samples", "32"]
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "OMP_NUM_THREADS": "1"}
    log = run_torchrun([*common, "--out", str(tmp_path / "two")], env)
    assert log.count("baseline: accuracy") == 1  # rank 0 alone reports
    single = subprocess.run([sys.executable, *common, "--out", str(tmp_path / "one")], env=env,
                            capture_output=True, timeout=300)
    assert single.returncode == 0, single.stderr.decode()[-3000:]
    one, two = pd.read_csv(tmp_path / "one" / "blocks.csv"), pd.read_csv(tmp_path / "two" / "blocks.csv")
    pd.testing.assert_frame_equal(one, two, check_exact=False, rtol=1e-4)
    assert (two["samples"] == 50).all()
    assert (tmp_path / "two" / "report.html").exists()
