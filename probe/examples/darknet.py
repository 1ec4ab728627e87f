"""A detector-shaped example: a small Darknet-53-style backbone with two YOLO-style heads.

Darknet-53 (YOLOv3's backbone) stacks residual units `x + conv3x3(conv1x1(x))` (each conv
followed by BatchNorm and LeakyReLU 0.1) in stages that start with a stride-2 convolution;
YOLOv3 predicts boxes from several stages. Here: three stages of 1, 2 and 2 units, and two
heads (on the last two stages), each a 1x1 convolution to 3 anchors x (5 + classes) channels.
The forward returns the two heads' maps as a list. There are no labels: probe it with
`task="drift"`, which asks how far each head's output moves when a unit is deleted.

    python -m probe.ablate --model probe.examples.darknet:darknet_tiny --dataset probe.examples.darknet:random_images \\
        --task drift --skip degradation representation recalibration

(random weights and images: a shape example; give --checkpoint and your own --dataset for a
real detector).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import TensorDataset


def conv(in_channels: int, out_channels: int, kernel: int, stride: int = 1) -> nn.Sequential:
    """Darknet's convolution: conv (no bias), BatchNorm, LeakyReLU(0.1)."""
    return nn.Sequential(nn.Conv2d(in_channels, out_channels, kernel, stride, kernel // 2, bias=False),
                         nn.BatchNorm2d(out_channels), nn.LeakyReLU(0.1))


class ResidualUnit(nn.Module):
    """x + conv3x3(conv1x1(x)), the 1x1 halving the channels: Darknet-53's residual block."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = conv(channels, channels // 2, 1)
        self.expand = conv(channels // 2, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.expand(self.reduce(x))


def stage(in_channels: int, out_channels: int, units: int) -> nn.Sequential:
    return nn.Sequential(conv(in_channels, out_channels, 3, stride=2), *[ResidualUnit(out_channels) for _ in range(units)])


class DarknetTiny(nn.Module):
    def __init__(self, classes: int = 2, units: tuple[int, ...] = (1, 2, 2), width: int = 8) -> None:
        super().__init__()
        self.stem = conv(3, width, 3)
        channels = [width * 2 ** (i + 1) for i in range(len(units))]
        self.stages = nn.ModuleList(stage(c_in, c_out, n) for c_in, c_out, n in zip([width, *channels], channels, units))
        outputs = 3 * (5 + classes)  # 3 anchors x (box, objectness, classes)
        self.heads = nn.ModuleList(nn.Conv2d(c, outputs, 1) for c in channels[-2:])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        features = []
        for part in self.stages:
            x = part(x)
            features.append(x)
        return [head(feature) for head, feature in zip(self.heads, features[-2:])]  # (B, 21, 8, 8), (B, 21, 4, 4)


def darknet_tiny(seed: int = 0) -> DarknetTiny:
    """Seeded random weights, with BatchNorm statistics of a few random batches (eval mode)."""
    torch.manual_seed(seed)
    model = DarknetTiny()
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(16, 3, 32, 32))
    return model.eval()


def random_images(split: str = "test", seed: int = 0) -> TensorDataset:
    """Unlabelled 3 x 32 x 32 images (items are 1-tuples: no targets)."""
    generator = torch.Generator().manual_seed(seed + (0 if split == "test" else 1))
    return TensorDataset(torch.randn(32, 3, 32, 32, generator=generator))
