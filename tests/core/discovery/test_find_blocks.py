"""Block discovery: exact names, branches and shortcuts."""

import pytest
import torch
import torchvision
from torch import nn

import probe


def names(model):
    return [b.name for b in probe.find_blocks(model)]


def test_resnet18_blocks():
    blocks = probe.find_blocks(torchvision.models.resnet18())
    assert [b.name for b in blocks] == [f"layer{s}.{i}" for s in range(1, 5) for i in range(2)]
    assert [b.position for b in blocks] == list(range(8))
    assert {b.branch for b in blocks} == {f"{b.name}.bn2" for b in blocks}
    # Only the first block of stages 2-4 projects its shortcut.
    assert [b.shortcut for b in blocks] == [None, None, "layer2.0.downsample", None,
                                            "layer3.0.downsample", None, "layer4.0.downsample", None]


def test_resnet50_blocks():
    blocks = probe.find_blocks(torchvision.models.resnet50())
    expected = [f"layer1.{i}" for i in range(3)] + [f"layer2.{i}" for i in range(4)] + \
               [f"layer3.{i}" for i in range(6)] + [f"layer4.{i}" for i in range(3)]
    assert [b.name for b in blocks] == expected
    assert all(b.branch == f"{b.name}.bn3" for b in blocks)
    assert [b.name for b in blocks if b.shortcut] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_cifar_resnet_blocks(depth):
    from probe.loading.models import cifar_resnet

    n = (depth - 2) // 6
    blocks = probe.find_blocks(cifar_resnet(depth))
    assert [b.name for b in blocks] == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(n)]
    assert [b.name for b in blocks if b.shortcut] == ["layer2.0", "layer3.0"]
    assert all(b.branch == f"{b.name}.bn2" for b in blocks)


def test_plain_network_is_refused():
    from probe.loading.models import cifar_resnet

    with pytest.raises(probe.ProbeError, match="no residual blocks found in CifarResNet"):
        probe.find_blocks(cifar_resnet(20, plain=True))
    with pytest.raises(probe.ProbeError, match="no residual blocks found in VGG"):
        with torch.device("meta"):  # discovery only traces: no need to fill 130M weights
            vgg = torchvision.models.vgg11()
        probe.find_blocks(vgg)


def test_parameter_addition_is_not_residual():
    class WithEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.position = nn.Parameter(torch.zeros(4))
            self.f = nn.Linear(4, 4)

        def forward(self, x):
            x = x + self.position  # a learned constant, no function of x
            return x + self.f(x)

    blocks = probe.find_blocks(WithEmbedding())
    assert [(b.name, b.branch, b.shortcut) for b in blocks] == [("<model>", "f", None)]


def test_sum_of_two_deep_paths_is_not_residual():
    class TwoTowers(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])
            self.b = nn.Sequential(*[nn.Linear(4, 4) for _ in range(6)])

        def forward(self, x):
            return self.a(x) + self.b(x)

    with pytest.raises(probe.ProbeError):
        probe.find_blocks(TwoTowers())


def test_discovery_is_reused_until_the_module_tree_changes():
    model = torchvision.models.resnet18()
    first = probe.find_blocks(model)
    assert probe.find_blocks(model) == first
    model.layer1[0] = torch.nn.Identity()  # no longer a residual block
    assert [b.name for b in probe.find_blocks(model)][0] == "layer1.1"
