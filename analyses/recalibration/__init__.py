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

__all__ = ["COLUMNS", "recalibration"]

COLUMNS = ["block", "position", "accuracy", "loss", "accuracy_drop", "loss_increase", "flip_rate", "samples",
           "mode", "bn_recalibrated"]


def recalibration(model: nn.Module, data: Iterable, calibration: Iterable, *, table: pd.DataFrame | None = None,
                  mode: str = "zero", blocks: Sequence[str | Block] | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """Single-block deletions with and without BN recalibration, in one long table.

    Two rows per block (bn_recalibrated False, then True); columns `COLUMNS`, as in
    `probe.sweep`. `accuracy_drop` and `loss_increase` are always against the model as given.
    table: an existing sweep table without recalibration (e.g. `python -m probe.ablate`'s),
    reused for the False rows instead of sweeping again. blocks: the blocks the table covers
    (names or Blocks, e.g. from a spec); all discovered when None.
    """
    blocks = resolve_blocks(model, blocks)
    reusable = table is not None and not ("bn_recalibrated" in table and table["bn_recalibrated"].any())
    if reusable:
        plain = check_table(table, COLUMNS[:-1], "recalibration", model, blocks).assign(bn_recalibrated=False)
    else:
        plain, _ = single_block_sweep(model, data, mode=mode, blocks=blocks, progress=progress)
    refit, _ = single_block_sweep(model, data, mode=mode, calibration=calibration, blocks=blocks, progress=progress)
    both = pd.concat([plain[COLUMNS], refit[COLUMNS]], ignore_index=True)
    both["bn_recalibrated"] = both["bn_recalibrated"].astype(bool)
    return both.sort_values(["position", "bn_recalibrated"], kind="stable").reset_index(drop=True)
