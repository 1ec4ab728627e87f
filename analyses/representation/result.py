"""What `representation` returns: its tables, and the per-block summary that joins them."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from probe.scoring.verdict import cost_column

SUMMARY_COLUMNS = ["block", "position", "stage", "ratio", "accuracy_drop", "verdict", "probe_accuracy", "probe_gain",
                   "lens_accuracy", "grad_cosine", "step_ratio", "cka_previous", "cka_next", "top_class",
                   "top_class_drop", "bn_recalibrated"]


@dataclass
class RepresentationResult:
    """Tables of `representation`; blocks in forward order, `stage` numbered from 1 (a new
    stage starts at each block whose shortcut is not the identity, and at each block whose
    output differs from the previous block's in resolution or width: `probe.instrument.stages`).

    probes (linear_probes.csv): one row per block: block, position, stage, width (pooled
        features), train_accuracy and test_accuracy of its linear probe (fractions),
        previous_test_accuracy (of the probe on the previous block's output; for the first
        block, on its input), gain (test_accuracy minus previous_test_accuracy), train_samples,
        test_samples.
    lens (logit_lens.csv): one row per block: block, position, stage, width, applicable (bool:
        the head takes this width), accuracy and agreement (share of samples where the head on
        this block predicts the label / the model's own final prediction; NaN when not
        applicable), samples, reason (why not applicable; "" when it is).
    refinement (refinement.csv): one row per block: block, position, stage, grad_cosine (mean
        over samples of cos(F(h), dL/dh); NaN where F(h) and h differ in shape), grad_cosine_std,
        step_ratio (mean of ||F(h)|| / ||h||), step_ratio_std, samples.
    cka (cka.csv): one row per ordered pair of blocks: block_a, position_a, stage_a, block_b,
        position_b, stage_b, cka (linear CKA of their pooled outputs over the evaluation data),
        samples.
    classes (block_classes.csv): one row per (block, class): block, position, class, samples,
        baseline_accuracy, accuracy (block deleted), accuracy_drop, bn_recalibrated, rank (1:
        the class that loses most when this block is deleted).
    summary (representation.csv): one row per block, everything together: block, position,
        stage, ratio (||F(x)||/||s(x)||), accuracy_drop (deleted alone), verdict, probe_accuracy
        (test), probe_gain, lens_accuracy, grad_cosine, step_ratio, cka_previous and cka_next
        (CKA with the neighbouring blocks; NaN at the ends), top_class and top_class_drop (the
        class that loses most when the block is deleted, and how much; <NA> and NaN when no
        class loses anything), bn_recalibrated.
        Other tasks: accuracy_drop is replaced by the task's cost column (loss_increase or
        drift, `probe.scoring.verdict.cost_column`); the columns of tables that do not apply are NaN.
    notes: {table: why it is empty} for the tables that do not apply to the task, keyed by
        field name ("probes", "lens", "classes": no class labels outside classification;
        "refinement": drift has no loss). Empty for classification.
    """

    probes: pd.DataFrame
    lens: pd.DataFrame
    refinement: pd.DataFrame
    cka: pd.DataFrame
    classes: pd.DataFrame
    summary: pd.DataFrame
    notes: dict[str, str] = field(default_factory=dict)

    def tables(self) -> dict[str, pd.DataFrame]:
        """{CSV name: table}, as the command and `probe.ablate` write them."""
        return {"linear_probes": self.probes, "logit_lens": self.lens, "refinement": self.refinement,
                "cka": self.cka, "block_classes": self.classes, "representation": self.summary}


def summary(table: pd.DataFrame, probes: pd.DataFrame, lens: pd.DataFrame, refinement: pd.DataFrame,
            cka: pd.DataFrame, classes: pd.DataFrame) -> pd.DataFrame:
    """One row per block: size, deletion cost, probe gain, refinement and neighbour similarity
    (see `RepresentationResult.summary`). `table` is the per-block table (block, position,
    ratio, accuracy_drop or another task's cost column; verdict and bn_recalibrated when
    present). Tables that do not apply to the task may be empty: their columns are NaN."""
    cost = cost_column(table)
    out = table[["block", "position"]].copy()
    for column in ("ratio", cost, "verdict"):
        out[column] = table[column] if column in table.columns else np.nan

    def by_block(df: pd.DataFrame, column: str) -> pd.Series:
        if column not in df.columns:
            return pd.Series(np.nan, index=out.index)
        return out["block"].map(df.set_index("block")[column])

    out["stage"] = by_block(probes, "stage")
    if len(probes) == 0 and "stage_a" in cka.columns:  # no probes (a task without labels): CKA knows the stages
        out["stage"] = by_block(cka.drop_duplicates("block_a").rename(columns={"block_a": "block"}), "stage_a")
    out["probe_accuracy"] = by_block(probes, "test_accuracy")
    out["probe_gain"] = by_block(probes, "gain")
    out["lens_accuracy"] = by_block(lens, "accuracy")
    out["grad_cosine"] = by_block(refinement, "grad_cosine")
    out["step_ratio"] = by_block(refinement, "step_ratio")
    pairs = cka.set_index(["block_a", "block_b"])["cka"]
    names = out["block"].tolist()
    out["cka_previous"] = [pairs.get((b, a), np.nan) for a, b in zip([None, *names[:-1]], names)]
    out["cka_next"] = [pairs.get((a, b), np.nan) for a, b in zip(names, [*names[1:], None])]
    # The class a block serves most: its rank-1 class when that loses accuracy without it; a block
    # whose deletion costs no class anything serves none (as the heatmap, which boxes nothing there).
    top = classes[(classes["rank"] == 1) & (classes["accuracy_drop"] > 0)].set_index("block")
    out["top_class"] = out["block"].map(top["class"]).astype("Int64")
    out["top_class_drop"] = out["block"].map(top["accuracy_drop"])
    out["bn_recalibrated"] = bool(table["bn_recalibrated"].iloc[0]) if "bn_recalibrated" in table.columns else False
    return out[[cost if column == "accuracy_drop" else column for column in SUMMARY_COLUMNS]]
