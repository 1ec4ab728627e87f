"""The identity of a loaded model: one digest of what its numbers depend on, however it was built.

A checkpoint file's hash says nothing of a model loaded from a Hugging Face folder or built by a
factory that reads its own weights, so the run record (`run.json`'s `model_sha256`) takes the
model as it is in memory:

- every parameter and buffer (and what else its state dict holds, such as a quantized layer's
  packed weights): its name, whether it is a parameter or a buffer, shape, dtype and the bytes
  of its values (a tensor shared under two names is hashed once; the second name says which it
  shares);
- its code: every module's name, class (qualified name) and settings (`extra_repr`, with memory
  addresses removed), the Hugging Face `config` where it has one, and for each class's source
  either its package's version (installed packages) or the sha256 of its source file (your own
  code, where an edit changes the numbers without changing a version).

It hashes each tensor's bytes as they lie in memory, once (sha256, about 2 GB/s on a free core),
so it costs what one sha256 pass over the weights costs (docs/guarantees.md: 0.6 s for 540 MB
of float32 weights on a busy shared core). The memory format does not count: a channels_last
copy has the digest of the original.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import sys
from importlib import metadata
from pathlib import Path

import torch
from torch import nn

__all__ = ["model_digest"]

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")  # `<function f at 0x7f...>` differs in every process


def model_digest(model: nn.Module) -> str:
    """sha256 (first 16 hex digits) of `model`'s parameters, buffers and code; see the module
    docstring. Equal for two loads of the same weights into the same code, different when any
    value, name, shape, dtype, module class or setting differs."""
    digest = hashlib.sha256()
    _add(digest, {"code": _code(model), "config": _hf_config(model)})
    seen: dict[int, str] = {}  # id(tensor) -> the first name it was hashed under
    named = [("parameter", name, t) for name, t in model.named_parameters(remove_duplicate=False)]
    named += [("buffer", name, t) for name, t in model.named_buffers(remove_duplicate=False)]
    # What only the state dict holds: packed weights of quantized modules, a module's extra state.
    covered = {name for _, name, _ in named}
    named += [("state", name, value) for name, value in model.state_dict(keep_vars=True).items()
              if name not in covered]
    offloaded = _offloaded(model)
    for kind, name, value in named:
        if name in offloaded and isinstance(value, torch.Tensor) and value.is_meta and id(value) not in seen:
            try:
                loaded = offloaded[name]()  # one offloaded weight at a time, read from the CPU or disk
            except (KeyError, OSError):
                loaded = None  # not where the hook looks: hashed as a meta tensor (shape and dtype)
            if loaded is not None:
                seen[id(value)] = name  # the model's tensor (the one read is gone after, its id reused)
                _add_value(digest, kind, name, loaded, {})
                continue
        _add_value(digest, kind, name, value, seen)
    return digest.hexdigest()[:16]


def _add_value(digest, kind: str, name: str, value: object, seen: dict[int, str]) -> None:
    """A tensor's header and values (once per tensor: a tensor seen before is named by where),
    or, for what else the state dict holds (a quantized layer's packed weights are a tuple), its
    parts one by one."""
    if isinstance(value, (list, tuple, dict)):
        items = sorted(value.items(), key=str) if isinstance(value, dict) else enumerate(value)
        _add(digest, {"kind": kind, "name": name, "container": type(value).__name__, "length": len(value)})
        for key, part in items:
            _add_value(digest, kind, f"{name}[{key}]", part, seen)
        return
    if not isinstance(value, torch.Tensor):  # a dtype, a number
        _add(digest, {"kind": kind, "name": name, "value": _ADDRESS.sub(" at 0x", repr(value))})
        return
    header = {"kind": kind, "name": name, "shape": list(value.shape), "dtype": str(value.dtype)}
    if id(value) in seen:
        _add(digest, {**header, "same as": seen[id(value)]})
        return
    seen[id(value)] = name
    if value.device.type == "meta":  # no values to hash: say so (its shape and dtype count)
        _add(digest, {**header, "values": "none (meta device)"})
        return
    _add(digest, header)
    digest.update(_values(value))  # as many bytes as the header's shape and dtype imply


def _offloaded(model: nn.Module) -> dict:
    """Name -> a function reading the weight that accelerate offloaded (to the CPU or disk; on
    the meta device in the model) through the hook of the innermost module holding it."""
    readers = {}
    for prefix, module in model.named_modules():
        weights = getattr(getattr(module, "_hf_hook", None), "weights_map", None)
        if weights is None:
            continue
        tensors = (*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False))
        for name, _ in tensors:
            readers[f"{prefix}.{name}" if prefix else name] = lambda weights=weights, name=name: weights[name]
    return readers


def _add(digest, part: object) -> None:
    """A JSON part, length-prefixed, so that no two sequences of parts hash alike."""
    text = json.dumps(part, sort_keys=True, default=_plain).encode()
    digest.update(len(text).to_bytes(8, "little") + text)


def _plain(value: object) -> object:
    """What JSON cannot hold, as text; a set sorted (its own order changes with every process)."""
    return sorted(map(str, value)) if isinstance(value, (set, frozenset)) else str(value)


def _values(tensor: torch.Tensor) -> memoryview:
    """The bytes of a tensor's values in row-major order (its memory format does not count)."""
    tensor = tensor.detach()
    if tensor.is_quantized:
        tensor = tensor.dequantize()  # the values it stands for: its integers with their scales
    if tensor.layout != torch.strided:
        tensor = tensor.to_dense()
    tensor = tensor.resolve_conj().resolve_neg().cpu().contiguous().reshape(-1)
    return memoryview(tensor.view(torch.uint8).numpy())


def _code(model: nn.Module) -> list:
    """[(module name, class, settings)] for every module, and where each class's code comes from."""
    tree, sources = [], {}
    for name, module in model.named_modules(remove_duplicate=False):
        cls = type(module)
        qualified = f"{cls.__module__}.{cls.__qualname__}"
        tree.append([name, qualified, _ADDRESS.sub(" at 0x", module.extra_repr())])
        for base in cls.__mro__:  # a subclass's code is also its bases'
            if base not in (nn.Module, object) and f"{base.__module__}.{base.__qualname__}" not in sources:
                sources[f"{base.__module__}.{base.__qualname__}"] = _source(base)
    return [tree, sorted(sources.items())]


def _source(cls: type) -> str | None:
    """Where a class's code comes from: "PACKAGE VERSION" for an installed package, else the
    sha256 of its source file; None where neither is known (a class defined at a prompt)."""
    try:
        file = inspect.getsourcefile(cls)
    except (TypeError, OSError):  # built in, or defined at a prompt
        file = None
    path = Path(file) if file else None
    if path is not None and path.is_file() and not {"site-packages", "dist-packages"} & set(path.parts):
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    package = cls.__module__.split(".")[0]
    version = getattr(sys.modules.get(package), "__version__", None)
    if version is None:
        try:
            version = metadata.version(package)
        except metadata.PackageNotFoundError:
            return None
    return f"{package} {version}"


def _hf_config(model: nn.Module) -> object:
    """A Hugging Face model's configuration (what its modules' settings do not show: rope scaling,
    attention implementation), without its private keys (the folder it was loaded from)."""
    config = getattr(model, "config", None)
    to_dict = getattr(config, "to_dict", None)
    if not callable(to_dict):
        return None
    return {key: value for key, value in to_dict().items() if not key.startswith("_")}
