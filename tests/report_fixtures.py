"""The report tests' data: a classification run's baseline and configuration, and a table of six
blocks whose verdicts are known by hand (helps, skipped, hurts, neutral, skipped, helps)."""

from __future__ import annotations

import pandas as pd

BASELINE = {"accuracy": 0.9825, "loss": 0.0612, "samples": 400}
CONFIG = {
    "model": "resnet20",
    "checkpoint": "runs/resnet20/model.pt",
    "dataset": "digits16",
    "samples": 400,
    "mode": "zero",
    "seed": 0,
    "date": "2024-05-01T12:00:00Z",
    "versions": {"torch": "2.4.0", "probe": "0.1.0"},
}


def table() -> pd.DataFrame:
    """Six blocks in shuffled row order (position gives forward order); verdicts by hand:
    helps, skipped, hurts, neutral, skipped, helps (see tests/core/scoring/test_verdict.py)."""
    df = pd.DataFrame({
        "block": ["layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1"],
        "position": [0, 1, 2, 3, 4, 5],
        "branch_norm": [12.0, 2.0, 9.0, 6.0, 1.0, 3.0],
        "branch_norm_std": [1.0, 0.5, 0.9, 0.6, 0.1, 0.3],
        "shortcut_norm": [10.0] * 6,
        "shortcut_norm_std": [0.5] * 6,
        "ratio": [1.2, 0.2, 0.9, 0.6, 0.1, 0.3],
        "ratio_std": [0.1, 0.05, 0.2, 0.1, 0.02, 0.04],
        "cosine": [-0.3, 0.05, -0.1, 0.2, 0.0, -0.5],
        "cosine_std": [0.05, 0.1, 0.02, 0.03, 0.01, 0.2],
        "accuracy": 0.0,  # set below: baseline - drop
        "loss": [0.4, 0.07, 0.05, 0.0612, 0.06, 0.15],
        "accuracy_drop": [0.10, 0.0025, -0.04, 0.0, -0.0025, 0.03],
        "loss_increase": [0.3388, 0.0088, -0.0112, 0.0, -0.0012, 0.0888],
        "flip_rate": [0.16, 0.01, 0.09, 0.0, 0.0025, 0.04],
        "samples": [400] * 6,
        "mode": ["zero"] * 6,
    })
    df["accuracy"] = BASELINE["accuracy"] - df["accuracy_drop"]
    return df.iloc[[3, 0, 5, 1, 4, 2]].reset_index(drop=True)  # not in forward order
