"""sweep and ablated against hand computation and against each other."""

import math

import pytest
import torch
import torch.nn.functional as F

import probe
from conftest import assert_unchanged, snapshot
from test_measure import X, Y, data


def cross_entropy(logits, target):
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


# Logits worked out by hand: block1 adds (x0, 0), block2 adds (0, -h1/2), each then relu.
BASELINE = [(6.0, 2.0), (2.0, 0.5), (0.6, 0.5)]
WITHOUT_BLOCK1 = [(3.0, 2.0), (1.0, 0.5), (0.3, 0.5)]
WITHOUT_BLOCK2 = [(6.0, 4.0), (2.0, 1.0), (0.6, 1.0)]


def test_ablated_zero_matches_hand_forward(tiny_net):
    with probe.ablated(tiny_net, ["block1"]):
        assert torch.allclose(tiny_net(X), torch.tensor(WITHOUT_BLOCK1))
    with probe.ablated(tiny_net, "block2"):
        assert torch.allclose(tiny_net(X), torch.tensor(WITHOUT_BLOCK2))
    assert torch.allclose(tiny_net(X), torch.tensor(BASELINE))


def test_ablated_mean_uses_mean_branch(tiny_net):
    # block1's mean branch over X is (4.3/3, 0): h = relu(x + mean), then block2 as usual.
    with probe.ablated(tiny_net, ["block1"], mode="mean", data=data()):
        out = tiny_net(torch.tensor([[1.0, 2.0]]))
    h0 = 1.0 + 4.3 / 3
    assert torch.allclose(out, torch.tensor([[h0, 1.0]]))


def test_sweep_matches_hand_computation(tiny_net):
    table = probe.sweep(tiny_net, data(), progress=False)
    baseline = table.attrs["baseline"]
    assert baseline["accuracy"] == pytest.approx(1 / 3)
    assert baseline["loss"] == pytest.approx(sum(cross_entropy(l, t) for l, t in zip(BASELINE, Y.tolist())) / 3)
    for name, logits in (("block1", WITHOUT_BLOCK1), ("block2", WITHOUT_BLOCK2)):
        row = table.set_index("block").loc[name]
        loss = sum(cross_entropy(l, t) for l, t in zip(logits, Y.tolist())) / 3
        assert row["accuracy"] == pytest.approx(2 / 3)
        assert row["accuracy_drop"] == pytest.approx(-1 / 3)
        assert row["flip_rate"] == pytest.approx(1 / 3)  # only the third sample changes class
        assert row["loss"] == pytest.approx(loss)
        assert row["loss_increase"] == pytest.approx(loss - baseline["loss"])
        assert row["samples"] == 3


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_sweep_equals_ablated_block_by_block(mode):
    torch.manual_seed(0)
    import torchvision

    model = torchvision.models.resnet18(num_classes=4).eval()
    inputs, targets = torch.randn(10, 3, 32, 32), torch.randint(0, 4, (10,))
    batches = [(inputs[:6], targets[:6]), (inputs[6:], targets[6:])]
    table = probe.sweep(model, batches, mode=mode, progress=False).set_index("block")
    means = probe.branch_means(model, batches, progress=False) if mode == "mean" else None
    with torch.no_grad():
        reference = model(inputs)
        for block in probe.find_blocks(model):
            with probe.ablated(model, [block.name], mode=mode, means=means):
                logits = model(inputs)
            row = table.loc[block.name]
            assert row["accuracy"] == pytest.approx((logits.argmax(1) == targets).float().mean().item())
            assert row["loss"] == pytest.approx(F.cross_entropy(logits, targets).item(), rel=1e-5)
            assert row["flip_rate"] == pytest.approx((logits.argmax(1) != reference.argmax(1)).float().mean().item())


def test_sweep_leaves_model_as_found(tiny_net):
    tiny_net.train()
    before = snapshot(tiny_net)
    probe.sweep(tiny_net, data(), progress=False)
    probe.sweep(tiny_net, data(), mode="mean", progress=False)
    assert_unchanged(tiny_net, before)


def test_unknown_mode_and_block_are_clear_errors(tiny_net):
    with pytest.raises(probe.ProbeError, match="'half'.*'zero'"):
        probe.sweep(tiny_net, data(), mode="half", progress=False)
    with pytest.raises(probe.ProbeError, match="'block3'.*block1"):
        with probe.ablated(tiny_net, ["block3"]):
            pass
    with pytest.raises(probe.ProbeError, match="mean"):
        with probe.ablated(tiny_net, ["block1"], mode="mean"):
            pass
