"""Models too big for one device in float32: weights in half precision, and models dispatched by
accelerate over the GPUs, the CPU and disk.

    dtype_of("bf16")                                  # torch.bfloat16
    read_device_map("auto") / read_device_map("map.json")
    read_max_memory("cpu=2GiB,0=20GiB")               # {"cpu": "2GiB", 0: "20GiB"}
    dispatch(model, "auto", max_memory=..., offload_folder="offload")   # any nn.Module

A Hugging Face model is dispatched by `from_pretrained(device_map=...)` itself
(`probe.loading.huggingface`); `dispatch` does the same for any other `nn.Module` with accelerate's
`infer_auto_device_map` and `dispatch_model`. Either way accelerate puts a hook on each module
that moves the module's inputs to its device (and, for an offloaded one, loads its weights from
the CPU or disk for its forward only); probe's hooks and the layer replay work with those hooks
in place and leave them as they were.

accelerate is an optional dependency (the lm extra), imported inside functions.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from probe.errors import ProbeError

__all__ = ["DEVICE_MAPS", "DTYPES", "dispatch", "dtype_of", "read_device_map", "read_max_memory"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# accelerate's (and from_pretrained's) strategies; anything else names a JSON file.
DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")
_INSTALL = 'pip install -e ".[lm]"'


def dtype_of(name: str | torch.dtype | None) -> torch.dtype | None:
    """The torch dtype `--dtype fp32|bf16|fp16` names (a torch dtype passes through; None stays None)."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ProbeError(f"--dtype {name!r} is not one of {', '.join(DTYPES)}.")
    return DTYPES[name]


def read_device_map(value: str | dict | None) -> str | dict | None:
    """A device map: one of `DEVICE_MAPS`, or a JSON file mapping module names to a device
    (a GPU index, "cuda:1", "cpu" or "disk"), as `from_pretrained(device_map=...)` takes it."""
    if value is None or isinstance(value, dict) or value in DEVICE_MAPS:
        return value
    path = Path(value).expanduser()
    if not path.is_file():
        raise ProbeError(f"--device-map {value!r} is neither one of {', '.join(DEVICE_MAPS)} nor a JSON file; give a "
                         'strategy or a file such as {"model.embed_tokens": 0, "model.layers.0": 0, ..., '
                         '"model.layers.20": "disk"}.')
    try:
        device_map = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ProbeError(f"--device-map {value!r} is not a readable JSON file ({error}).") from error
    if not isinstance(device_map, dict) or not device_map:
        raise ProbeError(f"--device-map {value!r} must hold a JSON object of module name -> device, e.g. "
                         '{"model.layers.0": 0, "model.layers.1": "disk"}.')
    for name, place in device_map.items():
        if not _is_place(place):
            raise ProbeError(f"--device-map {value!r}: module {name!r} is put on {place!r}; give a GPU index (0), "
                             '"cuda:N", "cpu" or "disk".')
    return device_map


def _is_place(place: object) -> bool:
    if isinstance(place, int) and not isinstance(place, bool):
        return place >= 0
    if not isinstance(place, str):
        return False
    if place in ("cpu", "disk", "mps", "cuda"):
        return True
    kind, _, index = place.partition(":")
    return kind in ("cuda", "xpu", "npu") and index.isdigit()


def read_max_memory(text: str | dict | None) -> dict | None:
    """`--max-memory "cpu=2GiB,0=20GiB"` as accelerate's dict ({"cpu": "2GiB", 0: "20GiB"})."""
    if text is None or isinstance(text, dict):
        return text
    try:
        from accelerate.utils import convert_file_size_to_int
    except ImportError as error:
        raise ProbeError(f"--max-memory needs accelerate ({error}); install the lm extra: {_INSTALL}") from error
    limits: dict = {}
    for part in filter(None, (piece.strip() for piece in text.split(","))):
        device, _, size = part.partition("=")
        device, size = device.strip(), size.strip()
        key: int | str = int(device) if device.isdigit() else device
        bad = not size or not (isinstance(key, int) or key in ("cpu", "disk", "mps") or _is_place(key))
        if not bad:
            try:
                convert_file_size_to_int(size)
            except (ValueError, TypeError):
                bad = True
        if bad:
            raise ProbeError(f"--max-memory {text!r}: {part!r} is not DEVICE=SIZE; give e.g. \"cpu=2GiB,0=20GiB\" "
                             "(a GPU index or cpu, and a size in B, KiB, MiB, GiB, or KB, MB, GB).")
        limits[key] = size
    if not limits:
        raise ProbeError(f"--max-memory {text!r} names no device; give e.g. \"cpu=2GiB,0=20GiB\".")
    return limits


def dispatch(model: nn.Module, device_map: str | dict, *, max_memory: dict | str | None = None,
             offload_folder: str | Path | None = None, no_split: Iterable[str] = (),
             dtype: torch.dtype | None = None) -> nn.Module:
    """`model` (any nn.Module, on the CPU) dispatched over devices by accelerate: its modules
    placed by `device_map` (a strategy of `DEVICE_MAPS`, inferred with `infer_auto_device_map`
    under `max_memory`, or a dict / JSON file of module name -> device), with hooks that move
    each module's inputs to its device; modules on "disk" are written to `offload_folder` and
    read back for their forward only. no_split: class names of modules kept whole on one device
    (a residual block: its shortcut and branch must meet on one device). Returns `model`.
    dtype: what the map is sized for (the model is cast to it first)."""
    try:
        from accelerate import dispatch_model, infer_auto_device_map
        from accelerate.utils import get_balanced_memory
    except ImportError as error:
        raise ProbeError(f"--device-map needs accelerate ({error}); install the lm extra: {_INSTALL}") from error
    if dtype is not None:
        model = model.to(dtype)
    device_map, max_memory = read_device_map(device_map), read_max_memory(max_memory)
    no_split = sorted(set(no_split))
    if isinstance(device_map, str):
        if device_map != "sequential":
            max_memory = get_balanced_memory(model, max_memory=max_memory, no_split_module_classes=no_split,
                                             low_zero=device_map == "balanced_low_0")
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    else:
        names = dict(model.named_modules())
        unknown = [name for name in device_map if name and name not in names]
        if unknown:
            raise ProbeError(f"--device-map names module(s) {unknown[:3]} that {type(model).__name__} does not have; "
                             f"name modules of model.named_modules(), e.g. {list(names)[1:4]}.")
    if "disk" in device_map.values() and offload_folder is None:
        raise ProbeError("the device map puts modules on \"disk\": give --offload-folder DIR for their weights.")
    try:
        dispatch_model(model, device_map=device_map, offload_dir=str(offload_folder) if offload_folder else None)
    except (ValueError, RuntimeError) as error:
        raise ProbeError(f"accelerate could not dispatch {type(model).__name__} with that device map "
                         f"({str(error).splitlines()[0] if str(error) else type(error).__name__}).") from error
    return model.eval()
