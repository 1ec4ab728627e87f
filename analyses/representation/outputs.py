"""Block outputs pooled to one vector per sample, read by hooks in one pass over the data: what
the linear probes, the logit lens and CKA look at."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from probe.batches import Batch, batches, explained_misfit, input_dtype, model_device
from probe.discovery.find import Block
from probe.errors import ProbeError
from probe.instrument.hooks import attached, model_preserved, tap_pairs
from probe.instrument.stages import sample_shape


def pool(output: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """One float32 vector per sample: (batch, features).

    (batch, channels, *spatial) is averaged over the spatial positions (global average pooling),
    (batch, positions, features) over the positions (a transformer's layout), and (batch,
    features) kept as it is. mask: a (batch, positions) attention mask (1: a real token, 0:
    padding); a sequence output is then averaged over its real positions only.
    """
    if output.dim() < 2:
        raise ProbeError(f"a block output of shape {tuple(output.shape)} has no features per sample to probe.")
    if output.dim() == 2:
        return output.float()
    if output.dim() == 3 and mask is not None and tuple(mask.shape) == tuple(output.shape[:2]):
        weights = mask.to(torch.float32).unsqueeze(2)  # (batch, positions, 1)
        return (output.float() * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)
    dims = (1,) if output.dim() == 3 else tuple(range(2, output.dim()))
    return output.mean(dim=dims, dtype=torch.float32)


def first_tensor(args: tuple) -> torch.Tensor:
    return next(value for value in args if isinstance(value, torch.Tensor))


def ran_twice(block: Block) -> ProbeError:
    return ProbeError(f"block {block.name!r} ran more than once in one forward; its representation has no single "
                      "output per sample. Leave it out with blocks=.")


def check_reiterable(data: Iterable, what: str) -> None:
    if iter(data) is data:
        raise ProbeError(f"{what} passes over the data more than once; give a DataLoader or a list of batches, "
                         "not a one-shot iterator or generator.")


Visit = Callable[[torch.Tensor, list[torch.Tensor], object, Batch], None]


def walk(model: nn.Module, data: Iterable, blocks: Sequence[Block], visit: Visit, *, progress: bool,
          desc: str) -> list[tuple[int, ...] | None]:
    """Run `data` through `model` (no gradients); per batch call visit(the first block's pooled
    input, each block's pooled output in block order, the model's outputs, the `Batch`). The
    model is left as found. Sequence outputs are pooled over the positions the batch's
    `attention_mask` (keyword inputs) marks as real, when it has one.

    Returns each block's output shape per sample in the first batch (`probe.instrument.stages`:
    what the blocks' stages are read from)."""
    modules = dict(model.named_modules())
    device = model_device(model)
    outputs: dict[str, torch.Tensor] = {}
    first_input: list[torch.Tensor] = []
    mask: list[torch.Tensor | None] = [None]  # the current batch's attention mask
    shapes: dict[str, tuple[int, ...]] = {}

    def record(block: Block, branch: torch.Tensor, shortcut: torch.Tensor) -> None:
        if block.name in outputs:
            raise ran_twice(block)
        shapes.setdefault(block.name, sample_shape(branch, shortcut))
        # mean pooling is linear: the sum is never made
        outputs[block.name] = pool(branch, mask[0]) + pool(shortcut, mask[0])

    with model_preserved(model), attached() as handles, torch.no_grad():
        tap_pairs(model, blocks, record, handles)
        handles.append(modules[blocks[0].module].register_forward_pre_hook(
            lambda _m, args: first_input.append(pool(first_tensor(args), mask[0]))))
        for batch in batches(data, device, dtype=input_dtype(model), progress=progress, desc=desc):
            outputs.clear()
            first_input.clear()
            mask[0] = batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None
            with explained_misfit(batch):
                model_outputs = batch.run(model)
            missing = [block.name for block in blocks if block.name not in outputs]
            if missing:
                raise ProbeError(f"block(s) {missing} did not run in a forward of the model; probe the blocks it runs.")
            visit(first_input[0], [outputs[block.name] for block in blocks], model_outputs, batch)
    return [shapes.get(block.name) for block in blocks]  # None: no batch came
