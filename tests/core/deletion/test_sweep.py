"""sweep and ablated against hand computation and against each other."""

import math

import pytest
import torch
import torch.nn.functional as F

import probe
from tiny_models import TINY_X, TINY_Y, assert_unchanged, snapshot, tiny_data


def cross_entropy(logits, target):
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


# Logits worked out by hand: block1 adds (x0, 0), block2 adds (0, -h1/2), each then relu.
BASELINE = [(6.0, 2.0), (2.0, 0.5), (0.6, 0.5)]
WITHOUT_BLOCK1 = [(3.0, 2.0), (1.0, 0.5), (0.3, 0.5)]
WITHOUT_BLOCK2 = [(6.0, 4.0), (2.0, 1.0), (0.6, 1.0)]


def test_ablated_zero_matches_hand_forward(tiny_net):
    with probe.ablated(tiny_net, ["block1"]):
        assert torch.allclose(tiny_net(TINY_X), torch.tensor(WITHOUT_BLOCK1))
    with probe.ablated(tiny_net, "block2"):
        assert torch.allclose(tiny_net(TINY_X), torch.tensor(WITHOUT_BLOCK2))
    assert torch.allclose(tiny_net(TINY_X), torch.tensor(BASELINE))


def test_ablated_mean_uses_mean_branch(tiny_net):
    # block1's mean branch over TINY_X is (4.3/3, 0): h = relu(x + mean), then block2 as usual.
    with probe.ablated(tiny_net, ["block1"], mode="mean", data=tiny_data()):
        out = tiny_net(torch.tensor([[1.0, 2.0]]))
    h0 = 1.0 + 4.3 / 3
    assert torch.allclose(out, torch.tensor([[h0, 1.0]]))


def test_sweep_matches_hand_computation(tiny_net):
    table = probe.sweep(tiny_net, tiny_data(), progress=False)
    baseline = table.attrs["baseline"]
    assert baseline["accuracy"] == pytest.approx(1 / 3)
    assert baseline["loss"] == pytest.approx(sum(cross_entropy(l, t) for l, t in zip(BASELINE, TINY_Y.tolist())) / 3)
    for name, logits in (("block1", WITHOUT_BLOCK1), ("block2", WITHOUT_BLOCK2)):
        row = table.set_index("block").loc[name]
        loss = sum(cross_entropy(l, t) for l, t in zip(logits, TINY_Y.tolist())) / 3
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
    probe.sweep(tiny_net, tiny_data(), progress=False)
    probe.sweep(tiny_net, tiny_data(), mode="mean", progress=False)
    assert_unchanged(tiny_net, before)


def test_unknown_mode_and_block_are_clear_errors(tiny_net):
    with pytest.raises(probe.ProbeError, match="'half'.*'zero'"):
        probe.sweep(tiny_net, tiny_data(), mode="half", progress=False)
    with pytest.raises(probe.ProbeError, match="'block3'.*block1"):
        with probe.ablated(tiny_net, ["block3"]):
            pass
    with pytest.raises(probe.ProbeError, match="mean"):
        with probe.ablated(tiny_net, ["block1"], mode="mean"):
            pass


def fast_equals_naive(model, batches, sets, mode="zero"):
    fast = probe.evaluate_ablations(model, batches, sets, mode=mode, progress=False)
    naive = probe.evaluate_ablations(model, batches, sets, mode=mode, fast=False, progress=False)
    assert fast[0] == pytest.approx(naive[0])
    for a, b in zip(fast[1], naive[1]):
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    return fast


@pytest.mark.parametrize("arch", ["resnet18", "resnet50", "cifar56"])
def test_fast_sweep_equals_naive(arch):
    import torchvision
    from probe.loading.models import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet(56) if arch == "cifar56" else getattr(torchvision.models, arch)(num_classes=10)
    model.eval()
    inputs, targets = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    batches = [(inputs[:4], targets[:4]), (inputs[4:], targets[4:])]
    names = [b.name for b in probe.find_blocks(model)]
    sets = [[n] for n in names] + [names[1:4], [names[-1], names[0]]]
    fast_equals_naive(model, batches, sets)
    fast_equals_naive(model, batches, sets[:3], mode="mean")


def test_suffix_runner_cuts_at_every_block():
    from probe.loading.models import cifar_resnet
    from probe.deletion.fast_suffix import build_runner

    model = cifar_resnet(20).eval()
    runner = build_runner(model, probe.find_blocks(model))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        output, cache = runner.baseline(x)
        assert torch.equal(output, model(x))
        # Unablated, every suffix reproduces the full forward from the cache alone.
        for block in probe.find_blocks(model):
            assert torch.allclose(runner.suffix(block, cache), output, atol=1e-6)


def test_suffix_for_a_deleted_block_never_computes_its_branch():
    from probe.deletion.ablated import branch_replacement
    from probe.loading.models import cifar_resnet
    from probe.deletion.fast_suffix import build_runner

    torch.manual_seed(0)
    model = cifar_resnet(20).eval()
    blocks = probe.find_blocks(model)
    runner = build_runner(model, blocks, branch_replacement("zero", None))
    x = torch.randn(2, 3, 16, 16)
    calls = []
    handle = model.layer2[0].conv1.register_forward_hook(lambda *_: calls.append(1))
    try:
        with torch.no_grad():
            _, cache = runner.baseline(x)
            calls.clear()
            deleted = runner.suffix(blocks[3], cache)  # layer2.0, the projecting block
            assert calls == []  # its branch (conv1 ... bn2) did not run
            with probe.ablated(model, ["layer2.0"]):
                assert torch.allclose(deleted, model(x), atol=1e-6)
            assert torch.allclose(runner.suffix(blocks[4], cache), _forward_without(model, x, "layer2.1"), atol=1e-6)
    finally:
        handle.remove()


def _forward_without(model, x, name):
    with probe.ablated(model, [name]):
        return model(x)


def test_in_place_change_of_a_cached_value_falls_back_to_full_forwards():
    class InPlaceBetween(torch.nn.Module):
        def __init__(self):
            super().__init__()
            from tiny_models import TinyBlock

            self.block1 = TinyBlock([[1.0, 0.0], [0.0, 0.0]])
            self.block2 = TinyBlock([[0.0, 0.0], [0.0, -0.5]])

        def forward(self, x):
            h = self.block1(x)
            y = self.block2(h)
            h.mul_(2)  # block2's cached input is no longer what block2 saw
            return y - h

    from probe.deletion.fast_suffix import InPlaceError, build_runner

    model = InPlaceBetween()
    X = torch.tensor([[3.0, 4.0], [1.0, 1.0], [0.3, 1.0]])
    batches = [(X, torch.tensor([0, 1, 1]))]
    runner = build_runner(model, probe.find_blocks(model))
    with pytest.raises(InPlaceError):
        runner.baseline(X)
    fast_equals_naive(model, batches, [["block1"], ["block2"]])


def test_per_class_and_outcomes(tiny_net):
    baseline, (without1, without2) = probe.evaluate_ablations(
        tiny_net, tiny_data(), [["block1"], ["block2"]], per_class=True, outcomes=True, progress=False)
    # By hand (see BASELINE etc.): predictions 0,0,0 unablated; 0,0,1 without either block.
    assert baseline["correct"].tolist() == [True, False, False]
    assert without1["correct"].tolist() == [True, False, True]
    assert baseline["class_accuracy"] == pytest.approx([1.0, 0.0])
    assert without2["class_accuracy"] == pytest.approx([1.0, 0.5])
    assert without2["class_samples"] == [1, 2]


def test_sweeps_reuse_the_suffixes_and_swap_the_replacement(monkeypatch):
    # Tracing the suffixes costs more than a small sweep on a GPU: a second sweep of the same
    # model reuses them, in zero and in mean mode alike, and a changed module tree retraces.
    import probe.deletion.fast_suffix
    from probe.loading.models import cifar_resnet

    torch.manual_seed(0)
    model = cifar_resnet(20, num_classes=4).eval()
    batches = [(torch.randn(5, 3, 16, 16), torch.randint(0, 4, (5,))) for _ in range(2)]
    builds = []
    build = probe.deletion.fast_suffix.build_runner
    monkeypatch.setattr(probe.deletion.fast_suffix, "build_runner", lambda *a, **k: builds.append(1) or build(*a, **k))
    first = probe.sweep(model, batches, progress=False)
    again = probe.sweep(model, batches, progress=False)
    mean = probe.sweep(model, batches, mode="mean", progress=False)
    assert len(builds) == 1
    assert first.equals(again)
    naive_mean = probe.sweep(model, batches, mode="mean", fast=False, progress=False)
    columns = ["accuracy", "loss", "flip_rate"]
    assert (mean[columns] - naive_mean[columns]).abs().to_numpy().max() < 1e-5
    assert (mean["loss"] - first["loss"]).abs().max() > 1e-3  # the mean replacement was really used
    model.layer3[2] = cifar_resnet(20, num_classes=4).layer3[2]  # a new module object: trace again
    probe.sweep(model, batches, progress=False)
    assert len(builds) == 2
