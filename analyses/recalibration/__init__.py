"""Does a deleted block's cost survive BatchNorm recalibration?

    python -m analyses.recalibration --out runs/recalibration

Deleting a block shifts every activation after it, and each BatchNorm downstream still
normalises with statistics from the intact network. EagleEye (Li et al. 2020) showed that after
pruning, re-estimating those statistics on a little training data changes which pruned networks
look good. Here every block is deleted alone twice: with the trained statistics, and with
statistics recalibrated on held-out training data for that deletion (`probe.recalibrate`). A
block whose cost shrinks a lot was mostly hurting through stale statistics; one whose cost stays
is doing computation the network needs.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import pandas as pd
from torch import nn

from probe.evaluation import single_block_sweep
from probe.table import check_table
from probe.blocks import Block, resolve_blocks
from probe.errors import ProbeError
from probe.recalibrate import batchnorm_layers

__all__ = ["COLUMNS", "recalibration"]

# The sweep's own columns, which a reused per-block table must have.
_SWEEP_COLUMNS = ["block", "position", "accuracy", "loss", "accuracy_drop", "loss_increase", "flip_rate", "samples",
                  "mode"]
COLUMNS = ["block", "position", "accuracy", "loss", "accuracy_drop", "loss_increase", "flip_rate", "samples",
           "baseline_accuracy", "baseline_loss", "mode", "bn_recalibrated"]


def recalibration(model: nn.Module, data: Iterable, calibration: Iterable, *, table: pd.DataFrame | None = None,
                  mode: str = "zero", blocks: Sequence[str | Block] | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """Single-block deletions with and without BN recalibration, in one long table.

    Two rows per block (bn_recalibrated False, then True); columns `COLUMNS`, as in
    `probe.sweep`, plus baseline_accuracy and baseline_loss: what each row is compared with.
    Rows with trained statistics are compared with the model as given; recalibrated rows with
    the intact model recalibrated on the same calibration data (so the refit alone costs nothing).
    table: an existing sweep table without recalibration (e.g. `python -m probe.ablate`'s),
    reused for the False rows instead of sweeping again. blocks: the blocks the table covers
    (names or Blocks, e.g. from a spec); all discovered when None.
    """
    if not batchnorm_layers(model):
        raise ProbeError(f"{type(model).__name__} has no BatchNorm layer with running statistics: there is "
                         "nothing to recalibrate.")
    if calibration is None:
        raise ProbeError("recalibration needs calibration batches (held-out data to refit BatchNorm statistics on).")
    blocks = resolve_blocks(model, blocks)
    reusable = table is not None and not ("bn_recalibrated" in table and table["bn_recalibrated"].any())
    if reusable:
        plain = check_table(table, _SWEEP_COLUMNS, "recalibration", model, blocks).assign(bn_recalibrated=False)
    else:
        plain, _ = single_block_sweep(model, data, mode=mode, blocks=blocks, progress=progress)
    refit, _ = single_block_sweep(model, data, mode=mode, calibration=calibration, blocks=blocks, progress=progress)
    both = pd.concat([_with_baseline(plain, table if reusable else plain), _with_baseline(refit, refit)],
                     ignore_index=True)
    both["bn_recalibrated"] = both["bn_recalibrated"].astype(bool)
    return both.sort_values(["position", "bn_recalibrated"], kind="stable").reset_index(drop=True)


def _with_baseline(rows: pd.DataFrame, source: pd.DataFrame) -> pd.DataFrame:
    """`rows` in `COLUMNS`, with the baseline they were compared with (`source.attrs`); a table
    read back from CSV has no attrs: its baseline is recovered from any row (accuracy + drop)."""
    baseline = source.attrs.get("baseline")
    if baseline is None:
        baseline = {"accuracy": float((rows["accuracy"] + rows["accuracy_drop"]).iloc[0]),
                    "loss": float((rows["loss"] - rows["loss_increase"]).iloc[0])}
    return rows.assign(baseline_accuracy=baseline["accuracy"], baseline_loss=baseline["loss"])[COLUMNS]
