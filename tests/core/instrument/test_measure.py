"""measure's statistics against values computed by hand on TinyNet (see tiny_models)."""

import math

import pytest
import torch

import probe
import probe.instrument.measurement as measure_module
from probe.loading.models import cifar_resnet
from tiny_models import TINY_X, assert_unchanged, snapshot, tiny_data

def by_hand():
    """Per-sample (branch norm, shortcut norm, ratio, cosine) for each block."""
    rows = {"block1": [], "block2": []}
    for x0, x1 in TINY_X.tolist():
        f1, s1 = (x0, 0.0), (x0, x1)                 # block1: F = (x0, 0), shortcut = x
        h = (max(2 * x0, 0.0), max(x1, 0.0))          # relu(x + F)
        f2, s2 = (0.0, -h[1] / 2), h                  # block2: F = (0, -h1/2)
        for name, f, s in (("block1", f1, s1), ("block2", f2, s2)):
            nf, ns = math.hypot(*f), math.hypot(*s)
            rows[name].append((nf, ns, nf / ns, (f[0] * s[0] + f[1] * s[1]) / (nf * ns)))
    return rows


def mean_std(values):
    mean = sum(values) / len(values)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


@pytest.mark.parametrize("batch_size", [1, 2, 3])
def test_measure_matches_hand_computation(tiny_net, batch_size):
    table = probe.measure(tiny_net, tiny_data(batch_size), progress=False)
    assert list(table["block"]) == ["block1", "block2"]
    assert list(table["shortcut"]) == ["identity", "identity"]
    expected = by_hand()
    for _, row in table.iterrows():
        samples = expected[row["block"]]
        for i, quantity in enumerate(["branch_norm", "shortcut_norm", "ratio", "cosine"]):
            mean, std = mean_std([s[i] for s in samples])
            assert row[quantity] == pytest.approx(mean, rel=1e-6), quantity
            assert row[quantity + "_std"] == pytest.approx(std, rel=1e-5, abs=1e-7), quantity
        assert row["samples"] == 3 and row["nonfinite"] == 0
    # Spot checks written out in full: block1 on (3, 4) has F = (3, 0), so ratio 3/5, cosine 9/15.
    assert expected["block1"][0][2:] == pytest.approx((0.6, 0.6))
    assert table.loc[0, "ratio"] == pytest.approx((0.6 + 1 / math.sqrt(2) + 0.3 / math.sqrt(1.09)) / 3)


def test_measure_per_class(tiny_net):
    table = probe.measure(tiny_net, tiny_data(), per_class=True, progress=False)
    assert list(table["class"]) == [0, 1, 0, 1]
    expected = by_hand()
    row = table[(table["block"] == "block1") & (table["class"] == 1)].iloc[0]
    assert row["samples"] == 2
    assert row["ratio"] == pytest.approx((expected["block1"][1][2] + expected["block1"][2][2]) / 2)
    assert math.isnan(table[(table["class"] == 0)].iloc[0]["ratio_std"])  # one sample: no spread


def test_measure_counts_nonfinite_samples_apart(tiny_net):
    bad = torch.tensor([[float("nan"), 1.0]])
    table = probe.measure(tiny_net, [(torch.cat([TINY_X, bad]), torch.tensor([0, 1, 1, 0]))], progress=False)
    assert list(table["nonfinite"]) == [1, 1]
    assert list(table["samples"]) == [3, 3]
    assert table.loc[0, "ratio"] == pytest.approx(sum(s[2] for s in by_hand()["block1"]) / 3)


def test_branch_means(tiny_net):
    means = probe.branch_means(tiny_net, tiny_data(), progress=False)
    assert torch.allclose(means["block1"], torch.tensor([4.3 / 3, 0.0]))
    # block2's branch is (0, -h1/2) with h1 = x1: 4, 1, 1.
    assert torch.allclose(means["block2"], torch.tensor([0.0, -1.0]))


def test_measure_leaves_model_as_found(tiny_net):
    tiny_net.train()
    tiny_net.block2.eval()
    before = snapshot(tiny_net)
    probe.measure(tiny_net, tiny_data(), progress=False)
    probe.branch_means(tiny_net, tiny_data(), progress=False)
    assert_unchanged(tiny_net, before)


def test_measure_memory_does_not_hold_activations(tiny_net):
    """The accumulators are fixed-size: (classes, 1 + 2 * quantities) per block."""
    from probe.instrument.measurement import _Moments

    moments = _Moments(2, torch.device("cpu"))
    for _ in range(50):
        moments.add(torch.tensor([1]), torch.ones(1, 7, 4), torch.zeros(7, dtype=torch.long), 1)
    assert moments.sums.shape == (2, 1, 9)
    assert moments.sums[1, 0, 0] == 350 and moments.sums[0, 0, 0] == 0


def test_channels_last_and_bf16_are_measured_without_copies_and_alike():
    torch.manual_seed(0)
    model = cifar_resnet(20, num_classes=4).eval()
    batches = [(torch.randn(6, 3, 16, 16), torch.randint(0, 4, (6,)))]
    reference = probe.measure(model, batches, progress=False)
    last = cifar_resnet(20, num_classes=4).eval()
    last.load_state_dict(model.state_dict())
    last = last.to(memory_format=torch.channels_last)
    in_last = [(x.to(memory_format=torch.channels_last), y) for x, y in batches]
    columns = ["branch_norm", "shortcut_norm", "ratio", "cosine"]
    assert_frame_close(probe.measure(last, in_last, progress=False)[columns], reference[columns], rtol=1e-5)
    # The flattened pair of a channels_last block is a view: nothing is copied per block.
    branch = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)
    shortcut = torch.randn(2, 8, 4, 4).to(memory_format=torch.channels_last)
    f, s = measure_module._flat_pair(branch, shortcut)
    assert f.data_ptr() == branch.data_ptr() and f._base is not None and s._base is not None
    norm, _, dot = measure_module._reduction_parts(branch, shortcut)
    assert torch.allclose(norm, branch.flatten(1).norm(dim=1)) and torch.allclose(
        dot, (branch.flatten(1) * shortcut.flatten(1)).sum(dim=1), atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = probe.measure(model, batches, progress=False)
    assert_frame_close(low[columns], reference[columns], rtol=2e-2)


def assert_frame_close(actual, expected, rtol):
    import numpy as np

    a, b = actual.to_numpy(dtype=float), expected.to_numpy(dtype=float)
    assert np.allclose(a, b, rtol=rtol, atol=1e-6), np.abs(a - b).max()


def test_float64_model_is_measured_like_float32():
    torch.manual_seed(0)
    model = cifar_resnet(20, num_classes=4).eval()
    batches = [(torch.randn(4, 3, 16, 16), torch.randint(0, 4, (4,)))]
    reference = probe.measure(model, batches, progress=False)
    double = probe.measure(model.double(), [(x.double(), y) for x, y in batches], progress=False)
    columns = ["branch_norm", "shortcut_norm", "ratio", "cosine"]
    assert_frame_close(double[columns], reference[columns], rtol=1e-4)
