"""What a forward's outputs mean and how each sample is scored: the task.

Every evaluating function takes `task=`: "classification" (the default), "lm", "drift", "detection", a
`Task`, or a user's function. A task turns one forward's outputs on one batch into per-sample
`Scores`; the evaluation engines (`probe.deletion.evaluation`, `probe.deletion.batchnorm`) sum them, so every
metric is a ratio of sums over samples (which is also what `all_reduce` needs under torchrun):

    loss      = sum of per-sample losses / sum of weights
    accuracy  = sum of per-sample correct units / sum of weights
    flip_rate = units whose prediction changed from the intact model's / sum of weights

A sample's weight is how many units it scores: 1 for a classified image, the number of
predicted tokens for a sequence (so `loss` is the mean NLL per token, and perplexity its exp).

A unit whose loss is not finite (NaN or Inf outputs: a NaN pixel, an overflow) is left out of
every metric (weight 0: neither right nor wrong, no loss, no flip) and counted apart in
`Scores.nonfinite`, which the outcome reports as `nonfinite` and the tables as
`nonfinite_outputs` (`probe.scoring.tally` warns).

- `classification`: class logits `(batch, classes)`, one integer label per sample;
  cross-entropy, accuracy, and the flip rate of the predicted class.
- `lm`: causal language modeling on token ids `(batch, seq)`; next-token NLL over predicted
  positions, padding excluded through the attention mask (and labels of -100), perplexity,
  top-1 next-token accuracy, and the flip rate of the argmax token.
- `drift`: no labels. Per sample, the relative L2 distance between the outputs with blocks
  deleted and the intact model's outputs, over all output tensors; with logits (an output with
  `.logits`, or `Drift(logits=True)`) also the KL divergence from the intact prediction.
- `detection`: a detector's detections matched with the intact model's (or the ground truth),
  mAP beside them (`probe.scoring.detection`).
- your own: a function `(outputs, batch) -> losses` or `-> (losses, correct)`, one value per
  sample, where `batch` is the batch as your data gave it (on the model's device).

Outputs may come as a tensor, a tuple (Hugging Face's `return_dict=False`), a list (detection
heads), a dict, or an object with `.logits` (Hugging Face). Which part holds the logits:
`logits_of`; drift compares every output tensor (`output_tensors`).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from probe.batches import Batch, check_targets_fit, class_targets
from probe.errors import ProbeError
from probe.imports import import_attribute
from probe.scoring.detection import Detection
from probe.scoring.scores import (TASKS, Scores, Task, _finite_only, _named_logits, _per_sample, _with_nonfinite, logits_of,
                                  output_tensors)

__all__ = ["TASKS", "Classification", "CustomTask", "Detection", "Drift", "LanguageModeling", "Scores", "Task",
           "logits_of", "output_tensors", "resolve_task"]



class Classification(Task):
    """Class logits and one integer label per sample: cross-entropy, accuracy, flip rate."""

    name = "classification"
    cost = "accuracy_drop"
    per_class = True

    def score(self, outputs: object, batch: Batch, reference: object | None = None) -> Scores:
        logits = logits_of(outputs)
        targets = class_targets(batch)
        if logits.dim() != 2 or len(logits) != batch.size:
            raise ProbeError(
                f"the classification task needs class logits of shape (batch, classes); the model gave "
                f"{tuple(logits.shape)} for {batch.size} samples. For token logits use task='lm'; for any other "
                "output, task='drift' or your own task.")
        check_targets_fit(logits, targets)
        logits = logits.float()
        # A row with a NaN or +Inf logit has a NaN or Inf loss, and an argmax that means nothing
        # (NaN counts as the largest): left out, not counted right or wrong.
        loss, kept = _finite_only(F.cross_entropy(logits, targets, reduction="none"))
        prediction = logits.argmax(dim=1)
        return Scores(loss=loss, weight=kept, correct=(prediction == targets) & kept,
                      prediction=torch.where(kept, prediction, -1), classes=logits.shape[1], nonfinite=~kept)

    def metrics(self, outcome) -> dict:
        return _with_nonfinite({"accuracy": outcome.accuracy, "loss": outcome.loss, "samples": outcome.samples},
                               outcome)

    def row(self, baseline, outcome) -> dict:
        return _with_nonfinite({"accuracy": outcome.accuracy, "loss": outcome.loss,
                                "accuracy_drop": baseline.accuracy - outcome.accuracy,
                                "loss_increase": outcome.loss - baseline.loss, "flip_rate": outcome.flip_rate},
                               outcome)


class LanguageModeling(Task):
    """Causal language modeling: position t's logits predict token t + 1.

    Token ids come from the batch's `labels` (or targets) when given, else from its inputs
    (`input_ids`, or the input tensor). A position is scored when the attention mask holds 1 at
    both t and t + 1, the label at t + 1 is not -100 (Hugging Face's "ignore"), and its loss is
    finite (else it is counted in `nonfinite`).

    A batch of two integer tensors of one shape given by position (`TensorDataset(input_ids,
    attention_mask)`) is refused unless the second is the token ids themselves (labels): it may
    be a mask, which would be scored as the next tokens.
    """

    name = "lm"
    units = "tokens"

    def score(self, outputs: object, batch: Batch, reference: object | None = None) -> Scores:
        logits = logits_of(outputs)
        tokens = self._tokens(batch)
        if logits.dim() != 3 or logits.shape[:2] != tokens.shape:
            raise ProbeError(
                f"the lm task needs token logits of shape (batch, seq, vocab) for token ids {tuple(tokens.shape)}; "
                f"the model gave {tuple(logits.shape)}. Is this a causal language model?")
        valid = tokens[:, 1:] != -100
        mask = batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None
        if mask is not None:
            mask = mask.bool()
            valid &= mask[:, 1:] & mask[:, :-1]
        # Every position's log-softmax over the vocabulary as rows of one contiguous (positions,
        # vocab) view: over a large vocabulary (49,152 for SmolLM2) that is 10x more accurate in
        # float32 than over a strided class dimension (1e-5 against 1e-4 nats), and 2x faster than
        # float64. The last position predicts nothing: its target is a placeholder, dropped below.
        following = torch.cat([tokens[:, 1:], tokens[:, :1]], dim=1).clamp_min(0)  # -100 -> 0, masked out
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), following.reshape(-1),
                              reduction="none").view(tokens.shape)[:, :-1]  # (batch, seq - 1)
        # A position whose logits hold NaN or +Inf (its NLL is not finite): left out, counted apart.
        finite = torch.isfinite(nll)
        nonfinite = (valid & ~finite).sum(dim=1)
        valid &= finite
        prediction = logits[:, :-1].argmax(dim=2)
        targets = tokens[:, 1:]
        weight = valid.sum(dim=1)
        return Scores(loss=_per_sample(nll.double(), valid), weight=weight,
                      correct=_per_sample((prediction == targets) & valid),
                      prediction=torch.where(valid, prediction, -1), nonfinite=nonfinite)

    @staticmethod
    def _tokens(batch: Batch) -> torch.Tensor:
        _check_not_a_mask(batch)
        tokens = batch.targets
        if tokens is None:
            tokens = batch.inputs.get("input_ids") if isinstance(batch.inputs, dict) else batch.inputs
        if not isinstance(tokens, torch.Tensor) or tokens.is_floating_point() or tokens.dim() != 2:
            found = f"{tokens.dtype} {tuple(tokens.shape)}" if isinstance(tokens, torch.Tensor) else type(tokens).__name__
            raise ProbeError(f"the lm task needs integer token ids of shape (batch, seq) as the inputs, `input_ids` or "
                             f"`labels`; the batch has {found}.")
        return tokens.long()

    def metrics(self, outcome) -> dict:
        return _with_nonfinite({"loss": outcome.loss, "perplexity": _exp(outcome.loss),
                                "token_accuracy": outcome.accuracy, "tokens": outcome.units,
                                "samples": outcome.samples}, outcome)

    def row(self, baseline, outcome) -> dict:
        return _with_nonfinite({"loss": outcome.loss, "perplexity": _exp(outcome.loss),
                                "token_accuracy": outcome.accuracy, "loss_increase": outcome.loss - baseline.loss,
                                "loss_increase_se": outcome.loss_increase_se,
                                "perplexity_ratio": _exp(outcome.loss - baseline.loss),
                                "token_accuracy_drop": baseline.accuracy - outcome.accuracy,
                                "token_flip_rate": outcome.flip_rate, "tokens": outcome.units}, outcome)


def _check_not_a_mask(batch: Batch) -> None:
    """Refuse (inputs, targets) given by position as two integer tensors of one shape whose second
    is not the token ids: `TensorDataset(input_ids, attention_mask)` reads like (ids, labels)."""
    inputs, targets = batch.inputs, batch.targets
    if not (batch.targets_by_position and isinstance(inputs, torch.Tensor) and isinstance(targets, torch.Tensor)
            and inputs.shape == targets.shape and inputs.dim() == 2
            and not inputs.is_floating_point() and not targets.is_floating_point()):
        return
    labelled = targets != -100
    if bool(torch.equal(targets[labelled], inputs[labelled].to(targets.dtype))):
        return  # (input_ids, labels): the labels are the ids, -100 where nothing is predicted
    raise ProbeError(
        f"batch {batch.number} is two integer tensors of one shape {tuple(inputs.shape)} given by position, "
        "and the second is not the token ids: task='lm' would score it as the next tokens, but it may be an "
        "attention_mask. Name the parts: batches as dicts {'input_ids': ..., 'attention_mask': ...} (or "
        "'labels'), or probe.Data(data, inputs=lambda b: {'input_ids': b[0], 'attention_mask': b[1]}, "
        "targets=None).")


def _exp(value: float) -> float:
    return math.exp(value) if value < 700 else math.inf


class Drift(Task):
    """How far the outputs move from the intact model's: per sample, ||out - ref|| / ||ref|| over
    all output tensors (flattened and joined), and with logits the KL divergence
    KL(softmax(ref) || softmax(out)), summed over the last dimension and averaged over the others.

    logits: None finds the logits by themselves (an output with `.logits` or a "logits" key);
    True treats the whole output (a tensor, or a tuple's first item) as logits; False: no KL.
    """

    name = "drift"
    cost = "drift"
    needs_reference = True
    needs_targets = False

    def __init__(self, logits: bool | None = None) -> None:
        self.logits = logits

    def score(self, outputs: object, batch: Batch, reference: object | None = None) -> Scores:
        current = output_tensors(outputs)
        if reference is None:  # the intact model itself: no drift (where its outputs are finite)
            zero = torch.zeros(batch.size, dtype=torch.float64, device=current[0].device)
            kept = torch.isfinite(sum((_per_sample(t.double().square()) for t in current
                                       if t.dim() > 0 and len(t) == batch.size), zero))
            return Scores(loss=zero, weight=kept, nonfinite=~kept,
                          extra={"kl": zero} if self._kl_logits(outputs) is not None else {})
        before = output_tensors(reference)
        self._check_samples([*current, *before], batch)
        difference = sum(_per_sample((a.double() - b.double()).square()) for a, b in zip(current, before))
        size = sum(_per_sample(b.double().square()) for b in before)
        drift = difference.sqrt() / size.sqrt().clamp_min(torch.finfo(torch.float64).tiny)
        extra = {}
        logits, reference_logits = self._kl_logits(outputs), self._kl_logits(reference)
        if logits is not None:
            log_p = F.log_softmax(reference_logits.double(), dim=-1)
            log_q = F.log_softmax(logits.double(), dim=-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(dim=-1)  # (batch, ...)
            extra["kl"] = kl.reshape(batch.size, -1).mean(dim=1)
        # Non-finite outputs (here or in the intact model's): left out, counted apart.
        drift, kept = _finite_only(drift)
        if "kl" in extra:
            kl, kept_kl = _finite_only(extra["kl"])
            kept &= kept_kl
            extra["kl"], drift = torch.where(kept, kl, 0.0), torch.where(kept, drift, 0.0)
        return Scores(loss=drift, weight=kept, extra=extra, nonfinite=~kept)

    @staticmethod
    def _check_samples(tensors: list[torch.Tensor], batch: Batch) -> None:
        for tensor in tensors:
            if tensor.dim() == 0 or len(tensor) != batch.size:
                raise ProbeError(f"the drift task needs every output tensor to hold the samples along its first "
                                 f"dimension; one has shape {tuple(tensor.shape)} for {batch.size} samples.")

    def _kl_logits(self, outputs: object) -> torch.Tensor | None:
        if self.logits is False:
            return None
        if self.logits:
            return logits_of(outputs)
        return _named_logits(outputs)

    def metrics(self, outcome) -> dict:
        return _with_nonfinite({"samples": outcome.samples}, outcome)

    def row(self, baseline, outcome) -> dict:
        row = {"drift": outcome.loss, "drift_se": outcome.loss_increase_se}
        if "kl" in outcome.extra:
            row["kl"] = outcome.extra["kl"]
        return _with_nonfinite(row, outcome)


class CustomTask(Task):
    """A user's scoring function: `function(outputs, batch)` returns per-sample losses, a
    `(batch,)` tensor, or `(losses, correct)` with `correct` a `(batch,)` bool or 0/1 tensor.
    `batch` is the batch as the data gave it, on the model's device. A sample whose loss is not
    finite is left out (and counted in `nonfinite`), as with every task."""

    needs_targets = False

    def __init__(self, function: Callable, name: str | None = None) -> None:
        self.function = function
        self.name = name or getattr(function, "__qualname__", type(function).__name__)

    def score(self, outputs: object, batch: Batch, reference: object | None = None) -> Scores:
        returned = self.function(outputs, batch.raw)
        losses, correct = returned if isinstance(returned, (tuple, list)) and len(returned) == 2 else (returned, None)
        losses, kept = _finite_only(self._check(losses, batch, "losses").double())
        if correct is None:
            return Scores(loss=losses, weight=kept, nonfinite=~kept)
        return Scores(loss=losses, weight=kept, correct=self._check(correct, batch, "correct").double() * kept,
                      nonfinite=~kept)

    def _check(self, value: object, batch: Batch, what: str) -> torch.Tensor:
        if not isinstance(value, torch.Tensor) or value.shape != (batch.size,):
            found = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
            raise ProbeError(f"task {self.name!r} returned {what} of {found} for a batch of {batch.size}; it must "
                             f"return one value per sample, a tensor of shape ({batch.size},), or (losses, correct).")
        return value

    def describe(self) -> str:
        return f"your task {self.name}"


def resolve_task(task: str | Task | Callable | None) -> Task:
    """A Task from what a user passed: None or "classification", "lm", "drift", "detection", a Task, a
    function `(outputs, batch) -> losses`, or "package.module:function"."""
    if task is None or task == "classification":
        return Classification()
    if isinstance(task, Task):
        return task
    if task == "lm":
        return LanguageModeling()
    if task == "drift":
        return Drift()
    if task == "detection":
        return Detection()
    if isinstance(task, str) and ":" in task:
        found = _import_function(task)
        return found if isinstance(found, Task) else CustomTask(found, name=task)
    if callable(task) and not isinstance(task, type):
        return CustomTask(task)
    raise ProbeError(f"unknown task {task!r}; use 'classification', 'lm', 'drift', 'detection', a function (outputs, batch) -> "
                     "per-sample losses, or 'package.module:function'.")


def _import_function(spec: str) -> Callable | Task:
    found = import_attribute(spec, "task")
    if isinstance(found, type) and issubclass(found, Task):
        raise ProbeError(f"task {spec!r} is a Task class; name an instance or a function (outputs, batch) -> losses.")
    if isinstance(found, Task):
        return found
    if not callable(found) or len(inspect.signature(found).parameters) < 2:
        raise ProbeError(f"task {spec!r} is not a function (outputs, batch) -> per-sample losses.")
    return found
