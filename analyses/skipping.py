"""Which blocks can go: remove every skipped block at once, deletion curves, and a pruned export.

    python -m analyses.skipping --out runs/skipping

1. **Remove the skipped blocks together.** The verdict rule (`analyses.verdict`) calls a block
   skipped when its branch is small and deleting it *alone* costs nothing beyond noise. Deleting
   them all at once is the real test: small effects can add up.
2. **Deletion curves** (Veit et al. 2016, Fig. 5a): accuracy as k = 0..N blocks are deleted
   together, in three orders: ascending branch/shortcut ratio, ascending single-block accuracy
   drop (the "truth" order), and random (several seeded draws; the figure shows their mean and
   range). Every point of every curve is evaluated in one data pass.
3. **Pruned export**: a deep copy of the model in which each skipped block computes only its
   shortcut path (the branch's modules are gone), checked against `probe.ablated` on the data,
   saved with `torch.save`, and measured for size and speed against the original.
"""

from __future__ import annotations

import argparse
import copy
import operator
import time
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.fx as fx
from torch import nn

from analyses.evaluation import block_table, check_table, evaluate_sets
from analyses.verdict import VerdictRule, classify
from probe.ablation import ablated
from probe.batches import batches, model_device
from probe.blocks import Block, resolve_blocks
from probe.errors import ProbeError
from probe.hooks import model_preserved
from probe.suffix import ModulesAsLeaves
from probe.recalibrate import recalibrate_batchnorm, recalibrated

__all__ = ["ORDERS", "SkippingResult", "curve_ks", "deletion_orders", "export_pruned", "main", "prune", "skipping"]

ORDERS = ("ratio", "drop", "random")

SUMMARY_COLUMNS = ["state", "blocks_removed", "removed", "accuracy", "loss", "accuracy_drop", "flip_rate",
                   "samples", "mode", "bn_recalibrated"]
CURVE_COLUMNS = ["order", "draw", "k", "removed", "accuracy", "loss", "accuracy_drop", "samples", "mode",
                 "bn_recalibrated"]
EXPORT_COLUMNS = ["model", "blocks", "parameters", "bytes", "seconds_per_batch", "batch_size",
                  "parameters_ratio", "bytes_ratio", "time_ratio", "max_abs_difference", "path",
                  "bn_recalibrated"]


@dataclass
class SkippingResult:
    """The three tables of the skipping analysis.

    summary: two rows, `state` "all blocks" and "skipped blocks removed": blocks_removed (count),
        removed (names, space-separated), accuracy, loss, accuracy_drop (vs. all blocks),
        flip_rate, samples, mode, bn_recalibrated.
    curves: one row per (order, draw, k): order ("ratio", "drop", "random"), draw (0..draws-1;
        always 0 for the two fixed orders), k (blocks deleted: the first k of the order), removed
        (the k-th block of the order; "" at k = 0), accuracy, loss, accuracy_drop (vs. k = 0),
        samples, mode, bn_recalibrated.
    export: two rows, `model` "original" and "pruned": blocks (blocks that still compute a branch), parameters,
        bytes (parameter and buffer storage), seconds_per_batch (fastest of several runs, the two
        models alternating in one process), batch_size, parameters_ratio / bytes_ratio / time_ratio (pruned / original),
        max_abs_difference (pruned logits vs. `probe.ablated`), path (where the pruned model was
        saved, or ""), bn_recalibrated. Empty when no export was asked for, or none was possible.
    export_note: why `export` is empty although it was asked for (say, blocks from a spec whose
        branch is no module's output: there is nothing to cut out); "" otherwise.
    """

    summary: pd.DataFrame
    curves: pd.DataFrame
    export: pd.DataFrame
    export_note: str = ""


def deletion_orders(table: pd.DataFrame, *, random_draws: int = 5, seed: int = 0) -> list[tuple[str, int, list[str]]]:
    """(order, draw, block names in deletion order) for every deletion curve.

    "ratio": smallest branch/shortcut ratio first. "drop": smallest single-block accuracy drop
    first, ties broken by the smaller loss increase (a finer measure of the same harm), then by
    position. "random": `random_draws` permutations from numpy's generator seeded with `seed`.
    """
    if not isinstance(random_draws, int) or random_draws < 0:
        raise ProbeError(f"random_draws must be a whole number >= 0, got {random_draws!r}.")
    forward = table.sort_values("position", kind="stable") if "position" in table else table
    names = forward["block"].astype(str).tolist()
    by_ratio = forward.sort_values("ratio", kind="stable")["block"].astype(str).tolist()
    keys = ["accuracy_drop", "loss_increase"] if "loss_increase" in forward else ["accuracy_drop"]
    by_drop = forward.sort_values(keys, kind="stable")["block"].astype(str).tolist()
    rng = np.random.default_rng(seed)
    orders = [("ratio", 0, by_ratio), ("drop", 0, by_drop)]
    orders += [("random", draw, [names[i] for i in rng.permutation(len(names))]) for draw in range(random_draws)]
    return orders


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


_ADDS = {operator.add, operator.iadd, torch.add}


def _is_add(node: fx.Node) -> bool:
    return (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_"))


def _shortcut_only(module: nn.Module, module_name: str, blocks: Sequence[Block]) -> fx.GraphModule:
    prefix = module_name + "." if module_name else ""
    branches = {block.branch[len(prefix):] for block in blocks}
    try:
        graph = ModulesAsLeaves(branches).trace(module)
    except Exception as error:  # fx raises many types; the user needs the block and the reason
        raise ProbeError(f"cannot export block(s) {[b.name for b in blocks]}: torch.fx cannot trace module "
                         f"{module_name or '<model>'!r} ({type(error).__name__}: {error}).") from error
    for node in list(graph.nodes):
        if node.op != "call_module" or node.target not in branches:
            continue
        adds = [user for user in node.users if _is_add(user)]
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
    (ProbeError if its logits differ), saved to `path` with `torch.save` when given (load it
    with `torch.load(path, weights_only=False)`), and timed against the original on `data`'s
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
        for inputs, _ in batches(data, device):
            first = inputs if first is None else first
            difference = max(difference, (pruned(inputs) - model(inputs)).abs().max().item())
    if not difference <= 1e-4:  # also catches NaN
        raise ProbeError(f"the pruned export differs from probe.ablated by {difference:.3g} on the data; "
                         "the blocks' forward cannot be reduced to their shortcut by tracing.")
    with model_preserved(model), torch.no_grad():
        seconds = _alternating_timings([model, pruned], first, repeats)
    saved = ""
    if path is not None:
        from probe.files import atomic_write

        try:
            saved = str(atomic_write(Path(path), lambda tmp: torch.save(pruned, tmp)))
        except Exception as error:  # pickling fx code varies across torch versions: keep the table
            warnings.warn(f"could not save the pruned model to {path} ({type(error).__name__}: {error}); "
                          f"the comparison table is kept. Rebuild it with analyses.skipping.prune(model, "
                          "blocks) where you need it.", stacklevel=2)
    rows = []
    total = len(resolve_blocks(model)) if total_blocks is None else total_blocks
    for name, module, timing, blocks_left in (("original", model, seconds[0], total),
                                              ("pruned", pruned, seconds[1], total - len(chosen))):
        rows.append({"model": name, "blocks": blocks_left, "parameters": _parameters(module),
                     "bytes": _bytes(module), "seconds_per_batch": timing, "batch_size": len(first)})
    for row in rows:
        for key, column in (("parameters", "parameters_ratio"), ("bytes", "bytes_ratio"),
                            ("seconds_per_batch", "time_ratio")):
            row[column] = row[key] / rows[0][key] if rows[0][key] else float("nan")
        row["max_abs_difference"] = 0.0 if row["model"] == "original" else difference
        row["path"] = saved if row["model"] == "pruned" else ""
        row["bn_recalibrated"] = calibration is not None
    return pruned, pd.DataFrame(rows, columns=EXPORT_COLUMNS)


def _reference(model: nn.Module, blocks: list[Block], calibration: Iterable | None):
    """The original model as the pruned copy should behave: blocks ablated (and BN refitted)."""
    if not blocks:
        import contextlib

        return contextlib.nullcontext(model)
    if calibration is not None:
        return recalibrated(model, calibration, blocks)
    return ablated(model, blocks)


def _alternating_timings(models: Sequence[nn.Module], inputs: torch.Tensor, repeats: int) -> list[float]:
    """Fastest seconds per forward of each model on `inputs`, over `repeats` interleaved rounds.

    Rounds alternate the order (A B, B A, ...) so neither model always runs first, and the
    minimum is kept: on a shared machine other work only ever adds time, so the fastest run is
    the best estimate of the model's own cost (the reasoning of Python's `timeit`).
    """
    times: list[list[float]] = [[] for _ in models]
    for model in models:
        model(inputs)  # warm-up: allocator, lazy initialisation
    for round_ in range(repeats):
        indices = range(len(models)) if round_ % 2 == 0 else reversed(range(len(models)))
        for i in indices:
            if inputs.is_cuda:
                torch.cuda.synchronize()
            start = time.perf_counter()
            models[i](inputs)
            if inputs.is_cuda:
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - start)
    return [min(t) for t in times]


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def curve_ks(blocks: int, points: int | None = None) -> list[int]:
    """The k (blocks deleted together) at which curves are evaluated: every k from 1 to `blocks`,
    or about `points` of them spread evenly (always including 1 and `blocks`)."""
    if points is not None and (not isinstance(points, int) or points < 2):
        raise ProbeError(f"curve points must be a whole number >= 2 (or None for every k), got {points!r}.")
    if points is None or points >= blocks:
        return list(range(1, blocks + 1))
    return sorted({1, *(int(k) for k in np.round(np.linspace(0, blocks, points))[1:])})


def skipping(model: nn.Module, data: Iterable, table: pd.DataFrame | None = None, *,
             rule: VerdictRule | None = None, mode: str = "zero", calibration: Iterable | None = None,
             random_draws: int = 5, seed: int = 0, curve_points: int | None = None,
             export_path: str | Path | None = None, export: bool = True, blocks: Sequence[str | Block] | None = None,
             progress: bool = True) -> SkippingResult:
    """Remove the skipped blocks together, draw deletion curves, and export the pruned model.

    table: the per-block table (`analyses.evaluation.block_table`, or `blocks.csv` of
    `python -m probe.ablate`) with block, position, ratio, accuracy_drop and the verdict
    inputs; computed when None. Its verdicts are recomputed with `rule`. The summary and every
    curve point come from one `evaluate_sets` call; `calibration` recalibrates BN per set.
    curve_points: evaluate each curve at about this many k (`curve_ks`) instead of every k:
    each point costs up to a forward pass, and a deep network has many blocks.
    blocks: the blocks the table covers (names or Blocks, e.g. from a spec); all discovered when None.
    """
    rule = rule or VerdictRule()
    every = resolve_blocks(model, blocks)
    if table is None:
        table = block_table(model, data, mode=mode, calibration=calibration, rule=rule, blocks=every,
                            progress=progress)
    table = classify(check_table(table, ["block", "position", "ratio", "accuracy_drop", "flip_rate", "samples"],
                                 "skipping", model, every), rule)
    skipped = table.loc[table["verdict"] == "skipped", "block"].astype(str).tolist()
    orders = deletion_orders(table, random_draws=random_draws, seed=seed)
    # Block objects, not names: each set is then used as given, without finding the blocks again.
    by_name = {block.name: block for block in every}
    ks = curve_ks(len(by_name), curve_points)
    # k = 0 is the baseline itself; each other k is a prefix of the order (nested sets).
    sets = [[by_name[n] for n in skipped]] + [[by_name[n] for n in names[:k]] for _, _, names in orders for k in ks]
    baseline, results = evaluate_sets(model, data, sets, mode=mode, calibration=calibration, progress=progress)
    recal = calibration is not None
    after = results[0]
    summary = pd.DataFrame([
        {"state": "all blocks", "blocks_removed": 0, "removed": "", "accuracy": baseline["accuracy"],
         "loss": baseline["loss"], "accuracy_drop": 0.0, "flip_rate": 0.0, "samples": baseline["samples"]},
        {"state": "skipped blocks removed", "blocks_removed": len(skipped), "removed": " ".join(skipped),
         "accuracy": after["accuracy"], "loss": after["loss"],
         "accuracy_drop": baseline["accuracy"] - after["accuracy"], "flip_rate": after["flip_rate"],
         "samples": after["samples"]},
    ]).assign(mode=mode, bn_recalibrated=recal)[SUMMARY_COLUMNS]
    rows, next_result = [], iter(results[1:])
    for order, draw, names in orders:
        rows.append({"order": order, "draw": draw, "k": 0, "removed": "", "accuracy": baseline["accuracy"],
                     "loss": baseline["loss"], "accuracy_drop": 0.0, "samples": baseline["samples"]})
        for k in ks:
            result = next(next_result)
            rows.append({"order": order, "draw": draw, "k": k, "removed": names[k - 1],
                         "accuracy": result["accuracy"], "loss": result["loss"],
                         "accuracy_drop": baseline["accuracy"] - result["accuracy"], "samples": result["samples"]})
    curves = pd.DataFrame(rows).assign(mode=mode, bn_recalibrated=recal)[CURVE_COLUMNS]
    exported, note = pd.DataFrame(columns=EXPORT_COLUMNS), ""
    if export:
        try:
            _, exported = export_pruned(model, data, sets[0], path=export_path, calibration=calibration,
                                        total_blocks=len(every))
        except ProbeError as error:  # the curves and the summary need no export: keep them, say why
            note = str(error)
            warnings.warn(f"no pruned model exported: {note}", stacklevel=2)
    return SkippingResult(summary=summary, curves=curves, export=exported, export_note=note)


def main(argv: list[str] | None = None) -> int:
    """`python -m analyses.skipping`: writes skipping.csv, deletion_curves.csv, pruned_export.csv,
    pruned_model.pt and deletion_curves.png into --out."""
    from analyses import _cli
    from reports import figures

    parser = _cli.model_parser("python -m analyses.skipping", __doc__.split("\n\n")[0])
    parser.add_argument("--random-draws", type=int, default=5,
                        help="random deletion orders to average (default: %(default)s)")
    parser.add_argument("--curve-points", type=int,
                        help="evaluate each deletion curve at about this many k (default: every k)")

    def body(args: argparse.Namespace, out: Path) -> list[Path]:
        inputs = _cli.load_inputs(args)
        result = skipping(inputs.model, inputs.data, mode=args.mode, calibration=inputs.calibration,
                          random_draws=args.random_draws, seed=args.seed, curve_points=args.curve_points,
                          export_path=out / "pruned_model.pt", blocks=inputs.blocks, progress=inputs.progress)
        written = _cli.write_tables(out, {"skipping": result.summary, "deletion_curves": result.curves,
                                          "pruned_export": result.export})
        written.append(_cli.write_figure(out / "deletion_curves.png", figures.deletion_curves, result.curves))
        print(result.summary[["state", "blocks_removed", "accuracy", "accuracy_drop"]].to_string(index=False))
        if result.export_note:
            print(f"pruned export: none ({result.export_note})")
            return written
        pruned = result.export.set_index("model").loc["pruned"]
        print(f"pruned export: parameters x{pruned.parameters_ratio:.2f}, bytes x{pruned.bytes_ratio:.2f}, "
              f"time per batch x{pruned.time_ratio:.2f} of the original")
        return written

    return _cli.run(parser, body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
