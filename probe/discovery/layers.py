"""Layers: the repeated units of a network, each holding one or more residual blocks.

A transformer decoder layer performs two residual additions (attention, MLP); ShortGPT and
SLEB delete whole layers. A block's layer is the element of a `ModuleList` or `Sequential`
that contains its module (`model.layers.3` for `model.layers.3[self_attn]`; `layer1.0` for a
ResNet's `layer1.0`, whose layer is the block itself).

    groups = probe.discovery.layers.group_layers(model, probe.find_blocks(model))
    probe.evaluate_ablations(model, data, list(groups.values()), task="lm")   # delete whole layers
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from probe.discovery.find import Block, resolve_blocks

__all__ = ["group_layers", "layer_of", "layer_stack"]


def layer_of(model: nn.Module, block: Block) -> str:
    """The qualified name of the layer that holds `block`: the innermost element of a
    ModuleList or Sequential on the way to its module; the block's own module when none."""
    parts = block.module.split(".") if block.module else []
    for end in range(len(parts), 0, -1):
        parent = ".".join(parts[:end - 1])
        container = model.get_submodule(parent) if parent else model
        if isinstance(container, (nn.ModuleList, nn.Sequential)):
            return ".".join(parts[:end])
    return block.module or block.name


def group_layers(model: nn.Module, blocks: Sequence[str | Block] | None = None) -> dict[str, list[Block]]:
    """{layer name: its blocks}, layers in forward order (of their first block)."""
    groups: dict[str, list[Block]] = {}
    for block in resolve_blocks(model, blocks):
        groups.setdefault(layer_of(model, block), []).append(block)
    return groups


def layer_stack(model: nn.Module, layers: Sequence[str]) -> tuple[str, nn.ModuleList | nn.Sequential] | None:
    """(name, container) of the one ModuleList or Sequential that holds every layer in
    `layers` as its consecutive elements, or None (the layers are not one stack)."""
    parents = {name.rpartition(".")[0] for name in layers}
    if len(parents) != 1:
        return None
    parent = parents.pop()
    container = model.get_submodule(parent) if parent else model
    if not isinstance(container, (nn.ModuleList, nn.Sequential)):
        return None
    return parent, container
