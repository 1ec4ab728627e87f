"""Representation similarity: linear CKA (Kornblith et al. 2019) between the pooled outputs of
every pair of blocks, computed exactly while streaming."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from analyses.representation.outputs import walk
from probe.discovery.find import Block, resolve_blocks
from probe.instrument.stages import stages
from probe.errors import ProbeError

CKA_COLUMNS = ["block_a", "position_a", "stage_a", "block_b", "position_b", "stage_b", "cka", "samples"]


class CkaAccumulator:
    """Linear CKA between every pair of feature sets, accumulated batch by batch, exactly.

    Linear CKA of X (n, p) and Y (n, q) with centred columns is
    ||Xc^T Yc||_F^2 / (||Xc^T Xc||_F ||Yc^T Yc||_F). Every product is a block of the centred
    second-moment matrix of all feature sets side by side, Z^T Z - s s^T / n (s: column sums of
    Z), and Z^T Z, s and n are sums over samples: `add` updates them (float64) per batch, so the
    memory is O(D^2) for D features in all, whatever n, and `matrix` gives the all-at-once CKA.

    While fewer samples than features have come (a language model's 60 blocks of 576 features
    make D = 34560, and D^2 floats would take 9.5 GB), the samples themselves are kept instead,
    and ||Xc^T Yc||_F^2 = <Kx, Ky> is taken from the centred Gram matrices (n x n): memory
    min(n, D) x D, never more than the streamed form, the same numbers.
    """

    def __init__(self) -> None:
        self.widths: list[int] = []
        self.count = 0
        self.sums: torch.Tensor | None = None  # (D,)
        self.products: torch.Tensor | None = None  # (D, D), once there are more samples than features
        self.rows: list[torch.Tensor] = []  # (batch, D) each, until then

    def add(self, features: Sequence[torch.Tensor]) -> None:
        """features: one (batch, width) tensor per feature set, the same samples in each."""
        z = torch.cat([x.double() for x in features], dim=1)  # (batch, D)
        if self.sums is None:
            self.widths = [x.shape[1] for x in features]
            self.sums = torch.zeros(z.shape[1], dtype=torch.float64, device=z.device)
        self.sums += z.sum(dim=0)
        self.count += len(z)
        if self.products is not None:
            self.products += z.T @ z
            return
        self.rows.append(z)
        if self.count > z.shape[1]:  # the (D, D) sums are now the smaller form
            kept = torch.cat(self.rows)
            self.products, self.rows = kept.T @ kept, []

    def matrix(self) -> np.ndarray:
        """(sets, sets) linear CKA; NaN for a set that does not vary over the samples."""
        if self.sums is None:
            raise ProbeError("CKA needs at least one batch of features.")
        edges = np.cumsum([0, *self.widths])
        parts = range(len(self.widths))
        if self.products is not None:
            centred = (self.products - torch.outer(self.sums, self.sums) / self.count).cpu()
            # ||Xc^T Yc||_F^2 for every pair: (sets, sets)
            squares = np.array([[float(centred[edges[a]:edges[a + 1], edges[b]:edges[b + 1]].square().sum())
                                 for b in parts] for a in parts])
        else:
            z = torch.cat(self.rows)
            z = z - self.sums / self.count  # centred columns
            grams = [z[:, edges[a]:edges[a + 1]] @ z[:, edges[a]:edges[a + 1]].T for a in parts]  # (n, n) each
            squares = np.array([[float((grams[a] * grams[b]).sum()) for b in parts] for a in parts])
        norms = np.sqrt(np.diag(squares))
        with np.errstate(invalid="ignore", divide="ignore"):
            return squares / np.outer(norms, norms)


def cka(model: nn.Module, data: Iterable, *, blocks: Sequence[str | Block] | None = None,
        progress: bool = True) -> pd.DataFrame:
    """Linear CKA between the pooled outputs of every pair of blocks over `data`, streamed
    (see `CkaAccumulator` and `RepresentationResult.cka`)."""
    chosen = resolve_blocks(model, blocks)
    accumulator = CkaAccumulator()
    shapes = walk(model, data, chosen, lambda _first, outputs, _model_outputs, _batch: accumulator.add(outputs),
                  progress=progress, desc="CKA")
    values = accumulator.matrix()
    numbers = stages(chosen, shapes)
    rows = [{"block_a": a.name, "position_a": a.position, "stage_a": numbers[i], "block_b": b.name,
             "position_b": b.position, "stage_b": numbers[j], "cka": values[i, j], "samples": accumulator.count}
            for i, a in enumerate(chosen) for j, b in enumerate(chosen)]
    return pd.DataFrame(rows, columns=CKA_COLUMNS)
