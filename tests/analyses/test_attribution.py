"""Attribution proxies against hand computations on TinyNet, and their Spearman scores against the sweep."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

import probe
from analyses.attribution import PROXIES, TRUTH, attribution, block_influence, gradient_x_activation
from probe.loading.models import cifar_resnet
from tiny_models import TINY_X, TINY_Y, assert_unchanged, snapshot, tiny_data


def cosine(a, b):
    return sum(p * q for p, q in zip(a, b)) / (math.hypot(*a) * math.hypot(*b))


def hand_streams():
    """Per sample: (s, s + F) for block1 and block2 of TinyNet (all values positive: relu is identity)."""
    rows = {"block1": [], "block2": []}
    for x0, x1 in TINY_X.tolist():
        rows["block1"].append(((x0, x1), (2 * x0, x1)))       # F1 = (x0, 0)
        h = (2 * x0, x1)
        rows["block2"].append((h, (h[0], h[1] / 2)))          # F2 = (0, -h1/2)
    return rows


def test_block_influence_by_hand(tiny_net):
    table = block_influence(tiny_net, tiny_data(2)).set_index("block")
    for name, pairs in hand_streams().items():
        expected = sum(1 - cosine(s, out) for s, out in pairs) / len(pairs)
        assert table.loc[name, "block_influence"] == pytest.approx(expected, rel=1e-6)
        assert table.loc[name, "samples"] == 3


def softmax(z):
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def test_gradient_x_activation_by_hand(tiny_net):
    """logits z = (2 x0, x1 / 2) = (h0, h1 / 2); d log p_y / dz = onehot(y) - softmax(z).

    block1: F1 = (x0, 0) enters z0 with slope 1          -> g.F1 = (onehot - p)[0] * x0
    block2: F2 = (0, -h1/2) enters z1 with slope 1       -> g.F2 = (onehot - p)[1] * (-x1 / 2)
    """
    before = snapshot(tiny_net)
    table = gradient_x_activation(tiny_net, tiny_data(2)).set_index("block")
    assert_unchanged(tiny_net, before)
    assert all(p.grad is None for p in tiny_net.parameters())
    expected = {"block1": 0.0, "block2": 0.0}
    for (x0, x1), y in zip(TINY_X.tolist(), TINY_Y.tolist()):
        p = softmax([2 * x0, x1 / 2])
        delta = [(1.0 if c == y else 0.0) - p[c] for c in range(2)]
        expected["block1"] += delta[0] * x0 / 3
        expected["block2"] += delta[1] * (-x1 / 2) / 3
    for name, value in expected.items():
        assert table.loc[name, "gradient_x_activation"] == pytest.approx(value, rel=1e-5)


def test_gradient_x_activation_without_captum_is_a_clear_probe_error(tiny_net, monkeypatch):
    # A report then shows the attribution section as not run, instead of losing the whole run
    # (seen on a GPU machine whose environment lacked captum).
    monkeypatch.setitem(__import__("sys").modules, "captum.attr", None)  # makes the import fail
    before = snapshot(tiny_net)
    with pytest.raises(probe.ProbeError, match="needs captum.*pip install captum"):
        gradient_x_activation(tiny_net, tiny_data(2))
    assert_unchanged(tiny_net, before)


def test_gradient_x_activation_leaves_users_inputs_alone(tiny_net):
    batches = tiny_data(3)
    gradient_x_activation(tiny_net, batches)
    assert not batches[0][0].requires_grad


def model_and_data():
    torch.manual_seed(0)
    model = cifar_resnet(14, num_classes=3, in_channels=1).eval()
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(20, 1, 8, 8, generator=g), torch.randint(0, 3, (20,), generator=g)
    return model, [(x[:12], y[:12]), (x[12:], y[12:])]


def test_attribution_summary_is_spearman_of_the_scores():
    model, batches = model_and_data()
    model.train()  # must come back in train mode, with no hook, no grad left behind
    before = snapshot(model)
    result = attribution(model, batches, progress=False)
    assert_unchanged(model, before)
    assert all(p.grad is None for p in model.parameters())
    assert result.summary["proxy"].tolist() == [*PROXIES, TRUTH]
    sweep = probe.sweep(model, batches, progress=False).set_index("block")
    measured = probe.measure(model, batches, progress=False).set_index("block")
    scores = result.scores
    for proxy in PROXIES:
        rows = scores[scores["proxy"] == proxy].set_index("block")
        assert rows.index.tolist() == sweep.index.tolist()  # forward order
        assert rows["accuracy_drop"].tolist() == pytest.approx(sweep["accuracy_drop"].tolist())
        assert rows["loss_increase"].tolist() == pytest.approx(sweep["loss_increase"].tolist())
        if proxy in ("ratio", "cosine"):
            assert rows["score"].tolist() == pytest.approx(measured[proxy].tolist())
        row = result.summary.set_index("proxy").loc[proxy]
        rho = stats.spearmanr(rows["score"], rows["loss_increase"]).statistic
        assert row["spearman_loss_increase"] == pytest.approx(rho)
        assert row["seconds"] > 0
    truth = result.summary.set_index("proxy").loc[TRUTH]
    assert math.isnan(truth["spearman_accuracy_drop"]) and truth["seconds"] > 0
    assert not result.scores["bn_recalibrated"].any() and not result.summary["bn_recalibrated"].any()


def test_attribution_reuses_a_given_table_and_its_timing():
    model, batches = model_and_data()
    table = probe.sweep(model, batches, progress=False)
    result = attribution(model, batches, table=table.iloc[::-1], truth_seconds=12.5, progress=False)
    assert result.summary.set_index("proxy").loc[TRUTH, "seconds"] == 12.5
    ratio = result.scores[result.scores["proxy"] == "ratio"]
    assert ratio["block"].tolist() == table["block"].tolist()  # back in forward order
