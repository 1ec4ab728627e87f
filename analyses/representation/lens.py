"""The logit lens on a classifier: the model's own head (its last nn.Linear with one output per
class) applied to each pooled block output of the width it takes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from analyses.representation.outputs import walk
from probe.batches import Batch, class_targets
from probe.discovery.find import Block, resolve_blocks
from probe.instrument.hooks import outside_inference_mode
from probe.instrument.stages import stages
from probe.scoring.tasks import logits_of

LENS_COLUMNS = ["block", "position", "stage", "width", "applicable", "accuracy", "agreement", "samples", "reason"]


def _head(model: nn.Module, classes: int) -> tuple[str, nn.Linear] | None:
    """The model's head: its last nn.Linear (in module order) with one output per class."""
    heads = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Linear) and m.out_features == classes]
    return heads[-1] if heads else None


@outside_inference_mode  # sums made here are added into inside model_preserved
def head_lens(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
              progress: bool = True) -> pd.DataFrame:
    """A logit lens for classifiers: the model's own head on each block's pooled output, where the
    widths fit (see `RepresentationResult.lens`; a language model's lens is `analyses.lm.logit_lens`)."""
    chosen = resolve_blocks(model, blocks)
    correct = torch.zeros(len(chosen), dtype=torch.int64)
    agree = torch.zeros(len(chosen), dtype=torch.int64)
    widths: list[int] = []
    heads: list[tuple[str, nn.Linear] | None] = []  # found at the first batch, which tells the number of classes
    count = 0

    def look(_first: torch.Tensor, outputs: list[torch.Tensor], model_outputs: object, batch: Batch) -> None:
        nonlocal count
        logits, targets = logits_of(model_outputs), class_targets(batch)
        if not heads:
            heads.append(_head(model, logits.shape[-1]))
            widths.extend(x.shape[1] for x in outputs)
        final = logits.argmax(dim=-1)
        for i, x in enumerate(outputs):
            if heads[0] is not None and x.shape[1] == heads[0][1].in_features:
                head = heads[0][1]
                # F.linear, not head(x): the call would fire any hook probe holds on the head.
                predicted = F.linear(x.to(head.weight.dtype), head.weight, head.bias).argmax(dim=-1)
                correct[i] += int((predicted == targets).sum())
                agree[i] += int((predicted == final).sum())
        count += len(targets)

    shapes = walk(model, data, chosen, look, progress=progress, desc="logit lens")
    head = heads[0]
    rows = []
    for i, (block, stage) in enumerate(zip(chosen, stages(chosen, shapes))):
        applicable = head is not None and widths[i] == head[1].in_features
        if head is None:
            reason = "the model has no nn.Linear with one output per class (its head)"
        elif not applicable:
            reason = f"its output has {widths[i]} features; the head {head[0]} takes {head[1].in_features}"
        else:
            reason = ""
        rows.append({"block": block.name, "position": block.position, "stage": stage, "width": widths[i],
                     "applicable": applicable, "accuracy": correct[i].item() / count if applicable else float("nan"),
                     "agreement": agree[i].item() / count if applicable else float("nan"), "samples": count,
                     "reason": reason})
    return pd.DataFrame(rows, columns=LENS_COLUMNS)
