"""What every task builds on: `Scores` (one forward's per-sample scores), the `Task` interface,
and reading a forward's outputs as they come (`logits_of`, `output_tensors`). The tasks
themselves: `probe.scoring.tasks` (and `probe.scoring.detection`)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils import _pytree as pytree

from probe.batches import Batch
from probe.errors import ProbeError

__all__ = ["TASKS", "Scores", "Task", "logits_of", "output_tensors"]

# The built-in tasks by name (`probe.scoring.tasks.resolve_task`); here so that a command can
# check `--task` without importing the tasks' own dependencies.
TASKS = ("classification", "lm", "drift", "detection")


@dataclass
class Scores:
    """One forward's per-sample scores on one batch; every tensor is `(batch,)` unless noted.

    loss:       per-sample loss, summed over the sample's units (float64)
    weight:     units per sample (tokens); None: 1 each
    correct:    correct units per sample; None where the task has no notion of correct
    prediction: what the flip rate compares with the intact model's, `(batch, ...)`; positions
                that are not scored hold -1 in both. None: no flip rate
    extra:      further per-sample values, averaged per sample in the outcome ({"kl": ...})
    classes:    how many classes the model outputs (classification), for per-class tables
    nonfinite:  units per sample left out because their loss was not finite (NaN or Inf
                outputs); they count in none of the above. None: the task checks none
    details:    what the task's `summarize` reads of this batch (a task with dataset-level
                metrics, not ratios of sums: the detection task's per-image boxes for mAP); None
    """

    loss: torch.Tensor
    weight: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    prediction: torch.Tensor | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    classes: int | None = None
    nonfinite: torch.Tensor | None = None
    details: object = None


class Task:
    """How one forward is scored. Subclasses set `name` and `cost` and implement `score`.

    cost: the table column the verdict reads as the damage a deletion does ("accuracy_drop",
    "loss_increase", "drift" or "detections_lost"); see `probe.scoring.verdict`.
    needs_reference: `score` is given the intact model's outputs on the same batch.
    needs_targets: batches must carry targets.
    per_class: outcomes can be split by class (integer class targets).
    units: what one unit of `Scores.weight` is, for messages ("samples", "tokens").

    A task may also define `summarize(details: list) -> dict[str, float]`: metrics of one row
    over the whole data that are no ratio of sums (mAP), from its batches' `Scores.details`
    (all processes' under torchrun); they go into the outcome's `extra`.
    """

    name = "task"
    cost = "loss_increase"
    needs_reference = False
    needs_targets = True
    per_class = False
    units = "samples"

    def score(self, outputs: object, batch: Batch, reference: object | None = None) -> Scores:
        raise NotImplementedError

    # -- tables ---------------------------------------------------------------------------------

    def metrics(self, outcome) -> dict:
        """The columns of one outcome on its own (no comparison): what `attrs["baseline"]` holds."""
        row = {"loss": outcome.loss}
        if outcome.accuracy is not None:
            row["accuracy"] = outcome.accuracy
        return _with_nonfinite(row | {"samples": outcome.samples}, outcome)

    def row(self, baseline, outcome) -> dict:
        """The sweep-table columns of `outcome` (blocks deleted) against `baseline` (intact)."""
        row = {"loss": outcome.loss, "loss_increase": outcome.loss - baseline.loss,
               "loss_increase_se": outcome.loss_increase_se}
        if outcome.accuracy is not None:
            row |= {"accuracy": outcome.accuracy, "accuracy_drop": baseline.accuracy - outcome.accuracy}
        return _with_nonfinite(row, outcome)

    def describe(self) -> str:
        return self.name

    def no_verdict(self, baseline) -> str | None:
        """Why the intact model's outcome cannot support block verdicts, or None (a classifier's
        chance level is `probe.scoring.verdict.chance_warning`; other tasks may define their own)."""
        return None


def _with_nonfinite(row: dict, outcome) -> dict:
    """`row` with the outcome's `nonfinite` count as `nonfinite_outputs`, where the evaluation had
    any (a column only then: for finite outputs the tables are as they always were). Not
    `nonfinite`: that is measure's column (norms), and the per-block table holds both."""
    return row if outcome.nonfinite is None else row | {"nonfinite_outputs": outcome.nonfinite}


def _finite_only(loss: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss with its non-finite values set to 0, the mask of the finite ones): what is left out
    of every metric, and counted apart (see the module docstring)."""
    kept = torch.isfinite(loss)
    return torch.where(kept, loss, torch.zeros((), dtype=loss.dtype, device=loss.device)), kept


def _per_sample(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Sum over every dimension but the first, of the positions `mask` keeps: `(batch, ...)` ->
    `(batch,)`. Left-out positions count as 0 whatever they hold (a NaN at a padded position too)."""
    if mask is not None:
        values = torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device))
    return values.reshape(len(values), -1).sum(dim=1)


# -- outputs as they come ------------------------------------------------------------------------


def _named_logits(outputs: object) -> torch.Tensor | None:
    logits = getattr(outputs, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(outputs, dict) and isinstance(outputs.get("logits"), torch.Tensor):
        return outputs["logits"]
    return None


def logits_of(outputs: object) -> torch.Tensor:
    """The logits in a forward's outputs: the tensor itself, `.logits` (Hugging Face), a dict's
    "logits", or the first item of a tuple (Hugging Face with `return_dict=False`); a list of
    tensors (detection heads) has none."""
    if isinstance(outputs, torch.Tensor):
        return outputs
    named = _named_logits(outputs)
    if named is not None:
        return named
    # A tuple's first item, as Hugging Face returns logits with return_dict=False. A list is
    # taken for what detectors return: several heads, none of them "the" logits.
    if isinstance(outputs, tuple) and outputs and isinstance(outputs[0], torch.Tensor):
        return outputs[0]
    kind = type(outputs).__name__ + (f" with keys {list(outputs)}" if isinstance(outputs, dict) else "") + (
        f" of {len(outputs)} items" if isinstance(outputs, list) else "")
    raise ProbeError(f"the model returned a {kind}: probe cannot find class logits in it (a tensor, `.logits`, a "
                     "'logits' key or a tuple's first item). Use task='drift', which compares whole outputs, or "
                     "your own task.")


def output_tensors(outputs: object) -> list[torch.Tensor]:
    """Every tensor of a forward's outputs, in a fixed order; only the logits of an output that
    has them by name (a Hugging Face output's other fields are caches and optional states)."""
    named = _named_logits(outputs)
    if named is not None:
        return [named]
    tensors = [leaf for leaf in pytree.tree_leaves(outputs) if isinstance(leaf, torch.Tensor)]
    if not tensors:
        raise ProbeError(f"the model returned a {type(outputs).__name__} holding no tensor; drift compares output "
                         "tensors.")
    return tensors
