"""The verdict rule on a hand-built table: noise, verdicts, summary and Spearman by hand."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from probe.scoring.verdict import VERDICTS, VerdictRule, classify, noise_band, rank_correlation, summarize
from probe.errors import ProbeError

N = 400  # samples per block; accuracy moves in steps of 1/400 = 0.0025


def table() -> pd.DataFrame:
    """Six blocks, one of each case, with |accuracy_drop| <= flip_rate as real data has.

    block      ratio  flip    drop     noise = 2*sqrt(flip/400)  verdict
    layer1.0   1.2    0.16    +0.10    2*0.02   = 0.04           helps   (0.10 > 0.04)
    layer1.1   0.2    0.01    +0.0025  2*0.005  = 0.01           skipped (within, 0.2 < 0.5)
    layer2.0   0.9    0.09    -0.04    2*0.015  = 0.03           hurts   (-0.04 < -0.03)
    layer2.1   0.6    0.0      0.0     0 -> floor 1/400 = 0.0025 neutral (within, 0.6 >= 0.5)
    layer3.0   0.1    0.0025  -0.0025  2*0.0025 = 0.005          skipped (within, 0.1 < 0.5)
    layer3.1   0.3    0.04    +0.03    2*0.01   = 0.02           helps   (small branch, but 0.03 > 0.02)
    """
    rows = [
        ("layer1.0", 1.2, 0.16, 0.10),
        ("layer1.1", 0.2, 0.01, 0.0025),
        ("layer2.0", 0.9, 0.09, -0.04),
        ("layer2.1", 0.6, 0.0, 0.0),
        ("layer3.0", 0.1, 0.0025, -0.0025),
        ("layer3.1", 0.3, 0.04, 0.03),
    ]
    return pd.DataFrame({
        "block": [r[0] for r in rows],
        "position": range(len(rows)),
        "ratio": [r[1] for r in rows],
        "flip_rate": [r[2] for r in rows],
        "accuracy_drop": [r[3] for r in rows],
        "samples": [N] * len(rows),
    })


def test_noise_band_hand_values() -> None:
    noise = noise_band(table())
    assert noise.name == "noise"
    assert noise.tolist() == pytest.approx([0.04, 0.01, 0.03, 0.0025, 0.005, 0.02], abs=1e-15)


def test_noise_floor_is_one_sample() -> None:
    df = pd.DataFrame({"flip_rate": [0.01, 0.0], "samples": [100, 50]})
    # z = 0.5: 0.5*sqrt(0.01/100) = 0.005 < 1/100, so the floor 0.01 binds; no flips -> 1/50.
    assert noise_band(df, VerdictRule(noise_z=0.5)).tolist() == pytest.approx([0.01, 0.02])
    # z = 2: 2*sqrt(0.01/100) = 0.02 is above the floor.
    assert noise_band(df).tolist() == pytest.approx([0.02, 0.02])


def test_classify_verdicts_and_copy() -> None:
    df = table()
    before = df.copy()
    out = classify(df)
    pd.testing.assert_frame_equal(df, before)  # input untouched
    assert list(out.columns) == list(df.columns) + ["noise", "verdict"]
    assert out["verdict"].tolist() == ["helps", "skipped", "hurts", "neutral", "skipped", "helps"]
    assert set(out["verdict"]) <= set(VERDICTS)
    assert out["noise"].tolist() == pytest.approx([0.04, 0.01, 0.03, 0.0025, 0.005, 0.02])


def test_boundaries_are_inclusive_of_noise_and_exclusive_of_ratio() -> None:
    # 16 samples, a quarter flipped: sqrt(0.25/16) = 0.125 exactly, noise (z=2) = 0.25 exactly.
    df = pd.DataFrame({
        "block": ["a", "b", "c", "d"],
        "ratio": [0.4, 0.4, 0.5, 0.4],
        "flip_rate": [0.25, 0.25, 0.25, 0.25],
        "accuracy_drop": [0.25, -0.25, 0.0, 0.1875],
        "samples": [16, 16, 16, 16],
    })
    out = classify(df)
    assert out["noise"].tolist() == [0.25, 0.25, 0.25, 0.25]
    # a drop of exactly the noise is within noise; ratio exactly max_ratio is not "small".
    assert out["verdict"].tolist() == ["skipped", "skipped", "neutral", "skipped"]
    # With z = 1 the noise is 0.125: 3/16 = 0.1875 now helps, -0.25 hurts.
    out = classify(df, rule=VerdictRule(noise_z=1.0))
    assert out["verdict"].tolist() == ["helps", "hurts", "neutral", "helps"]
    # A larger max_ratio makes c's 0.5 branch small.
    out = classify(df, rule=VerdictRule(max_ratio=0.6))
    assert out["verdict"].tolist() == ["skipped", "skipped", "skipped", "skipped"]


def test_nan_ratio_within_noise_is_neutral() -> None:
    df = table()
    df.loc[1, "ratio"] = float("nan")
    assert classify(df)["verdict"].iloc[1] == "neutral"


def test_summarize_lists_and_spearman() -> None:
    summary = summarize(table())
    assert summary["helps_most"] == ["layer1.0", "layer3.1"]  # drops 0.10, 0.03
    assert summary["skipped"] == ["layer3.0", "layer1.1"]     # ratios 0.1, 0.2
    assert summary["hurts"] == ["layer2.0"]
    assert summary["counts"] == {"helps": 2, "skipped": 2, "hurts": 1, "neutral": 1}
    assert summary["blocks"] == 6
    # ranks of ratio:         1.0->6 1.1->2 2.0->5 2.1->4 3.0->1 3.1->3
    # ranks of accuracy_drop: 1.0->6 1.1->4 2.0->1 2.1->3 3.0->2 3.1->5
    # d^2 = 0+4+16+1+1+4 = 26; rho = 1 - 6*26/(6*35) = 1 - 26/35 = 9/35
    assert summary["spearman_rho"] == pytest.approx(9 / 35, abs=1e-12)
    assert summarize(table(), n=1)["helps_most"] == ["layer1.0"]
    assert summarize(table(), n=0)["helps_most"] == []


def test_summarize_uses_existing_verdicts_and_forward_order() -> None:
    df = classify(table(), rule=VerdictRule(noise_z=100.0)).iloc[::-1]  # everything within noise
    summary = summarize(df)
    assert summary["helps_most"] == [] and summary["hurts"] == []
    assert summary["skipped"] == ["layer3.0", "layer1.1", "layer3.1"]


def test_rank_correlation_exact_and_undefined() -> None:
    # ranks (1,2,3,4) vs (2,1,3,4): sum d^2 = 2, rho = 1 - 6*2/(4*15) = 0.8
    df = pd.DataFrame({"ratio": [0.1, 0.2, 0.3, 0.4], "accuracy_drop": [0.02, 0.01, 0.03, 0.04]})
    assert rank_correlation(df) == pytest.approx(0.8, abs=1e-12)
    constant = df.assign(accuracy_drop=0.0)
    assert math.isnan(rank_correlation(constant))
    assert math.isnan(rank_correlation(df.iloc[:1]))
    with_nan = pd.concat([df, pd.DataFrame({"ratio": [float("nan")], "accuracy_drop": [9.0]})])
    assert rank_correlation(with_nan) == pytest.approx(0.8, abs=1e-12)


def test_describe_states_the_thresholds() -> None:
    text = VerdictRule().describe()
    assert "ratio ||F(x)||/||s(x)|| below 0.5" in text
    assert "2 standard errors" in text and "sqrt(flip_rate / samples)" in text
    assert "helps" in text and "hurts" in text and "neutral" in text
    assert "below 0.25" in VerdictRule(max_ratio=0.25, noise_z=1).describe()
    assert "1 standard error " in VerdictRule(noise_z=1).describe()


@pytest.mark.parametrize("kwargs", [{"max_ratio": 0}, {"max_ratio": float("nan")},
                                    {"noise_z": -1}])
def test_bad_rule_raises(kwargs) -> None:
    with pytest.raises(ProbeError):
        VerdictRule(**kwargs)


def test_bad_tables_raise_with_names() -> None:
    with pytest.raises(ProbeError, match="flip_rate"):
        classify(table().drop(columns="flip_rate"))
    with pytest.raises(ProbeError, match="samples"):
        noise_band(table().assign(samples=0))
    with pytest.raises(ProbeError, match="flip_rate"):
        noise_band(table().assign(flip_rate=1.5))
