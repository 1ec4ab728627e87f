"""Model zoo and checkpoints: CIFAR-style ResNets (He et al. 2016, sec. 4.2), torchvision models,
and user factories, plus loading and saving state dicts safely.

The CIFAR-style block keeps its branch output intact and owns both of its ReLUs, so hooks on
`bn2` see `F(x)` and hooks on `relu1`/`relu2` see one activation each (docs/architecture.md, "Pitfalls").
"""

from __future__ import annotations

import inspect
import io
import os
import pickle
import pickletools
import re
import sys
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path

import torch
import torchvision
from safetensors.torch import load_file
from torch import nn

from probe.errors import ProbeError, unknown_name
from probe.files import atomic_write
from probe.imports import import_attribute

__all__ = [
    "CIFAR_DEPTHS",
    "MODEL_NAMES",
    "CifarBasicBlock",
    "CifarResNet",
    "PadShortcut",
    "STATE_DICT_KEYS",
    "build_model",
    "cifar_resnet",
    "load_checkpoint",
    "save_checkpoint",
]

# The depths He et al. 2016 report on CIFAR-10 (Table 6); any 6n+2 >= 8 builds.
CIFAR_DEPTHS = (20, 32, 44, 56, 110)
_STAGE_WIDTHS = (16, 32, 64)


class PadShortcut(nn.Module):
    """Parameter-free shortcut at a stage change (He et al. 2016, option A).

    Subsamples the input spatially by `stride` and appends zero channels, so
    `out[:, :in_channels] = x[:, :, ::stride, ::stride]` and the remaining channels are 0.
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 2) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ProbeError(
                f"PadShortcut cannot shrink channels ({in_channels} -> {out_channels}); "
                "use shortcut='B' for a projection."
            )
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, :: self.stride, :: self.stride]  # (batch, in_channels, h/stride, w/stride)
        extra = self.out_channels - self.in_channels
        # F.pad pads the last dims first: (w_left, w_right, h_top, h_bottom, c_front, c_back).
        return nn.functional.pad(x, (0, 0, 0, 0, 0, extra))  # (batch, out_channels, h', w')

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, stride={self.stride}"


class CifarBasicBlock(nn.Module):
    """Two 3x3 convs with BN; `relu2(F(x) + s(x))`, or `relu2(F(x))` when `plain`.

    `shortcut` is None for the identity, else the module computing `s(x)` at a stage change.
    The addition is out of place so the branch tensor (bn2's output) stays intact.
    """

    def __init__(
        self, in_channels: int, out_channels: int, stride: int = 1, *, plain: bool = False,
        shortcut: str = "A",
    ) -> None:
        super().__init__()
        self.plain = plain
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module | None = None
        if not plain and (stride != 1 or in_channels != out_channels):
            if shortcut == "A":
                self.shortcut = PadShortcut(in_channels, out_channels, stride)
            elif shortcut == "B":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                    nn.BatchNorm2d(out_channels),
                )
            else:
                raise unknown_name("shortcut", shortcut, ["A", "B"])
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        if self.plain:
            out = branch
        else:
            out = branch + (x if self.shortcut is None else self.shortcut(x))
        return self.relu2(out)


class CifarResNet(nn.Module):
    """Stem conv3x3(16)+BN+ReLU, stages `layer1..layer3` (16/32/64 channels), `avgpool`, `fc`."""

    def __init__(
        self, blocks_per_stage: int, *, num_classes: int = 10, in_channels: int = 3,
        plain: bool = False, shortcut: str = "A",
    ) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise unknown_name("shortcut", shortcut, ["A", "B"])
        self.plain = plain
        self.conv1 = nn.Conv2d(in_channels, _STAGE_WIDTHS[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(_STAGE_WIDTHS[0])
        self.relu = nn.ReLU()  # used once per forward, in the stem only
        channels = _STAGE_WIDTHS[0]
        stages = []
        for stage, width in enumerate(_STAGE_WIDTHS):
            blocks = []
            for i in range(blocks_per_stage):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(
                    CifarBasicBlock(channels, width, stride, plain=plain, shortcut=shortcut)
                )
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)
        _init_like_torchvision(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (batch, 16, h, w)
        x = self.layer3(self.layer2(self.layer1(x)))  # (batch, 64, h/4, w/4)
        x = torch.flatten(self.avgpool(x), 1)  # (batch, 64)
        return self.fc(x)


def _init_like_torchvision(model: nn.Module) -> None:
    # As torchvision.models.resnet.ResNet.__init__: He-normal convs, BN at (1, 0), default Linear.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.constant_(m.weight, 1)
            nn.init.constant_(m.bias, 0)


def cifar_resnet(
    depth: int, *, num_classes: int = 10, in_channels: int = 3, plain: bool = False,
    shortcut: str = "A",
) -> CifarResNet:
    """A CIFAR-style ResNet (or plain net) of `depth` = 6n+2 layers: n blocks per stage."""
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6 != 0:
        raise ProbeError(
            f"depth {depth!r} is not of the form 6n+2 (n >= 1); "
            f"use e.g. {', '.join(map(str, CIFAR_DEPTHS))}."
        )
    return CifarResNet(
        (depth - 2) // 6, num_classes=num_classes, in_channels=in_channels, plain=plain,
        shortcut=shortcut,
    )


_CIFAR_NAMES = tuple(
    f"{kind}{depth}" for kind in ("resnet", "plain") for depth in CIFAR_DEPTHS
)
_TORCHVISION_NAMES = tuple(
    n for n in torchvision.models.list_models(module=torchvision.models) if n not in _CIFAR_NAMES
)
# Names build_model accepts (besides "package.module:factory").
MODEL_NAMES: tuple[str, ...] = _CIFAR_NAMES + _TORCHVISION_NAMES


def _parse_cifar_name(name: str) -> tuple[bool, int] | None:
    """("resnet56" -> (False, 56), "plain20" -> (True, 20)) for any 6n+2 depth, else None."""
    for prefix, plain in (("resnet", False), ("plain", True)):
        rest = name[len(prefix):]
        if name.startswith(prefix) and rest.isdigit():
            depth = int(rest)
            if depth >= 8 and (depth - 2) % 6 == 0 and name not in _TORCHVISION_NAMES:
                return plain, depth
    return None


def build_model(
    name: str, *, num_classes: int = 10, in_channels: int = 3, weights: str | None = None
) -> nn.Module:
    """Build a model by name, in training mode.

    - CIFAR-style: "resnet20/32/44/56/110", "plain20/...": see `cifar_resnet` (any 6n+2 depth
      that is not a torchvision name works, e.g. "resnet26").
    - torchvision: any name in `torchvision.models.list_models()` (e.g. "resnet18"). With `weights`
      (e.g. "DEFAULT" or "ResNet18_Weights.IMAGENET1K_V1") the classifier keeps the weights' class
      count and `num_classes` is ignored (with a warning if it differs). `in_channels != 3`
      replaces the first conv; with weights its kernel is the pretrained one averaged over RGB.
    - "package.module:factory": imports the module and calls `factory(num_classes=...,
      in_channels=...)`, passing only the keywords the factory accepts.
    """
    if not isinstance(name, str) or not name:
        raise ProbeError(f"model name must be a non-empty string, got {name!r}.")
    if ":" in name:
        return _build_from_factory(name, num_classes=num_classes, in_channels=in_channels)
    cifar = _parse_cifar_name(name)
    if cifar is not None:
        if weights is not None:
            raise ProbeError(
                f"model {name!r} has no pretrained weights (got weights={weights!r}); "
                "train it with `python -m probe.train`."
            )
        plain, depth = cifar
        return cifar_resnet(depth, num_classes=num_classes, in_channels=in_channels, plain=plain)
    if name in _TORCHVISION_NAMES:
        return _build_torchvision(name, num_classes=num_classes, in_channels=in_channels,
                                  weights=weights)
    raise unknown_name("model", name, MODEL_NAMES)


def _build_torchvision(name: str, *, num_classes: int, in_channels: int, weights: str | None):
    if weights is None:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    else:
        try:
            weight_enum = torchvision.models.get_weight(weights) if "." in weights else (
                torchvision.models.get_model_weights(name)[weights]
            )
        except (KeyError, ValueError) as e:
            options = [f"{w}" for w in torchvision.models.get_model_weights(name)] + ["DEFAULT"]
            raise ProbeError(
                f"unknown weights {weights!r} for model {name!r}. Known: {', '.join(options)}."
            ) from e
        categories = weight_enum.meta.get("categories") or []
        if categories and len(categories) != num_classes:
            warnings.warn(
                f"weights {weights!r} fix {name}'s classifier at {len(categories)} classes; "
                f"ignoring num_classes={num_classes}.",
                stacklevel=3,
            )
        try:
            model = torchvision.models.get_model(name, weights=weight_enum)
        except (OSError, RuntimeError) as e:  # no network, or a corrupt download
            raise ProbeError(f"could not load weights {weights!r} for {name!r}: {e}") from e
    if in_channels != 3:
        _replace_first_conv(model, in_channels, keep_weights=weights is not None)
    return model


def _replace_first_conv(model: nn.Module, in_channels: int, *, keep_weights: bool) -> None:
    """Swap the first Conv2d (resnet: `conv1`) for one taking `in_channels` input channels."""
    for qualname, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            break
    else:
        raise ProbeError(f"cannot set in_channels={in_channels}: the model has no Conv2d.")
    new = nn.Conv2d(
        in_channels, module.out_channels, module.kernel_size, stride=module.stride,
        padding=module.padding, dilation=module.dilation, groups=module.groups,
        bias=module.bias is not None, padding_mode=module.padding_mode,
    )
    if keep_weights:
        with torch.no_grad():
            # (out, 3, k, k) -> (out, in_channels, k, k), keeping the response to a grey image.
            mean = module.weight.mean(dim=1, keepdim=True) * (3 / in_channels)
            new.weight.copy_(mean.expand_as(new.weight))
            if module.bias is not None:
                new.bias.copy_(module.bias)
    else:
        nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    parent_name, _, attr = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def _build_from_factory(spec: str, *, num_classes: int, in_channels: int) -> nn.Module:
    factory = import_attribute(spec, "model")
    if not callable(factory):
        raise ProbeError(f"model {spec!r}: {spec.partition(':')[2]!r} is not callable.")
    kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: call bare
        params = {}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    model = _call_factory(spec, factory, kwargs)
    if not isinstance(model, nn.Module):
        raise ProbeError(
            f"model {spec!r}: factory returned {type(model).__name__}, not a torch.nn.Module."
        )
    return model


def _call_factory(spec: str, factory, kwargs: dict) -> object:
    """`factory(**kwargs)`; a factory that takes **kwargs but not `in_channels` (torchvision's
    `resnet18` hands them to its class) is called again without it. Whatever the user's code
    raises becomes one line naming the factory."""
    while True:
        try:
            return factory(**kwargs)
        except TypeError as error:
            if "in_channels" in kwargs and "in_channels" in str(error):
                kwargs = {k: v for k, v in kwargs.items() if k != "in_channels"}
                continue
            raise ProbeError(f"model {spec!r}: calling it with {kwargs or 'no arguments'} failed "
                             f"({_one_line(error)}); give a factory that builds a model from num_classes "
                             "(and in_channels) alone, e.g. mypkg.models:build.") from error
        except Exception as error:  # the user's own code: say what it raised, in one line
            raise ProbeError(f"model {spec!r}: the factory raised {_one_line(error)}.") from error


# --- loading checkpoints --------------------------------------------------------------------------

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
    model: nn.Module, path: str | os.PathLike, *, allow_pickle: bool = False
) -> nn.Module:
    """Load the weights in `path` into `model` (in place) and return `model`.

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
