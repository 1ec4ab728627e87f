"""Model zoo: CIFAR-style ResNets (He et al. 2016, sec. 4.2), torchvision models and user
factories, built by name (`build_model`). Checkpoints are read and written by
`probe.loading.checkpoints`.

The CIFAR-style block keeps its branch output intact and owns both of its ReLUs, so hooks on
`bn2` see `F(x)` and hooks on `relu1`/`relu2` see one activation each (docs/architecture.md, "Pitfalls").
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Mapping

import torch
import torchvision
from torch import nn

from probe.errors import ProbeError, unknown_name
from probe.imports import import_attribute
from probe.loading.checkpoints import _one_line

__all__ = [
    "CIFAR_DEPTHS",
    "MODEL_NAMES",
    "CifarBasicBlock",
    "CifarResNet",
    "PadShortcut",
    "build_model",
    "cifar_resnet",
    "is_builtin_model",
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


def is_builtin_model(name: str) -> bool:
    """A classifier `build_model` builds by name (CIFAR-style or torchvision), not a factory."""
    return isinstance(name, str) and (name in _TORCHVISION_NAMES or _parse_cifar_name(name) is not None)


def build_model(
    name: str, *, num_classes: int | None = 10, in_channels: int | None = 3, weights: str | None = None,
    origins: Mapping[str, str] | None = None,
) -> nn.Module:
    """Build a model by name, in training mode.

    - CIFAR-style: "resnet20/32/44/56/110", "plain20/...": see `cifar_resnet` (any 6n+2 depth
      that is not a torchvision name works, e.g. "resnet26").
    - torchvision: any name in `torchvision.models.list_models()` (e.g. "resnet18"). With `weights`
      (e.g. "DEFAULT" or "ResNet18_Weights.IMAGENET1K_V1") the classifier keeps the weights' class
      count and `num_classes` is ignored (with a warning if it differs). `in_channels != 3`
      replaces the first conv; with weights its kernel is the pretrained one averaged over RGB.
    - "package.module:factory": imports the module and calls `factory(num_classes=...,
      in_channels=...)`, passing only the keywords the factory accepts, and neither when it is
      None (data without classes: the factory keeps its own). `origins` says where each value
      came from ({"num_classes": "the 10 classes of --dataset digits"}), for messages.
    """
    if not isinstance(name, str) or not name:
        raise ProbeError(f"model name must be a non-empty string, got {name!r}.")
    if ":" in name:
        return _build_from_factory(name, num_classes=num_classes, in_channels=in_channels, origins=origins)
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


def _build_from_factory(spec: str, *, num_classes: int | None, in_channels: int | None,
                        origins: Mapping[str, str] | None = None) -> nn.Module:
    factory = import_attribute(spec, "model")
    if not callable(factory):
        raise ProbeError(f"model {spec!r}: {spec.partition(':')[2]!r} is not callable.")
    # A value not given (None: data without classes) is not passed: the factory keeps its own.
    kwargs = {k: v for k, v in {"num_classes": num_classes, "in_channels": in_channels}.items() if v is not None}
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):  # builtins without a signature: call bare
        params = {}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    model = _call_factory(spec, factory, kwargs, origins or {})
    if not isinstance(model, nn.Module):
        raise ProbeError(
            f"model {spec!r}: factory returned {type(model).__name__}, not a torch.nn.Module."
        )
    return model


def _called_with(kwargs: dict, origins: Mapping[str, str]) -> str:
    """The keywords a factory was called with, each with where its value came from."""
    if not kwargs:
        return "no arguments"
    return ", ".join(f"{k}={v!r}" + (f" ({origins[k]})" if k in origins else "") for k, v in kwargs.items())


def _call_factory(spec: str, factory, kwargs: dict, origins: Mapping[str, str]) -> object:
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
            raise ProbeError(f"model {spec!r}: calling it with {_called_with(kwargs, origins)} failed "
                             f"({_one_line(error)}); give a factory that builds a model from num_classes "
                             "(and in_channels) alone, e.g. mypkg.models:build.") from error
        except Exception as error:  # the user's own code: say what it raised, in one line
            called = f" (called with {_called_with(kwargs, origins)})" if kwargs else ""
            raise ProbeError(f"model {spec!r}: the factory raised {_one_line(error)}{called}.") from error
