"""How many CPU threads torch uses: the cores this process may run on that no one else is using.

torch's intra-op threads wait for one another at every operation, so one thread that shares its
core with another busy process holds all of them back: on two cores with one other CPU-bound
process, the default job took 2.12x its quiet time with two threads and 1.33x with one
(`benchmarks/shared_machine.py --threads-too`). So the
commands count the cores they may use (`os.sched_getaffinity`), look at how busy those cores are
right now (`/proc/stat`, over a tenth of a second; the load average where there is none), and
use the free ones. `--threads N` (or OMP_NUM_THREADS) decides instead. The choice, and why, goes
into the run record.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from probe.errors import ProbeError

__all__ = ["ThreadChoice", "choose_threads", "chosen", "use_threads"]

_WINDOW = 0.1  # seconds of /proc/stat between the two readings


@dataclass(frozen=True)
class ThreadChoice:
    """threads: what torch uses; reason: one line saying why (for the run record)."""

    threads: int
    reason: str


_chosen: ThreadChoice | None = None


def chosen() -> ThreadChoice | None:
    """The choice `use_threads` made last in this process (None before any)."""
    return _chosen


def use_threads(requested: int | None = None) -> ThreadChoice:
    """`choose_threads`, applied to torch (`torch.set_num_threads`)."""
    global _chosen
    choice = choose_threads(requested)
    if choice.threads != torch.get_num_threads():
        torch.set_num_threads(choice.threads)
    _chosen = choice
    return choice


def choose_threads(requested: int | None = None, *, environ: dict | None = None) -> ThreadChoice:
    """requested (`--threads N`), else OMP_NUM_THREADS / MKL_NUM_THREADS, else the usable cores
    that others leave free (at least one)."""
    environ = os.environ if environ is None else environ
    if requested is not None:
        if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
            raise ProbeError(f"--threads must be a whole number >= 1, got {requested!r}.")
        return ThreadChoice(requested, f"{requested} (--threads)")
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if environ.get(variable):
            return ThreadChoice(torch.get_num_threads(), f"{torch.get_num_threads()} ({variable}={environ[variable]})")
    cores = usable_cores()
    busy = busy_cores(cores)
    threads = max(1, len(cores) - round(busy))
    others = f"others keep {busy:.1f} of them busy" if busy >= 0.05 else "all free"
    return ThreadChoice(threads, f"{threads} of {len(cores)} usable cores ({others}; --threads N to choose)")


def usable_cores() -> list[int]:
    """The CPUs this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def busy_cores(cores: list[int], window: float = _WINDOW) -> float:
    """How many of `cores` other processes keep busy now: the busy share of each over `window`
    seconds (user, system and interrupt time; a hypervisor's steal is not another process),
    summed. This process sleeps meanwhile, so it is not counted."""
    first = _cpu_times(cores)
    if first is None:
        try:
            return min(float(len(cores)), os.getloadavg()[0])
        except OSError:
            return 0.0
    time.sleep(window)
    second = _cpu_times(cores) or first
    busy = 0.0
    for core in cores:
        (busy_a, total_a), (busy_b, total_b) = first.get(core, (0, 0)), second.get(core, (0, 0))
        if total_b > total_a:
            busy += (busy_b - busy_a) / (total_b - total_a)
    return busy


def _cpu_times(cores: list[int]) -> dict[int, tuple[int, int]] | None:
    """core -> (busy ticks, all ticks but steal) from /proc/stat; None where there is none."""
    try:
        text = Path("/proc/stat").read_text()
    except OSError:
        return None
    return parse_cpu_times(text, cores)


def parse_cpu_times(text: str, cores: list[int]) -> dict[int, tuple[int, int]] | None:
    """`_cpu_times` of a /proc/stat text."""
    wanted, times = set(cores), {}
    for line in text.splitlines():
        name, *fields = line.split() or [""]
        if len(fields) < 7 or not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit() or int(name[3:]) not in wanted:
            continue
        # user nice system idle iowait irq softirq steal ...
        user, nice, system, idle, iowait, irq, softirq, *rest = (int(f) for f in fields)
        busy = user + nice + system + irq + softirq
        times[int(name[3:])] = (busy, busy + idle + iowait)
    return times or None
