"""Block by class: the accuracy each class loses when each block is deleted, and the classes each
block serves most."""

from __future__ import annotations

import numpy as np
import pandas as pd

from analyses.uncertainty import CLASS_COLUMNS, per_class_drops
from probe.scoring.results import Evaluation

CLASSES_COLUMNS = [*CLASS_COLUMNS, "rank"]


def block_classes(table: pd.DataFrame, evaluation: Evaluation, *, bn_recalibrated: bool = False) -> pd.DataFrame:
    """The accuracy drop per (block, class) (`analyses.uncertainty.per_class_drops`), with each
    class's `rank` within its block (1: loses most; ties by class). An evaluation of a task
    without classes gives an empty table with these columns."""
    drops = per_class_drops(table, evaluation, bn_recalibrated=bn_recalibrated)
    if drops.empty:
        return pd.DataFrame(columns=CLASSES_COLUMNS)
    drops["rank"] = drops.groupby("block", sort=False)["accuracy_drop"].rank(ascending=False, method="first") \
        .astype(np.int64)
    return drops
