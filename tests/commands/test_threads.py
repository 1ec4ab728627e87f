"""How many CPU threads the commands use (`probe.commands.threads`): the usable cores others leave free,
`--threads N` or OMP_NUM_THREADS instead, and the choice in the run record."""

from __future__ import annotations

import json

import pytest
import torch

import probe
from probe.commands import threads
from probe.commands.config import RunConfig
from probe.commands.run_folder import RunDirectory

STAT = """cpu  300 0 100 1000 0 0 0 500 0 0
cpu0 {busy0} 0 0 {idle0} 0 0 0 {steal0} 0 0
cpu1 {busy1} 0 0 {idle1} 0 0 0 0 0 0
intr 12345
"""


def _stat(busy0, idle0, busy1, idle1, steal0=0):
    return STAT.format(busy0=busy0, idle0=idle0, busy1=busy1, idle1=idle1, steal0=steal0)


def test_cpu_times_count_user_system_and_interrupts_but_not_steal():
    times = threads.parse_cpu_times(_stat(70, 30, 5, 95, steal0=400), [0, 1])
    assert times == {0: (70, 100), 1: (5, 100)}  # steal (400) is in neither
    assert threads.parse_cpu_times(_stat(1, 1, 1, 1), [1]) == {1: (1, 2)}  # only the usable cores
    assert threads.parse_cpu_times("intr 1\n", [0]) is None


def _machine(monkeypatch, first: str, second: str, cores=(0, 1)):
    readings = iter([threads.parse_cpu_times(first, list(cores)), threads.parse_cpu_times(second, list(cores))])
    monkeypatch.setattr(threads, "_cpu_times", lambda _cores: next(readings))
    monkeypatch.setattr(threads, "usable_cores", lambda: list(cores))
    monkeypatch.setattr(threads.time, "sleep", lambda _seconds: None)


def test_one_core_kept_busy_by_another_process_leaves_one_thread(monkeypatch):
    # Over the window core 0 was busy 90 of 100 ticks, core 1 for 2 of 100: 0.92 cores busy.
    _machine(monkeypatch, _stat(0, 0, 0, 0), _stat(90, 10, 2, 98))
    choice = threads.choose_threads(environ={})
    assert choice.threads == 1
    assert choice.reason == "1 of 2 usable cores (others keep 0.9 of them busy; --threads N to choose)"


def test_a_quiet_machine_uses_every_usable_core(monkeypatch):
    _machine(monkeypatch, _stat(0, 0, 0, 0, steal0=0), _stat(3, 97, 1, 99, steal0=900), cores=(0, 1))
    assert threads.choose_threads(environ={}) == threads.ThreadChoice(
        2, "2 of 2 usable cores (all free; --threads N to choose)")


def test_every_core_busy_still_leaves_one_thread(monkeypatch):
    _machine(monkeypatch, _stat(0, 0, 0, 0), _stat(100, 0, 100, 0))
    assert threads.choose_threads(environ={}).threads == 1


def test_threads_asked_for_or_set_in_the_environment_decide(monkeypatch):
    monkeypatch.setattr(threads, "_cpu_times", lambda _cores: pytest.fail("no need to look at the machine"))
    assert threads.choose_threads(3, environ={}) == threads.ThreadChoice(3, "3 (--threads)")
    choice = threads.choose_threads(environ={"OMP_NUM_THREADS": "1"})
    assert choice == threads.ThreadChoice(torch.get_num_threads(), f"{torch.get_num_threads()} (OMP_NUM_THREADS=1)")
    for bad in (0, -2, 1.5, True):
        with pytest.raises(probe.ProbeError, match="--threads must be a whole number >= 1"):
            threads.choose_threads(bad, environ={})
    with pytest.raises(probe.ProbeError, match=r"--threads must be a whole number >= 1, got 0"):
        RunConfig(threads=0)


def test_use_threads_sets_torch_and_is_remembered():
    before = torch.get_num_threads()
    try:
        choice = threads.use_threads(2)
        assert torch.get_num_threads() == 2 and threads.chosen() == choice
    finally:
        torch.set_num_threads(before)


def test_a_command_called_from_python_puts_torch_threads_back():
    """model and torch's global state as before: `main(argv)` in a notebook or a test uses the
    threads asked for while it runs, and leaves torch's count as it found it, also on an error."""
    import argparse

    from probe.commands.runner import run_command
    from probe.errors import ProbeError

    parser = argparse.ArgumentParser(prog="demo")
    parser.add_argument("--threads", type=int)
    before = torch.get_num_threads()
    seen = []

    def body(_args):
        seen.append(torch.get_num_threads())
        raise ProbeError("stop here")

    assert run_command(parser, body, ["--threads", str(before + 1)]) == 2
    assert seen == [before + 1] and torch.get_num_threads() == before


def test_a_resume_with_another_thread_count_is_not_refused(tmp_path):
    with RunDirectory(tmp_path, {"model": "m", "threads": "2 of 2 usable cores"}) as run:
        run.save("measure", 1)
    with RunDirectory(tmp_path, {"model": "m", "threads": "1 (--threads)"}) as run:
        assert run.load("measure") == 1  # the pieces are reused
    assert json.loads((tmp_path / "run.json").read_text())["threads"] == "2 of 2 usable cores"
    with pytest.raises(probe.ProbeError, match="another configuration"):
        RunDirectory(tmp_path, {"model": "other", "threads": "2 of 2 usable cores"})


@pytest.mark.slow  # trains a model twice
def test_training_gives_the_same_weights_whatever_threads_the_caller_set():
    """Trained weights must not depend on how busy the machine was when the commands chose their
    threads: training uses its own fixed count, and puts torch's back."""
    from probe.loading.training import TrainConfig, train_model

    config = TrainConfig(model="resnet8", epochs=1, limit=64, batch_size=16)
    weights = []
    before = torch.get_num_threads()
    try:
        for count in (1, 3):
            torch.set_num_threads(count)
            model, _ = train_model(config, progress=False)
            assert torch.get_num_threads() == count
            weights.append(model.state_dict())
    finally:
        torch.set_num_threads(before)
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][key], weights[1][key]) for key in weights[0])
