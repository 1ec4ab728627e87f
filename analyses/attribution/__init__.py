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

Other tasks (`probe.scoring.tasks`): the truth is the task's cost (`probe.scoring.verdict.cost_column`: the loss
increase, or the drift of the outputs), and gradient x activation differentiates minus the
task's per-sample loss (the NLL of the next tokens for `lm`, your own loss), averaged per unit
(token). Drift has no gradient proxy: it is 0 at the intact model and smallest there, so its
gradient is 0 and a first-order estimate of any deletion is 0 (`AttributionResult.notes` says so).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from dataclasses import dataclass, field

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

import probe
from analyses.registry import Analysis, Job
from probe.commands.config import RunConfig
from probe.commands.inputs import load_inputs
from probe.deletion.evaluation import single_block_sweep
from probe.deletion.block_table import check_table
from probe.scoring.tasks import Classification, CustomTask, Task, resolve_task
from probe.scoring.verdict import cost_column, rank_correlation
from probe.batches import Batch, batches, class_targets, explained_misfit, input_dtype, model_device
from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError
from probe.instrument.hooks import attached, model_preserved, outside_inference_mode, tap_pairs

__all__ = ["PROXIES", "AttributionResult", "attribution", "block_influence", "differentiable_loss",
           "gradient_x_activation", "truth_columns"]

PROXIES = ("ratio", "cosine", "block_influence", "gradient_x_activation")
SUMMARY_COLUMNS = ["proxy", "spearman_accuracy_drop", "spearman_loss_increase", "seconds", "bn_recalibrated"]
TRUTH = "measured drop (sweep)"
NO_DRIFT_GRADIENT = ("drift has no gradient proxy: the drift is 0 at the intact model and smallest there, so its "
                     "gradient is 0 and a first-order (gradient x activation) estimate of any deletion is 0.")


def truth_columns(cost: str = "accuracy_drop") -> list[str]:
    """The truth columns for a table whose cost column is `cost` (`probe.scoring.verdict.cost_column`):
    the cost, then loss_increase where the task has one. classification: accuracy_drop,
    loss_increase; lm and your own loss: loss_increase; drift: drift."""
    return [cost] if cost != "accuracy_drop" else ["accuracy_drop", "loss_increase"]


@dataclass(frozen=True)
class AttributionResult:
    """scores: one row per (block, proxy): block, position, proxy, score, and the block's
        measured accuracy_drop and loss_increase (the truth), bn_recalibrated (of the truth).
    summary: one row per proxy, then one for the truth itself (proxy "measured drop (sweep)",
        correlations NaN): spearman_accuracy_drop and spearman_loss_increase (rank correlation
        of the proxy with each truth over the blocks; NaN when undefined), seconds (wall time
        to compute the proxy over the data; ratio and cosine come from one `probe.measure`
        pass, which both rows report), bn_recalibrated.
    Other tasks: the truth columns are `truth_columns(task.cost)` (lm, your own loss:
        loss_increase; drift: drift), in scores as they are and in summary as spearman_<column>.
    notes: {proxy: why it has no score} for proxies that do not apply to the task (drift:
        gradient_x_activation, whose scores and correlations are then NaN, seconds NaN).
    """

    scores: pd.DataFrame
    summary: pd.DataFrame
    notes: dict[str, str] = field(default_factory=dict)

    def tables(self) -> dict[str, pd.DataFrame]:
        """{file stem: table}: attribution.csv (the scores), proxies.csv (the summary)."""
        return {"attribution": self.scores, "proxies": self.summary}


@outside_inference_mode  # sums made here are added into inside model_preserved
def block_influence(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
                    progress: bool = True) -> pd.DataFrame:
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
        for batch in batches(data, device, dtype=input_dtype(model), progress=progress, desc="block influence"):
            with explained_misfit(batch):
                batch.run(model)
            count += batch.size
    total = float(count)
    return pd.DataFrame([{"block": b.name, "position": b.position, "block_influence": float(sums[b.name]) / total,
                          "samples": int(total)} for b in chosen])


@outside_inference_mode  # sums made here are added into inside model_preserved
def gradient_x_activation(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
                          task: str | Task | Callable | None = None, progress: bool = True) -> pd.DataFrame:
    """captum's LayerGradientXActivation on every block's branch output, one backward per batch.

    Columns: block, position, gradient_x_activation (mean over samples of
    sum over elements of d log p(target) / dF * F; NaN for a block whose branch is not a module
    output), samples. The model runs in eval mode; its parameters' `.grad` are left as they
    were (captum differentiates with torch.autograd.grad).

    task: classification (the default) differentiates the target class's log-probability. Any
    other task differentiates minus its per-sample loss (`probe.scoring.tasks.Task.score`; your own
    function is called directly, so that its loss keeps its gradient), and the sum is divided by
    the units scored (tokens for `lm`, samples otherwise): an estimate of the loss increase per
    unit. Drift has none (ProbeError; see the module docstring).
    """
    task = resolve_task(task)
    if task.cost == "drift":
        raise ProbeError(NO_DRIFT_GRADIENT)
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
    classification = isinstance(task, Classification)

    def target_log_probability(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        log_p = F.log_softmax(model(inputs).float(), dim=1)  # (batch, classes)
        return log_p.gather(1, targets.unsqueeze(1)).squeeze(1)  # (batch,): one output per sample

    units: list[torch.Tensor] = []

    def negative_loss(_placeholder: torch.Tensor, batch: Batch) -> torch.Tensor:
        losses, weight = differentiable_loss(task, batch.run(model), batch)
        units.append(weight)
        return -losses  # (batch,): one output per sample

    layers = [modules[b.branch] for b in chosen]
    on_tensor = LayerGradientXActivation(target_log_probability, layers)
    on_batch = LayerGradientXActivation(negative_loss, layers)
    sums = torch.zeros(len(chosen), dtype=torch.float64, device=device)
    count = 0
    total_units = 0.0
    with model_preserved(model), torch.enable_grad():
        for batch in batches(data, device, dtype=input_dtype(model), progress=progress,
                             desc="gradient x activation"):
            if not chosen:
                count += batch.size
                continue
            with explained_misfit(batch):
                if classification and isinstance(batch.inputs, torch.Tensor):
                    # detach(): captum sets requires_grad on what it is given; not on the user's tensors.
                    attributions = on_tensor.attribute(batch.inputs.detach(),
                                                       additional_forward_args=(class_targets(batch),))
                    total_units += batch.size
                else:
                    # The batch rides along as an extra argument; captum gets a placeholder with
                    # one row per sample as its "inputs" (the inputs may be a dict, or integers).
                    units.clear()
                    placeholder = torch.zeros(batch.size, 1, device=device)
                    attributions = on_batch.attribute(placeholder, additional_forward_args=(batch,))
                    total_units += float(units[-1].sum())
            if isinstance(attributions, torch.Tensor):
                attributions = [attributions]
            for i, layer in enumerate(attributions):
                sums[i] += layer.detach().reshape(batch.size, -1).double().sum()
            count += batch.size
    scores = {b.name: float(sums[i]) / total_units for i, b in enumerate(chosen)}
    return pd.DataFrame([{"block": b.name, "position": b.position,
                          "gradient_x_activation": scores.get(b.name, float("nan")), "samples": count}
                         for b in every])


def differentiable_loss(task: Task, outputs: object, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sample loss with its gradient, per-sample units: tokens for `lm`, else 1) of `task`
    on one forward's outputs; ProbeError when the loss carries no gradient."""
    if isinstance(task, CustomTask):  # CustomTask.score detaches what the function returns: call it directly
        returned = task.function(outputs, batch.raw)
        losses = returned[0] if isinstance(returned, (tuple, list)) and len(returned) == 2 else returned
        if not isinstance(losses, torch.Tensor) or losses.shape != (batch.size,):
            task.score(outputs, batch)  # the task's own message for losses of the wrong form
        weight = torch.ones(batch.size, dtype=torch.float64, device=losses.device)
    else:
        scores = task.score(outputs, batch)
        losses = scores.loss
        weight = scores.weight.double() if scores.weight is not None else torch.ones_like(losses, dtype=torch.float64)
    if not losses.requires_grad:
        raise ProbeError(f"the task {task.name!r} gives losses without a gradient (detached?); gradient x "
                         "activation and refinement differentiate them.")
    return losses, weight.detach()


def _timed(compute):
    start = time.perf_counter()
    value = compute()
    return value, time.perf_counter() - start


def attribution(model: nn.Module, data: Iterable, *, table: pd.DataFrame | None = None,
                truth_seconds: float | None = None, measure_seconds: float | None = None, mode: str = "zero",
                calibration: Iterable | None = None,
                blocks: Sequence[str | Block] | None = None, task: str | Task | Callable | None = None,
                progress: bool = True) -> AttributionResult:
    """Every proxy in `PROXIES`, its cost, and its rank correlation with the measured drop.

    table: the per-block table with the truth (block, position, accuracy_drop, loss_increase),
    e.g. from `python -m probe.ablate`; when None the single-block sweep runs here and is timed.
    truth_seconds: how long that sweep took, when it ran elsewhere (NaN if unknown).
    measure_seconds: how long `probe.measure` took when `table` holds its ratio and cosine (NaN if
    unknown): those columns are then the ratio and cosine proxies; when None, measure runs here, timed.
    (Under torchrun the job's measure ran on one process's shard: its seconds are that share.)
    blocks: the blocks the table covers (names or Blocks, e.g. from a spec); all discovered when None.
    task: what the outputs mean (`probe.scoring.tasks`; classification by default); the truth is its
    cost (`truth_columns`), and a table handed in must be of the same task.
    """
    task = resolve_task(task)
    blocks = resolve_blocks(model, blocks)
    recal = calibration is not None
    if table is None:
        (table, _), truth_seconds = _timed(lambda: single_block_sweep(model, data, mode=mode, calibration=calibration,
                                                                      blocks=blocks, task=task, progress=progress))
    else:
        if "bn_recalibrated" in table.columns:
            recal = bool(table["bn_recalibrated"].iloc[0])
    cost = cost_column(table)
    if cost != task.cost:
        raise ProbeError(f"attribution: the per-block table holds {cost} (a table of another task), but the task "
                         f"{task.name!r} measures {task.cost}; pass the task the table was made with (task=).")
    truths = truth_columns(cost)
    truth = check_table(table, ["block", "position", *truths], "attribution", model, blocks=blocks)
    truth = truth[["block", "position", *truths]]
    if measure_seconds is not None and {"ratio", "cosine"} <= set(table.columns):
        stats = table[["block", "ratio", "cosine"]]  # measure's own columns, from the same model and data
    else:
        stats, measure_seconds = _timed(lambda: probe.measure(model, data, blocks=blocks, progress=progress))
    influence, influence_seconds = _timed(lambda: block_influence(model, data, blocks=blocks, progress=progress))
    notes = {}
    if task.cost == "drift":
        notes["gradient_x_activation"] = NO_DRIFT_GRADIENT
        gxa = pd.DataFrame({"block": [b.name for b in blocks], "gradient_x_activation": float("nan")})
        gxa_seconds = float("nan")
    else:
        gxa, gxa_seconds = _timed(lambda: gradient_x_activation(model, data, blocks=blocks, task=task,
                                                                progress=progress))
    proxies = {"ratio": (stats, measure_seconds), "cosine": (stats, measure_seconds),
               "block_influence": (influence, influence_seconds), "gradient_x_activation": (gxa, gxa_seconds)}
    score_tables, summary = [], []
    for proxy, (frame, seconds) in proxies.items():
        scores = truth.merge(frame[["block", proxy]], on="block").rename(columns={proxy: "score"})
        scores["proxy"] = proxy
        score_tables.append(scores)
        summary.append({"proxy": proxy, **{f"spearman_{column}": rank_correlation(scores, "score", column)
                                           for column in truths}, "seconds": seconds})
    summary.append({"proxy": TRUTH, **{f"spearman_{column}": float("nan") for column in truths},
                    "seconds": float("nan") if truth_seconds is None else float(truth_seconds)})
    score_columns = ["block", "position", "proxy", "score", *truths, "bn_recalibrated"]
    summary_columns = ["proxy", *(f"spearman_{column}" for column in truths), "seconds", "bn_recalibrated"]
    scores = pd.concat(score_tables, ignore_index=True).assign(bn_recalibrated=recal)[score_columns]
    summary = pd.DataFrame(summary).assign(bn_recalibrated=recal)[summary_columns]
    return AttributionResult(scores=scores, summary=summary, notes=notes)


def _in_job(job: Job) -> AttributionResult:
    return attribution(job.model, job.data, table=job.table, truth_seconds=job.sweep_seconds,
                       measure_seconds=job.measure_seconds, mode=job.config.mode, blocks=job.blocks, task=job.task,
                       progress=job.progress)


def _alone(config: RunConfig, out: Path, progress: bool) -> AttributionResult:
    inputs = load_inputs(config, progress=progress)
    return attribution(inputs.model, inputs.data, mode=config.mode, calibration=inputs.calibration,
                       blocks=inputs.blocks, task=resolve_task(config.task), progress=progress)


ANALYSIS = Analysis(
    name="attribution", order=30, in_job=_in_job, alone=_alone, options=("model", "ablation"),
    summary="how well cheap proxies (ratio, cosine, block influence, gradient x activation) rank the measured cost")
