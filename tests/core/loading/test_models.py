"""Tests for probe.loading.models: CIFAR-style ResNets, the model registry and checkpoints."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from torch import nn

from probe.errors import ProbeError
from probe.loading.checkpoints import load_checkpoint, save_checkpoint
from probe.loading.models import (
    MODEL_NAMES,
    CifarBasicBlock,
    PadShortcut,
    build_model,
    cifar_resnet,
)


def _blocks(model: nn.Module) -> list[tuple[str, CifarBasicBlock]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, CifarBasicBlock)]


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# Hand count for ResNet-20 (n = 3 blocks per stage, option A shortcuts have no parameters);
# a 3x3 conv from a to b channels has 9ab weights, a BN over c channels has 2c parameters.
_STEM = 9 * 3 * 16 + 2 * 16  # 464
_STAGE1 = 3 * (2 * 9 * 16 * 16 + 2 * 2 * 16)  # 3 * 4672 = 14016
_STAGE2 = (9 * 16 * 32 + 9 * 32 * 32 + 2 * 2 * 32) + 2 * (2 * 9 * 32 * 32 + 2 * 2 * 32)  # 51072
_STAGE3 = (9 * 32 * 64 + 9 * 64 * 64 + 2 * 2 * 64) + 2 * (2 * 9 * 64 * 64 + 2 * 2 * 64)  # 203520
_FC = 64 * 10 + 10  # 650
RESNET20_PARAMS = 269_722


def test_hand_count_adds_up():
    assert _STEM + _STAGE1 + _STAGE2 + _STAGE3 + _FC == RESNET20_PARAMS


def test_resnet20_blocks_and_parameter_count():
    model = cifar_resnet(20)
    names = [n for n, _ in _blocks(model)]
    assert names == [f"layer{s}.{i}" for s in (1, 2, 3) for i in range(3)]
    # He et al. 2016, Table 6: 0.27M.
    assert _num_params(model) == RESNET20_PARAMS


def test_resnet56_has_27_blocks():
    names = [n for n, _ in _blocks(build_model("resnet56"))]
    assert len(names) == 27
    assert names[0] == "layer1.0" and names[9] == "layer2.0" and names[-1] == "layer3.8"


def test_shortcuts_only_at_stage_changes():
    model = cifar_resnet(20)
    with_shortcut = [n for n, b in _blocks(model) if b.shortcut is not None]
    assert with_shortcut == ["layer2.0", "layer3.0"]
    assert all(isinstance(model.get_submodule(n).shortcut, PadShortcut) for n in with_shortcut)


def test_block_owns_its_relus():
    block = cifar_resnet(20).layer1[0]
    assert block.relu1 is not block.relu2
    assert [n for n, _ in block.named_children()] == [
        "conv1", "bn1", "relu1", "conv2", "bn2", "relu2"
    ]  # shortcut None is not a child


def test_output_shapes():
    model = cifar_resnet(20, num_classes=7, in_channels=1).eval()
    x = torch.randn(2, 1, 16, 16)
    feats = {}
    for name in ("layer1", "layer2", "layer3"):
        model.get_submodule(name).register_forward_hook(
            lambda m, i, o, name=name: feats.__setitem__(name, o.shape)
        )
    assert model(x).shape == (2, 7)
    assert feats == {
        "layer1": (2, 16, 16, 16), "layer2": (2, 32, 8, 8), "layer3": (2, 64, 4, 4)
    }


def test_plain_has_no_additions_and_same_parameters():
    resnet, plain = cifar_resnet(20), build_model("plain20")
    assert all(b.plain and b.shortcut is None for _, b in _blocks(plain))
    assert _num_params(plain) == _num_params(resnet) == RESNET20_PARAMS
    # With the same weights, a plain block outputs relu(F(x)), a residual one relu(F(x) + x).
    torch.manual_seed(0)
    block_r = CifarBasicBlock(4, 4).eval()
    block_p = CifarBasicBlock(4, 4, plain=True).eval()
    block_p.load_state_dict(block_r.state_dict())
    x = torch.randn(2, 4, 5, 5)
    branch = block_r.bn2(block_r.conv2(block_r.relu1(block_r.bn1(block_r.conv1(x)))))
    torch.testing.assert_close(block_p(x), torch.relu(branch))
    torch.testing.assert_close(block_r(x), torch.relu(branch + x))


def test_shortcut_b_is_a_projection():
    model = cifar_resnet(20, shortcut="B")
    sc = model.layer2[0].shortcut
    assert isinstance(sc, nn.Sequential) and sc[0].kernel_size == (1, 1) and sc[0].stride == (2, 2)
    # Two 1x1 projections (16->32, 32->64) and their BNs on top of the option-A count.
    assert _num_params(model) == RESNET20_PARAMS + 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64


def test_branch_tensor_is_not_modified_by_the_addition():
    block = CifarBasicBlock(2, 2).eval()
    seen = {}

    def keep(module, inputs, output):
        seen["branch"] = (output, output.clone())  # the tensor itself and a copy

    block.bn2.register_forward_hook(keep)
    block(torch.randn(1, 2, 3, 3))
    kept, copy = seen["branch"]
    torch.testing.assert_close(kept, copy)


def test_pad_shortcut_by_hand():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)
    out = PadShortcut(1, 3, stride=2)(x)
    expected = torch.zeros(1, 3, 2, 2)
    expected[0, 0] = torch.tensor([[0.0, 2.0], [8.0, 10.0]])
    assert out.shape == (1, 3, 2, 2)
    torch.testing.assert_close(out, expected)
    assert list(PadShortcut(1, 3).parameters()) == []


@pytest.mark.parametrize("depth", [7, 15, 21, 2])
def test_bad_depth(depth):
    with pytest.raises(ProbeError, match=rf"depth {depth}\b.*20, 32, 44, 56, 110"):
        cifar_resnet(depth)


def test_bad_shortcut():
    with pytest.raises(ProbeError, match="'C'"):
        cifar_resnet(20, shortcut="C")


def test_model_names():
    for name in ("resnet20", "resnet110", "plain56", "resnet18", "resnet50"):
        assert name in MODEL_NAMES


def test_torchvision_model_num_classes_and_channels():
    model = build_model("resnet18", num_classes=7)
    assert model.fc.out_features == 7
    gray = build_model("resnet18", num_classes=7, in_channels=1)
    assert gray.conv1.in_channels == 1
    assert gray.eval()(torch.randn(1, 1, 32, 32)).shape == (1, 7)


def test_resnet50_is_torchvision_not_cifar():
    # 50 = 6 * 8 + 2, but "resnet50" must stay torchvision's bottleneck network.
    assert type(build_model("resnet50")).__module__ == "torchvision.models.resnet"


def test_unknown_weights_name_lists_known():
    with pytest.raises(ProbeError, match=r"unknown weights 'NOPE'.*IMAGENET1K_V1"):
        build_model("resnet18", weights="NOPE")
    with pytest.raises(ProbeError, match="no pretrained weights"):
        build_model("resnet20", weights="DEFAULT")


def test_unknown_model_name():
    with pytest.raises(ProbeError, match=r"unknown model 'resnet57'.*Did you mean"):
        build_model("resnet57")


def test_factory_spec(tmp_path, monkeypatch):
    (tmp_path / "my_factory_mod.py").write_text(textwrap.dedent("""
        from torch import nn

        def with_args(num_classes, in_channels):
            return nn.Linear(in_channels, num_classes)

        def bare():
            return nn.Linear(2, 2)

        def not_a_model():
            return 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "my_factory_mod", raising=False)
    model = build_model("my_factory_mod:with_args", num_classes=5, in_channels=4)
    assert (model.in_features, model.out_features) == (4, 5)
    assert build_model("my_factory_mod:bare", num_classes=5).out_features == 2
    with pytest.raises(ProbeError, match="no 'missing'"):
        build_model("my_factory_mod:missing")
    with pytest.raises(ProbeError, match="cannot import module 'no_such_mod_xyz'"):
        build_model("no_such_mod_xyz:f")
    with pytest.raises(ProbeError, match="not a torch.nn.Module"):
        build_model("my_factory_mod:not_a_model")


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_checkpoint_roundtrip(tmp_path):
    source = cifar_resnet(20, num_classes=3, in_channels=1)
    path = save_checkpoint(source, tmp_path / "sub" / "m.pt", epochs=2, note="x")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["m.pt"]  # no temp left
    torch.manual_seed(1)
    target = cifar_resnet(20, num_classes=3, in_channels=1)
    assert load_checkpoint(target, path) is target
    for (k, a), (k2, b) in zip(source.state_dict().items(), target.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    saved = torch.load(path, weights_only=True)
    assert saved["metadata"] == {"epochs": 2, "note": "x"}


@pytest.mark.parametrize("wrap", ["raw", "state_dict", "model", "module."])
def test_checkpoint_layouts(tmp_path, wrap):
    state = _tiny().state_dict()
    payload = {
        "raw": state,
        "state_dict": {"state_dict": state, "epoch": 3},
        "model": {"model": state},
        "module.": {f"module.{k}": v for k, v in state.items()},
    }[wrap]
    torch.save(payload, tmp_path / "c.pth")
    target = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    load_checkpoint(target, tmp_path / "c.pth")
    torch.testing.assert_close(target[0].weight, state["0.weight"])


def test_missing_checkpoint(tmp_path):
    path = tmp_path / "nope.pt"
    with pytest.raises(ProbeError, match="nope.pt"):
        load_checkpoint(_tiny(), path)


def test_mismatched_checkpoint_leaves_model_unchanged(tmp_path):
    other = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 5))  # 5 classes
    state = other.state_dict()
    state["extra.weight"] = torch.zeros(1)
    del state["0.bias"]
    torch.save(state, tmp_path / "bad.pt")
    model = _tiny()
    before = _snapshot(model)
    with pytest.raises(ProbeError) as info:
        load_checkpoint(model, tmp_path / "bad.pt")
    message = str(info.value)
    assert "missing keys: 0.bias" in message
    assert "unexpected keys: extra.weight" in message
    assert "2.weight (checkpoint (5, 4), model (2, 4))" in message
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a pickle")
    with pytest.raises(ProbeError, match="cannot read checkpoint"):
        load_checkpoint(_tiny(), tmp_path / "junk.pt")
