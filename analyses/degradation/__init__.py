"""The degradation problem: plain networks get worse as they get deeper; residual ones do not.

    python -m analyses.degradation --depths 20 32 44 56 --out runs/degradation

Trains a plain and a residual CIFAR-style network at each depth with the same recipe (He et
al. 2016, sec. 4.2: the plain net is the residual one without its shortcuts), through the model
cache, so a rerun loads instead of training. Each is evaluated on the full training and test
splits. He et al. 2016 (Fig. 1 and 6) found that a plain 56-layer net has *higher training
error* than a plain 20-layer one: not overfitting, an optimisation failure that the shortcuts
remove.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from analyses.registry import Analysis, Job
from probe.batches import device_for
from probe.scoring.tasks import Classification, Task
from probe.loading.cache import cached_model
from probe.commands.config import RunConfig, check_depths
from probe.loading.datasets import load_dataset, make_loader
from probe.loading.training import TrainConfig, evaluate

__all__ = ["COLUMNS", "DEPTHS", "DegradationResult", "degradation"]

DEPTHS = RunConfig.degradation_depths  # the depths of He et al. 2016 are 20, 32, 44, 56 and 110
COLUMNS = ["depth", "residual", "model", "train_accuracy", "test_accuracy", "train_loss", "test_loss",
           "train_error", "test_error", "epochs", "checkpoint", "bn_recalibrated"]


@dataclass(frozen=True)
class DegradationResult:
    """table: one row per (depth, residual), columns `COLUMNS` (documented on `degradation`)."""

    table: pd.DataFrame

    def tables(self) -> dict[str, pd.DataFrame]:
        """{file stem: table}: degradation.csv."""
        return {"degradation": self.table}


def degradation(depths: Sequence[int] = DEPTHS, *, dataset: str = "digits", epochs: int | None = None,
                seed: int = 0, device: str = "cpu", data_root: str | None = None, download: bool = False,
                limit: int | None = None, batch_size: int = 256, progress: bool = True) -> DegradationResult:
    """Train (or load from the cache) plain and residual nets at `depths`; evaluate each.

    Its table has one row per (depth, residual), sorted by depth then plain first. Columns:
    depth, residual (bool), model ("plain56", "resnet56"), train_accuracy / test_accuracy
    (fractions, `probe.loading.training.evaluate` in eval mode on the whole split), train_loss / test_loss
    (mean cross-entropy), train_error / test_error (1 - accuracy), epochs, checkpoint (cache
    path), bn_recalibrated (always False: nothing is deleted here).
    `epochs=None` uses the trainer's default; `limit` trains and evaluates on the first `limit`
    samples of each split (quick runs and tests).
    """
    depths = check_depths(depths)
    loaders = {split: make_loader(load_dataset(dataset, split=split, root=data_root, download=download, seed=seed),
                                  batch_size=batch_size, limit=limit)
               for split in ("train", "test")}
    rows = []
    for depth in depths:
        for residual in (False, True):
            name = f"{'resnet' if residual else 'plain'}{depth}"
            fields = {"epochs": epochs} if epochs is not None else {}
            # The same fields probe.ablate uses, so the resnet it trained is found in the cache.
            config = TrainConfig(model=name, dataset=dataset, seed=seed, device=str(device), data_root=data_root,
                                 download=download, limit=limit, **fields)
            model, path = cached_model(config, progress=progress)
            train_loss, train_accuracy = evaluate(model, loaders["train"], device)
            test_loss, test_accuracy = evaluate(model, loaders["test"], device)
            rows.append({"depth": depth, "residual": residual, "model": name,
                         "train_accuracy": train_accuracy, "test_accuracy": test_accuracy,
                         "train_loss": train_loss, "test_loss": test_loss,
                         "train_error": 1.0 - train_accuracy, "test_error": 1.0 - test_accuracy,
                         "epochs": config.epochs, "checkpoint": str(path), "bn_recalibrated": False})
    return DegradationResult(pd.DataFrame(rows, columns=COLUMNS))


def _in_job(job: Job) -> DegradationResult:
    config = job.config
    return degradation(config.degradation_depths, dataset=config.dataset, epochs=config.epochs, seed=config.seed,
                       device=job.device, data_root=config.data_root, download=config.download,
                       batch_size=config.batch_size, progress=job.progress)


def _alone(config: RunConfig, out: Path, progress: bool) -> DegradationResult:
    return degradation(config.degradation_depths, dataset=config.dataset, epochs=config.epochs, seed=config.seed,
                       device=str(device_for(config.device)), data_root=config.data_root, download=config.download,
                       limit=config.limit, batch_size=config.batch_size, progress=progress)


def _applies(task: Task, config: RunConfig) -> str | None:
    if isinstance(task, Classification):
        return None
    return (f"degradation trains plain and residual classifiers of its own on {config.dataset}; it does not apply "
            f"to the task {task.name!r}.")


def _off_by_default(config: RunConfig) -> str | None:
    # Degradation trains its own plain and residual nets: only a run that trains is asked for it.
    if config.checkpoint or config.weights:
        return ("the model came from a checkpoint; degradation trains its own plain and residual networks, ask for "
                "it with --sections.")
    return None


ANALYSIS = Analysis(
    name="degradation", order=10, in_job=_in_job, alone=_alone, options=("degradation",),
    summary="plain against residual networks as depth grows: the degradation problem",
    applies=_applies, off_by_default=_off_by_default)
