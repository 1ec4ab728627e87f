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

import pandas as pd

from probe.loading.cache import cached_model
from probe.commands.config import RunConfig, check_depths
from probe.loading.datasets import load_dataset, make_loader
from probe.loading.training import TrainConfig, evaluate

__all__ = ["COLUMNS", "DEPTHS", "degradation", "summary_lines"]

DEPTHS = RunConfig.degradation_depths  # the depths of He et al. 2016 are 20, 32, 44, 56 and 110
COLUMNS = ["depth", "residual", "model", "train_accuracy", "test_accuracy", "train_loss", "test_loss",
           "train_error", "test_error", "epochs", "checkpoint", "bn_recalibrated"]


def degradation(depths: Sequence[int] = DEPTHS, *, dataset: str = "digits", epochs: int | None = None,
                seed: int = 0, device: str = "cpu", data_root: str | None = None, download: bool = False,
                limit: int | None = None, batch_size: int = 256, progress: bool = True) -> pd.DataFrame:
    """Train (or load from the cache) plain and residual nets at `depths`; evaluate each.

    Returns one row per (depth, residual), sorted by depth then plain first. Columns:
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
    return pd.DataFrame(rows, columns=COLUMNS)


def summary_lines(table: pd.DataFrame) -> list[str]:
    """The finding in words: does the deeper plain net train worse, and what do shortcuts buy?"""
    plain = table[~table["residual"]].set_index("depth")
    residual = table[table["residual"]].set_index("depth")
    lines = []
    if len(plain) >= 2:
        shallow, deep = plain.index.min(), plain.index.max()
        gap = plain.loc[shallow, "train_accuracy"] - plain.loc[deep, "train_accuracy"]
        where = f"{gap * 100:.1f} points below" if gap > 0 else "not below"
        lines.append(f"plain-{deep} trains to {plain.loc[deep, 'train_accuracy']:.1%} training accuracy, "
                     f"{where} plain-{shallow}'s {plain.loc[shallow, 'train_accuracy']:.1%}.")
    for depth in residual.index.intersection(plain.index):
        ours, theirs = residual.loc[depth, "train_accuracy"], plain.loc[depth, "train_accuracy"]
        lines.append(f"depth {depth}: the residual net trains to {ours:.1%}, the plain net to {theirs:.1%} "
                     f"({(ours - theirs) * 100:+.1f} points for the shortcuts).")
    return lines
