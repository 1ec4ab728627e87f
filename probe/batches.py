"""Walk a user's data as validated `(inputs, targets)` batches on the model's device."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from probe.errors import ProbeError


def model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def batches(data: Iterable, device: torch.device, *, progress: bool = False,
            desc: str = "") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(inputs, targets)` from `data` on `device`; raise ProbeError for malformed data."""
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    seen = 0
    for seen, batch in enumerate(tqdm(data, total=total, desc=desc, disable=not progress, leave=False), start=1):
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            kind = type(batch).__name__ + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "")
            raise ProbeError(
                f"batch {seen} is a {kind}; probe needs (inputs, targets) pairs, as a DataLoader "
                "over a dataset of (image, label) items yields."
            )
        inputs, targets = batch
        if not isinstance(inputs, torch.Tensor) or not isinstance(targets, torch.Tensor):
            raise ProbeError(
                f"batch {seen} holds ({type(inputs).__name__}, {type(targets).__name__}); "
                "probe needs (inputs, targets) as tensors, with integer class targets."
            )
        if targets.dtype.is_floating_point or targets.dim() != 1 or len(targets) != len(inputs):
            raise ProbeError(
                f"batch {seen} has targets of dtype {targets.dtype} and shape {tuple(targets.shape)} "
                f"for {len(inputs)} inputs; probe needs one integer class label per input."
            )
        non_blocking = device.type == "cuda"
        yield inputs.to(device, non_blocking=non_blocking), targets.to(device, non_blocking=non_blocking)
    if seen == 0:
        raise ProbeError("the data is empty: it yielded no batch. Pass a DataLoader with at least one sample.")
