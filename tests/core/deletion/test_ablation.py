"""ablated(mode="zero") against hand-written forwards of torchvision's blocks."""

import pytest
import torch
import torchvision

import probe


def resnet_forward_without(model, x, skip):
    """torchvision ResNet's forward written out, with block `skip`'s branch removed."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    for stage in range(1, 5):
        for index, block in enumerate(getattr(model, f"layer{stage}")):
            identity = x if block.downsample is None else block.downsample(x)
            if f"layer{stage}.{index}" == skip:
                out = identity
            elif isinstance(block, torchvision.models.resnet.Bottleneck):
                out = block.relu(block.bn1(block.conv1(x)))
                out = block.relu(block.bn2(block.conv2(out)))
                out = block.bn3(block.conv3(out)) + identity
            else:
                out = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(x))))) + identity
            x = block.relu(out)
    return model.fc(torch.flatten(model.avgpool(x), 1))


@pytest.mark.parametrize("arch,skip", [
    ("resnet18", "layer1.1"),   # identity shortcut
    ("resnet18", "layer2.0"),   # downsampling block: the projection still runs
    ("resnet18", None),
    ("resnet50", "layer3.0"),   # Bottleneck with projection
    ("resnet50", "layer4.2"),
])
def test_zero_ablation_equals_forward_without_branch(arch, skip):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=5).eval()
    # Non-trivial BN statistics, so a wrong shortcut would show.
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = resnet_forward_without(model, x, skip)
        if skip is None:
            actual = model(x)
        else:
            with probe.ablated(model, [skip]):
                actual = model(x)
            assert not torch.allclose(actual, model(x))  # the ablation changed something
    assert torch.allclose(actual, expected, atol=1e-5)


def test_ablating_two_blocks_at_once():
    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=3).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad(), probe.ablated(model, ["layer1.0", "layer3.0"]):
        both = model(x)
        blocks = [model.layer1[0], model.layer3[0]]
        for block in blocks:  # check against zeroed bn2 weights: same function
            block.bn2.weight.data.zero_(); block.bn2.bias.data.zero_()
    with torch.no_grad():
        zeroed = model(x)
    assert torch.allclose(both, zeroed, atol=1e-6)
