"""Shared fixtures: tiny residual models whose numbers can be checked by hand."""

from __future__ import annotations

import torch
from torch import nn
import pytest

torch.set_num_threads(1)


class TinyBlock(nn.Module):
    """out = relu(x + branch(x)), with a bias-free linear branch set by hand."""

    def __init__(self, weight: list[list[float]]) -> None:
        super().__init__()
        self.branch = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.branch.weight.copy_(torch.tensor(weight))
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.branch(x))


class LinearBlock(nn.Module):
    """out = x + A x (no activation), A set by hand."""

    def __init__(self, weight: list[list[float]]) -> None:
        super().__init__()
        self.branch = nn.Linear(2, 2, bias=False)
        with torch.no_grad():
            self.branch.weight.copy_(torch.tensor(weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.branch(x)


class TinyNet(nn.Module):
    """Two hand-set residual blocks and a linear head over 2 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.block1 = TinyBlock([[1.0, 0.0], [0.0, 0.0]])   # F(x) = (x0, 0)
        self.block2 = TinyBlock([[0.0, 0.0], [0.0, -0.5]])  # F(x) = (0, -x1 / 2)
        self.head = nn.Linear(2, 2)
        with torch.no_grad():
            self.head.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
            self.head.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block2(self.block1(x)))


@pytest.fixture
def tiny_net() -> TinyNet:
    return TinyNet()


def snapshot(model: nn.Module) -> dict:
    """Everything a probe call must leave unchanged."""
    hook_dicts = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
                  "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
                  "_load_state_dict_pre_hooks")
    return {
        "tensors": {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()},
        "training": {name: m.training for name, m in model.named_modules()},
        "hooks": {name: {d: len(getattr(m, d, {})) for d in hook_dicts} for name, m in model.named_modules()},
        "grad": {k: p.requires_grad for k, p in model.named_parameters()},
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    assert after["training"] == before["training"]
    assert after["hooks"] == before["hooks"]
    assert after["grad"] == before["grad"]
    assert before["tensors"].keys() == after["tensors"].keys()
    for key, value in before["tensors"].items():
        assert torch.equal(value, after["tensors"][key]), key
