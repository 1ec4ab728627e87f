"""find_blocks, ablated, measure and sweep on every family of residual network we support.

Two kinds of test:
- discovery on full-size torchvision models, built on the meta device (tracing needs no
  weights): exact block counts and names, and which strategy (hooks or intercept) each gets;
- numbers on small configurations with random weights: zero-ablating a block equals a
  hand-written forward of that block without its branch (spliced into the model with a plain
  forward hook), measure's ratio equals ||F(x)|| / ||s(x)|| computed from the block's
  submodules, and sweep equals what probe.ablated gives.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn
from torchvision.models import convnext, efficientnet, mobilenetv2, mobilenetv3, resnet, swin_transformer

import probe
from tiny_models import FunctionalEnds, Untraceable, assert_unchanged, randomize, snapshot, tiny_vit


# -- discovery on full-size models ----------------------------------------------------------


def stage_names(prefix: str, depths: list[int], stages: list[int] | None = None) -> list[str]:
    stages = stages or list(range(1, len(depths) + 1))
    return [f"{prefix}{s}.{i}" for s, n in zip(stages, depths) for i in range(n)]


def resnet_names(depths):
    return stage_names("layer", depths)


def residual_users(model: nn.Module, kind: type) -> list[str]:
    """Oracle from the architecture itself: modules of `kind` whose use_res_connect is set."""
    return [name for name, m in model.named_modules() if isinstance(m, kind) and m.use_res_connect]


def doubled(names, sublayers=("attn", "mlp")):
    """A transformer layer's two residual additions, named by their sublayers."""
    return [f"{n}[{sublayer}]" for n in names for sublayer in sublayers]


# arch -> (expected count, expected names or a function of the model giving them)
FULL_SIZE = {
    "resnet18": (8, resnet_names([2, 2, 2, 2])),
    "resnet34": (16, resnet_names([3, 4, 6, 3])),
    "resnet50": (16, resnet_names([3, 4, 6, 3])),
    "resnet101": (33, resnet_names([3, 4, 23, 3])),
    "resnext50_32x4d": (16, resnet_names([3, 4, 6, 3])),
    "wide_resnet50_2": (16, resnet_names([3, 4, 6, 3])),
    "mobilenet_v2": (10, [f"features.{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)]),
    "mobilenet_v3_small": (6, [f"features.{i}" for i in (3, 5, 6, 8, 10, 11)]),
    "mobilenet_v3_large": (10, [f"features.{i}" for i in (1, 3, 5, 6, 8, 9, 10, 12, 14, 15)]),
    "efficientnet_b0": (9, ["features.2.1", "features.3.1", "features.4.1", "features.4.2", "features.5.1",
                            "features.5.2", "features.6.1", "features.6.2", "features.6.3"]),
    "efficientnet_v2_s": (35, lambda m: residual_users(m, (efficientnet.MBConv, efficientnet.FusedMBConv))),
    "regnet_y_400mf": (16, [f"trunk_output.block{s}.block{s}-{i}" for s, n in zip(range(1, 5), [1, 3, 6, 6])
                            for i in range(n)]),
    "regnet_x_400mf": (22, [f"trunk_output.block{s}.block{s}-{i}" for s, n in zip(range(1, 5), [1, 2, 7, 12])
                            for i in range(n)]),
    "convnext_tiny": (18, stage_names("features.", [3, 3, 9, 3], [1, 3, 5, 7])),
    "vit_b_16": (24, doubled([f"encoder.layers.encoder_layer_{i}" for i in range(12)], ("self_attention", "mlp"))),
    "swin_t": (24, doubled(stage_names("features.", [2, 2, 6, 2], [1, 3, 5, 7]))),
    "swin_v2_t": (24, doubled(stage_names("features.", [2, 2, 6, 2], [1, 3, 5, 7]))),
}


def full_size(arch: str) -> nn.Module:
    if arch.startswith("regnet"):  # RegNet computes its widths with real tensors: no meta device
        return getattr(torchvision.models, arch)()
    with torch.device("meta"):
        return getattr(torchvision.models, arch)()


@pytest.mark.parametrize("arch", FULL_SIZE)
def test_full_size_block_names(arch):
    model = full_size(arch)
    count, names = FULL_SIZE[arch]
    names = names(model) if callable(names) else names
    blocks = probe.find_blocks(model)
    assert len(blocks) == count == len(names)
    assert [b.name for b in blocks] == names
    assert [b.position for b in blocks] == list(range(count))


def test_mobilenet_names_match_use_res_connect():
    """The hand-written lists above agree with torchvision's own flags."""
    for arch, kind in (("mobilenet_v2", mobilenetv2.InvertedResidual), ("mobilenet_v3_small", mobilenetv3.InvertedResidual),
                       ("mobilenet_v3_large", mobilenetv3.InvertedResidual), ("efficientnet_b0", efficientnet.MBConv)):
        assert residual_users(full_size(arch), kind) == FULL_SIZE[arch][1], arch


def test_branches_shortcuts_and_strategies():
    """Module outputs get plain hooks; function ends, reused modules, intermediates get intercepted."""
    by_name = {b.name: b for b in probe.find_blocks(full_size("mobilenet_v2"))}
    assert by_name["features.3"] == probe.Block("features.3", "features.3", "features.3.conv", None, 0,
                                                "hooks", add_index=0, branch_operand=1)
    regnet_blocks = probe.find_blocks(full_size("regnet_y_400mf"))
    first = regnet_blocks[0]
    assert (first.branch, first.shortcut, first.strategy) == (
        "trunk_output.block1.block1-0.f", "trunk_output.block1.block1-0.proj", "hooks")
    convnext_block = probe.find_blocks(full_size("convnext_tiny"))[0]
    assert (convnext_block.branch, convnext_block.shortcut, convnext_block.strategy) == (
        "features.1.0.stochastic_depth", None, "hooks")

    vit = probe.find_blocks(full_size("vit_b_16"))
    layer = "encoder.layers.encoder_layer_0"
    assert vit[0] == probe.Block(f"{layer}[self_attention]", layer, f"{layer}.dropout", None, 0, "hooks", 0, 0)
    # The MLP residual adds to the attention residual's sum: no module outputs that value.
    assert vit[1] == probe.Block(f"{layer}[mlp]", layer, f"{layer}.mlp", f"{layer}[self_attention]", 1, "intercept", 1, 1)

    swin = probe.find_blocks(full_size("swin_t"))
    # Swin runs one stochastic_depth module for both branches: a hook on it would fire twice.
    assert {b.strategy for b in swin} == {"intercept"}
    assert (swin[0].branch, swin[0].shortcut, swin[0].add_index) == ("features.1.0.stochastic_depth", None, 0)
    assert (swin[1].shortcut, swin[1].add_index) == ("features.1.0[attn]", 1)


def test_vit_positional_embedding_is_not_a_block():
    blocks = probe.find_blocks(full_size("vit_b_16"))
    assert not any(b.module in ("encoder", "") for b in blocks)


def test_plain_vgg_is_refused_saying_what_was_searched():
    with pytest.raises(probe.ProbeError, match=r"no residual blocks found in VGG: searched its torch.fx trace "
                                               r"for additions of a tensor to a function of that same tensor"):
        probe.find_blocks(full_size("vgg11"))


# -- residual blocks written out here ---------------------------------------------------------


class PreActBlock(nn.Module):
    """He et al. 2016, "Identity Mappings": out = F(relu(bn(x))) + s, s = x or proj(relu(bn(x)))."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1, self.conv1 = nn.BatchNorm2d(cin), nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2, self.conv2 = nn.BatchNorm2d(cout), nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.shortcut = nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.layers = nn.Sequential(PreActBlock(4, 4), PreActBlock(4, 8, 2), PreActBlock(8, 8))
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        x = F.relu(self.bn(self.layers(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ConvBnLeaky(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.1))


class DarknetResidual(nn.Module):
    """YOLOv3's Darknet-53 unit: 1x1 conv halving the channels, 3x3 conv restoring them, add."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = ConvBnLeaky(channels, channels // 2, 1)
        self.expand = ConvBnLeaky(channels // 2, channels, 3)

    def forward(self, x):
        residual = x
        out = self.expand(self.reduce(x))
        out += residual
        return out


class Darknet(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.stem = ConvBnLeaky(3, 8, 3)
        self.stage1 = nn.Sequential(ConvBnLeaky(8, 16, 3, 2), DarknetResidual(16))
        self.stage2 = nn.Sequential(ConvBnLeaky(16, 32, 3, 2), DarknetResidual(32), DarknetResidual(32))
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.stage2(self.stage1(self.stem(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_preact_resnet_blocks():
    blocks = probe.find_blocks(PreActResNet())
    assert [(b.name, b.branch, b.shortcut, b.strategy) for b in blocks] == [
        ("layers.0", "layers.0.conv2", None, "hooks"),
        ("layers.1", "layers.1.conv2", "layers.1.shortcut", "hooks"),  # projection of the pre-activated x
        ("layers.2", "layers.2.conv2", None, "hooks"),
    ]


def test_darknet_residual_units():
    blocks = probe.find_blocks(Darknet())
    assert [(b.name, b.branch, b.shortcut, b.strategy) for b in blocks] == [
        ("stage1.1", "stage1.1.expand", None, "hooks"),
        ("stage2.1", "stage2.1.expand", None, "hooks"),
        ("stage2.2", "stage2.2.expand", None, "hooks"),
    ]


def test_branches_ending_in_a_function_or_a_scale():
    blocks = probe.find_blocks(FunctionalEnds())
    assert [(b.name, b.branch, b.shortcut, b.strategy, b.add_index, b.branch_operand) for b in blocks] == [
        ("blocks.0", "gelu(blocks.0.fc)", None, "intercept", 0, 1),
        ("blocks.1", "mul(blocks.1.gamma, blocks.1.f)", None, "intercept", 0, 1),
        ("blocks.2", "gelu(blocks.2.fc)", None, "intercept", 0, 1),
    ]


def test_untraceable_model_needs_an_example_input():
    model = Untraceable()
    with pytest.raises(probe.ProbeError, match="could not trace Untraceable with torch.fx.*example_input"):
        probe.find_blocks(model)
    model.train()
    before = snapshot(model)
    with pytest.raises(probe.ProbeError, match="running it on the example input failed .*RuntimeError"):
        probe.find_blocks(model, example_input=torch.randn(1, 5))  # wrong width
    assert_unchanged(model, before)
    assert torch._C._len_torch_function_stack() == 0
    blocks = probe.find_blocks(model, example_input=torch.randn(1, 12))
    assert_unchanged(model, before)
    assert [(b.name, b.branch, b.strategy, b.add_index, b.branch_operand) for b in blocks] == [
        ("blocks.0", "mul(blocks.0.gamma, blocks.0.f)", "intercept", 0, 1),
        ("blocks.1", "gelu(blocks.1.fc)", "intercept", 0, 1),
    ]


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "efficientnet_b0", "convnext_tiny", "vit_b_16", "swin_t"])
def test_forward_pass_discovery_agrees_with_tracing(arch):
    """The no-trace path finds the same additions (meta tensors: shapes only, no arithmetic)."""
    model = full_size(arch)
    traced = probe.find_blocks(model)
    from probe.discovery.find import blocks_in
    from probe.discovery.tracing import record

    recorded = blocks_in(record(model, torch.empty(1, 3, 224, 224, device="meta")))
    assert [(b.name, b.module, b.add_index, b.branch_operand) for b in recorded] == \
           [(b.name, b.module, b.add_index, b.branch_operand) for b in traced]


# -- numbers on small configurations ----------------------------------------------------------


@dataclass
class Case:
    """A small model, one of its blocks, and that block written out by hand.

    pair(module, x) -> (F(x), s(x)) from the block module's submodules, given its input x;
    without(module, x) -> the block module's output with the branch removed.
    """

    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    block: str
    pair: Callable
    without: Callable


def relu_after(pair):
    return lambda m, x: m.relu(pair(m, x)[1])


def basic_pair(m, x):
    return m.bn2(m.conv2(m.relu(m.bn1(m.conv1(x))))), (m.downsample(x) if m.downsample is not None else x)


def bottleneck_pair(m, x):
    out = m.relu(m.bn2(m.conv2(m.relu(m.bn1(m.conv1(x))))))
    return m.bn3(m.conv3(out)), (m.downsample(x) if m.downsample is not None else x)


def vit_attention(m, x):
    h = m.ln_1(x)
    return m.dropout(m.self_attention(h, h, h, need_weights=False)[0])


def swin_first(m, x):
    return m.stochastic_depth(m.attn(m.norm1(x)))


def preact_pair(m, x):
    h = F.relu(m.bn1(x))
    return m.conv2(F.relu(m.bn2(m.conv1(h)))), (m.shortcut(h) if m.shortcut is not None else x)


def tiny_swin():
    return swin_transformer.SwinTransformer(patch_size=[4, 4], embed_dim=8, depths=[2, 1], num_heads=[1, 2],
                                            window_size=[2, 2], num_classes=3)


def tiny_convnext():
    return convnext.ConvNeXt([convnext.CNBlockConfig(8, 16, 2), convnext.CNBlockConfig(16, None, 1)],
                             layer_scale=0.5, num_classes=3)


def tiny_efficientnet():
    setting, last = efficientnet._efficientnet_conf("efficientnet_b0", width_mult=0.25, depth_mult=0.5)
    return efficientnet.EfficientNet(setting, dropout=0.0, last_channel=last, num_classes=3)


CASES = {
    "resnet18": Case(lambda: torchvision.models.resnet18(num_classes=3), (2, 3, 32, 32), "layer2.0",
                     basic_pair, lambda m, x: m.relu(m.downsample(x))),
    "resnext": Case(lambda: resnet.ResNet(resnet.Bottleneck, [1, 2, 1, 1], groups=4, width_per_group=4, num_classes=3),
                    (2, 3, 32, 32), "layer2.1", bottleneck_pair, lambda m, x: m.relu(x)),
    "mobilenet_v2": Case(lambda: torchvision.models.mobilenet_v2(width_mult=0.25, num_classes=3), (2, 3, 32, 32),
                         "features.5", lambda m, x: (m.conv(x), x), lambda m, x: x),
    "mobilenet_v3": Case(lambda: torchvision.models.mobilenet_v3_small(num_classes=3), (2, 3, 32, 32), "features.5",
                         lambda m, x: (m.block(x), x), lambda m, x: x),
    "efficientnet": Case(tiny_efficientnet, (2, 3, 32, 32), "features.4.1",
                         lambda m, x: (m.stochastic_depth(m.block(x)), x), lambda m, x: x),
    "regnet": Case(lambda: torchvision.models.regnet_y_400mf(num_classes=3), (2, 3, 32, 32),
                   "trunk_output.block2.block2-0", lambda m, x: (m.f(x), m.proj(x)),
                   lambda m, x: m.activation(m.proj(x))),
    "convnext": Case(tiny_convnext, (2, 3, 32, 32), "features.1.1",
                     lambda m, x: (m.stochastic_depth(m.layer_scale * m.block(x)), x), lambda m, x: x),
    "vit_attention": Case(tiny_vit, (2, 3, 32, 32), "encoder.layers.encoder_layer_1[self_attention]",
                          lambda m, x: (vit_attention(m, x), x), lambda m, x: x + m.mlp(m.ln_2(x))),
    "vit_mlp": Case(tiny_vit, (2, 3, 32, 32), "encoder.layers.encoder_layer_0[mlp]",
                    lambda m, x: (m.mlp(m.ln_2(x + vit_attention(m, x))), x + vit_attention(m, x)),
                    lambda m, x: x + vit_attention(m, x)),
    "swin_attention": Case(tiny_swin, (2, 3, 16, 16), "features.1.1[attn]", lambda m, x: (swin_first(m, x), x),
                           lambda m, x: x + m.stochastic_depth(m.mlp(m.norm2(x)))),
    "swin_mlp": Case(tiny_swin, (2, 3, 16, 16), "features.1.0[mlp]",
                     lambda m, x: (m.stochastic_depth(m.mlp(m.norm2(x + swin_first(m, x)))), x + swin_first(m, x)),
                     lambda m, x: x + swin_first(m, x)),
    "preact_resnet": Case(PreActResNet, (2, 3, 8, 8), "layers.1", preact_pair,
                          lambda m, x: m.shortcut(F.relu(m.bn1(x)))),
    "darknet": Case(Darknet, (2, 3, 16, 16), "stage2.2", lambda m, x: (m.expand(m.reduce(x)), x), lambda m, x: x),
    "gelu_end": Case(FunctionalEnds, (3, 12), "blocks.2", lambda m, x: (F.gelu(m.fc(x)), x), lambda m, x: x),
    "scaled_end": Case(FunctionalEnds, (3, 12), "blocks.1", lambda m, x: (m.gamma * m.f(x), x), lambda m, x: x),
}


def block_module(model: nn.Module, case: Case) -> nn.Module:
    return model.get_submodule(case.block.split("[")[0])


def block_input(model: nn.Module, case: Case, x: torch.Tensor) -> torch.Tensor:
    """The tensor the block module is called with, caught with a plain pre-hook."""
    seen = []
    handle = block_module(model, case).register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    try:
        model(x)
    finally:
        handle.remove()
    return seen[0]


def forward_without(model: nn.Module, case: Case, x: torch.Tensor) -> torch.Tensor:
    """The whole model, with the block module's forward replaced by the hand-written one."""
    handle = block_module(model, case).register_forward_hook(lambda m, args, _out: case.without(m, args[0]))
    try:
        return model(x)
    finally:
        handle.remove()


@pytest.fixture(scope="module")
def built():
    cache: dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]] = {}

    def get(name: str):
        if name not in cache:
            case = CASES[name]
            model = randomize(case.build(), case.input_shape)
            torch.manual_seed(1)
            cache[name] = (model, torch.randn(case.input_shape), torch.randint(0, 3, (case.input_shape[0],)))
        return cache[name]

    return get


@pytest.mark.parametrize("name", CASES)
def test_zero_ablation_equals_forward_without_branch(name, built):
    model, x, _ = built(name)
    case = CASES[name]
    assert case.block in [b.name for b in probe.find_blocks(model)]
    with torch.no_grad():
        expected = forward_without(model, case, x)
        with probe.ablated(model, [case.block]):
            actual = model(x)
        assert not torch.allclose(actual, model(x), atol=1e-4)  # the branch mattered
    assert torch.allclose(actual, expected, atol=1e-5), (actual - expected).abs().max()


@pytest.mark.parametrize("name", CASES)
def test_measure_ratio_equals_direct_computation(name, built):
    model, x, y = built(name)
    case = CASES[name]
    with torch.no_grad():
        f, s = case.pair(block_module(model, case), block_input(model, case, x))
        f, s = f.flatten(1).double(), s.flatten(1).double()
    ratio = (f.norm(dim=1) / s.norm(dim=1)).mean().item()
    cosine = F.cosine_similarity(f, s, dim=1).mean().item()
    before = snapshot(model)
    table = probe.measure(model, [(x, y)], blocks=[case.block], progress=False)
    assert_unchanged(model, before)
    assert list(table["block"]) == [case.block] and table.loc[0, "samples"] == len(x)
    assert table.loc[0, "ratio"] == pytest.approx(ratio, rel=1e-4)
    assert table.loc[0, "cosine"] == pytest.approx(cosine, rel=1e-4, abs=1e-5)


@pytest.mark.parametrize("name", CASES)
def test_sweep_equals_ablated(name, built):
    model, x, y = built(name)
    case = CASES[name]
    with torch.no_grad():
        baseline = model(x)
        with probe.ablated(model, [case.block]):
            ablated = model(x)
    before = snapshot(model)
    for fast in (True, False):
        table = probe.sweep(model, [(x[:1], y[:1]), (x[1:], y[1:])], blocks=[case.block], fast=fast, progress=False)
        row = table.iloc[0]
        assert row["loss"] == pytest.approx(F.cross_entropy(ablated, y).item(), rel=1e-4)
        assert row["accuracy"] == pytest.approx((ablated.argmax(1) == y).float().mean().item())
        assert row["flip_rate"] == pytest.approx((ablated.argmax(1) != baseline.argmax(1)).float().mean().item())
        assert table.attrs["baseline"]["loss"] == pytest.approx(F.cross_entropy(baseline, y).item(), rel=1e-4)
    assert_unchanged(model, before)


def test_measure_and_sweep_cover_every_block_of_a_transformer(built):
    """All blocks at once (hooks and intercepted ones together) give the same numbers as alone."""
    model, x, y = built("vit_mlp")
    together = probe.measure(model, [(x, y)], progress=False).set_index("block")
    for name in together.index:
        alone = probe.measure(model, [(x, y)], blocks=[name], progress=False)
        assert alone.loc[0, "ratio"] == pytest.approx(together.loc[name, "ratio"], rel=1e-6)
    swept = probe.sweep(model, [(x, y)], progress=False)
    assert list(swept["block"]) == list(together.index)


def test_untraceable_model_measures_and_ablates_with_its_found_blocks():
    model = randomize(Untraceable(), (1, 12))
    x, y = torch.randn(3, 12), torch.tensor([0, 1, 2])
    blocks = probe.find_blocks(model, example_input=x[:1])
    gelu = model.blocks[1]
    with torch.no_grad():
        h = model.blocks[0](model.stem(x))
        expected_ratio = (F.gelu(gelu.fc(h)).norm(dim=1) / h.norm(dim=1)).mean().item()
        expected = model.head(h)  # blocks.1 ablated: h passes unchanged
        with probe.ablated(model, [blocks[1]]):
            actual = model(x)
    assert torch.allclose(actual, expected, atol=1e-6)
    table = probe.measure(model, [(x, y)], blocks=blocks, progress=False)
    assert table.loc[1, "ratio"] == pytest.approx(expected_ratio, rel=1e-5)
    swept = probe.sweep(model, [(x, y)], blocks=blocks, progress=False)
    assert swept.loc[1, "loss"] == pytest.approx(F.cross_entropy(expected, y).item(), rel=1e-5)


def test_mean_ablation_of_an_intercepted_block(built):
    model, x, y = built("vit_mlp")
    case = CASES["vit_mlp"]
    means = probe.branch_means(model, [(x, y)], blocks=[case.block], progress=False)
    module = block_module(model, case)
    with torch.no_grad():
        f, _ = case.pair(module, block_input(model, case, x))
        assert torch.allclose(means[case.block], f.mean(dim=0), atol=1e-6)
        handle = module.register_forward_hook(lambda m, args, _o: case.without(m, args[0]) + f.mean(dim=0))
        try:
            expected = model(x)
        finally:
            handle.remove()
        with probe.ablated(model, [case.block], mode="mean", means=means):
            actual = model(x)
    assert torch.allclose(actual, expected, atol=1e-5)


# -- intercepted blocks leave nothing behind ----------------------------------------------------


def mode_stack_depth() -> int:
    return torch._C._len_torch_function_stack()


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_intercepted_block_leaves_no_hook_or_mode_when_the_forward_raises(error):
    model = randomize(FunctionalEnds(), (1, 12))
    before, depth = snapshot(model), mode_stack_depth()

    def fail(_module, _args, _output):
        raise error("tanh broke")

    with pytest.raises(error):
        with probe.ablated(model, ["blocks.0", "blocks.1"]):
            # Inside an intercepted block: a KeyboardInterrupt skips its always-called hook.
            handle = model.blocks[1].f[1].register_forward_hook(fail)
            try:
                model(torch.randn(2, 12))
            finally:
                handle.remove()
    assert_unchanged(model, before)
    assert mode_stack_depth() == depth
    from probe.instrument import intercept

    assert not intercept._watches


def test_intercepted_block_raising_inside_its_forward_is_cleaned_up():
    model = randomize(FunctionalEnds(), (1, 12))
    before, depth = snapshot(model), mode_stack_depth()
    handle = model.blocks[1].f[1].register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("tanh broke")))
    try:
        with pytest.raises(RuntimeError, match="tanh broke"):
            probe.measure(model, [(torch.randn(2, 12), torch.tensor([0, 1]))], progress=False)
        assert mode_stack_depth() == depth
    finally:
        handle.remove()
    assert_unchanged(model, before)
    # And the model works normally afterwards: nothing is intercepted any more.
    x = torch.randn(2, 12)
    with torch.no_grad():
        h = model.stem(x)
        for block in model.blocks:
            h = block(h)
        assert torch.allclose(model(x), model.head(h))


def test_intercept_reports_an_addition_that_never_happens():
    model = FunctionalEnds()
    wrong = probe.Block("blocks.0", "blocks.0", "right", None, 0, "intercept", add_index=1, branch_operand=1)
    with pytest.raises(probe.ProbeError, match=r"addition #1 .* made only 1"):
        probe.measure(model, [(torch.randn(2, 12), torch.tensor([0, 1]))], blocks=[wrong], progress=False)
    assert mode_stack_depth() == 0


def test_describe_blocks_lists_output_shapes_and_leaves_the_model_unchanged():
    model = randomize(tiny_vit(), (1, 3, 32, 32))
    model.train()
    before = snapshot(model)
    table = probe.describe_blocks(model, torch.randn(1, 3, 32, 32))
    assert_unchanged(model, before)
    assert list(table.columns) == ["name", "module", "branch", "shortcut", "output_shape"]
    layer = "encoder.layers.encoder_layer_0"
    assert table.iloc[0].to_dict() == {"name": f"{layer}[self_attention]", "module": layer, "branch": f"{layer}.dropout",
                                       "shortcut": "identity", "output_shape": (1, 17, 16)}
    assert table.iloc[1]["shortcut"] == f"{layer}[self_attention]"
    assert list(table["output_shape"]) == [(1, 17, 16)] * 4  # 16 patches + the class token


def test_describe_blocks_of_convolutional_stages():
    model = randomize(torchvision.models.resnet18(num_classes=3), (2, 3, 32, 32))
    table = probe.describe_blocks(model, torch.randn(2, 3, 32, 32))
    assert list(table["output_shape"]) == [(2, 64, 8, 8)] * 2 + [(2, 128, 4, 4)] * 2 + [(2, 256, 2, 2)] * 2 + \
           [(2, 512, 1, 1)] * 2
    assert list(table["shortcut"])[2] == "layer2.0.downsample"
