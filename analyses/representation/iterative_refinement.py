"""Iterative refinement (Jastrzebski et al. 2018): per sample cos(F(h), dL/dh), the branch against
the gradient of the loss at the block's input, and ||F(h)|| / ||h||."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from analyses.attribution import differentiable_loss
from analyses.representation.outputs import first_tensor, ran_twice
from probe.batches import batches, call_model, class_targets, explained_misfit, input_dtype, model_device
from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError
from probe.instrument.hooks import attached, model_preserved, outside_inference_mode, tap_pairs
from probe.instrument.stages import sample_shape, stages
from probe.scoring.tasks import Classification, Task, logits_of, resolve_task

REFINEMENT_COLUMNS = ["block", "position", "stage", "grad_cosine", "grad_cosine_std", "step_ratio", "step_ratio_std",
                      "samples"]
NO_DRIFT_REFINEMENT = ("refinement compares each branch with the gradient of the loss, and drift has no loss to "
                       "descend: it is 0 at the intact model and smallest there, so its gradient is 0.")
NO_DETECTION_REFINEMENT = ("refinement compares each branch with the gradient of the loss, and the detection task "
                           "counts the detections kept: a count changes in steps, so it has no gradient.")
# Tasks whose cost has no gradient to compare a branch with, and why.
NO_REFINEMENT = {"drift": NO_DRIFT_REFINEMENT, "detections_lost": NO_DETECTION_REFINEMENT}
_TINY = torch.finfo(torch.float32).tiny


@outside_inference_mode  # sums made here are added into inside model_preserved
def refinement(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
               task: str | Task | Callable | None = None, progress: bool = True) -> pd.DataFrame:
    """Per block, cos(F(h), dL/dh) and ||F(h)|| / ||h|| averaged over samples (see
    `RepresentationResult.refinement`).

    L is each sample's cross-entropy; in eval mode samples do not interact, so the gradient of
    the batch's summed loss at h holds each sample's own dL/dh. It is taken with
    torch.autograd.grad with respect to the captured block inputs only: the parameters' `.grad`
    stay as they were. task: another task's per-sample loss takes the cross-entropy's place
    (`analyses.attribution.differentiable_loss`: the next-token NLL for `lm`, your own loss);
    drift has no loss to descend, and detections kept no gradient (ProbeError, `NO_REFINEMENT`).
    """
    task = resolve_task(task)
    if task.cost in NO_REFINEMENT:
        raise ProbeError(NO_REFINEMENT[task.cost])
    chosen = resolve_blocks(model, blocks)
    modules = dict(model.named_modules())
    device = model_device(model)
    inputs_of: dict[str, torch.Tensor] = {}
    branches: dict[str, torch.Tensor] = {}
    shapes: dict[str, tuple[int, ...]] = {}  # each block's output per sample: its stage
    # Per block: samples, samples with a cosine (F(h) and h of one shape), then sums of cosine,
    # cosine^2, ratio and ratio^2.
    sums = torch.zeros(len(chosen), 6, dtype=torch.float64, device=device)

    def record(block: Block, branch: torch.Tensor, shortcut: torch.Tensor) -> None:
        if block.name in branches:
            raise ran_twice(block)
        shapes.setdefault(block.name, sample_shape(branch, shortcut))
        branches[block.name] = branch.detach().clone()  # torchvision adds the shortcut into F(x) in place later
        if block.shortcut is None:
            inputs_of[block.name] = shortcut

    def enter(args: tuple, name: str) -> None:
        inputs_of[name] = first_tensor(args)

    with model_preserved(model), attached() as handles, torch.enable_grad():
        tap_pairs(model, chosen, record, handles)
        for block in chosen:
            if block.shortcut is not None:  # h is the block's own input, not the projected shortcut
                handles.append(modules[block.module].register_forward_pre_hook(
                    lambda _m, args, name=block.name: enter(args, name)))
        for batch in batches(data, device, dtype=input_dtype(model), progress=progress, desc="refinement"):
            inputs_of.clear()
            branches.clear()
            # Inputs that require grad make every h differentiable, also with frozen parameters.
            x = pytree.tree_map(_differentiable, batch.inputs)
            with explained_misfit(batch):
                outputs = call_model(model, x)
            hs = [inputs_of[block.name] for block in chosen]
            if not all(h.requires_grad for h in hs):
                raise ProbeError("refinement needs gradients at the block inputs; the model computes them without "
                                 "autograd (integer inputs and frozen parameters?).")
            if isinstance(task, Classification):
                loss = F.cross_entropy(logits_of(outputs).float(), class_targets(batch), reduction="sum")
            else:
                loss = differentiable_loss(task, outputs, batch)[0].sum()
            grads = torch.autograd.grad(loss, hs)
            for i, (block, h, grad) in enumerate(zip(chosen, hs, grads)):
                branch = branches[block.name]
                n = len(branch)
                f = branch.reshape(n, -1).float()  # (batch, elements)
                ratio = f.norm(dim=1) / h.detach().reshape(n, -1).float().norm(dim=1).clamp_min(_TINY)
                sums[i, 0] += n
                sums[i, 4:] += torch.stack([ratio.sum(), ratio.square().sum()]).double()
                if branch.shape == h.shape:
                    g = grad.reshape(n, -1).float()
                    cosine = (f * g).sum(dim=1) / (f.norm(dim=1) * g.norm(dim=1)).clamp_min(_TINY)
                    sums[i, 1] += n
                    sums[i, 2:4] += torch.stack([cosine.sum(), cosine.square().sum()]).double()
    totals = sums.cpu().numpy()
    cosine, cosine_std = _mean_std(totals[:, 1], totals[:, 2], totals[:, 3])
    ratio, ratio_std = _mean_std(totals[:, 0], totals[:, 4], totals[:, 5])
    numbers = stages(chosen, [shapes.get(b.name) for b in chosen])
    return pd.DataFrame({"block": [b.name for b in chosen], "position": [b.position for b in chosen],
                         "stage": numbers, "grad_cosine": cosine, "grad_cosine_std": cosine_std,
                         "step_ratio": ratio, "step_ratio_std": ratio_std, "samples": totals[:, 0].astype(np.int64)},
                        columns=REFINEMENT_COLUMNS)


def _differentiable(leaf: object) -> object:
    if isinstance(leaf, torch.Tensor) and leaf.is_floating_point():
        return leaf.detach().requires_grad_(True)
    return leaf


def _mean_std(count: np.ndarray, total: np.ndarray, squares: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and sample standard deviation from counts, sums and sums of squares."""
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = total / count
        variance = (squares - count * mean * mean) / (count - 1)
    return mean, np.where(count > 1, np.sqrt(np.clip(variance, 0, None)), np.nan)
