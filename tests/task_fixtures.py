"""A model and a data set for the report tests of tasks other than classification, importable by
the CLI (`--model task_fixtures:two_head_model --dataset task_fixtures:unlabelled_images`).

`TwoHeadNet` has three residual blocks over 1 x 8 x 8 images and returns a list of two outputs
(one head per depth): no logits, no labels, so only the drift task applies. `block1`'s branch is
exactly zero, so deleting it changes nothing: its drift is exactly 0. `two_head_batchnorm_model`:
the same with BatchNorm in the branches of block0 and block2, for BatchNorm recalibration.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import TensorDataset


class Block(nn.Module):
    """relu(x + conv(x)), or relu(x + bn(conv(x)))."""

    def __init__(self, channels: int, batchnorm: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        # No nn.Identity in its place: the branch is then the convolution's output, found alike
        # by a torch.fx trace and by a recorded forward (an Identity runs no torch function).
        self.bn = nn.BatchNorm2d(channels) if batchnorm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        branch = self.conv(x)
        return F.relu(x + (self.bn(branch) if self.bn is not None else branch))


class TwoHeadNet(nn.Module):
    """stem -> block0 -> block1 -> head_a; -> down -> block2 -> head_b: [a, b]."""

    def __init__(self, seed: int = 0, batchnorm: bool = False) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block0, self.block1, self.block2 = Block(4, batchnorm), Block(4), Block(4, batchnorm)
        self.head_a = nn.Conv2d(4, 3, 1)
        self.down = nn.Conv2d(4, 4, 3, stride=2, padding=1)
        self.head_b = nn.Conv2d(4, 2, 1)
        with torch.no_grad():
            self.block1.conv.weight.zero_()
            self.block1.conv.bias.zero_()
            for module in self.modules():
                if isinstance(module, nn.BatchNorm2d):  # statistics that recalibration changes
                    module.running_mean.uniform_(-0.5, 0.5)
                    module.running_var.uniform_(0.5, 2.0)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = self.block1(self.block0(F.relu(self.stem(x))))
        return [self.head_a(h), self.head_b(self.block2(F.relu(self.down(h))))]


def two_head_model(seed: int = 0) -> TwoHeadNet:
    return TwoHeadNet(seed).eval()


def two_head_batchnorm_model(seed: int = 0) -> TwoHeadNet:
    return TwoHeadNet(seed, batchnorm=True).eval()


def unlabelled_images(split: str = "test") -> TensorDataset:
    """Images only (no targets): 12 of them for "test", another 12 for "train"."""
    generator = torch.Generator().manual_seed(0 if split == "test" else 1)
    return TensorDataset(torch.randn(12, 1, 8, 8, generator=generator))
