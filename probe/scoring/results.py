"""Typed results of evaluating a model with sets of blocks deleted.

Both evaluation engines (`probe.deletion.evaluation.evaluate_ablations`, and BatchNorm recalibration in
`probe.deletion.batchnorm`) return an `Evaluation`; the sweep table, the analyses, resumable run
pieces and the report all read it. See docs/architecture.md ("Results").
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, fields

import pandas as pd
import torch

__all__ = ["Evaluation", "Outcome", "TableInfo", "table_info"]


@dataclass(frozen=True, eq=False)
class Outcome(Mapping):
    """How the model did on the data in one state (intact, or with one set of blocks deleted).

    What each number means depends on the task (`probe.scoring.tasks`); every one is a ratio of sums
    over samples. loss: mean loss per unit (cross-entropy per sample; NLL per token for `lm`;
    the drift itself for `drift`); accuracy: share of units correct (None for a task without
    one); samples: how many were evaluated; units: how many units were scored (tokens for
    `lm`; samples otherwise). flip_rate: share of units whose prediction differs from the
    intact model's (None for the intact model itself, the reference, and for tasks without
    predictions). loss_increase_se: standard error of the loss increase over the reference, from
    the paired per-sample differences (None for the reference). extra: further task metrics,
    averages per sample ({"kl": ...} for drift on logits) and those over the whole data of a
    task's `summarize` ({"map50": ...} for detection). nonfinite: units left out of every other number because
    their outputs were NaN or Inf (samples; tokens for `lm`); set on every outcome of an
    evaluation where any state had some, else None.

    Optional, when asked for: class_accuracy (index = class; NaN for a class absent from the
    data) and class_samples (the finite samples of each class); correct, a bool tensor with one
    entry per sample in data order (classification; False for a non-finite one); sample_loss and
    sample_weight, per-sample loss sums and units in data order (every task; for bootstrap
    intervals; 0 and 0 for a non-finite sample).

    It is also a read-only mapping of the fields that are set (`outcome["accuracy"]`,
    `dict(outcome)`, `"correct" in outcome`), which is how tables and JSON consume it.
    """

    accuracy: float | None
    loss: float
    samples: int
    flip_rate: float | None = None
    class_accuracy: list[float] | None = None
    class_samples: list[int] | None = None
    correct: torch.Tensor | None = None
    loss_increase_se: float | None = None
    units: int | None = None
    extra: dict[str, float] = field(default_factory=dict)
    sample_loss: torch.Tensor | None = None
    sample_weight: torch.Tensor | None = None
    nonfinite: int | None = None

    def _present(self) -> list[str]:
        return [f.name for f in fields(self) if getattr(self, f.name) is not None and getattr(self, f.name) != {}]

    def __getitem__(self, key: str):
        if key in self._present():
            return getattr(self, key)
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._present())

    def __len__(self) -> int:
        return len(self._present())

    def summary(self) -> dict:
        """accuracy, loss and samples: what a classification table's `attrs["baseline"]` holds
        (other tasks: `probe.scoring.tasks.Task.metrics`)."""
        return {"accuracy": self.accuracy, "loss": self.loss, "samples": self.samples}


@dataclass(frozen=True, eq=False)
class Evaluation:
    """The intact model's outcome and one outcome per deleted set, in the order asked for.

    With BatchNorm recalibration, `baseline` is the intact model with its statistics refitted
    on the same calibration data (every set is compared with it), and `trained_baseline` the
    intact model as given; without, `trained_baseline` is None.

    It unpacks like a pair: `baseline, outcomes = evaluate_ablations(...)`.
    """

    baseline: Outcome
    sets: list[Outcome]
    trained_baseline: Outcome | None = None
    task: object = None  # the probe.scoring.tasks.Task that scored it (None: classification)

    def __iter__(self) -> Iterator:
        return iter((self.baseline, self.sets))

    def __getitem__(self, index: int):
        return (self.baseline, self.sets)[index]

    def __len__(self) -> int:
        return 2


@dataclass(frozen=True)
class TableInfo:
    """What a per-block table is compared against and how it was judged: the metadata that holds
    for no single row, read from the table in one place (`table_info`), so that no later step
    reads `DataFrame.attrs` itself.

    baseline: the intact model's numbers, as the table's task has them ({"accuracy", "loss",
    "samples"} for classification; {} for a table without them); trained_baseline: the intact
    model as given, when the sweep refitted BatchNorm statistics (None otherwise); task: the
    task's name (None: classification, or unknown); rule: the `probe.scoring.verdict.VerdictRule`
    behind the table's verdicts (None: not classified, or the default); unsupported: why the
    table carries no verdicts (the intact model is at chance), else None; seconds: what each stage
    of a `python -m probe.ablate` run took ({} elsewhere).
    """

    baseline: dict = field(default_factory=dict)
    trained_baseline: dict | None = None
    task: str | None = None
    rule: object | None = None
    unsupported: str | None = None
    seconds: dict = field(default_factory=dict)


def table_info(table: pd.DataFrame) -> TableInfo:
    """The `TableInfo` of a per-block table (`probe.sweep`, `probe.block_table`, an analysis's
    table handed on); empty for any other object."""
    attrs = table.attrs if isinstance(table, pd.DataFrame) else {}
    trained = attrs.get("trained_baseline")
    return TableInfo(baseline=dict(attrs.get("baseline") or {}),
                     trained_baseline=dict(trained) if trained is not None else None,
                     task=attrs.get("task") or None, rule=attrs.get("rule"), unsupported=attrs.get("unsupported"),
                     seconds=dict(attrs.get("seconds") or {}))
