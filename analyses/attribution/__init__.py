"""Cheap proxies for a block's importance, scored against what deleting it really costs.

    python -m analyses.attribution --out runs/attribution

Deleting each block and re-evaluating (the sweep) is the ground truth, and costs one partial
forward pass per block. Cheaper signals exist; this analysis measures how well each one ranks
the blocks (Spearman's rank correlation with the measured drop) and what it costs (seconds):

- ``ratio``, ``cosine``: probe's own ||F(x)||/||s(x)|| and cos(F(x), s(x)) (`probe.measure`).
- ``block_influence``: ShortGPT's "block influence", 1 - cos(input, output) of a block, averaged
  over samples. We take the residual stream right before and right after the block's addition,
  s(x) and s(x) + F(x): for an identity shortcut s(x) is the block's input, for a projection it
  is the input mapped into the output's shape (where a raw cosine would be undefined).
- ``gradient_x_activation``: captum's LayerGradientXActivation on each block's branch output,
  summed over the branch's elements and averaged over samples, with the target class's
  log-probability as output. Deleting the branch sets F(x) to 0, so by a first-order Taylor
  expansion sum(dlogp/dF * F) is the log-probability the deletion would cost: a one-backward-pass
  estimate of each block's loss increase (Molchanov et al. 2017 prune with the same idea).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import probe
from probe.evaluation import single_block_sweep
from probe.table import check_table
from probe.verdict import rank_correlation
from probe.batches import batches, input_dtype, model_device
from probe.blocks import Block, resolve_blocks
from probe.errors import ProbeError
from probe.hooks import attached, model_preserved, tap_pairs

__all__ = ["PROXIES", "AttributionResult", "attribution", "block_influence", "gradient_x_activation"]

PROXIES = ("ratio", "cosine", "block_influence", "gradient_x_activation")
SCORE_COLUMNS = ["block", "position", "proxy", "score", "accuracy_drop", "loss_increase", "bn_recalibrated"]
SUMMARY_COLUMNS = ["proxy", "spearman_accuracy_drop", "spearman_loss_increase", "seconds", "bn_recalibrated"]
TRUTH = "measured drop (sweep)"


@dataclass
class AttributionResult:
    """scores: one row per (block, proxy): block, position, proxy, score, and the block's
        measured accuracy_drop and loss_increase (the truth), bn_recalibrated (of the truth).
    summary: one row per proxy, then one for the truth itself (proxy "measured drop (sweep)",
        correlations NaN): spearman_accuracy_drop and spearman_loss_increase (rank correlation
        of the proxy with each truth over the blocks; NaN when undefined), seconds (wall time
        to compute the proxy over the data; ratio and cosine come from one `probe.measure`
        pass, which both rows report), bn_recalibrated.
    """

    scores: pd.DataFrame
    summary: pd.DataFrame


def block_influence(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
                    progress: bool = False) -> pd.DataFrame:
    """ShortGPT's block influence per block: mean over samples of 1 - cos(s(x), s(x) + F(x)).

    Columns: block, position, block_influence, samples. 0: the block leaves the residual
    stream's direction as it was; larger: it turns it.
    """
    chosen = resolve_blocks(model, blocks)
    device = model_device(model)
    sums = {block.name: torch.zeros((), dtype=torch.float64, device=device) for block in chosen}
    count = torch.zeros((), dtype=torch.float64, device=device)
    tiny = torch.finfo(torch.float32).tiny

    def record(block: Block, branch: torch.Tensor, shortcut: torch.Tensor) -> None:
        s = shortcut.reshape(len(shortcut), -1).float()  # (batch, elements)
        out = s + branch.reshape(len(branch), -1).float()  # the stream after the addition
        cosine = (s * out).sum(dim=1) / (s.norm(dim=1) * out.norm(dim=1)).clamp_min(tiny)
        sums[block.name] += (1.0 - cosine).double().sum()

    with model_preserved(model), attached() as handles, torch.no_grad():
        tap_pairs(model, chosen, record, handles)
        for inputs, _targets in batches(data, device, dtype=input_dtype(model), progress=progress,
                                        desc="block influence"):
            model(inputs)
            count += len(inputs)
    total = float(count)
    return pd.DataFrame([{"block": b.name, "position": b.position, "block_influence": float(sums[b.name]) / total,
                          "samples": int(total)} for b in chosen])


def gradient_x_activation(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
                          progress: bool = False) -> pd.DataFrame:
    """captum's LayerGradientXActivation on every block's branch output, one backward per batch.

    Columns: block, position, gradient_x_activation (mean over samples of
    sum over elements of d log p(target) / dF * F; NaN for a block whose branch is not a module
    output), samples. The model runs in eval mode; its parameters' `.grad` are left as they
    were (captum differentiates with torch.autograd.grad).
    """
    try:
        from captum.attr import LayerGradientXActivation
    except ImportError as error:  # a declared dependency, but a hand-made environment may lack it
        raise ProbeError(f"gradient x activation needs captum, which cannot be imported here ({error}); "
                         "pip install captum.") from error

    every = resolve_blocks(model, blocks)
    # captum attributes to a module's output: blocks whose F(x) is a module output ("hooks"
    # blocks: every ResNet's). A branch that ends in a function has no layer to attribute to.
    chosen = [b for b in every if getattr(b, "strategy", "hooks") == "hooks"]
    modules = dict(model.named_modules())
    device = model_device(model)

    def target_log_probability(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(model(inputs).float(), dim=1)  # (batch, classes)
        return log_p.gather(1, targets.unsqueeze(1)).squeeze(1)  # (batch,): one output per sample

    method = LayerGradientXActivation(target_log_probability, [modules[b.branch] for b in chosen])
    sums = torch.zeros(len(chosen), dtype=torch.float64, device=device)
    count = 0
    with model_preserved(model), torch.enable_grad():
        for inputs, targets in batches(data, device, dtype=input_dtype(model), progress=progress,
                                       desc="gradient x activation"):
            if not chosen:
                count += len(inputs)
                continue
            # detach(): captum sets requires_grad on what it is given; not on the user's tensors.
            attributions = method.attribute(inputs.detach(), additional_forward_args=(targets,))
            if isinstance(attributions, torch.Tensor):
                attributions = [attributions]
            for i, layer in enumerate(attributions):
                sums[i] += layer.detach().reshape(len(inputs), -1).double().sum()
            count += len(inputs)
    scores = {b.name: float(sums[i]) / count for i, b in enumerate(chosen)}
    return pd.DataFrame([{"block": b.name, "position": b.position,
                          "gradient_x_activation": scores.get(b.name, float("nan")), "samples": count}
                         for b in every])


def _timed(compute):
    start = time.perf_counter()
    value = compute()
    return value, time.perf_counter() - start


def attribution(model: nn.Module, data: Iterable, table: pd.DataFrame | None = None, *,
                truth_seconds: float | None = None, mode: str = "zero", calibration: Iterable | None = None,
                blocks: Sequence[str | Block] | None = None, progress: bool = True) -> AttributionResult:
    """Every proxy in `PROXIES`, its cost, and its rank correlation with the measured drop.

    table: the per-block table with the truth (block, position, accuracy_drop, loss_increase),
    e.g. from `python -m probe.ablate`; when None the single-block sweep runs here and is timed.
    truth_seconds: how long that sweep took, when it ran elsewhere (NaN if unknown).
    blocks: the blocks the table covers (names or Blocks, e.g. from a spec); all discovered when None.
    """
    blocks = resolve_blocks(model, blocks)
    recal = calibration is not None
    if table is None:
        (table, _), truth_seconds = _timed(lambda: single_block_sweep(model, data, mode=mode, calibration=calibration,
                                                                      blocks=blocks, progress=progress))
    else:
        if "bn_recalibrated" in table.columns:
            recal = bool(table["bn_recalibrated"].iloc[0])
    truth = check_table(table, ["block", "position", "accuracy_drop", "loss_increase"], "attribution", model,
                        blocks)
    truth = truth[["block", "position", "accuracy_drop", "loss_increase"]]
    stats, measure_seconds = _timed(lambda: probe.measure(model, data, blocks=blocks, progress=progress))
    influence, influence_seconds = _timed(lambda: block_influence(model, data, blocks=blocks, progress=progress))
    gxa, gxa_seconds = _timed(lambda: gradient_x_activation(model, data, blocks=blocks, progress=progress))
    proxies = {"ratio": (stats, measure_seconds), "cosine": (stats, measure_seconds),
               "block_influence": (influence, influence_seconds), "gradient_x_activation": (gxa, gxa_seconds)}
    score_tables, summary = [], []
    for proxy, (frame, seconds) in proxies.items():
        scores = truth.merge(frame[["block", proxy]], on="block").rename(columns={proxy: "score"})
        scores["proxy"] = proxy
        score_tables.append(scores)
        summary.append({"proxy": proxy, "spearman_accuracy_drop": rank_correlation(scores, "score", "accuracy_drop"),
                        "spearman_loss_increase": rank_correlation(scores, "score", "loss_increase"),
                        "seconds": seconds})
    summary.append({"proxy": TRUTH, "spearman_accuracy_drop": float("nan"), "spearman_loss_increase": float("nan"),
                    "seconds": float("nan") if truth_seconds is None else float(truth_seconds)})
    scores = pd.concat(score_tables, ignore_index=True).assign(bn_recalibrated=recal)[SCORE_COLUMNS]
    return AttributionResult(scores=scores, summary=pd.DataFrame(summary).assign(bn_recalibrated=recal)[SUMMARY_COLUMNS])
