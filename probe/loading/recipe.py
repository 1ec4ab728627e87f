"""The recipe of a training run: every setting that determines the trained weights.

Apart from `probe.loading.training`, which runs it, so that a command can show its defaults
(`--help`) and check its values without importing the training stack.
"""

from __future__ import annotations

from dataclasses import dataclass

from probe.errors import ProbeError

__all__ = ["TrainConfig"]


@dataclass
class TrainConfig:
    """Everything that determines a training run (and, in `probe.loading.cache`, its cache key).

    `limit`: use only the first `limit` samples of each split (quick runs and tests).
    `data_root`/`download`: where the data comes from; they do not change the result and are
    left out of the cache key.
    """

    model: str = "resnet56"
    dataset: str = "digits"
    # Measured (resnet56 on digits, seed 0): test accuracy 0.99 from epoch 4 on; lr 0.1 or
    # batch 128 stall near chance for the first epochs, lr 0.01 ends at 0.96.
    epochs: int = 8
    batch_size: int = 32
    lr: float = 0.02
    momentum: float = 0.9
    weight_decay: float = 5e-4
    seed: int = 0
    device: str = "cpu"
    limit: int | None = None
    data_root: str | None = None
    download: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ProbeError(f"{name} must be a positive integer, got {value!r}.")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise ProbeError(f"limit must be a positive integer or None, got {self.limit!r}.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ProbeError(f"seed must be a whole number from 0 to 2**32 - 1, got {self.seed!r}.")
        if not self.lr > 0:
            raise ProbeError(f"lr must be positive, got {self.lr!r}.")
        if not 0 <= self.momentum < 1:
            raise ProbeError(f"momentum must be in [0, 1), got {self.momentum!r}.")
        if self.weight_decay < 0:
            raise ProbeError(f"weight_decay must be >= 0, got {self.weight_decay!r}.")
