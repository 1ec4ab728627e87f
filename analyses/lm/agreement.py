"""Cheap scores against the measured loss: Spearman's rank correlation of each score with the loss
increase of deleting each unit alone, with a seeded bootstrap interval."""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats

from analyses.uncertainty import check_bootstrap
from probe.scoring.verdict import rank_correlation

AGREEMENT_COLUMNS = ["kind", "score", "spearman", "low", "high", "level", "resamples", "units"]


def _bootstrap_spearman(x: np.ndarray, y: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Spearman's rho of every resample (rows of `index`); NaN where a resample is constant."""
    rx = stats.rankdata(x[index], axis=1)
    ry = stats.rankdata(y[index], axis=1)
    rx -= rx.mean(axis=1, keepdims=True)
    ry -= ry.mean(axis=1, keepdims=True)
    denominator = np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (rx * ry).sum(axis=1) / denominator
    rho[denominator < 1e-12] = np.nan
    return rho


def score_agreement(layers: pd.DataFrame, *, resamples: int = 1000, level: float = 0.95,
                    seed: int = 0) -> pd.DataFrame:
    """How well each cheap score ranks the units by their measured single-deletion loss increase.

    layers: the `lm_layers` per-unit table (kind, unit, loss_increase and the scores:
    block_influence, angular_distance, and ratio where it is not all NaN). For each kind
    ("layer", "sublayer") and score: Spearman's rho with loss_increase over the units
    (`probe.scoring.verdict.rank_correlation`, i.e. scipy's), and a percentile bootstrap interval:
    `resamples` resamples of the units with replacement, drawn once per kind as
    `numpy.random.default_rng(seed).integers(0, units, (resamples, units))` (every score of a
    kind sees the same resamples), rho recomputed on each (resamples where a column is constant
    are left out), and the (1 - level) / 2 and (1 + level) / 2 percentiles of the rest.

    Columns: kind, score, spearman, low, high (the interval; NaN when no resample is defined),
    level, resamples, units.
    """
    check_bootstrap(resamples, level)
    rows = []
    for kind in ("layer", "sublayer"):
        units = layers[layers["kind"] == kind].reset_index(drop=True)
        if not len(units):
            continue
        index = np.random.default_rng(seed).integers(0, len(units), (int(resamples), len(units)))
        scores = [s for s in ("block_influence", "angular_distance", "ratio")
                  if s in units.columns and units[s].notna().any()]
        for score in scores:
            pair = units[[score, "loss_increase"]].apply(pd.to_numeric, errors="coerce")
            rho = rank_correlation(pair, score, "loss_increase")
            low = high = float("nan")
            if pair.notna().all().all() and len(units) > 1:
                boot = _bootstrap_spearman(pair[score].to_numpy(float), pair["loss_increase"].to_numpy(float), index)
                boot = boot[np.isfinite(boot)]
                if len(boot):
                    low, high = (float(v) for v in np.percentile(boot, [50 * (1 - level), 50 * (1 + level)]))
            rows.append({"kind": kind, "score": score, "spearman": rho, "low": low, "high": high, "level": level,
                         "resamples": int(resamples), "units": len(units)})
    return pd.DataFrame(rows, columns=AGREEMENT_COLUMNS)
