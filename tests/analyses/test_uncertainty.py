"""Bootstrap intervals against distributions worked out by hand; per-class drops on TinyNet by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

import probe
from analyses.uncertainty import bootstrap_interval, drop_intervals, per_class_drops, uncertainty
from probe.scoring.results import Outcome
from probe.scoring.verdict import VerdictRule, classify
from tiny_models import assert_unchanged, snapshot, tiny_data


def outcome(accuracy: float, correct: torch.Tensor) -> Outcome:
    """One state's outcome on 20 samples, with per-sample correctness (the loss is not used)."""
    return Outcome(accuracy=accuracy, loss=0.0, samples=20, correct=correct)


def test_two_samples_one_lost():
    # d = (1, 0): a resample's mean drop is 0, 1/2 or 1 with probabilities 1/4, 1/2, 1/4, so the
    # 2.5th percentile is 0 and the 97.5th is 1.
    assert bootstrap_interval([True, True], [False, True], resamples=2000, seed=1) == (0.0, 1.0)


def test_four_samples_one_lost():
    # d = (1, 0, 0, 0): k ~ Binomial(4, 1/4) samples of the +1 are drawn, drop = k / 4.
    # P(k = 0) = 0.316 > 0.025, so the low end is 0; P(k <= 2) = 0.949 < 0.975 <= P(k <= 3) = 0.996,
    # so the high end is 3/4.
    low, high = bootstrap_interval([1, 1, 1, 1], [0, 1, 1, 1], resamples=4000, seed=0)
    assert (low, high) == (0.0, 0.75)
    # A 50% interval (quartiles): P(k = 0) = 0.316 >= 0.25, so the low end is 0;
    # P(k <= 1) = 0.738 < 0.75 <= P(k <= 2) = 0.949, so the high end is 2/4.
    assert bootstrap_interval([1, 1, 1, 1], [0, 1, 1, 1], resamples=20000, level=0.5, seed=0) == (0.0, 0.5)


def test_no_change_gives_a_point_and_changes_are_bracketed():
    assert bootstrap_interval([True, False, True], [True, False, True]) == (0.0, 0.0)
    rng = np.random.default_rng(0)
    base = rng.random(60) < 0.9
    ablated = base & (rng.random(60) < 0.7)
    low, high = bootstrap_interval(torch.as_tensor(base), torch.as_tensor(ablated), seed=3)
    point = base.mean() - ablated.mean()
    assert low <= point <= high and low < high
    # Seeded: the same numbers twice; another seed, (almost surely) other numbers.
    assert bootstrap_interval(base, ablated, seed=3) == (low, high)


@pytest.mark.parametrize("kwargs,match", [({"resamples": 0}, "resamples"), ({"level": 1.0}, "level")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(probe.ProbeError, match=match):
        bootstrap_interval([True], [False], **kwargs)
    with pytest.raises(probe.ProbeError, match="equally long"):
        bootstrap_interval([True, True], [False])


def synthetic():
    """20 samples, all correct at baseline. Block a loses 10 of them, b none, c none (but wins
    nothing: it is the same as b, with a large branch), d wins 5 back on a worse baseline."""
    base = torch.ones(20, dtype=torch.bool)
    base_d = base.clone()
    a = base.clone()
    a[:10] = False
    results = [outcome(a.float().mean().item(), a), outcome(1.0, base.clone()), outcome(1.0, base.clone())]
    baseline = outcome(1.0, base_d)
    table = pd.DataFrame({"block": ["a", "b", "c"], "position": [0, 1, 2], "ratio": [0.9, 0.1, 0.8]})
    return table, (baseline, results)


def test_decisions_from_intervals():
    table, evaluation = synthetic()
    intervals = drop_intervals(table, evaluation, resamples=500, seed=0).set_index("block")
    assert intervals.loc["a", "verdict_ci"] == "helps" and intervals.loc["a", "drop_low"] > 0
    assert intervals.loc["a", "accuracy_drop"] == pytest.approx(0.5)
    assert intervals.loc["b", ["drop_low", "drop_high"]].tolist() == [0.0, 0.0]
    assert intervals.loc["b", "verdict_ci"] == "skipped" and intervals.loc["b", "skipped"]
    assert intervals.loc["c", "verdict_ci"] == "neutral" and not intervals.loc["c", "skipped"]  # big branch
    assert intervals["verdict"].isna().all()  # no flip_rate in the table: no noise-band verdict


def test_the_tables_verdicts_are_read_unless_a_rule_is_given():
    table, evaluation = synthetic()
    table = table.assign(accuracy_drop=[0.5, 0.0, 0.0], flip_rate=[0.5, 0.0, 0.0], samples=20)
    given = table.assign(verdict=["neutral"] * 3)  # as another rule classified it
    assert drop_intervals(given, evaluation, resamples=50)["verdict"].tolist() == ["neutral"] * 3
    again = drop_intervals(given, evaluation, resamples=50, rule=VerdictRule())["verdict"].tolist()
    assert again == ["helps", "skipped", "neutral"]


def test_intervals_decide_by_the_rule_that_classified_the_table():
    """verdict_ci uses the rule behind the table's verdicts (attrs["rule"]), not the default:
    block c's branch (ratio 0.8) is small under max_ratio 0.9."""
    table, evaluation = synthetic()
    table = table.assign(accuracy_drop=[0.5, 0.0, 0.0], flip_rate=[0.5, 0.0, 0.0], samples=20)
    classified = classify(table, rule=VerdictRule(max_ratio=0.9))
    intervals = drop_intervals(classified, evaluation, resamples=50).set_index("block")
    assert intervals.loc["c", "verdict"] == "skipped" and intervals.loc["c", "verdict_ci"] == "skipped"
    default = drop_intervals(table, evaluation, resamples=50).set_index("block")
    assert default.loc["c", "verdict_ci"] == "neutral"


def test_hurting_block_and_per_block_seeds():
    base = torch.zeros(20, dtype=torch.bool)
    better = base.clone()
    better[:8] = True
    table = pd.DataFrame({"block": ["x", "y"], "position": [0, 1], "ratio": [0.2, 0.2]})
    evaluation = (outcome(0.0, base), [outcome(0.4, better)] * 2)
    intervals = drop_intervals(table, evaluation, seed=4)
    assert intervals["verdict_ci"].tolist() == ["hurts", "hurts"] and (intervals["drop_high"] < 0).all()
    # Each block's resamples depend on (seed, position) only, not on the other blocks asked for.
    alone = drop_intervals(table.iloc[[1]], (evaluation[0], evaluation[1][1:]), seed=4)
    assert alone[["drop_low", "drop_high"]].values.tolist() == intervals.iloc[[1]][["drop_low", "drop_high"]].values.tolist()


def test_per_class_drops_on_tinynet_by_hand(tiny_net):
    """Y = (0, 1, 1). Baseline predictions (0, 0, 0): class 0 right, class 1 wrong twice.
    Without either block the predictions are (0, 0, 1): class 1 gains one of two."""
    evaluation = probe.evaluate_ablations(tiny_net, tiny_data(2), [["block1"], ["block2"]], per_class=True,
                                          progress=False)
    table = pd.DataFrame({"block": ["block1", "block2"], "position": [0, 1]})
    drops = per_class_drops(table, evaluation)
    assert drops[["block", "class", "samples"]].values.tolist() == [
        ["block1", 0, 1], ["block1", 1, 2], ["block2", 0, 1], ["block2", 1, 2]]
    assert drops["baseline_accuracy"].tolist() == [1.0, 0.0, 1.0, 0.0]
    assert drops["accuracy_drop"].tolist() == pytest.approx([0.0, -0.5, 0.0, -0.5])


def test_uncertainty_end_to_end(tiny_net):
    before = snapshot(tiny_net)
    result = uncertainty(tiny_net, tiny_data(2), resamples=200, progress=False)
    assert_unchanged(tiny_net, before)
    rows = result.intervals.set_index("block")
    assert rows["accuracy_drop"].tolist() == pytest.approx([-1 / 3, -1 / 3])
    assert (rows["drop_low"] <= rows["accuracy_drop"]).all() and (rows["accuracy_drop"] <= rows["drop_high"]).all()
    assert rows["verdict"].notna().all() and not rows["bn_recalibrated"].any()
    assert len(result.per_class) == 4


def test_precomputed_evaluation_needs_its_table(tiny_net):
    evaluation = probe.evaluate_ablations(tiny_net, tiny_data(2), [["block1"], ["block2"]], outcomes=True,
                                          per_class=True, progress=False)
    with pytest.raises(probe.ProbeError, match="table"):
        uncertainty(tiny_net, tiny_data(2), evaluation=evaluation, progress=False)
