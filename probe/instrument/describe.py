"""`describe_blocks`: the table behind the CLI's block listing; `shortcut_kinds`: what each
block's shortcut computes, for the run record and the report."""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch
from torch import nn

from probe.discovery.find import Block, find_blocks, resolve_blocks
from probe.instrument.hooks import attached, model_preserved, tap_pairs
from probe.batches import call_model

COLUMNS = ["name", "module", "branch", "shortcut", "output_shape"]


def describe_blocks(model: nn.Module, example_input: object, *, blocks: Sequence[str | Block] | None = None,
                    spec: object = None) -> pd.DataFrame:
    """One row per residual block: name, module, branch, shortcut, output_shape.

    `output_shape` is the shape (a tuple, batch first) of the block's residual sum F(x) + s(x)
    when the model runs on `example_input` (a tensor, or a tuple of the forward's arguments),
    or None for a block that input does not reach. `shortcut` is "identity" for the block's
    input. Blocks come from `blocks` (names or Block objects), else `spec`, else discovery
    (which falls back to running `example_input` when torch.fx cannot trace the model). The
    forward runs in eval mode without gradients; the model is left as it was.
    """
    if blocks is not None:
        chosen = resolve_blocks(model, blocks, example_input=example_input)
    else:
        chosen = find_blocks(model, example_input=example_input, spec=spec)
    shapes: dict[str, tuple[int, ...]] = {}

    def note(block: Block, branch: torch.Tensor, shortcut: torch.Tensor) -> None:
        shapes.setdefault(block.name, tuple(torch.broadcast_shapes(branch.shape, shortcut.shape)))

    with model_preserved(model), attached() as handles, torch.no_grad():
        tap_pairs(model, chosen, note, handles)
        call_model(model, example_input)
    rows = [{"name": b.name, "module": b.module, "branch": b.branch, "shortcut": b.shortcut or "identity",
             "output_shape": shapes.get(b.name)} for b in chosen]
    return pd.DataFrame(rows, columns=COLUMNS)


def shortcut_kinds(model: nn.Module, example_input: object, blocks: Sequence[Block]) -> dict[str, str]:
    """{block name: kind of its shortcut s(x)}, from one forward of `example_input`.

    "identity" (s(x) is the block input), "projection" (a module with weights, e.g. a 1x1
    convolution and BatchNorm), "zero-padding" (no weights, and some channels of s(x) are zero
    everywhere: the option-A shortcut of He et al. 2016, subsampling then padding with zeros),
    or "function" (any other computation without weights).
    """
    modules = dict(model.named_modules())
    padded: dict[str, bool] = {}

    def note(block: Block, _branch: torch.Tensor, shortcut: torch.Tensor) -> None:
        if shortcut.dim() >= 2 and block.name not in padded:  # (batch, channels, ...)
            empty = (shortcut.detach() == 0).flatten(2).all(dim=2).all(dim=0) if shortcut.dim() > 2 \
                else (shortcut.detach() == 0).all(dim=0)
            padded[block.name] = bool(empty.any()) and not bool(empty.all())

    with model_preserved(model), attached() as handles, torch.no_grad():
        tap_pairs(model, blocks, note, handles)
        call_model(model, example_input)
    kinds = {}
    for block in blocks:
        if block.shortcut is None:
            kinds[block.name] = "identity"
        elif block.shortcut in modules and any(True for _ in modules[block.shortcut].parameters()):
            kinds[block.name] = "projection"
        else:
            kinds[block.name] = "zero-padding" if padded.get(block.name) else "function"
    return kinds
