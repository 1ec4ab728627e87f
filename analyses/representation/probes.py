"""Linear probes (Alain and Bengio 2016): a logistic regression on each block's standardised pooled
output, fitted on training data and scored on the evaluation data."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler
from torch import nn

from analyses.representation.outputs import walk
from probe.batches import Batch, class_targets
from probe.discovery.find import Block, resolve_blocks
from probe.instrument.stages import stages
from probe.errors import ProbeError

PROBE_COLUMNS = ["block", "position", "stage", "width", "train_accuracy", "test_accuracy", "previous_test_accuracy",
                 "gain", "train_samples", "test_samples"]
_MAX_ITER = 2000  # lbfgs iterations per probe; standardised features converge well before


class _Rows:
    """Rows appended batch by batch into one array that doubles when full.

    One block of memory, not one small array per batch: small arrays kept while each batch's
    large activations come and go fragment the heap (with 10x the training samples peak RSS grew
    by 230 MB for 13 MB of features; this way by 25 MB).
    """

    def __init__(self) -> None:
        self.array: np.ndarray | None = None
        self.count = 0

    def add(self, rows: np.ndarray) -> None:
        needed = self.count + len(rows)
        if self.array is None or needed > len(self.array):
            grown = np.empty((max(2 * needed, 1024), *rows.shape[1:]), dtype=rows.dtype)
            if self.array is not None:
                grown[:self.count] = self.array[:self.count]
            self.array = grown
        self.array[self.count:needed] = rows
        self.count = needed

    def value(self) -> np.ndarray:
        return self.array[:self.count]


def _fit_probe(features: np.ndarray, targets: np.ndarray) -> Pipeline:
    # lbfgs is deterministic: the same features give the same probe, no seed needed.
    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=_MAX_ITER)).fit(features, targets)


def linear_probes(model: nn.Module, data: Iterable, *, train_data: Iterable,
                  blocks: Sequence[str | Block] | None = None, progress: bool = True) -> pd.DataFrame:
    """A logistic-regression probe on each block's standardised pooled output, fitted on
    `train_data` and scored on `data` (see `RepresentationResult.probes`).

    The training features (samples x pooled width per block) are kept to fit the probes; the
    evaluation data is scored batch by batch.
    """
    chosen = resolve_blocks(model, blocks)
    train = [_Rows() for _ in range(len(chosen) + 1)]  # the first block's input, then each output
    train_targets = _Rows()

    def keep(first: torch.Tensor, outputs: list[torch.Tensor], _model_outputs: object, batch: Batch) -> None:
        targets = class_targets(batch)
        for store, features in zip(train, [first, *outputs]):
            store.add(features.cpu().numpy())
        train_targets.add(targets.cpu().numpy())

    walk(model, train_data, chosen, keep, progress=progress, desc="probe features (train)")
    labels = train_targets.value()
    if len(np.unique(labels)) < 2:
        raise ProbeError("linear probes need at least two classes in the training data; it has only "
                         f"{np.unique(labels).tolist()}.")
    features = [store.value() for store in train]
    fitted = [_fit_probe(x, labels) for x in features]
    correct = np.zeros(len(fitted), dtype=np.int64)
    count = 0

    def score(first: torch.Tensor, outputs: list[torch.Tensor], _model_outputs: object, batch: Batch) -> None:
        nonlocal count
        truth = class_targets(batch).cpu().numpy()
        for i, (fitted_probe, x) in enumerate(zip(fitted, [first, *outputs])):
            correct[i] += int((fitted_probe.predict(x.cpu().numpy()) == truth).sum())
        count += len(truth)

    shapes = walk(model, data, chosen, score, progress=progress, desc="probe accuracy")
    test = correct / count
    rows = [{"block": block.name, "position": block.position, "stage": stage, "width": features[i + 1].shape[1],
             "train_accuracy": fitted[i + 1].score(features[i + 1], labels), "test_accuracy": test[i + 1],
             "previous_test_accuracy": test[i], "gain": test[i + 1] - test[i], "train_samples": len(labels),
             "test_samples": count}
            for i, (block, stage) in enumerate(zip(chosen, stages(chosen, shapes)))]
    return pd.DataFrame(rows, columns=PROBE_COLUMNS)
