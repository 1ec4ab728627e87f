"""`sweep`: ablate each block alone and measure what the network loses.

The loop runs batches outside and ablations inside: each batch is loaded once, its unablated
predictions are the reference for the flip rate, and one hook per block stays attached for the
whole sweep (switched on for the block being ablated). Counts are summed on the device.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from probe.ablation import branch_replacement, check_mode
from probe.batches import batches, model_device
from probe.blocks import Block, resolve_blocks
from probe.hooks import attached, model_preserved, replace_branches

COLUMNS = ["block", "position", "mode", "accuracy", "loss", "accuracy_drop", "loss_increase",
           "flip_rate", "samples"]


def sweep(model: nn.Module, data: Iterable, *, mode: str = "zero", blocks: Sequence[str | Block] | None = None,
          means: Mapping[str, torch.Tensor] | None = None, progress: bool = True) -> pd.DataFrame:
    """Ablate every block alone (mode "zero" or "mean") and compare with the unablated model.

    Returns one row per block in forward order; `df.attrs["baseline"]` holds the unablated
    model's {"accuracy", "loss", "samples"}. Accuracies are fractions in [0, 1]; `loss` is the
    mean cross-entropy; `flip_rate` is the share of samples whose predicted class changes.
    """
    check_mode(mode)
    chosen = resolve_blocks(model, blocks)
    sets = [[block] for block in chosen]
    baseline, results = evaluate_ablations(model, data, sets, mode=mode, means=means, progress=progress)
    rows = []
    for block, result in zip(chosen, results):
        rows.append({"block": block.name, "position": block.position, "mode": mode, **result,
                     "accuracy_drop": baseline["accuracy"] - result["accuracy"],
                     "loss_increase": result["loss"] - baseline["loss"]})
    table = pd.DataFrame(rows, columns=COLUMNS)
    table.attrs["baseline"] = baseline
    return table


def evaluate_ablations(model: nn.Module, data: Iterable, ablation_sets: Sequence[Sequence[Block]], *,
                       mode: str = "zero", means: Mapping[str, torch.Tensor] | None = None,
                       progress: bool = True) -> tuple[dict, list[dict]]:
    """Accuracy, loss and flip rate with each set of blocks ablated together, in one data pass.

    Returns (baseline, one dict per set), each dict with accuracy, loss, flip_rate, samples.
    """
    check_mode(mode)
    involved = list({block.name: block for s in ablation_sets for block in s}.values())
    if mode == "mean" and means is None:
        from probe.measure import branch_means

        means = branch_means(model, data, blocks=involved, progress=progress)
    device = model_device(model)
    active: set[str] = set()
    # Rows: baseline, then each set. Columns: correct, loss sum, flips.
    totals = torch.zeros(len(ablation_sets) + 1, 3, dtype=torch.float64, device=device)
    samples = 0
    with model_preserved(model), attached() as handles, torch.no_grad():
        replace_branches(model, involved, branch_replacement(mode, means), handles,
                         active=lambda block: block.name in active)
        for inputs, targets in batches(data, device, progress=progress,
                                       desc=f"sweep ({len(ablation_sets)} ablations)"):
            active.clear()
            logits = model(inputs)
            reference = logits.argmax(dim=1)
            totals[0] += _outcomes(logits, targets, reference)
            for row, ablation_set in enumerate(ablation_sets, start=1):
                active.clear()
                active.update(block.name for block in ablation_set)
                totals[row] += _outcomes(model(inputs), targets, reference)
            active.clear()
            samples += len(targets)
    results = [{"accuracy": float(c) / samples, "loss": float(l) / samples, "flip_rate": float(f) / samples,
                "samples": samples} for c, l, f in totals.cpu().tolist()]
    baseline = {k: results[0][k] for k in ("accuracy", "loss", "samples")}
    return baseline, results[1:]


def _outcomes(logits: torch.Tensor, targets: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """(correct count, summed cross-entropy, count of predictions that differ from reference)."""
    predictions = logits.argmax(dim=1)
    loss = F.cross_entropy(logits.float(), targets, reduction="sum")
    return torch.stack([(predictions == targets).sum().double(), loss.double(),
                        (predictions != reference).sum().double()])
