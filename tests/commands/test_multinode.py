"""torchrun beyond one process group of one machine: two nodes (two torchrun agents, static
rendezvous on 127.0.0.1) give the single-process table and only global rank 0 writes; under
`--max-restarts 1` a worker killed mid-sweep is restarted and the group resumes from the saved
pieces to the uninterrupted table. Each run has a deadline: a hang fails, it does not block.
A restarted attempt waits for the lock its dead predecessor may still hold (a network file
system's lease), and only for that one."""

import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from analyses import registry
from probe import ablate, distributed
from probe.commands import run_folder
from probe.commands.run_folder import RunDirectory
from probe.errors import ProbeError
from tiny_models import saved_cifar_resnet

TESTS = Path(__file__).resolve().parents[1]
JOB = TESTS / "multinode_job.py"
SKIP_ANALYSES = ["--skip", *(analysis.name for analysis in registry.registered())]  # the sweep's table alone
DEADLINE = 240  # seconds for one torchrun job, restarts included


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return saved_cifar_resnet(tmp_path_factory.mktemp("ckpt"), depth=20)


def job_args(checkpoint, out):
    # 9 blocks, saved 3 at a time: the sweep is 3 pieces, sweep-0 to sweep-2.
    return ["--model", "resnet20", "--checkpoint", str(checkpoint), "--limit", "40", "--batch-size", "8",
            "--save-every", "3", "--no-progress", *SKIP_ANALYSES, "--out", str(out)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(**extra) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), str(TESTS)]), "OMP_NUM_THREADS": "1",
            **extra}


def torchrun(*arguments, cwd, env) -> subprocess.Popen:
    """A torchrun agent in its own session, so that a hang kills its workers too."""
    executable = shutil.which("torchrun", path=os.path.dirname(sys.executable)) or shutil.which("torchrun")
    return subprocess.Popen([executable, *arguments], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True, text=True)


def finish(agents: list[subprocess.Popen], *, succeed: bool = True) -> list[str]:
    """Every agent's log, once all have exited (0, with `succeed`) within DEADLINE; killed and
    failed otherwise."""
    logs = []
    try:
        for agent in agents:
            logs.append(agent.communicate(timeout=DEADLINE)[0])
    except subprocess.TimeoutExpired:
        pytest.fail("torchrun did not finish in time (a hang)")
    finally:
        for agent in agents:
            if agent.poll() is None:
                os.killpg(agent.pid, signal.SIGKILL)
                agent.communicate()
    for agent, log in zip(agents, logs):
        assert (agent.returncode == 0) == succeed, log[-4000:]
    return logs


def two_nodes(checkpoint, nodes: list[Path], *, succeed: bool = True) -> list[str]:
    """Two torchrun agents of one process each, node ranks 0 and 1, each in its own folder, with
    the same relative --out: what a node writes lands in its own folder."""
    port = free_port()
    agents = [torchrun("--nnodes", "2", "--node-rank", str(rank), "--nproc-per-node", "1", "--rdzv-backend",
                       "static", "--master-addr", "127.0.0.1", "--master-port", str(port), str(JOB),
                       *job_args(checkpoint, "run"), cwd=node, env=environment())
              for rank, node in enumerate(nodes)]
    return finish(agents, succeed=succeed)


@pytest.fixture(scope="module")
def single(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "run"
    assert ablate.main(job_args(checkpoint, out)) == 0
    return pd.read_csv(out / "blocks.csv")


@pytest.mark.slow  # two torchrun agents, twice
def test_two_nodes_give_the_single_process_table_and_only_rank_0_writes(checkpoint, single, tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
    logs = two_nodes(checkpoint, nodes)
    written = nodes[0] / "run"
    assert sorted(p.name for p in written.iterdir()) == [".lock", "blocks.csv", "partial", "report.html", "run.json"]
    assert not (nodes[1] / "run").exists()  # node 1's process (global rank 1, local rank 0) wrote nothing
    assert "wrote run/blocks.csv" in logs[0] and "wrote" not in logs[1]
    two = pd.read_csv(written / "blocks.csv")
    assert (two["samples"] == 40).all()
    # Shards batch samples differently, and float32 kernels round per batch composition.
    pd.testing.assert_frame_equal(single, two, check_exact=False, rtol=1e-4)

    # Again: rank 0 resumes every piece from its folder; rank 1, whose folder has none, is told
    # what rank 0 found instead of computing them alone (which would leave rank 0 waiting).
    pieces = {p.name: p.stat().st_mtime_ns for p in (written / "partial").iterdir()}
    table = (written / "blocks.csv").read_bytes()
    two_nodes(checkpoint, nodes)
    assert {p.name: p.stat().st_mtime_ns for p in (written / "partial").iterdir()} == pieces  # none computed
    assert (written / "blocks.csv").read_bytes() == table
    assert not (nodes[1] / "run").exists()


@pytest.mark.slow  # two torchrun agents
def test_nodes_with_other_weights_at_the_same_path_are_refused(tmp_path):
    nodes = [tmp_path / "node0", tmp_path / "node1"]
    for node in nodes:
        node.mkdir()
        saved_cifar_resnet(node, depth=20).rename(node / "model.pt")
    with open(nodes[1] / "model.pt", "ab") as handle:  # another file: its digest differs, its weights load
        handle.write(b"\0")
    logs = two_nodes("model.pt", nodes, succeed=False)
    for log in logs:  # every process says why, in one line, instead of waiting for the others
        assert "probe.ablate: error: the processes of this torchrun job do not run the same thing " \
               "(checkpoint_sha256:" in log, log[-3000:]
    assert not (nodes[0] / "run" / "run.json").exists()


def standalone(checkpoint, folder: Path, **env) -> str:
    """Two processes under one agent, restarted once if one fails."""
    agent = torchrun("--standalone", "--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.5",
                     str(JOB), *job_args(checkpoint, "run"), cwd=folder, env=environment(**env))
    return finish([agent])[0]


@pytest.fixture(scope="module")
def uninterrupted(checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("uninterrupted")
    standalone(checkpoint, folder)
    return (folder / "run" / "blocks.csv").read_bytes()


@pytest.mark.slow  # torchrun jobs of two processes, one restarted
@pytest.mark.parametrize("rank", [0, 1], ids=["writer killed", "reader killed"])
def test_killed_worker_is_restarted_and_the_group_resumes(rank, checkpoint, uninterrupted, tmp_path):
    trace = tmp_path / "trace"
    trace.mkdir()
    log = standalone(checkpoint, tmp_path, PROBE_TEST_DIE_RANK=str(rank), PROBE_TEST_DIE_AFTER="sweep-0",
                     PROBE_TEST_TRACE=str(trace))
    assert (tmp_path / "run" / "blocks.csv").read_bytes() == uninterrupted
    # The killed worker got no further in the first attempt than the piece it died after.
    assert (trace / f"0-{rank}.txt").read_text().splitlines() == ["measure computed", "sweep-0 computed"], log
    for restarted in (0, 1):  # both processes of the second attempt resume what the first finished
        lines = (trace / f"1-{restarted}.txt").read_text().splitlines()
        assert lines == ["measure resumed", "sweep-0 resumed", "sweep-1 computed", "sweep-2 computed"]


def test_the_writer_is_global_rank_0_before_the_group_is_joined(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "0")  # node 1's first process: local rank 0, global rank 1
    monkeypatch.setenv("RANK", "1")
    assert not distributed.leader()
    monkeypatch.setenv("RANK", "0")
    assert distributed.leader()


def held_lock(folder: Path, holder: dict, seconds: float) -> threading.Timer:
    """The folder's lock taken as a run of `holder` takes it, released after `seconds`."""
    folder.mkdir(exist_ok=True)
    handle = open(folder / ".lock", "a+b")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    handle.write(json.dumps(holder).encode())
    handle.flush()
    timer = threading.Timer(seconds, handle.close)
    timer.start()
    return timer


@pytest.mark.parametrize("job, attempt, waits", [("J", 0, True), ("other", 0, False), ("J", 1, False)],
                         ids=["its own earlier attempt", "another job", "its own attempt"])
def test_a_restarted_attempt_waits_only_for_its_predecessors_lock(job, attempt, waits, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "J")
    monkeypatch.setenv("TORCHELASTIC_RESTART_COUNT", "1")
    monkeypatch.setattr(run_folder, "RESTART_LOCK_WAIT", 30)
    timer = held_lock(tmp_path / "run", {"job": job, "attempt": attempt, "host": "h", "pid": 1}, seconds=1.0)
    start = time.monotonic()
    try:
        if waits:
            with RunDirectory(tmp_path / "run", {"model": "m"}):
                assert 1.0 <= time.monotonic() - start < 30
            holder = json.loads((tmp_path / "run" / ".lock").read_text())
            assert (holder["job"], holder["attempt"], holder["pid"]) == ("J", 1, os.getpid())
        else:
            with pytest.raises(ProbeError, match="another probe run is using --out"):
                RunDirectory(tmp_path / "run", {"model": "m"})
            assert time.monotonic() - start < 1.0
    finally:
        timer.join()
