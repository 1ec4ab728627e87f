"""Train a model on a data set: a seeded, deterministic (on CPU) SGD loop with a cosine schedule.

The command `python -m probe.train` (probe/train.py) is this module's entry point.

The defaults of `TrainConfig` take a CIFAR-style ResNet-56 to ~99% test accuracy on the digits
data set in about a minute on 2 CPU cores.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from probe.loading.datasets import dataset_info, load_dataset, make_loader
from probe.errors import ProbeError
from probe.loading.models import build_model
from probe.loading.recipe import TrainConfig

__all__ = [
    "HISTORY_COLUMNS", "TrainConfig", "build_for", "default_checkpoint_path",
    "evaluate", "train", "train_model",
]

# Columns of the DataFrame `train` returns, one row per epoch.
HISTORY_COLUMNS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy")


def _device(device: str | torch.device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ProbeError(f"unknown device {device!r}; use e.g. 'cpu' or 'cuda'.") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ProbeError(f"device {device!r} requested but CUDA is not available; use 'cpu'.")
    return dev


def evaluate(
    model: nn.Module, loader, device: str | torch.device = "cpu"
) -> tuple[float, float]:
    """(mean cross-entropy loss, accuracy as a fraction) of `model` over `loader`, in eval mode.

    `loader` yields `(inputs, targets)` batches; inputs go to `device`, where the model must be.
    The model's training flag is restored afterwards, also on error.
    """
    dev = _device(device)
    was_training = model.training
    loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
    correct = torch.zeros((), dtype=torch.int64, device=dev)
    count = 0
    model.eval()
    try:
        with torch.no_grad():
            for inputs, targets in loader:
                inputs, targets = inputs.to(dev), targets.to(dev)
                logits = model(inputs)  # (batch, num_classes)
                loss_sum += nn.functional.cross_entropy(logits, targets, reduction="sum").double()
                correct += (logits.argmax(dim=1) == targets).sum()
                count += targets.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise ProbeError("cannot evaluate on an empty data set (the loader yielded no samples).")
    # One device sync for the whole pass.
    return loss_sum.item() / count, correct.item() / count


def train(
    model: nn.Module,
    train_loader,
    *,
    epochs: int,
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    device: str | torch.device = "cpu",
    progress: bool = True,
    test_loader=None,
) -> pd.DataFrame:
    """Train `model` in place with SGD + momentum and a per-step cosine learning-rate decay.

    Returns a tidy history, one row per epoch, with columns `HISTORY_COLUMNS`:
    `train_loss`/`train_accuracy` are running means over the epoch's batches (train mode);
    `test_loss`/`test_accuracy` come from `evaluate` on `test_loader` (NaN without one).
    Accuracies are fractions in [0, 1]. The model is left on `device`, in eval mode.
    Deterministic on CPU given the model's initial weights and a seeded loader.
    """
    if not isinstance(epochs, int) or epochs < 1:
        raise ProbeError(f"epochs must be a positive integer, got {epochs!r}.")
    dev = _device(device)
    model.to(dev)
    steps_per_epoch = len(train_loader)
    if steps_per_epoch == 0:
        raise ProbeError("cannot train on an empty data set (the loader yields no batches).")
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay
    )
    # Cosine from lr to 0 over all steps: no schedule constants to tune per run length.
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / total_steps))
    )
    rows = []
    bar = tqdm(total=total_steps, disable=not progress, unit="batch", file=sys.stderr)
    try:
        for epoch in range(1, epochs + 1):
            bar.set_description(f"epoch {epoch}/{epochs}")
            model.train()
            loss_sum = torch.zeros((), dtype=torch.float64, device=dev)
            correct = torch.zeros((), dtype=torch.int64, device=dev)
            count = 0
            for inputs, targets in train_loader:
                inputs, targets = inputs.to(dev), targets.to(dev)
                logits = model(inputs)  # (batch, num_classes)
                loss = nn.functional.cross_entropy(logits, targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                loss_sum += loss.detach().double() * targets.numel()
                correct += (logits.detach().argmax(dim=1) == targets).sum()
                count += targets.numel()
                bar.update(1)
            train_loss, train_acc = loss_sum.item() / count, correct.item() / count
            if not math.isfinite(train_loss):
                raise ProbeError(
                    f"training diverged in epoch {epoch} (loss {train_loss}); try a smaller lr "
                    f"than {lr}."
                )
            test_loss = test_acc = float("nan")
            if test_loader is not None:
                test_loss, test_acc = evaluate(model, test_loader, dev)
            rows.append((epoch, train_loss, train_acc, test_loss, test_acc))
            postfix = {"loss": f"{train_loss:.3f}", "acc": f"{train_acc:.3f}"}
            if test_loader is not None:
                postfix["test_acc"] = f"{test_acc:.3f}"
            bar.set_postfix(postfix)
    finally:
        bar.close()
        model.eval()
    return pd.DataFrame(rows, columns=list(HISTORY_COLUMNS))


def _loaders(config: TrainConfig):
    common = {"root": config.data_root, "download": config.download, "seed": config.seed}
    train_set = load_dataset(config.dataset, split="train", **common)
    test_set = load_dataset(config.dataset, split="test", **common)
    train_loader = make_loader(
        train_set, batch_size=config.batch_size, shuffle=True, seed=config.seed,
        limit=config.limit,
    )
    test_loader = make_loader(test_set, batch_size=256, shuffle=False, limit=config.limit)
    return train_loader, test_loader


def build_for(config: TrainConfig) -> nn.Module:
    """The untrained model `config` names, sized for its data set (classes, input channels)."""
    info = dataset_info(config.dataset, root=config.data_root)
    return build_model(config.model, num_classes=info.num_classes, in_channels=info.in_channels)


def train_model(config: TrainConfig, *, progress: bool = True) -> tuple[nn.Module, pd.DataFrame]:
    """Build the model and data `config` names, train, and return (model in eval mode, history).

    Seeds torch with `config.seed` before building the model, and trains with a fixed number of
    CPU threads (`training_threads`), so runs repeat bit for bit on CPU: the backward pass sums
    in another order with another thread count, and the trained-model cache is keyed by
    `config` alone. torch's thread count is put back afterwards.
    `history.attrs["config"]` holds the config as a dict.
    """
    dev = _device(config.device)
    torch.manual_seed(config.seed)
    model = build_for(config)
    train_loader, test_loader = _loaders(config)
    with _threads(training_threads()):
        history = _train(config, model, train_loader, test_loader, dev, progress)
    history.attrs["config"] = asdict(config)
    return model, history


def training_threads() -> int:
    """The CPU threads training uses: 2 (1 on a one-core machine), or what OMP_NUM_THREADS or
    MKL_NUM_THREADS says. Not the free cores `probe.commands.threads` picks for evaluation: the weights
    must not depend on how busy the machine was."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        if os.environ.get(variable, "").isdigit() and int(os.environ[variable]) > 0:
            return int(os.environ[variable])
    return max(1, min(2, os.cpu_count() or 1))


@contextlib.contextmanager
def _threads(count: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _train(config: TrainConfig, model: nn.Module, train_loader, test_loader, dev: torch.device,
           progress: bool) -> pd.DataFrame:
    return train(
        model, train_loader, epochs=config.epochs, lr=config.lr, momentum=config.momentum,
        weight_decay=config.weight_decay, device=dev, progress=progress, test_loader=test_loader,
    )


def default_checkpoint_path(config: TrainConfig) -> Path:
    """runs/<model>-<dataset>-seed<seed>.pt, with characters unsafe in file names replaced."""
    stem = f"{config.model}-{config.dataset}-seed{config.seed}"
    return Path("runs") / (re.sub(r"[^A-Za-z0-9_.-]+", "_", stem) + ".pt")
