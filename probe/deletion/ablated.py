"""`ablated`: run the user's own model with some blocks' branches removed."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError
from probe.instrument.hooks import attached, held, replace_branches
from probe.instrument.measurement import branch_means

MODES = ("zero", "mean")


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ProbeError(f"unknown ablation mode {mode!r}; use 'zero' (branch output replaced by zeros) "
                         "or 'mean' (replaced by its mean over the data).")
    return mode


def branch_replacement(mode: str, means: Mapping[str, torch.Tensor | np.ndarray] | None):
    """The function that maps (block, branch output) to what the ablated block adds instead.

    It returns a fresh tensor: blocks such as torchvision's add the shortcut to it in place.
    `means` may hold numpy arrays too (means saved with the results, read back).
    """
    if mode == "zero":
        return lambda _block, output: torch.zeros_like(output)
    tensors = _as_tensors(means) if means is not None else {}

    def mean_of(block: Block, output: torch.Tensor) -> torch.Tensor:
        if block.name not in tensors:
            raise ProbeError(f"no mean branch output given for block {block.name!r}; compute the means "
                             "with probe.branch_means(model, data).")
        mean = tensors[block.name].to(device=output.device, dtype=output.dtype)  # (C, H, W)
        if mean.shape != output.shape[1:]:
            raise ProbeError(f"the mean branch output of block {block.name!r} has shape {tuple(mean.shape)}, "
                             f"but the model now produces {tuple(output.shape[1:])}; compute the means "
                             "on inputs of the same size.")
        return torch.empty_like(output).copy_(mean.expand_as(output))

    return mean_of


def _as_tensors(means: Mapping[str, object]) -> dict[str, torch.Tensor]:
    if not isinstance(means, Mapping):
        raise ProbeError(f"means is a {type(means).__name__}; give a dict of block name -> mean branch output, "
                         "as probe.branch_means returns.")
    tensors = {}
    for name, mean in means.items():
        try:
            tensors[name] = torch.as_tensor(mean)
        except (TypeError, RuntimeError) as error:
            raise ProbeError(f"the mean branch output of block {name!r} is a {type(mean).__name__}; give a tensor "
                             "or a numpy array, as probe.branch_means returns.") from error
    return tensors


@contextlib.contextmanager
def ablated(model: nn.Module, blocks: Sequence[str | Block] | str | Block, *, mode: str = "zero",
            means: Mapping[str, torch.Tensor | np.ndarray] | None = None,
            data: Iterable | None = None) -> Iterator[nn.Module]:
    """Within the `with` body, the named blocks' branches contribute zeros (or their means).

    mode="zero": F(x) is replaced by zeros; shortcut, addition and what follows run as usual.
    mode="mean": F(x) is replaced by its elementwise mean over the data: pass `means` (from
    `probe.branch_means`) or `data` to compute them. The model's parameters, buffers and flags
    are untouched; the hooks are removed when the body ends, also on an exception. Until then
    probe calls on the model from other threads are refused: the hooks would act on them too.
    """
    check_mode(mode)
    # A set of blocks to delete: naming one twice deletes it once.
    chosen = list({block.name: block for block in resolve_blocks(model, blocks, unique=False)}.values())
    if mode == "mean":
        if means is None and data is None:
            raise ProbeError("mode='mean' needs the branch means: pass means=probe.branch_means(model, data) or data=.")
        if means is None:
            means = branch_means(model, data, blocks=chosen, progress=False)
        missing = [b.name for b in chosen if b.name not in means]
        if missing:
            raise ProbeError(f"no mean branch output given for blocks {missing}; compute them with probe.branch_means.")
    with held(model), attached() as handles:
        replace_branches(model, chosen, branch_replacement(mode, means), handles)
        yield model
