"""The commands keep freed memory for reuse (`probe.commands.allocator`): fewer page faults, same numbers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import probe
from probe import ablate
from probe.commands import runner as cli
from probe.commands.allocator import keep_freed_memory

ROOT = Path(__file__).resolve().parents[2]

# Five rounds of making and freeing ten 8 MiB tensors, as a sweep makes and frees activations;
# prints the minor page faults of the last four rounds (the first one faults in either way).
# Compared with glibc's starting thresholds held fixed: its default moves them as blocks are
# freed, so how many faults the default takes depends on what ran before (22,000-82,000 here).
ROUNDS = """
import ctypes, resource, sys, torch
from probe.commands.allocator import keep_freed_memory
ctypes.CDLL(None).prctl(41, 1, 0, 0, 0)  # PR_SET_THP_DISABLE: 4 KiB pages whatever the host's huge-page policy
if sys.argv[1] == "kept":
    assert keep_freed_memory({})
else:  # glibc's starting thresholds, held there (by default they move with what was freed before)
    mallopt = ctypes.CDLL("libc.so.6").mallopt
    assert mallopt(-3, 128 * 1024) and mallopt(-1, 128 * 1024)
faults = 0
for round in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(2 * 2**20) for _ in range(10)]
    del tensors
    if round:
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(faults)
"""


def _faults(how: str) -> int:
    done = subprocess.run([sys.executable, "-c", ROUNDS, how], capture_output=True, text=True, cwd=ROOT,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    """Memory given back when freed: every round faults its 80 MiB in again (about 20,000
    pages); kept: the freed blocks are reused."""
    default, kept = _faults("returned"), _faults("kept")
    assert default > 4 * 15_000, (default, kept)
    assert kept < default / 4, (default, kept)  # measured: about 82,000 against 2,000-10,000


def test_the_users_own_malloc_settings_win():
    assert not keep_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=0"})
    assert not keep_freed_memory({"MALLOC_TRIM_THRESHOLD_": "0"})


def test_the_commands_keep_freed_memory_and_the_library_does_not(monkeypatch, tiny_net):
    """Every command goes through run_command, which asks for it once; a library call never."""
    calls = []
    monkeypatch.setattr(cli, "keep_freed_memory", lambda: calls.append(1) or True)
    assert ablate.main(["--list-blocks"]) == 0
    assert calls == [1]
    probe.measure(tiny_net, [(torch.randn(2, 2), torch.tensor([0, 1]))], progress=False)
    assert calls == [1]
