"""Walk a user's data as validated `(inputs, targets)` batches on the model's device."""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from itertools import chain

import torch
from torch import nn
from tqdm.auto import tqdm

from probe.errors import ProbeError


def device_for(choice: str) -> torch.device:
    """The device a `--device auto|cpu|cuda` choice means here; ProbeError if cuda is missing."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice == "cuda" and not torch.cuda.is_available():
        raise ProbeError("--device cuda: no CUDA device is available here; use --device cpu or auto.")
    return torch.device(choice)


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (or buffer); ProbeError for a model without data."""
    tensors = list(chain(model.named_parameters(), model.named_buffers()))
    meta = [name for name, tensor in tensors if tensor.is_meta]
    if meta:
        raise ProbeError(
            f"the model {type(model).__name__} has tensors on the meta device ({meta[0]!r}"
            f"{f' and {len(meta) - 1} more' if len(meta) > 1 else ''}): it has no data; load weights first "
            "(model.to_empty(device='cpu'), then model.load_state_dict(...))."
        )
    return tensors[0][1].device if tensors else torch.device("cpu")


def input_dtype(model: nn.Module) -> torch.dtype | None:
    """What floating-point inputs are cast to: the dtype of the model's first floating-point
    parameter (a bf16 model needs bf16 inputs), or None for a model without one."""
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), None)


def read_again(data: Iterable) -> Iterable:
    """`data`, for a second pass after mode="mean" computed its means from it: one-shot data (a
    generator) that pass used up gets a ProbeError saying so, not "the data is empty"."""
    return _used_up_by_means_pass(data) if isinstance(data, Iterator) else data


def _used_up_by_means_pass(data: Iterator) -> Iterator:
    empty = True
    for batch in data:
        empty = False
        yield batch
    if empty:
        raise ProbeError(
            f"the data is a one-shot {type(data).__name__}: it was used up by the means pass (mode='mean' "
            "without means=), leaving nothing to evaluate. Pass a re-iterable DataLoader or list, or "
            "precomputed means=probe.branch_means(model, data)."
        )


def batches(data: Iterable, device: torch.device, *, dtype: torch.dtype | None = None, progress: bool = False,
            desc: str = "") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield `(inputs, targets)` from `data` on `device`; raise ProbeError for malformed data.

    Floating-point inputs are cast to `dtype` when given (see `input_dtype`); integer targets
    of any width become int64 class labels.
    """
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
        integer = not (targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool)
        if not integer or targets.dim() != 1 or len(targets) != len(inputs):
            raise ProbeError(
                f"batch {seen} has targets of dtype {targets.dtype} and shape {tuple(targets.shape)} "
                f"for {len(inputs)} inputs; probe needs one integer class label per input."
            )
        non_blocking = device.type == "cuda"
        cast = dtype if inputs.is_floating_point() else None
        yield (inputs.to(device, dtype=cast, non_blocking=non_blocking),
               targets.to(device, dtype=torch.long, non_blocking=non_blocking))
    if seen == 0:
        raise ProbeError("the data is empty: it yielded no batch. Pass a DataLoader with at least one sample.")


# Phrases of torch's errors for inputs that do not fit a layer (channels, sizes, features).
_MISFIT_PHRASES = ("channels", "cannot be multiplied", "size mismatch", "must match the size", "Expected size",
                   "shape", "Wrong shape", "expected input")


@contextlib.contextmanager
def explained_misfit(inputs: torch.Tensor) -> Iterator[None]:
    """Turn torch's error for inputs the model cannot take into a ProbeError that says so."""
    try:
        yield
    except RuntimeError as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        if not any(phrase in text for phrase in _MISFIT_PHRASES):
            raise
        raise ProbeError(
            f"the model cannot take inputs of shape {tuple(inputs.shape)} ({text}). Check that the data set "
            "fits the model: its input channels, image size and number of classes."
        ) from error


def check_targets_fit(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Class labels must index the model's outputs."""
    classes = logits.shape[-1]
    largest, smallest = int(targets.max()), int(targets.min())
    if largest >= classes or smallest < 0:
        raise ProbeError(
            f"the data has class label {largest if largest >= classes else smallest}, but the model outputs "
            f"{classes} classes (labels 0..{classes - 1}). Use a model built for this data set's classes."
        )
