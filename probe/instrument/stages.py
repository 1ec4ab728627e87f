"""Stages: runs of consecutive blocks whose outputs keep one resolution and width.

A ResNet changes resolution and width inside a block, through a projection (or padding)
shortcut; a detector such as YOLO does it in a strided convolution between blocks, whose
shortcuts are all identities. So a block's stage is read from both: a new stage starts at a
block whose shortcut is not the identity, and at one whose output (one sample's residual sum
F(x) + s(x)) differs in shape from the previous block's: in spatial size, in channels, in
features, or in the number of positions. A shortcut that is another block's output (a
transformer's MLP adds the residual stream as it left the attention block) passes the stream
through unchanged: it is an identity here, and a language model's layers are one stage.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from probe.discovery.block import Block
from probe.errors import ProbeError

__all__ = ["sample_shape", "stages"]


def sample_shape(branch: torch.Tensor, shortcut: torch.Tensor) -> tuple[int, ...]:
    """The shape of one sample's residual sum F(x) + s(x): the broadcast shape, batch left out."""
    return tuple(torch.broadcast_shapes(branch.shape, shortcut.shape))[1:]


def stages(blocks: Sequence[Block], shapes: Sequence[tuple[int, ...] | None]) -> list[int]:
    """Each block's stage, from 1, in the order given (forward order).

    shapes: each block's output shape per sample (`sample_shape`, from one forward), None where
    unknown (no change is read from it). A new stage starts at the first block, at every block
    whose shortcut is not the identity, and at every block whose output shape differs from the
    previous block's; a shortcut naming another block's output is the stream, an identity.
    """
    if len(shapes) != len(blocks):
        raise ProbeError(f"stages: {len(shapes)} output shape(s) for {len(blocks)} block(s); give one per block "
                         "(None where unknown).")
    numbers, stage, previous = [], 0, None
    names = {block.name for block in blocks}
    for i, (block, shape) in enumerate(zip(blocks, shapes)):
        reshaped = shape is not None and previous is not None and tuple(shape) != tuple(previous)
        projected = block.shortcut is not None and block.shortcut not in names  # not the stream itself
        stage += 1 if i == 0 or projected or reshaped else 0
        numbers.append(stage)
        previous = shape if shape is not None else previous
    return numbers
