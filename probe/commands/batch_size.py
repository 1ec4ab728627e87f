"""`--batch-size auto`: the most windows of text per forward that fit the memory there is.

    choice = choose_batch_size(model, data_of, task=task, blocks=blocks, available=64,
                               budget=memory_budget(model, device, "8GiB"))
    choice.windows, choice.describe(), choice.record()

Measured, not guessed: the engine (`probe.evaluate_ablations`) deletes a block on one window,
then on two, under `probe.instrument.memory.TensorMemory`; the difference of the two peaks is
what a window adds, the rest is fixed. Each deletion measured is of the first block (every layer
after it runs) and of the second on from a network without the first (the layer replay then
keeps two networks' layer outputs, `probe.deletion.fast_replay`); one more set of layer outputs
per window is added as a margin for the work that holds a third (a curve's chained points). The
choice is the most windows that fit in the budget, at most the windows there are. A run into a
folder whose run a `--batch-size auto` began keeps that run's size when it still fits: its pieces
were made with it, and the folder resumes although the memory free has changed.

The budget: `--memory-budget` when given; else, for a model on GPUs, 90% of the smallest free
memory among them once the model is loaded (the rest for the allocator's rounding and cache);
on the CPU, half of the memory the system reports available.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import torch
from torch import nn
from torch.utils import _pytree as pytree

from probe.deletion.evaluation import evaluate_ablations
from probe.discovery.find import Block
from probe.discovery.layers import group_layers
from probe.commands.byte_sizes import format_bytes, parse_size
from probe.errors import ProbeError
from probe.instrument.hooks import attached
from probe.instrument.memory import TensorMemory
from probe.scoring.scores import Task

__all__ = ["BatchSizeChoice", "choose_batch_size", "memory_budget"]

GPU_SHARE = 0.9  # of the free GPU memory: the rest is the allocator's rounding and cache
CPU_SHARE = 0.5  # of the memory the system reports available
CACHES = 2  # layer-output caches the replay holds at once: the intact network's and a chained one's


@dataclasses.dataclass(frozen=True)
class BatchSizeChoice:
    """windows: the chosen windows per forward. budget_bytes and budget (where it came from, in
    words). window_bytes: what one more window takes (forward and scoring, plus the replay's
    caches); cache_bytes: the caches' part of it; fixed_bytes: what a forward takes beyond its
    windows. fits: windows the budget holds; available: windows in the data. kept: the size is
    the one an earlier run into the same out folder chose (it still fits, and its pieces resume)."""

    windows: int
    budget_bytes: int
    budget: str
    window_bytes: int
    cache_bytes: int
    fixed_bytes: int
    fits: int
    available: int
    kept: bool = False

    def record(self) -> dict:
        return dataclasses.asdict(self)

    def describe(self) -> str:
        why = ("as the run this folder holds chose" if self.kept else
               "every window there is" if self.windows == self.available else "the most that fit")
        return (f"--batch-size auto: {self.windows} windows per forward ({why}): each takes "
                f"{format_bytes(self.window_bytes)}, beyond {format_bytes(self.fixed_bytes)} fixed, of a budget of "
                f"{format_bytes(self.budget_bytes)} ({self.budget})")


def memory_budget(model: nn.Module, device: torch.device, stated: str | None = None) -> tuple[int, str]:
    """(bytes, where they come from): `stated` (--memory-budget), else the free memory of the
    model's GPUs, else the CPU's available memory (module docstring)."""
    if stated is not None:
        return parse_size(stated), f"--memory-budget {stated}"
    gpus = sorted({p.device for p in model.parameters() if p.device.type == "cuda"} | (
        {device} if device.type == "cuda" else set()), key=str)
    if gpus:
        free = {gpu: torch.cuda.mem_get_info(gpu)[0] for gpu in gpus}
        tightest = min(free, key=free.get)
        return int(GPU_SHARE * free[tightest]), (f"{GPU_SHARE:.0%} of the {format_bytes(free[tightest])} free on "
                                                 f"{tightest}, after the model")
    available = _available_memory()
    return int(CPU_SHARE * available), f"half of the {format_bytes(available)} this machine has available"


def _available_memory() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_batch_size(model: nn.Module, data_of: Callable[[int], Iterable], *, task: Task, blocks: Sequence[Block],
                      available: int, budget: tuple[int, str], earlier: int | None = None) -> BatchSizeChoice:
    """The most windows per forward that fit `budget` ((bytes, words): `memory_budget`), at most
    `available`. data_of(n): the data's first n windows as one batch (a loader of one batch);
    blocks: the model's blocks (the deletions measured are of the first two). earlier: the size
    an earlier run into the same folder chose, kept when it still fits (its pieces resume)."""
    budget_bytes, source = budget
    if available < 1:
        raise ProbeError("--batch-size auto needs at least one window of data.")
    one, cache = _peak(model, data_of(1), task, blocks)
    two = _peak(model, data_of(2), task, blocks)[0] if available > 1 else 2 * one
    forward = max(two - one, 1)
    fixed = max(one - forward, 0)
    window = forward + cache
    fits = (budget_bytes - fixed) // window
    if fits < 1:
        raise ProbeError(f"--batch-size auto: one window needs {format_bytes(fixed + window)} and the budget is "
                         f"{format_bytes(budget_bytes)} ({source}); give a larger --memory-budget, a shorter --seq-len, "
                         "or --device-map to spread the model over more devices.")
    kept = earlier is not None and 1 <= earlier <= min(fits, available)
    return BatchSizeChoice(windows=earlier if kept else min(int(fits), available), budget_bytes=budget_bytes,
                           budget=source, window_bytes=window, cache_bytes=cache, fixed_bytes=fixed, fits=int(fits),
                           available=available, kept=kept)


def _peak(model: nn.Module, data: Iterable, task: Task, blocks: Sequence[Block]) -> tuple[int, int]:
    """(the peak bytes of the engine's work on `data`'s one batch, the bytes of one more cache
    of the layer outputs per window). The work: the first block deleted (every layer after the
    first runs), and the second deleted on from a network without the first (`base`: the
    engine keeps that network's layer outputs beside the intact one's)."""
    layers = [model.get_submodule(name) for name in group_layers(model, blocks)]
    sizes: list[int] = []

    def keep_size(_module, _args, output) -> None:
        if len(sizes) < len(layers):  # the first forward's: replayed calls pass cached outputs on
            sizes.append(sum(t.untyped_storage().nbytes() for t in pytree.tree_leaves(output)
                             if isinstance(t, torch.Tensor)))

    with attached() as handles:
        for layer in layers:
            handles.append(layer.register_forward_hook(keep_size))
        with TensorMemory() as memory:
            first = evaluate_ablations(model, data, [blocks[:1]], task=task, outcomes=True, progress=False)
            if len(blocks) > 1:
                evaluate_ablations(model, data, [blocks[:2]], task=task, outcomes=True, progress=False,
                                   base=blocks[:1])
    return memory.peak, sum(sizes) // first.baseline.samples
