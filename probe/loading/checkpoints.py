"""Checkpoints read and written safely: `load_checkpoint` takes the forms users have (state_dicts,
wrapped ones, safetensors, pickled modules) and says in one line what a file holds when it does
not fit; `save_checkpoint` writes atomically."""

from __future__ import annotations

import io
import os
import pickle
import pickletools
import re
import sys
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from probe.errors import ProbeError
from probe.files import atomic_write

__all__ = ["STATE_DICT_KEYS", "load_checkpoint", "save_checkpoint"]

# Dict keys under which training scripts keep the weights, tried in this order.
STATE_DICT_KEYS = ("state_dict", "model", "model_state_dict", "net")
# Prefixes wrappers put before every key: DataParallel/DDP and torch.compile's OptimizedModule.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# Modules whose globals torch's weights-only unpickler rebuilds itself (tensors, storages,
# OrderedDict, set, ...), so they never explain why a file was refused.
_TORCH_PICKLE_MODULES = ("torch.", "collections.", "builtins.", "__builtin__.", "_codecs.")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _short_list(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _one_line(error: BaseException) -> str:
    """An exception's first line without terminal colour codes (torch's texts have both)."""
    lines = _ANSI.sub("", str(error)).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def load_checkpoint(
    model: nn.Module, path: str | os.PathLike, *, allow_pickle: bool = False, dtype: torch.dtype | None = None
) -> nn.Module:
    """Load the weights in `path` into `model` (in place) and return `model`. With `dtype`, the
    model's floating-point weights are cast to it first and each checkpoint tensor is cast as it
    is copied in (no float32 copy of the whole model beside the checkpoint).

    The file may hold:

    - a state_dict, or a dict holding one under "state_dict", "model", "model_state_dict" or
      "net" (`STATE_DICT_KEYS`, tried in that order);
    - keys prefixed "module." (DataParallel, DDP) or "_orig_mod." (torch.compile), also when
      `model` is itself such a wrapper;
    - safetensors data (recognised by its header, whatever the file's name; needs the
      `safetensors` package);
    - a whole pickled module (`torch.save(model)`), alone or under one of those keys. It is read
      with torch's weights-only unpickler, allowed to rebuild only `nn.Module` classes this
      process has already imported: the file can make probe neither import a module nor run
      code other than those classes' own.
      A file naming anything else (a class not imported here, `argparse.Namespace`, numpy
      scalars, ...) is refused unless `allow_pickle=True`: full unpickling, which can run any
      code the file names; use it only for files you trust.

    As torch's own `load_state_dict(strict=True)`, a missing `num_batches_tracked` of a
    BatchNorm (or InstanceNorm tracking statistics) is accepted when the file predates that
    buffer (no version-2 metadata for the layer, as in files from old torch or whose keys were
    renamed), and the layer keeps its own count. Every other key must match in name and shape.
    Everything is checked before anything is copied: a file that does not fit raises one-line
    ProbeError saying what the file holds and how it differs from the model, and leaves the
    model untouched.
    """
    path = Path(path)
    state, holds = _find_state_dict(_read_checkpoint(path, allow_pickle=allow_pickle), path)
    target = _unwrap(model)
    expected = target.state_dict()
    state = _strip_wrapper_prefixes(state, list(expected))
    _check_fits(target, expected, state, f"checkpoint {str(path)!r} ({holds})")
    if dtype is not None:
        target.to(dtype)  # floating-point tensors only; load_state_dict's copy casts each tensor read
    target.load_state_dict(state, strict=True)
    return model


def _read_checkpoint(path: Path, *, allow_pickle: bool) -> object:
    shown = str(path)
    if path.is_dir():
        entries = sorted(p.name for p in path.iterdir())
        holding = f"holding {_short_list(entries, 4)}" if entries else "empty"
        raise ProbeError(
            f"checkpoint {shown!r} is a directory ({holding}), not a file; pass the checkpoint "
            "file itself."
        )
    if not path.is_file():
        raise ProbeError(f"checkpoint {shown!r} does not exist.")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise ProbeError(f"cannot read checkpoint {shown!r}: it is an empty file (0 bytes).")
    if _is_safetensors(head, size):
        return _load_safetensors(path)
    holds_pickle, what = _describe_file(path, head, size)
    if not holds_pickle:
        raise ProbeError(f"cannot read checkpoint {shown!r}: it is {what}.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # torch's texts are long and coloured: say below what the file is
        pass
    return _load_pickled(path, what, allow_pickle=allow_pickle)


def _is_safetensors(head: bytes, size: int) -> bool:
    # The format's signature: an 8-byte little-endian header length, then a JSON object.
    length = int.from_bytes(head[:8], "little")
    return len(head) > 8 and 2 <= length <= size - 8 and head[8:9] == b"{"


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device="cpu")
    except Exception as error:  # safetensors raises its own error types
        raise ProbeError(
            f"cannot read checkpoint {str(path)!r}: it is a safetensors file that safetensors "
            f"cannot read ({_one_line(error)})."
        ) from error


def _describe_file(path: Path, head: bytes, size: int) -> tuple[bool, str]:
    """(whether the file holds a pickle torch might unpickle, what the file is, in words)."""
    if head.startswith(b"PK"):
        if not zipfile.is_zipfile(path):
            return False, f"a truncated or damaged zip archive ({size} bytes)"
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
        base = {name.rpartition("/")[2] for name in names}
        if "constants.pkl" in base and any("/code/" in name for name in names):
            return False, (
                "a TorchScript archive (torch.jit.save), not a state_dict; load it with "
                "torch.jit.load and save its state_dict()"
            )
        if "data.pkl" in base:
            return True, "a torch checkpoint"
        return False, f"a zip archive of {_short_list(names, 4)}, not a torch checkpoint"
    if head[0] == pickle.PROTO[0]:
        return True, "a pickle (torch's pre-1.6 format, or plain pickle)"
    text = _as_text(head)
    if text is not None and text.startswith("version https://git-lfs"):
        return False, "a Git LFS pointer, not the weights; fetch them with `git lfs pull`"
    if text is not None:
        return False, f"a text file beginning {text.splitlines()[0][:40]!r}, not a torch checkpoint"
    return False, (
        f"not a torch checkpoint: {size} bytes that are no zip archive, pickle or safetensors "
        f"file (they begin {head[:8].hex(' ')})"
    )


def _as_text(head: bytes) -> str | None:
    """`head` as text, if it is printable UTF-8 (a character cut off at the end is fine)."""
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 3:
            return None
        text = head[: error.start].decode("utf-8")
    return text if all(c.isprintable() or c in "\t\r\n" for c in text) else None


def _load_pickled(path: Path, what: str, *, allow_pickle: bool) -> object:
    """A pickle weights-only loading refused: rebuilt from imported nn.Module classes only, or
    fully unpickled when the caller allows it, or refused saying what the file names."""
    names = _pickle_globals(path)
    found = {name: _imported(name) for name in names}
    module_classes = [obj for obj in found.values() if _is_module_class(obj)]
    if module_classes:
        try:
            with torch.serialization.safe_globals(module_classes):
                return torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # it names more than modules: refused or fully unpickled below
            pass
    if allow_pickle:
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as error:  # unpickling can raise anything
            raise ProbeError(
                f"cannot unpickle checkpoint {str(path)!r} even with allow_pickle=True: "
                f"{_one_line(error)}"
            ) from error
    if module_classes or any(name.startswith("torch.nn.modules.") for name in names):
        what = "a pickled torch.nn.Module (torch.save(model))"
    foreign = [name for name in names if not name.startswith(_TORCH_PICKLE_MODULES)]
    missing = [name for name in foreign if found[name] is None]
    others = [name for name in foreign
              if found[name] is not None and not _is_module_class(found[name])]
    reasons = []
    if missing:
        reasons.append(
            f"it names classes or functions this process has not imported "
            f"({_short_list(missing, 3)}); "
            "import the module that defines them first"
        )
    if others:
        reasons.append(
            "it holds objects that loading without running the file's code refuses "
            f"({_short_list(others, 3)})"
        )
    if not reasons:
        reasons.append("torch's weights-only loading cannot read it")
    raise ProbeError(
        f"cannot read checkpoint {str(path)!r}: it is {what}; " + "; ".join(reasons)
        + ". Pass allow_pickle=True if you trust the file, or re-save it with "
        "torch.save(model.state_dict(), path)."
    )


def _pickle_globals(path: Path) -> list[str]:
    """The classes and functions a pickle names ("module.qualname"), in order of appearance,
    read from its GLOBAL opcodes without unpickling anything. torch.save writes protocol 2,
    whose only way to name them is GLOBAL."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            record = next(n for n in archive.namelist() if n.rpartition("/")[2] == "data.pkl")
            stream: io.BufferedIOBase = io.BytesIO(archive.read(record))
    else:
        stream = open(path, "rb")  # closed by the `with` below
    names: list[str] = []
    with stream:
        try:
            # torch's pre-1.6 format is 5 pickles back to back, then raw tensor bytes.
            for _pickle in range(5):
                for opcode, arg, _position in pickletools.genops(stream):
                    if opcode.name == "GLOBAL":
                        names.append(arg.replace(" ", "."))
        except ValueError:  # the end of the data, or bytes that are no pickle
            pass
    return list(dict.fromkeys(names))


def _is_module_class(obj: object) -> bool:
    return isinstance(obj, type) and issubclass(obj, nn.Module)


def _imported(name: str) -> object | None:
    """The object "module.qualname" names, if its module is already imported (imports nothing)."""
    parts = name.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        obj = sys.modules.get(".".join(parts[:cut]))
        if obj is not None:
            for attr in parts[cut:]:
                obj = getattr(obj, attr, None)
            return obj
    return None


def _find_state_dict(obj: object, path: Path) -> tuple[Mapping[str, torch.Tensor], str]:
    """The state_dict in a loaded checkpoint, and what the file holds, in words."""
    candidates = [(obj, "")]
    if isinstance(obj, Mapping):
        candidates += [(obj[key], f" under {key!r}") for key in STATE_DICT_KEYS if key in obj]
    for value, under in candidates:
        if isinstance(value, nn.Module):
            return value.state_dict(), f"a pickled {type(value).__name__}{under}"
        if _is_state_dict(value):
            return value, f"a state_dict of {len(value)} tensors{under}"
    keys = ", ".join(repr(k) for k in STATE_DICT_KEYS[:-1]) + f" or {STATE_DICT_KEYS[-1]!r}"
    raise ProbeError(
        f"checkpoint {str(path)!r} holds no model weights: it is {_describe_object(obj)}; probe "
        f"reads a state_dict, a dict holding one under {keys}, or a pickled nn.Module."
    )


def _is_state_dict(obj: object) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _is_optimizer_state(obj: object) -> bool:
    return isinstance(obj, Mapping) and {"state", "param_groups"} <= set(obj)


def _describe_object(obj: object) -> str:
    if _is_optimizer_state(obj):
        return "an optimizer's state_dict (keys 'state' and 'param_groups')"
    if isinstance(obj, Mapping):
        if not obj:
            return "an empty dict"
        keys = [repr(k) for k in obj]
        text = f"a dict with keys [{_short_list(keys, 6)}]"
        optimizers = [repr(k) for k, v in obj.items() if _is_optimizer_state(v)]
        if optimizers:
            text += f", {' and '.join(optimizers)} holding an optimizer's state"
        return text
    if isinstance(obj, torch.Tensor):
        return f"a single tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (list, tuple)):
        return f"a {type(obj).__name__} of {len(obj)} items"
    return f"a {type(obj).__module__}.{type(obj).__qualname__}"


def _unwrap(model: nn.Module) -> nn.Module:
    """The module inside DataParallel/DDP and torch.compile wrappers, whose keys have no prefix."""
    while True:
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


def _strip_wrapper_prefixes(
    state: Mapping[str, torch.Tensor], model_keys: list[str]
) -> Mapping[str, torch.Tensor]:
    """`state` without the wrapper prefixes that every one of its keys has and the model's lack."""
    while True:
        prefix = next(
            (p for p in _WRAPPER_PREFIXES
             if all(k.startswith(p) for k in state)
             and not all(k.startswith(p) for k in model_keys)),
            None,
        )
        if prefix is None:
            return state
        stripped = OrderedDict((k[len(prefix):], v) for k, v in state.items())
        metadata = getattr(state, "_metadata", None)
        if metadata is not None:
            # Per-module versions drive torch's upgrades of old files (BatchNorm's
            # num_batches_tracked); their keys are module paths, "module" being the root.
            stripped._metadata = OrderedDict(
                (k[len(prefix):] if k.startswith(prefix) else "", v)
                for k, v in metadata.items()
                if k == prefix[:-1] or k.startswith(prefix)
            )
        state = stripped


def _filled_by_torch(model: nn.Module, key: str, metadata: Mapping | None) -> bool:
    """Whether `load_state_dict` fills in missing `key` itself: the `num_batches_tracked` of a
    norm layer saved before version 2 added it (mirrors `_NormBase._load_from_state_dict`)."""
    module_name, _, buffer = key.rpartition(".")
    if buffer != "num_batches_tracked":
        return False
    module = model.get_submodule(module_name)
    version = (metadata or {}).get(module_name, {}).get("version")
    return (isinstance(module, nn.modules.batchnorm._NormBase) and module.track_running_stats
            and (version is None or version < 2))


def _check_fits(
    model: nn.Module, expected: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor],
    source: str,
) -> None:
    metadata = getattr(state, "_metadata", None)
    missing = [k for k in expected if k not in state and not _filled_by_torch(model, k, metadata)]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k} (checkpoint {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
        for k in expected
        if k in state and state[k].shape != expected[k].shape
    ]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    if missing:
        parts.append(f"missing keys: {_short_list(missing)}")
    if unexpected:
        parts.append(f"unexpected keys: {_short_list(unexpected)}")
    if mismatched:
        parts.append(f"shape mismatches: {_short_list(mismatched, 3)}")
    heads = {k.partition(".")[0] + "." for k in state}
    if len(heads) == 1 and all("." in k for k in state):
        head = heads.pop()
        if not any(k.startswith(head) for k in expected):
            parts.append(f"every checkpoint key starts with {head!r}, no model key does")
    raise ProbeError(
        f"{source} does not fit {type(model).__name__} ({len(expected)} tensors): "
        + "; ".join(parts) + "."
    )


def save_checkpoint(model: nn.Module, path: str | os.PathLike, **metadata) -> Path:
    """Save `{"state_dict": ..., "metadata": metadata}` to `path` atomically; return the path.

    Written through `probe.files.atomic_write` (a temp file in the same directory, synced to
    disk, then renamed), so a reader never sees a partial file. `metadata` should hold plain
    values (str, numbers, lists, dicts) so that `torch.load(weights_only=True)` can read it back.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            torch.save({"state_dict": state, "metadata": dict(metadata)}, f)
            f.flush()
            os.fsync(f.fileno())

    return atomic_write(path, write)
