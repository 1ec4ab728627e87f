"""Name each residual block "helps", "skipped", "hurts" or "neutral", by a rule stated in words.

Input is the per-block table the core produces (one row per block, see docs/architecture.md):
it needs at least ``block``, ``ratio``, ``accuracy_drop``, ``flip_rate`` and ``samples``.
Accuracies are fractions in [0, 1]; ``accuracy_drop`` = baseline accuracy - ablated accuracy,
so a positive drop means the block was doing useful work.

Noise. Deleting a block changes some predictions; the accuracy drop is the mean of a paired
difference d_i = correct_base_i - correct_ablated_i in {-1, 0, 1} over the same n samples.
Var(d) = P(d != 0) - E[d]^2 <= P(d != 0) <= P(prediction changed) = flip_rate, because a
sample's correctness can only change if its prediction changed. So the standard error of
the drop is at most sqrt(flip_rate / n): a conservative, per-block bound that needs no
resampling and is exact enough when few predictions change (the interesting case).

Other tasks (`probe.scoring.tasks`) have no accuracy to count: their cost is a continuous per-sample
number, `loss_increase` (language models, a user's own loss), `detections_lost` (the share of
the reference's detections a detector no longer makes) or `drift` (how far the outputs move;
no labels), and its table carries the standard error of the paired per-sample differences
(`loss_increase_se`, `detections_lost_se`, `drift_se`). Their noise band is noise_z standard
errors, floored at what float rounding can produce (a millionth of the loss; a millionth for a
share of detections) and at the rule's `max_drift` for drift: an output that moves less than
that is taken as unchanged.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from probe.errors import ProbeError
from probe.scoring.cost import DETECTIONS_LOST, DRIFT, LOSS_INCREASE

__all__ = [
    "UNSUPPORTED",
    "VERDICTS",
    "VerdictRule",
    "chance_warning",
    "classify",
    "cost_column",
    "noise_band",
    "per_token",
    "rank_correlation",
    "summarize",
]

# Every value the ``verdict`` column can take, in the order reports list them.
VERDICTS = ("helps", "skipped", "hurts", "neutral")
# The verdict of every block when the data cannot support one (see `chance_warning`).
UNSUPPORTED = "unsupported"

_NOISE_COLUMNS = ("flip_rate", "samples")
_VERDICT_COLUMNS = ("block", "ratio", "accuracy_drop", "flip_rate", "samples")
# Continuous costs, each with the column of its standard error; a table with one of these SE
# columns is judged by that cost, any other by accuracy_drop.
_CONTINUOUS_COSTS = {cost.column: cost.se_column for cost in (DETECTIONS_LOST, DRIFT, LOSS_INCREASE)}


def cost_column(df: pd.DataFrame) -> str:
    """The column that holds what deleting a block costs: `detections_lost`, `drift` or
    `loss_increase` when the table carries its standard error (tasks other than
    classification), else `accuracy_drop`."""
    for cost, se in _CONTINUOUS_COSTS.items():
        if cost in df.columns and se in df.columns:
            return cost
    return "accuracy_drop"


# Columns only the lm task's tables have (`probe.scoring.tasks.LanguageModeling.row`).
_LM_COLUMNS = ("perplexity_ratio", "token_accuracy")


def per_token(df: pd.DataFrame | None) -> bool:
    """A language model's table: its loss is the mean NLL per token, in nats. Read from the lm
    task's own output columns (`perplexity_ratio`, `token_accuracy`), which every table of that
    task has, also read back from a CSV."""
    return isinstance(df, pd.DataFrame) and any(column in df.columns for column in _LM_COLUMNS)


def _columns_for(df: pd.DataFrame) -> tuple[str, ...]:
    cost = cost_column(df)
    if cost == "accuracy_drop":
        return _VERDICT_COLUMNS
    return ("block", "ratio", cost, _CONTINUOUS_COSTS[cost], "samples")


@dataclass(frozen=True)
class VerdictRule:
    """Thresholds of the verdict rule; ``describe()`` says the rule in one paragraph.

    max_ratio: a branch counts as small when its mean ||F(x)|| / ||s(x)|| is below this.
    noise_z: how many standard errors of the paired accuracy difference count as noise.
    max_drift: for the `drift` task, the mean relative change of the outputs that still counts
    as unchanged (0.05: outputs move by under 5% of their size).
    """

    max_ratio: float = 0.5
    noise_z: float = 2.0
    max_drift: float = 0.05

    def __post_init__(self) -> None:
        if not (isinstance(self.max_ratio, (int, float)) and math.isfinite(self.max_ratio)
                and self.max_ratio > 0):
            raise ProbeError(
                f"max_ratio={self.max_ratio!r} must be a positive finite number, e.g. 0.5."
            )
        if not (isinstance(self.noise_z, (int, float)) and math.isfinite(self.noise_z)
                and self.noise_z >= 0):
            raise ProbeError(
                f"noise_z={self.noise_z!r} must be a finite number >= 0, e.g. 2."
            )
        if not (isinstance(self.max_drift, (int, float)) and math.isfinite(self.max_drift)
                and self.max_drift >= 0):
            raise ProbeError(
                f"max_drift={self.max_drift!r} must be a finite number >= 0, e.g. 0.05."
            )

    def describe(self, cost: str = "accuracy_drop") -> str:
        """The rule in plain English, used verbatim by the report and the CLI; `cost` is the
        table's cost column (`cost_column`), which decides the wording."""
        z = f"{self.noise_z:g}"
        errors = "standard error" if self.noise_z == 1 else "standard errors"
        small = (f"A block is skipped when its branch is small next to its shortcut (ratio ||F(x)||/||s(x)|| "
                 f"below {self.max_ratio:g}) and ")
        if cost == "loss_increase":
            return (small + f"deleting it changes the loss by no more than noise ({z} {errors} of the "
                    "paired per-sample loss difference, never less than a millionth of the loss). A block helps "
                    "when deleting it raises the loss by more than that noise; it hurts when deleting it lowers the "
                    "loss by more than that noise; any other block is neutral.")
        if cost == "detections_lost":
            return (small + f"deleting it changes the share of the reference's detections it keeps by no more than "
                    f"noise ({z} {errors} of the paired per-image difference). A block helps when deleting it "
                    "loses more detections than that noise; it hurts when deleting it matches more of the ground "
                    "truth by more than that noise; any other block is neutral.")
        if cost == "drift":
            return (small + f"deleting it moves the outputs by no more than noise ({z} {errors} of the "
                    f"per-sample relative change, never less than {self.max_drift:g}). A block helps (carries the "
                    "network) when deleting it moves the outputs by more than that; drift has no direction, so no "
                    "block hurts; any other block is neutral.")
        return (
            "A block is skipped when its branch is small next to its shortcut "
            f"(ratio ||F(x)||/||s(x)|| below {self.max_ratio:g}) and deleting it changes "
            f"test accuracy by no more than noise ({z} {errors} of the paired accuracy "
            f"difference, {z} * sqrt(flip_rate / samples), never less than one sample, "
            "1 / samples). A block helps when deleting it costs more accuracy than that "
            "noise; it hurts when deleting it improves accuracy by more than that noise; "
            "any other block is neutral (deleting it changes accuracy within noise, but its "
            "branch is not small)."
        )


def _require(df: pd.DataFrame, columns: Iterable[str], what: str) -> None:
    if not isinstance(df, pd.DataFrame):
        raise ProbeError(
            f"{what} needs a pandas DataFrame (the per-block table), got {type(df).__name__}."
        )
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise ProbeError(
            f"{what} needs column(s) {', '.join(map(repr, missing))}, which the table lacks. "
            f"Columns present: {', '.join(map(str, df.columns)) or '(none)'}. "
            "Pass the table from probe.sweep (joined with probe.measure for ratio)."
        )


def noise_band(df: pd.DataFrame, rule: VerdictRule | None = None) -> pd.Series:
    """Per-block accuracy change that counts as noise, as a fraction (like ``accuracy_drop``).

    noise = noise_z * sqrt(flip_rate / samples), floored at 1 / samples.

    Why the floor: accuracy moves in steps of 1 / samples, and when no prediction changed the
    bound above is 0, so any float rounding in ``accuracy_drop`` (baseline and ablated
    accuracy computed by separate sums) would be called an effect. With noise_z >= 1 the floor
    only ever binds when flip_rate is 0, because one changed prediction already gives
    sqrt(flip_rate / samples) >= 1 / samples; its message is "one sample is never evidence".
    """
    rule = VerdictRule() if rule is None else rule
    cost = cost_column(df) if isinstance(df, pd.DataFrame) else "accuracy_drop"
    if cost != "accuracy_drop":
        return _continuous_noise(df, cost, rule)
    _require(df, _NOISE_COLUMNS, "noise_band")
    samples = pd.to_numeric(df["samples"], errors="coerce").astype(float)
    flip = pd.to_numeric(df["flip_rate"], errors="coerce").astype(float)
    bad = ~(samples > 0)
    if bad.any():
        raise ProbeError(
            f"samples must be a positive count for every block; got {samples[bad].tolist()[:5]} "
            "(a block evaluated on no samples has no accuracy to compare)."
        )
    bad = ~((flip >= 0) & (flip <= 1))
    if bad.any():
        raise ProbeError(
            f"flip_rate must be a share in [0, 1] for every block; got {flip[bad].tolist()[:5]}."
        )
    noise = np.maximum(rule.noise_z * np.sqrt(flip / samples), 1.0 / samples)
    return pd.Series(noise, index=df.index, name="noise", dtype=float)


def _continuous_noise(df: pd.DataFrame, cost: str, rule: VerdictRule) -> pd.Series:
    """noise_z standard errors of a continuous cost, floored (see the module docstring)."""
    se_column = _CONTINUOUS_COSTS[cost]
    _require(df, (cost, se_column, "samples"), "noise_band")
    se = pd.to_numeric(df[se_column], errors="coerce").astype(float).fillna(0.0)
    if (se < 0).any():
        raise ProbeError(f"{se_column} must be >= 0 for every block; got {se[se < 0].tolist()[:5]}.")
    if cost == "drift":
        floor = pd.Series(rule.max_drift, index=df.index, dtype=float)
    elif cost == "detections_lost":  # a share: below a millionth, two float sums differ by rounding
        floor = pd.Series(1e-6, index=df.index, dtype=float)
    else:  # a millionth of the intact model's loss: below that, two float sums differ by rounding
        base = (pd.to_numeric(df["loss"], errors="coerce") - pd.to_numeric(df[cost], errors="coerce")).abs() \
            if "loss" in df.columns else pd.Series(1.0, index=df.index)
        floor = 1e-6 * base.astype(float).fillna(1.0) + 1e-12
    return pd.Series(np.maximum(rule.noise_z * se, floor), index=df.index, name="noise", dtype=float)


def classify(df: pd.DataFrame, *, rule: VerdictRule | None = None) -> pd.DataFrame:
    """A copy of ``df`` with a ``noise`` column (see ``noise_band``) and a ``verdict`` column.

    verdict, checked in this order (cost: `cost_column`, accuracy_drop for classification):
      "helps"   cost >  noise (deleting the block costs more than noise)
      "hurts"   cost < -noise (deleting the block improves the model beyond noise)
      "skipped" within noise and ratio <  max_ratio
      "neutral" within noise and ratio >= max_ratio, or ratio unknown (NaN)
    Rows keep their order and index; an existing noise/verdict column is recomputed. The rule
    goes into `attrs["rule"]`: what describes these verdicts (the report, `drop_intervals`).
    """
    rule = VerdictRule() if rule is None else rule
    _require(df, _VERDICT_COLUMNS if not isinstance(df, pd.DataFrame) else _columns_for(df), "classify")
    out = df.copy()
    noise = noise_band(out, rule)
    cost = cost_column(out)
    drop = pd.to_numeric(out[cost], errors="coerce").astype(float)
    ratio = pd.to_numeric(out["ratio"], errors="coerce").astype(float)
    if drop.isna().any():
        names = out.loc[drop.isna(), "block"].tolist()[:5]
        raise ProbeError(f"{cost} is missing (NaN) for block(s) {names}.")
    verdict = np.select(
        [drop > noise, drop < -noise, ratio < rule.max_ratio],
        ["helps", "hurts", "skipped"],
        default="neutral",
    )
    out["noise"] = noise
    out["verdict"] = pd.Series(verdict, index=out.index, dtype=object)
    out.attrs["rule"] = rule
    return out


def rank_correlation(df: pd.DataFrame, x: str = "ratio", y: str = "accuracy_drop") -> float:
    """Spearman rank correlation between two columns; NaN when it is undefined.

    Undefined: fewer than 2 rows with both values present, or a column that is constant
    (scipy would warn and return NaN; we return NaN without the warning).
    """
    _require(df, (x, y), "rank_correlation")
    pair = df[[x, y]].apply(pd.to_numeric, errors="coerce").dropna()
    if len(pair) < 2 or pair[x].nunique() < 2 or pair[y].nunique() < 2:
        return float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rho = stats.spearmanr(pair[x].to_numpy(), pair[y].to_numpy()).statistic
    return float(rho)


def summarize(df: pd.DataFrame, *, n: int = 5, rule: VerdictRule | None = None) -> dict:
    """The answer in a few lists, for the terminal table and the report.

    Returns a dict:
      "helps_most":   up to ``n`` block names with verdict "helps", largest cost first (accuracy_drop
                      for classification; see `cost_column`)
      "skipped":      every block with verdict "skipped", smallest ratio first
      "hurts":        every block with verdict "hurts", largest accuracy gain first
      "counts":       {verdict: number of blocks} for every verdict in VERDICTS
      "spearman_rho": Spearman rank correlation of ratio and the cost (NaN if undefined)
      "blocks":       number of blocks
    Only blocks that help beyond noise are listed as helping: when no block does, the list is
    empty rather than naming the largest noise. ``df`` may already be classified; if it has no
    ``verdict`` column it is classified with ``rule`` (default VerdictRule()). Ties keep
    forward order (``position`` when present, else row order).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise ProbeError(f"n={n!r} must be a whole number >= 0 (how many helping blocks to list).")
    _require(df, _VERDICT_COLUMNS if not isinstance(df, pd.DataFrame) else _columns_for(df), "summarize")
    table = df if "verdict" in df.columns else classify(df, rule=rule)
    cost = cost_column(table)
    if "position" in table.columns:
        table = table.sort_values("position", kind="stable")

    def names(verdict: str, by: str, ascending: bool) -> list[str]:
        rows = table[table["verdict"] == verdict]
        return rows.sort_values(by, ascending=ascending, kind="stable")["block"].astype(str).tolist()

    return {
        "helps_most": names("helps", cost, ascending=False)[:n],
        "skipped": names("skipped", "ratio", ascending=True),
        "hurts": names("hurts", cost, ascending=True),
        "counts": {v: int((table["verdict"] == v).sum()) for v in VERDICTS},
        "spearman_rho": rank_correlation(table, "ratio", cost),
        "blocks": int(len(table)),
    }


def chance_warning(accuracy: float, samples: int, class_samples: Sequence[int] | None = None, *,
                   num_classes: int | None = None, rule: VerdictRule | None = None) -> str | None:
    """Why no block verdict can be drawn when the intact model is no better than chance, or None.

    Chance is the better of guessing uniformly (1 / classes) and always predicting the most
    frequent class (its share of `class_samples`). The intact model is at chance when its
    accuracy is within `rule.noise_z` binomial standard errors of that: deleting a block cannot
    then cost anything measurable, and "skipped" would be an artefact (a wrong image size,
    normalization or label order is the usual cause).
    """
    rule = VerdictRule() if rule is None else rule
    counts = [int(c) for c in class_samples] if class_samples is not None else []
    classes = num_classes or len(counts)
    if samples < 1 or classes < 2:
        return None
    chance = max(1.0 / classes, max(counts) / samples if counts else 0.0)
    margin = rule.noise_z * math.sqrt(chance * (1.0 - chance) / samples)
    if accuracy > chance + margin:
        return None
    basis = f"{classes} classes" + (f", the most frequent {max(counts) / samples:.1%} of the samples" if counts else "")
    return (f"the intact model's accuracy {accuracy:.1%} on {samples} samples is no better than chance "
            f"({chance:.1%}: {basis}), so no block verdict can be drawn; check the image size, normalization, "
            "channels and class order the model expects.")
