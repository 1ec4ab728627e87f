"""A forward captured once and replayed: what makes `measure` cheap where a GPU is launch-bound.

On a GPU a small network (ResNet-56 on 16x16 digits) runs thousands of tiny kernels per batch,
and measure's hooks add a few reductions per block: the forward is bound by launching kernels,
not by computing them (measure took 2.0-2.8x a plain forward on an H100). A CUDA graph records
every kernel of one call, hooks included, and replays them all with one launch.

What a captured call may be: a function of tensors (the leaves of a batch's inputs) that returns
one tensor. It reads its inputs from static tensors and writes its result into one static tensor;
each replay overwrites that result. Python runs only while capturing: whatever must happen for
every batch has to be tensor work inside the function, and Python-side state it sets (which
blocks ran, in what order) is that of the capture.

Two ways to capture, with one interface (`Captured.run`):
- on a CUDA device, a `torch.cuda.CUDAGraph` (warmed up on a side stream, as torch's docs ask);
- on any other device, an aten-level graph traced with `make_fx`, replayed as fx code. It is no
  faster on a CPU; it keeps the same promise (Python ran once, at capture; parameters are read
  by reference), so the CPU tests check the code around a replay that a GPU runs.

Callers check a replay against an eager call on the same input before trusting it
(`measure` does): a capture can fail loudly (a forward that syncs with the host), and a forward
whose Python depends on more than shapes would replay the captured path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.fx.experimental.proxy_tensor import make_fx

__all__ = ["Captured", "capture"]


class Captured:
    """One captured call: `run(*leaves)` copies `leaves` into the static inputs, replays, and
    returns the static output (valid until the next `run`)."""

    def __init__(self, static: tuple[torch.Tensor, ...], replay: Callable[[], None], output: torch.Tensor) -> None:
        self._static, self._replay, self.output = static, replay, output

    def run(self, *leaves: torch.Tensor) -> torch.Tensor:
        for static, value in zip(self._static, leaves, strict=True):
            static.copy_(value)
        self._replay()
        return self.output


def capture(function: Callable[..., torch.Tensor], *example: torch.Tensor) -> Captured:
    """`function` captured on static copies of `example` (see the module docstring): a CUDA
    graph when the examples are on a CUDA device, else a `make_fx` graph. Raises whatever the
    capture raises; the caller decides what a failed capture means."""
    static = tuple(value.clone() for value in example)
    if static and static[0].device.type == "cuda":
        return _cuda_graph(function, static)
    return _fx_graph(function, static)


def _cuda_graph(function: Callable[..., torch.Tensor], static: tuple[torch.Tensor, ...]) -> Captured:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # lazy initialisation (cuBLAS/cuDNN handles) happens outside the capture
        function(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    previous = torch.cuda.current_stream()
    try:
        # "thread_local": a DataLoader's pin-memory thread may allocate pinned memory meanwhile;
        # in the default "global" mode that call would fail in its thread, and the data with it.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            output = function(*static)
    finally:  # a capture that fails (a sync with the host) ends without putting the stream back
        torch.cuda.set_stream(previous)
    return Captured(static, graph.replay, output)


def _fx_graph(function: Callable[..., torch.Tensor], static: tuple[torch.Tensor, ...]) -> Captured:
    traced = make_fx(function)(*static)
    output = traced(*static).clone()

    def replay() -> None:
        output.copy_(traced(*static))

    return Captured(static, replay, output)
