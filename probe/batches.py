"""Walk a user's data as `Batch`es on the model's device: inputs and targets told apart, whatever
the batch's form (a pair, a tuple with extras, a dict, a bare tensor; `probe.Data` names them)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain

import torch
from torch import nn
from torch.utils import _pytree as pytree
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
    """The device of the model's first parameter (or buffer); ProbeError for a model without data.
    A model dispatched over devices by accelerate (`hf_device_map`): the device its inputs go to,
    the first accelerator of the map, else the CPU (its hooks move each layer's inputs to the
    layer's device, and the outputs back to the inputs' device)."""
    dispatched = dispatched_device(model)
    if dispatched is not None:
        return dispatched
    tensors = list(chain(model.named_parameters(), model.named_buffers()))
    meta = [name for name, tensor in tensors if tensor.is_meta]
    if meta:
        raise ProbeError(
            f"the model {type(model).__name__} has tensors on the meta device ({meta[0]!r}"
            f"{f' and {len(meta) - 1} more' if len(meta) > 1 else ''}): it has no data; load weights first "
            "(model.to_empty(device='cpu'), then model.load_state_dict(...))."
        )
    return tensors[0][1].device if tensors else torch.device("cpu")


def dispatched_device(model: nn.Module) -> torch.device | None:
    """Where a model accelerate dispatched over devices (`dispatch_model`, `from_pretrained(device_map=...)`:
    both set `hf_device_map`) takes its inputs: the first accelerator the map names, else the CPU
    (layers on "disk" run on the CPU there). None for a model on one device."""
    device_map = getattr(model, "hf_device_map", None)
    if not isinstance(device_map, dict) or not device_map:
        return None
    for place in device_map.values():
        if isinstance(place, int) and not isinstance(place, bool):
            return torch.device("cuda", place)
        if isinstance(place, (str, torch.device)) and str(place) not in ("cpu", "disk", "meta"):
            return torch.device(place)
    return torch.device("cpu")


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


@dataclass(frozen=True, eq=False)
class Batch:
    """One batch on the model's device, taken apart.

    inputs:  what the model is called with: a tensor (`model(x)`), a tuple of tensors
             (`model(*inputs)`) or a dict (`model(**inputs)`, as Hugging Face models take).
    targets: the labels, or None for data without any (the `drift` task needs none).
    raw:     the batch as the data gave it, on the device: what a user's own task receives.
    size:    how many samples it holds (the first dimension of its inputs).
    number:  its place in the data, from 1 (for messages).
    targets_by_position: the targets are a tuple's second item, taken by its place (not named
             by a dict key or `probe.Data`): a task may find that ambiguous (`lm`: the second of
             two token tensors may be an attention mask).
    """

    inputs: object
    targets: torch.Tensor | None
    raw: object
    size: int
    number: int = 1
    targets_by_position: bool = False

    def run(self, model: Callable) -> object:
        """`model` called on this batch's inputs."""
        return call_model(model, self.inputs)

    def describe(self) -> str:
        """The inputs' shapes, for messages: `(8, 3, 32, 32)` or `input_ids (8, 16), attention_mask (8, 16)`."""
        if isinstance(self.inputs, torch.Tensor):
            return str(tuple(self.inputs.shape))
        if isinstance(self.inputs, dict):
            return ", ".join(f"{key} {_shape(value)}" for key, value in self.inputs.items())
        return ", ".join(_shape(value) for value in self.inputs)


def _shape(value: object) -> str:
    return str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__


def call_model(model: Callable, inputs: object) -> object:
    """`model(**inputs)` for a dict, `model(*inputs)` for a tuple or list, else `model(inputs)`."""
    if isinstance(inputs, dict):
        return model(**inputs)
    if isinstance(inputs, (tuple, list)):
        return model(*inputs)
    return model(inputs)


def copy_inputs(inputs: object) -> object:
    """`inputs` with every tensor in it cloned (tuples, lists and dicts rebuilt around them)."""
    return pytree.tree_map(lambda leaf: leaf.clone() if isinstance(leaf, torch.Tensor) else leaf, inputs)


def tensor_versions(value: object) -> tuple[int, ...]:
    """The version counters of the tensors in `value`: one moves when its tensor is written in place."""
    return tuple(leaf._version for leaf in pytree.tree_leaves(value) if isinstance(leaf, torch.Tensor))


class InputCopies:
    """The inputs for each forward of a batch, such that the caller's own tensors never reach
    the model: a model may write into its input (`x += f(x)` on `x` itself), and on the CPU a
    batch's tensors are the caller's (moving them to their own device copies nothing).

    Per batch, one copy serves every forward while none writes into it (one clone per batch,
    not per forward); once one has (a version counter moved), every forward from then on, in
    this batch and the later ones, gets a fresh copy of the batch as the data gave it.

        copies = InputCopies()
        for batch in batches(...):
            outputs = call_model(model, copies.inputs(batch))   # as often as needed
    """

    def __init__(self) -> None:
        self._written = False
        self._batch: Batch | None = None
        self._shared: object = None
        self._versions: tuple[int, ...] = ()

    @property
    def written(self) -> bool:
        """Whether a forward wrote into its inputs (each gets its own copy from then on)."""
        if not self._written and self._batch is not None and tensor_versions(self._shared) != self._versions:
            self._written = True
            self._batch = self._shared = None
        return self._written

    def inputs(self, batch: Batch) -> object:
        """A copy of `batch.inputs` no forward has written into."""
        if self.written:
            return copy_inputs(batch.inputs)
        if self._batch is not batch:
            self._batch, self._shared = batch, copy_inputs(batch.inputs)
            self._versions = tensor_versions(self._shared)
        return self._shared

    def run(self, model: Callable, batch: Batch) -> object:
        """`model` called on a copy of `batch`'s inputs (see `inputs`)."""
        return call_model(model, self.inputs(batch))


# Dict keys that hold a model's inputs, and those that hold targets. Hugging Face models take
# their inputs as keywords; a lone image-like key is passed positionally (`model(batch["image"])`).
_KEYWORD_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "position_ids", "pixel_values", "pixel_mask",
                   "inputs_embeds", "decoder_input_ids", "decoder_attention_mask")
_POSITIONAL_INPUTS = ("image", "images", "img", "input", "inputs", "x", "data", "features")
_TARGET_KEYS = ("labels", "label", "target", "targets", "y", "class", "classes")

Selector = str | int | Sequence[str | int] | Callable[[object], object] | None


class Data:
    """A user's data with the parts of each batch named: which item holds the inputs, which the
    targets. Needed only when probe cannot tell them apart by itself (see `split_batch`).

        probe.sweep(model, probe.Data(loader, inputs="image", targets="label"))
        probe.sweep(model, probe.Data(loader, inputs=["left", "right"], targets=None))
        probe.sweep(model, probe.Data(loader, inputs=lambda b: (b[0], b[2]), targets=lambda b: b[1]))

    inputs: a key or index (its value is the input), several (the model takes them as keyword
    arguments for keys, positional ones for indices), or a function of the batch. targets: a
    key, an index, a function, or None (no targets: the `drift` task). Iterating yields the
    batches unchanged; probe takes them apart with these selectors.
    """

    def __init__(self, data: Iterable, *, inputs: Selector, targets: Selector = None) -> None:
        for name, value in (("inputs", inputs), ("targets", targets)):
            if not (value is None or callable(value) or isinstance(value, (str, int))
                    or (isinstance(value, (list, tuple)) and value and all(isinstance(v, (str, int)) for v in value))):
                raise ProbeError(f"probe.Data: {name}={value!r} must be a key, an index, a list of them, or a "
                                 "function of the batch.")
        if inputs is None:
            raise ProbeError("probe.Data: inputs=None; name the batch item(s) the model takes, e.g. inputs='image'.")
        self.data, self.inputs, self.targets = data, inputs, targets

    def __iter__(self) -> Iterator:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]

    def split(self, raw: object) -> tuple[object, object]:
        return _select(raw, self.inputs, "inputs", several=True), _select(raw, self.targets, "targets")


def _select(raw: object, selector: Selector, what: str, several: bool = False) -> object:
    if selector is None:
        return None
    if callable(selector):
        return selector(raw)
    if isinstance(selector, (list, tuple)):
        values = [_select(raw, one, what) for one in selector]
        if all(isinstance(one, str) for one in selector):
            return dict(zip(selector, values))
        return tuple(values)
    try:
        return raw[selector]  # type: ignore[index]
    except (KeyError, IndexError, TypeError) as error:
        found = f"keys {list(raw)}" if isinstance(raw, dict) else f"a {type(raw).__name__}" + (
            f" of length {len(raw)}" if isinstance(raw, (tuple, list)) else "")
        raise ProbeError(f"probe.Data: {what}={selector!r} is not in the batch, which has {found}.") from error


def split_batch(raw: object, number: int) -> tuple[object, object]:
    """(inputs, targets) of a batch as the data gave it.

    - a tensor: inputs alone (no targets);
    - a tuple or list: (inputs, targets, extras...), or (inputs,) alone; inputs may themselves
      be a tuple or list of tensors (a model with several inputs);
    - a dict: Hugging Face style keys (`input_ids`, `attention_mask`, `pixel_values`, ...) as
      keyword inputs, or one image-like key (`image`, `input`, `x`, ...) as the input; targets
      from `labels`, `label`, `target`, `y`, ... when present.
    Anything else raises a ProbeError that names what was found and says how to name the parts
    (`probe.Data(data, inputs=..., targets=...)`).
    """
    if isinstance(raw, torch.Tensor):
        return raw, None
    if isinstance(raw, (tuple, list)) and raw:
        inputs = tuple(raw[0]) if isinstance(raw[0], (tuple, list)) else raw[0]
        return inputs, (raw[1] if len(raw) > 1 else None)
    if isinstance(raw, dict):
        keys = list(raw)
        targets = next((raw[k] for k in _TARGET_KEYS if k in raw), None)
        keyword = {k: raw[k] for k in keys if k in _KEYWORD_INPUTS}
        positional = [k for k in keys if k in _POSITIONAL_INPUTS]
        if keyword and not positional:
            return keyword, targets
        if len(positional) == 1 and not keyword:
            return raw[positional[0]], targets
        raise ProbeError(
            f"batch {number} is a dict with keys {keys}: probe cannot tell which hold the model's inputs and which "
            "the targets. Name them: probe.Data(data, inputs='KEY' (or a list of keys, or a function), "
            "targets='KEY' or None).")
    kind = type(raw).__name__ + (" (empty)" if isinstance(raw, (tuple, list)) else "")
    raise ProbeError(
        f"batch {number} is a {kind}; probe needs a tensor, an (inputs, targets, ...) tuple or a dict of tensors. "
        "Name the parts with probe.Data(data, inputs=..., targets=...).")


def _to_device(value: object, device: torch.device, dtype: torch.dtype | None) -> object:
    """Tensors in `value` (a tensor, or tuples, lists and dicts of them) moved to `device`, and
    floating-point ones cast to `dtype` when given. Inference tensors (data made under
    `torch.inference_mode()`) become normal ones: probe runs outside inference mode
    (`probe.instrument.hooks.model_preserved`), where they have no version counter and cannot
    be changed in place."""
    non_blocking = device.type == "cuda"

    def move(leaf: object) -> object:
        if not isinstance(leaf, torch.Tensor):
            return leaf
        cast = dtype if dtype is not None and leaf.is_floating_point() else None
        moved = leaf.to(device, dtype=cast, non_blocking=non_blocking)
        return moved.clone() if moved.is_inference() and not torch.is_inference_mode_enabled() else moved

    return pytree.tree_map(move, value)


def _size(inputs: object, number: int) -> int:
    tensors = [leaf for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, torch.Tensor)]
    if not tensors or tensors[0].dim() == 0:
        raise ProbeError(f"batch {number} has inputs of type {type(inputs).__name__} with no batched tensor; "
                         "the inputs must be tensors with the samples along their first dimension.")
    return len(tensors[0])


def refuse_unbatched(data: object) -> None:
    """ProbeError for `data` that holds samples where batches belong: a tensor or a map-style
    torch Dataset would be read one row or one sample at a time, each taken for a batch (a
    sample's features for samples); and for None."""
    if data is None:
        raise ProbeError("data is None; pass the batches to measure on: a DataLoader, or a list of (inputs, targets).")
    if isinstance(data, torch.Tensor):
        raise ProbeError(f"data is a tensor of shape {tuple(data.shape)}, which probe would read row by row, each row "
                         "taken for a batch; pass batches: a DataLoader, e.g. DataLoader(TensorDataset(inputs, targets), "
                         "batch_size=256), or a list of (inputs, targets).")
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        raise ProbeError(f"data is a {type(data).__name__}, a data set of single samples, which probe would read one "
                         "sample at a time, each taken for a batch; wrap it in a DataLoader: DataLoader(data, "
                         "batch_size=256).")


def batches(data: Iterable, device: torch.device, *, dtype: torch.dtype | None = None, progress: bool = False,
            desc: str = "") -> Iterator[Batch]:
    """Yield each batch of `data` as a `Batch` on `device`; raise ProbeError for malformed data.

    Floating-point inputs are cast to `dtype` when given (see `input_dtype`). Batches may be
    pairs, tuples with extra items, dicts or bare tensors (`split_batch`), or named with
    `probe.Data`. What the targets must be is the task's business (`probe.scoring.tasks`).
    """
    refuse_unbatched(data)
    try:
        total = len(data)  # type: ignore[arg-type]
    except TypeError:
        total = None
    split = data.split if isinstance(data, Data) else None
    seen = yielded = 0
    for seen, raw in enumerate(tqdm(data, total=total, desc=desc, disable=not progress, leave=False), start=1):
        raw = _to_device(raw, device, None)  # once: the inputs and targets are parts of it
        inputs, targets = split(raw) if split is not None else split_batch(raw, seen)
        if targets is not None and not isinstance(targets, torch.Tensor) and not _per_image_dicts(targets):
            raise ProbeError(f"batch {seen} has targets of type {type(targets).__name__}; targets must be a tensor, "
                             "a list of dicts per image (detection ground truth: 'boxes', 'labels'), or left out "
                             "(name the parts with probe.Data(data, inputs=..., targets=None)).")
        if isinstance(inputs, list):
            inputs = tuple(inputs)
        size = _size(inputs, seen)
        if size == 0:  # an empty batch (a last partial batch of nothing, a filtered shard) scores nothing
            continue
        yielded += 1
        yield Batch(inputs=_to_device(inputs, device, dtype), targets=targets, raw=raw, size=size, number=seen,
                    targets_by_position=split is None and isinstance(raw, (tuple, list)) and targets is not None)
    if yielded == 0:
        raise ProbeError("the data is empty: it yielded no batch with a sample in it. Pass a DataLoader with at "
                         "least one sample.")


def _per_image_dicts(targets: object) -> bool:
    """Targets given as one dict per image (a detector's ground truth: boxes and labels)."""
    return isinstance(targets, (list, tuple)) and bool(targets) and all(isinstance(t, dict) for t in targets)


def first_inputs(data: Iterable, model: nn.Module) -> object:
    """A copy of the inputs of `data`'s first batch, on the model's device: what a model torch.fx
    cannot trace is run on to find its blocks (a copy: the model may write into its input).
    Reads one batch (`data` must be re-iterable)."""
    return copy_inputs(next(iter(batches(data, model_device(model), dtype=input_dtype(model)))).inputs)


def class_targets(batch: Batch) -> torch.Tensor:
    """The batch's targets as int64 class labels, one per sample; ProbeError otherwise."""
    targets = batch.targets
    where = f"batch {batch.number}"
    if targets is None:
        raise ProbeError(f"{where} has no targets, but class labels are needed here; give (inputs, labels) batches, "
                         "or use task='drift', which needs no labels.")
    integer = not (targets.dtype.is_floating_point or targets.dtype.is_complex or targets.dtype == torch.bool)
    if not integer or targets.dim() != 1 or len(targets) != batch.size:
        raise ProbeError(
            f"{where} has targets of dtype {targets.dtype} and shape {tuple(targets.shape)} for {batch.size} "
            "inputs; the classification task needs one integer class label per input (for other targets, "
            "choose task='lm', 'drift' or your own).")
    return targets.long()


# Phrases of torch's errors for inputs that do not fit a layer (channels, sizes, features).
_MISFIT_PHRASES = ("channels", "cannot be multiplied", "size mismatch", "must match the size", "Expected size",
                   "shape", "Wrong shape", "expected input")


@contextlib.contextmanager
def explained_misfit(batch: Batch | torch.Tensor) -> Iterator[None]:
    """Turn torch's error for inputs the model cannot take into a ProbeError that says so."""
    try:
        yield
    except RuntimeError as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        wrong_dtype = _dtype_misfit(batch, text)
        if wrong_dtype is not None:
            raise ProbeError(wrong_dtype) from error
        if not any(phrase in text for phrase in _MISFIT_PHRASES):
            raise
        shapes = batch.describe() if isinstance(batch, Batch) else str(tuple(batch.shape))
        raise ProbeError(
            f"the model cannot take inputs of shape {shapes} ({text}). Check that the data set "
            "fits the model: its input channels, image size and number of classes."
        ) from error


# Phrases of torch's errors for inputs of a dtype a layer cannot take (integer images, float token ids).
_DTYPE_PHRASES = ("scalar type", "should be the same", "same dtype", "not implemented for")
# How those errors name a dtype (ATen's scalar type names, C++ type names): an error blames the
# inputs' dtype only when it names it (a language model's ids are integers, and its own Half/Float
# mismatch is no fault of theirs).
_DTYPE_NAMES = {torch.uint8: ("Byte", "unsigned char"), torch.int8: ("Char", "signed char"),
                torch.int16: ("Short", "short"), torch.int32: ("Int", "int"),
                torch.int64: ("Long", "long"), torch.bool: ("Bool", "bool"),
                torch.complex64: ("ComplexFloat", "complex<float>"), torch.complex128: ("ComplexDouble", "complex<double>")}


def _dtype_misfit(batch: Batch | torch.Tensor, text: str) -> str | None:
    """Why the model cannot take the inputs' dtype, and what to do; None when the error is not
    about the inputs' dtype."""
    if not any(phrase in text for phrase in _DTYPE_PHRASES):
        return None
    inputs = batch.inputs if isinstance(batch, Batch) else batch
    tensors = [leaf for leaf in pytree.tree_leaves(inputs) if isinstance(leaf, torch.Tensor)]
    if "'indices'" in text and tensors and all(t.is_floating_point() for t in tensors):
        return (f"the model takes integer inputs (token ids) but the data gives dtype {tensors[0].dtype} ({text}); "
                "give the ids as an integer tensor (torch.long).")
    odd = next((t for t in tensors if not t.is_floating_point()
                and any(re.search(rf"\b{re.escape(name)}\b", text) for name in _DTYPE_NAMES.get(t.dtype, ()))), None)
    if odd is None:
        return None
    return (f"the model cannot take inputs of dtype {odd.dtype} ({text}): its layers compute in floating point. "
            "Convert the inputs to float (images of 0..255: .float() / 255, then normalize them as the model was "
            "trained).")


def check_targets_fit(logits: torch.Tensor, targets: torch.Tensor) -> None:
    """Class labels must index the model's outputs."""
    classes = logits.shape[-1]
    largest, smallest = int(targets.max()), int(targets.min())
    if largest >= classes or smallest < 0:
        raise ProbeError(
            f"the data has class label {largest if largest >= classes else smallest}, but the model outputs "
            f"{classes} classes (labels 0..{classes - 1}). Use a model built for this data set's classes."
        )
