"""Model surgery: a copy of the model without some blocks' branches, and its export.

`prune` deep-copies the model and rewrites each chosen block so that it computes only its
shortcut path (the branch's modules are gone, so the copy is smaller and faster); it equals
`probe.ablated(model, blocks)` in mode "zero". `export_pruned` checks the copy against
`probe.ablated` on data, saves it (whole, or as weights and the blocks that rebuild it when the
module cannot be pickled; `load_pruned` reads either), and times it against the original.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from probe.ablation import ablated
from probe.additions import is_addition
from probe.batches import Batch, batches, input_dtype, model_device
from probe.blocks import Block, resolve_blocks
from probe.errors import ProbeError
from probe.files import atomic_write
from probe.hooks import model_preserved
from probe.recalibrate import recalibrate_batchnorm, recalibrated
from probe.recording import fx_tracing, traced
from probe.suffix import ModulesAsLeaves

__all__ = ["EXPORT_COLUMNS", "PRUNED_FORMAT", "export_pruned", "load_pruned", "prune"]

EXPORT_COLUMNS = ["model", "blocks", "parameters", "bytes", "seconds_per_batch", "batch_size",
                  "parameters_ratio", "bytes_ratio", "time_ratio", "max_abs_difference", "path",
                  "bn_recalibrated"]


def prune(model: nn.Module, blocks: Sequence[str | Block], *, calibration: Iterable | None = None,
          progress: bool = False) -> nn.Module:
    """A deep copy of `model` in which each of `blocks` computes its shortcut path only.

    Each block's branch output is replaced by zeros shaped like its shortcut, and the modules
    that only fed the branch are dropped (so the copy is smaller and faster); the block module
    becomes a `torch.fx.GraphModule`. The result equals `probe.ablated(model, blocks)` in
    mode "zero". With `calibration`, the copy's BN statistics are first recalibrated for the
    pruned network (see `probe.recalibrate`). `model` itself is never modified.
    """
    chosen = resolve_blocks(model, list(blocks)) if blocks else []
    unsupported = [b.name for b in chosen if getattr(b, "strategy", "hooks") != "hooks"]
    if unsupported:
        raise ProbeError(f"cannot export block(s) {unsupported}: their branch F(x) is not the output of one module, "
                         "so there is no module to cut out; only blocks found with strategy 'hooks' can be pruned.")
    pruned = copy.deepcopy(model)
    if calibration is not None and chosen:
        recalibrate_batchnorm(pruned, calibration, chosen, progress=progress)
    per_module: dict[str, list[Block]] = {}
    for block in chosen:
        per_module.setdefault(block.module, []).append(block)
    # The model itself ("") last: its GraphModule then takes in the already pruned submodules.
    for module_name in sorted(per_module, key=lambda name: name == ""):
        replacement = _shortcut_only(pruned.get_submodule(module_name), module_name, per_module[module_name])
        if module_name == "":
            return replacement
        parent, _, attr = module_name.rpartition(".")
        setattr(pruned.get_submodule(parent) if parent else pruned, attr, replacement)
    return pruned


def _shortcut_only(module: nn.Module, module_name: str, blocks: Sequence[Block]) -> fx.GraphModule:
    prefix = module_name + "." if module_name else ""
    branches = {block.branch[len(prefix):] for block in blocks}
    try:
        with fx_tracing(module):  # fx patches torch while it traces: undone even on Ctrl-C
            graph = traced(ModulesAsLeaves(branches), module)
    except Exception as error:  # fx raises many types; the user needs the block and the reason
        raise ProbeError(f"cannot export block(s) {[b.name for b in blocks]}: torch.fx cannot trace module "
                         f"{module_name or '<model>'!r} ({type(error).__name__}: {error}).") from error
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in branches:
            continue
        adds = [user for user in node.users if is_addition(user)]
        if len(adds) != 1:
            raise ProbeError(f"cannot export: the output of branch {prefix + node.target!r} does not feed exactly "
                             "one residual addition in the traced block.")
        add = adds[0]
        shortcut = next(arg for arg in add.args[:2] if arg is not node)
        with graph.inserting_before(add):
            # A fresh zero tensor, as probe.ablated's hook returns: blocks like torchvision's add
            # the shortcut into it in place, which must not touch the shortcut itself.
            zeros = graph.call_function(torch.zeros_like, (shortcut,))
        node.replace_all_uses_with(zeros)
    # Unpickling a GraphModule re-traces its code with the tracer class it records; plain fx
    # tracing is all that needs (every submodule is kept as a leaf), and keeps the saved model
    # loadable without this module.
    graph._tracer_cls = None
    # Type annotations are cosmetic in fx code; string ones (modules with `from __future__ import
    # annotations`, like ours) break torch.save before torch 2.12 (pytorch/pytorch#167117).
    for node in graph.nodes:
        node.type = None
    pruned = fx.GraphModule(module, graph, class_name=f"Pruned{type(module).__name__}")
    # The branch's call is now unused: dead-code elimination drops it and everything feeding only
    # it, and the submodules no node calls any more are detached (that is the size reduction).
    pruned.graph.eliminate_dead_code()
    pruned.delete_all_unused_submodules()
    pruned.graph.lint()
    pruned.recompile()
    return pruned


def export_pruned(model: nn.Module, data: Iterable, blocks: Sequence[str | Block], *,
                  path: str | Path | None = None, calibration: Iterable | None = None, repeats: int = 7,
                  total_blocks: int | None = None, progress: bool = False) -> tuple[nn.Module, pd.DataFrame]:
    """(pruned copy, table comparing it with `model`): see `prune` and `SkippingResult.export`.

    The pruned copy is checked against `probe.ablated(model, blocks)` on every batch of `data`
    (ProbeError if its logits differ), saved to `path` when given (whole with `torch.save`, or
    as weights and blocks when it cannot be pickled; read either with `load_pruned(path,
    original_architecture)`), and timed against the original on `data`'s
    first batch, alternating the two models `repeats` times after a warm-up of each.
    total_blocks: how many blocks the original has, for the table's `blocks` column (the
    discovered blocks are counted when None).
    """
    if not isinstance(repeats, int) or repeats < 1:
        raise ProbeError(f"repeats must be a positive whole number, got {repeats!r}.")
    chosen = resolve_blocks(model, list(blocks)) if blocks else []
    pruned = prune(model, chosen, calibration=calibration, progress=progress).eval()
    device = model_device(model)
    difference = 0.0
    first = None
    with model_preserved(model), torch.no_grad(), _reference(model, chosen, calibration):
        for batch in batches(data, device, dtype=input_dtype(model)):
            first = batch if first is None else first
            difference = max(difference, _largest_difference(batch.run(pruned), batch.run(model)))
    if not difference <= 1e-4:  # also catches NaN
        raise ProbeError(f"the pruned export differs from probe.ablated by {difference:.3g} on the data; "
                         "the blocks' forward cannot be reduced to their shortcut by tracing.")
    with model_preserved(model), torch.no_grad():
        seconds = _alternating_timings([model, pruned], first, repeats)
    saved = _save(Path(path), pruned, chosen) if path is not None else ""
    rows = []
    total = len(resolve_blocks(model)) if total_blocks is None else total_blocks
    for name, module, timing, blocks_left in (("original", model, seconds[0], total),
                                              ("pruned", pruned, seconds[1], total - len(chosen))):
        rows.append({"model": name, "blocks": blocks_left, "parameters": _parameters(module),
                     "bytes": _bytes(module), "seconds_per_batch": timing, "batch_size": first.size})
    for row in rows:
        for key, column in (("parameters", "parameters_ratio"), ("bytes", "bytes_ratio"),
                            ("seconds_per_batch", "time_ratio")):
            row[column] = row[key] / rows[0][key] if rows[0][key] else float("nan")
        row["max_abs_difference"] = 0.0 if row["model"] == "original" else difference
        row["path"] = saved if row["model"] == "pruned" else ""
        row["bn_recalibrated"] = calibration is not None
    return pruned, pd.DataFrame(rows, columns=EXPORT_COLUMNS)


def _largest_difference(a: object, b: object) -> float:
    """The largest absolute difference between two outputs of any form (tensors, tuples, dicts)."""
    pairs = zip(pytree.tree_leaves(a), pytree.tree_leaves(b))
    return max((float((x - y).abs().max()) for x, y in pairs if isinstance(x, torch.Tensor)), default=0.0)


# What `export_pruned` writes when the pruned module itself cannot be pickled (a shortcut
# written as a lambda, fx code some torch versions cannot pickle): its weights and the blocks
# that rebuild it from the original architecture (`load_pruned`).
PRUNED_FORMAT = "probe.pruned/1"


def _save(path: Path, pruned: nn.Module, blocks: Sequence[Block]) -> str:
    """Save `pruned` whole, else as weights + blocks; warn and return "" if neither works."""
    try:
        return str(atomic_write(path, lambda tmp: torch.save(pruned, tmp)))
    except Exception as whole:  # pickling fails in many ways: a lambda, fx code of another torch
        payload = {"format": PRUNED_FORMAT, "blocks": [dataclasses.asdict(block) for block in blocks],
                   "state_dict": pruned.state_dict()}
        try:
            return str(atomic_write(path, lambda tmp: torch.save(payload, tmp)))
        except Exception:
            warnings.warn(f"could not save the pruned model to {path} ({type(whole).__name__}: {whole}); "
                          f"the comparison table is kept. Rebuild it with probe.surgery.prune(model, "
                          "blocks) where you need it.", stacklevel=3)
            return ""


def load_pruned(path: str | Path, model: nn.Module) -> nn.Module:
    """The pruned model `export_pruned` saved at `path`, in eval mode.

    `model` is the original architecture (freshly built; its weights are not used): a file
    holding weights and blocks (`PRUNED_FORMAT`) is rebuilt as `prune(model, blocks)` with
    those weights; a file holding the whole pruned module is returned as it is. The file is
    unpickled in full: load only exports you made.
    """
    saved = torch.load(path, map_location="cpu", weights_only=False)
    if isinstance(saved, nn.Module):
        return saved.eval()
    if not (isinstance(saved, dict) and saved.get("format") == PRUNED_FORMAT):
        raise ProbeError(f"{str(path)!r} is not a pruned model exported by probe (no {PRUNED_FORMAT!r} record).")
    pruned = prune(model, [Block(**fields) for fields in saved["blocks"]])
    pruned.load_state_dict(saved["state_dict"])
    return pruned.eval()


def _reference(model: nn.Module, blocks: list[Block], calibration: Iterable | None):
    """The original model as the pruned copy should behave: blocks ablated (and BN refitted)."""
    if not blocks:
        return contextlib.nullcontext(model)
    if calibration is not None:
        return recalibrated(model, calibration, blocks)
    return ablated(model, blocks)


def _alternating_timings(models: Sequence[nn.Module], batch: Batch, repeats: int) -> list[float]:
    """Fastest seconds per forward of each model on `batch`, over `repeats` interleaved rounds.

    Rounds alternate the order (A B, B A, ...) so neither model always runs first, and the
    minimum is kept: on a shared machine other work only ever adds time, so the fastest run is
    the best estimate of the model's own cost (the reasoning of Python's `timeit`).
    """
    cuda = any(leaf.is_cuda for leaf in pytree.tree_leaves(batch.inputs) if isinstance(leaf, torch.Tensor))
    times: list[list[float]] = [[] for _ in models]
    for model in models:
        batch.run(model)  # warm-up: allocator, lazy initialisation
    for round_ in range(repeats):
        indices = range(len(models)) if round_ % 2 == 0 else reversed(range(len(models)))
        for i in indices:
            if cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            batch.run(models[i])
            if cuda:
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - start)
    return [min(t) for t in times]


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
