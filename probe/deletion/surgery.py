"""Model surgery: a copy of the model without some blocks' branches, and its export.

`prune` deep-copies the model and rewrites each chosen block so that it computes only its
shortcut path (the branch's modules are gone, so the copy is smaller and faster); it equals
`probe.ablated(model, blocks)` in mode "zero". `export_pruned` checks the copy against
`probe.ablated` on data, saves it (whole, or as weights and the blocks that rebuild it when the
module cannot be pickled; `load_pruned` reads either), and times it against the original.

`prune_layers` is the whole-layer counterpart for Hugging Face language models (ShortGPT, SLEB):
a deep copy with some decoder layers deleted from their ModuleList and everything that numbers
layers by position renumbered, so the copy still generates with a key-value cache and saves and
loads like any Hugging Face model (`export_pruned_lm`, `load_pruned_lm`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import pandas as pd
import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from probe.deletion.ablated import ablated
from probe.discovery.additions import is_addition
from probe.batches import Batch, batches, input_dtype, model_device
from probe.discovery.find import Block, resolve_blocks
from probe.errors import ProbeError
from probe.files import atomic_write
from probe.instrument.hooks import model_preserved
from probe.discovery.layers import layer_stack
from probe.deletion.batchnorm import recalibrate_batchnorm, recalibrated
from probe.discovery.tracing import fx_tracing, traced
from probe.deletion.fast_suffix import ModulesAsLeaves
from probe.scoring.tasks import logits_of

__all__ = ["EXPORT_COLUMNS", "PRUNED_FORMAT", "export_pruned", "export_pruned_lm", "load_pruned", "load_pruned_lm",
           "prune", "prune_layers"]

EXPORT_COLUMNS = ["model", "blocks", "parameters", "bytes", "seconds_per_batch", "batch_size",
                  "parameters_ratio", "bytes_ratio", "time_ratio", "max_abs_difference", "path",
                  "bn_recalibrated"]


def prune(model: nn.Module, blocks: Sequence[str | Block], *, calibration: Iterable | None = None,
          progress: bool = True) -> nn.Module:
    """A deep copy of `model` in which each of `blocks` computes its shortcut path only.

    Each block's branch output is replaced by zeros shaped like its shortcut, and the modules
    that only fed the branch are dropped (so the copy is smaller and faster); the block module
    becomes a `torch.fx.GraphModule`. The result equals `probe.ablated(model, blocks)` in
    mode "zero". With `calibration`, the copy's BN statistics are first recalibrated for the
    pruned network (see `probe.deletion.batchnorm`). `model` itself is never modified.
    """
    chosen = resolve_blocks(model, list(blocks)) if blocks else []
    unsupported = [b.name for b in chosen if getattr(b, "strategy", "hooks") != "hooks"]
    if unsupported:
        raise ProbeError(f"cannot export block(s) {unsupported}: their branch F(x) is not the output of one module, "
                         "so there is no module to cut out; only blocks found with strategy 'hooks' can be pruned.")
    pruned = copy.deepcopy(model)
    if calibration is not None and chosen:
        recalibrate_batchnorm(pruned, calibration, blocks=chosen, progress=progress)
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
                  path: str | Path | None = None, calibration: Iterable | None = None, repeats: int = 3,
                  total_blocks: int | None = None, progress: bool = True) -> tuple[nn.Module, pd.DataFrame]:
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
                          f"the comparison table is kept. Rebuild it with probe.deletion.surgery.prune(model, "
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
    pruned = prune(model, [Block(**fields) for fields in saved["blocks"]], progress=False)
    pruned.load_state_dict(saved["state_dict"])
    return pruned.eval()


def _reference(model: nn.Module, blocks: list[Block], calibration: Iterable | None):
    """The original model as the pruned copy should behave: blocks ablated (and BN refitted)."""
    if not blocks:
        return contextlib.nullcontext(model)
    if calibration is not None:
        return recalibrated(model, calibration, blocks=blocks, progress=False)
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


# --- Whole layers of Hugging Face language models ----------------------------------------------

# Config lists with one entry per layer, besides any `*_types` list (`layer_types`,
# `mlp_layer_types`): they are filtered with the layers. Any other non-empty list whose name
# mentions layers may hold layer indices (`mlp_only_layers`, `kv_source_layers`), which would
# need their values rewritten, so `prune_layers` refuses it rather than guess.
PER_LAYER_LISTS = frozenset({"no_rope_layers", "num_attention_heads_per_layer", "num_key_value_heads_per_layer"})


def prune_layers(model: nn.Module, layers: Sequence[str] | str) -> nn.Module:
    """A deep copy of the Hugging Face model `model` without the whole layers `layers`.

    layers: qualified names of elements of one ModuleList (or Sequential), as
    `probe.discovery.layers.group_layers` names them: `["model.layers.3", "model.layers.5"]` for Llama,
    `["transformer.h.2"]` for GPT-2. They are deleted from the copy's ModuleList, and what
    numbers layers by position is renumbered so the copy is an ordinary, shorter model of its
    class: each remaining module's `layer_idx` (attention modules index the key-value cache with
    it, Hugging Face transformers issue 30508), the config's layer count (`num_hidden_layers`,
    which GPT-2 calls `n_layer`) and its per-layer lists (`layer_types`, `mlp_layer_types`, ...).
    The copy equals the original with every block of those layers ablated (`probe.ablated`,
    mode "zero") in pre-LayerNorm models (Llama, GPT-2), where a layer without its branches is the
    identity; in post-LayerNorm models (BERT) the ablated layer still applies its LayerNorms, the
    deleted one does not. The copy keeps `model`'s device, dtype and training flag; `model`
    itself is never modified. A model accelerate dispatched over devices (`hf_device_map`) is
    copied without its weights: the copy shares them (on the GPUs, the CPU, or on disk behind
    accelerate's hooks), with its own renumbered `hf_device_map`; for saving (`export_pruned_lm`),
    not for changing its weights.

    ProbeError (`model` untouched) when `model` is not a Hugging Face `PreTrainedModel`, is an
    encoder-decoder, has a per-layer (heterogeneous) config; when a name is not an element of one
    ModuleList or every element would go; when the config's layer count is not that list's
    length; when a module's `layer_idx` is not its layer's position, or the computation of a
    kept layer depends on its position (GPT-2's `scale_attn_by_inverse_layer_idx`); when the
    config holds another list that may index layers; and when the renumbered config would build
    a model with other parameters than the copy (a layer-indexed setting probe does not know,
    such as DeepSeek's `first_k_dense_replace`).
    """
    names = [layers] if isinstance(layers, str) else list(dict.fromkeys(layers))
    if not names:
        return copy.deepcopy(model)
    stack_name, delete, count = _layer_plan(model, names)
    kept = [i for i in range(count) if i not in delete]
    pruned = _copy_sharing_dispatched_weights(model)
    if getattr(model, "hf_device_map", None):
        pruned.hf_device_map = _renumbered_map(model.hf_device_map, stack_name, kept)
    stack = pruned.get_submodule(stack_name)
    for index in sorted(delete, reverse=True):
        del stack[index]  # ModuleList and Sequential renumber their keys: "0", "1", ...
    for position, layer in enumerate(stack):
        for module in layer.modules():
            if _layer_index(module) is not None:
                module.layer_idx = position
    config = _owner_config(pruned, stack_name)
    for key, value in list(vars(config).items()):
        if _is_per_layer_list(key, value, count):
            setattr(config, key, type(value)(value[i] for i in kept))
    config.num_hidden_layers = len(kept)  # through attribute_map: GPT-2's n_layer
    _check_structure(pruned, names)
    return pruned


def _copy_sharing_dispatched_weights(model: nn.Module) -> nn.Module:
    """A deep copy of `model`; one that accelerate dispatched shares its tensors and offloaded
    weights with `model` (a copy of a model too big for one device would not fit)."""
    if not getattr(model, "hf_device_map", None):
        return copy.deepcopy(model)
    shared: dict[int, object] = {id(t): t for t in (*model.parameters(), *model.buffers())}
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for part in (*getattr(hook, "hooks", ()), hook):  # a SequentialHook holds several
            for name in ("weights_map", "tied_params_map"):
                value = getattr(part, name, None)
                if value is not None:
                    shared[id(value)] = value
    return copy.deepcopy(model, memo=shared)


def _renumbered_map(device_map: dict, stack_name: str, kept: list[int]) -> dict:
    """`device_map` for the stack holding only the layers `kept`, renumbered 0, 1, ..."""
    position = {old: new for new, old in enumerate(kept)}
    prefix = f"{stack_name}." if stack_name else ""
    renumbered = {}
    for name, place in device_map.items():
        index, _, rest = name[len(prefix):].partition(".") if name.startswith(prefix) else ("", "", "")
        if not index.isdigit():
            renumbered[name] = place
        elif int(index) in position:
            renumbered[".".join(filter(None, [f"{prefix}{position[int(index)]}", rest]))] = place
    return renumbered


def export_pruned_lm(model: nn.Module, layers: Sequence[str] | str, path: str | os.PathLike, *,
                     tokenizer: object | None = None, example_input: object = None) -> Path:
    """Save `prune_layers(model, layers)` with `save_pretrained` to the new folder `path`.

    The folder (created, with its parents; it must not exist or be empty) then holds an
    ordinary Hugging Face model, and `tokenizer`'s files when given: read it back with
    `load_pruned_lm(path)` or `AutoModelForCausalLM.from_pretrained(path)`, and generate with
    it as with any model (the key-value cache works: layers are renumbered). The folder appears
    whole or not at all (written beside it, then renamed). With `example_input` (token ids, or
    a dict of the forward's keyword arguments), the saved model is read back and its logits on
    that input compared with the pruned copy's (ProbeError when they differ: a setting that
    numbers layers, which the copy does not use but a model built from the config does); that
    check holds a second pruned model in memory while it runs. Returns `path`. `model` itself is
    never modified.
    """
    path = Path(path).expanduser()
    if path.exists() and not (path.is_dir() and not any(path.iterdir())):
        raise ProbeError(f"cannot export the pruned model to {str(path)!r}: it exists and is not an empty folder; "
                         "choose a new folder or delete that one.")
    pruned = prune_layers(model, layers)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        with warnings.catch_warnings():  # a dispatched model's offloaded weights are read one at a time
            warnings.filterwarnings("ignore", message="Attempting to save a model with offloaded modules")
            pruned.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if example_input is not None:
            _check_saved(pruned, tmp, example_input)
        if path.exists():
            path.rmdir()  # empty, checked above
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def load_pruned_lm(path: str | os.PathLike, **kwargs) -> nn.Module:
    """The model `export_pruned_lm` saved in the folder `path`, in eval mode.

    Read with `from_pretrained` of the class the folder's config records (`architectures`;
    the class that was exported, a causal language model for Llama or GPT-2), else
    `AutoModelForCausalLM`. kwargs go to `from_pretrained` (`dtype`, `device_map`, ...).
    The tokenizer, when exported, reads with `AutoTokenizer.from_pretrained(path)`.
    """
    transformers = _transformers("load_pruned_lm")
    config = transformers.AutoConfig.from_pretrained(path)
    recorded = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, recorded, None) if recorded else None
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        cls = transformers.AutoModelForCausalLM
    return cls.from_pretrained(path, **kwargs).eval()


def _transformers(what: str):
    try:
        import transformers  # optional dependency (docs/architecture.md): only these functions need it
    except ImportError as error:
        raise ProbeError(f"{what} needs the transformers package (pip install transformers).") from error
    return transformers


def _layer_plan(model: nn.Module, names: list[str]) -> tuple[str, set[int], int]:
    """(stack name, indices to delete, how many layers the stack holds), or ProbeError."""
    transformers = _transformers("prune_layers")
    if not isinstance(model, transformers.PreTrainedModel):
        raise ProbeError(f"prune_layers needs a Hugging Face PreTrainedModel (it renumbers the config's layers); "
                         f"got {type(model).__name__}. Use probe.deletion.surgery.prune for other models.")
    if getattr(model.config, "is_encoder_decoder", False):
        raise ProbeError(f"prune_layers cannot prune the encoder-decoder {type(model).__name__}: its config counts "
                         "encoder and decoder layers apart, and probe renumbers one stack of layers only.")
    for name in names:
        parent, _, index = name.rpartition(".")
        try:
            container = model.get_submodule(parent) if parent else model
        except AttributeError:
            container = None
        if not isinstance(container, (nn.ModuleList, nn.Sequential)) or not index.isdigit():
            raise ProbeError(f"cannot prune layer {name!r}: it is no element of a ModuleList or Sequential "
                             "(name whole layers, as probe.discovery.layers.group_layers does: 'model.layers.3').")
        if int(index) >= len(container):
            raise ProbeError(f"cannot prune layer {name!r}: {parent!r} holds {len(container)} layers "
                             f"(0 to {len(container) - 1}).")
    found = layer_stack(model, names)
    if found is None:
        parents = sorted({name.rpartition(".")[0] for name in names})
        raise ProbeError(f"cannot prune layers {names}: they are elements of several lists ({parents}); "
                         "prune the layers of one stack at a time.")
    stack_name, stack = found
    delete = {int(name.rpartition(".")[2]) for name in names}
    if len(delete) == len(stack):
        raise ProbeError(f"cannot prune every layer of {stack_name!r} ({len(stack)}): keep at least one.")
    config = _owner_config(model, stack_name)
    count = getattr(config, "num_hidden_layers", None)
    if count != len(stack):
        raise ProbeError(f"cannot prune layers of {stack_name!r}: its config counts {count} hidden layers but the list "
                         f"holds {len(stack)}, so probe cannot tell which count to renumber.")
    if getattr(config, "is_heterogeneous", False):
        raise ProbeError(f"cannot prune layers of {type(model).__name__}: its config is heterogeneous "
                         "(per_layer_config keyed by layer index), which probe does not renumber.")
    for position, layer in enumerate(stack):
        for module_name, module in layer.named_modules():
            index = _layer_index(module)
            if index is not None and index != position:
                raise ProbeError(f"cannot prune layers of {stack_name!r}: module "
                                 f"{'.'.join(filter(None, [stack_name, str(position), module_name]))!r} has layer_idx "
                                 f"{index}, not its layer's position {position}, so probe cannot renumber it.")
    moved = any(i not in delete and i > min(delete) for i in range(len(stack)))
    if moved and getattr(config, "scale_attn_by_inverse_layer_idx", False):
        raise ProbeError(f"cannot prune layers of {type(model).__name__}: scale_attn_by_inverse_layer_idx scales each "
                         "layer's attention by its position, so a renumbered layer would compute something else.")
    for key, value in vars(config).items():
        if isinstance(value, (list, tuple)) and value and "layer" in key and not key.startswith("_") \
                and not _is_per_layer_list(key, value, count):
            raise ProbeError(f"cannot prune layers of {type(model).__name__}: config.{key} = {list(value)!r} may "
                             "number layers by position, and probe does not know how to renumber it.")
    return stack_name, delete, count


def _owner_config(model: nn.Module, stack_name: str):
    """The config of the innermost PreTrainedModel holding the stack (a composite model's text config)."""
    parts = stack_name.split(".") if stack_name else []
    for end in range(len(parts), -1, -1):
        module = model.get_submodule(".".join(parts[:end])) if end else model
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "num_hidden_layers") and hasattr(module, "save_pretrained"):
            return config
    return model.config


def _layer_index(module: nn.Module) -> int | None:
    index = getattr(module, "layer_idx", None)
    return index if isinstance(index, int) and not isinstance(index, bool) else None


def _is_per_layer_list(key: str, value: object, count: int) -> bool:
    return (isinstance(value, (list, tuple)) and len(value) == count and not key.startswith("_")
            and (key.endswith("_types") or key in PER_LAYER_LISTS))


def _check_structure(pruned: nn.Module, names: list[str]) -> None:
    """ProbeError when the renumbered config builds a model with other parameters than `pruned`.

    The model is built from the config on the meta device (no memory), as `from_pretrained`
    would build it: a setting that numbers layers which probe left alone (DeepSeek's
    `first_k_dense_replace`, Qwen-MoE's `decoder_sparse_step`) gives other shapes or names.
    """
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fresh = type(pruned)(copy.deepcopy(pruned.config))
    except Exception as error:  # a class that cannot be rebuilt from its config: nothing to compare
        warnings.warn(f"could not rebuild {type(pruned).__name__} from the pruned config to check it "
                      f"({type(error).__name__}: {error}).", stacklevel=3)
        return
    want = {key: tuple(value.shape) for key, value in pruned.state_dict().items()}
    got = {key: tuple(value.shape) for key, value in fresh.state_dict().items()}
    if want != got:
        differ = sorted(key for key in want.keys() | got.keys() if want.get(key) != got.get(key))
        raise ProbeError(f"cannot prune layers {names}: the renumbered config builds a model with other parameters "
                         f"({', '.join(differ[:3])}{', ...' if len(differ) > 3 else ''}); a setting of "
                         f"{type(pruned.config).__name__} numbers layers in a way probe does not know.")


def _check_saved(pruned: nn.Module, folder: Path, example_input: object) -> None:
    """ProbeError when the model saved in `folder` computes other logits than `pruned`."""
    device = model_device(pruned)
    device_map = getattr(pruned, "hf_device_map", None)
    if device_map:  # read back dispatched as the copy is: it need not fit one device either
        offload = Path(tempfile.mkdtemp(prefix=f".{folder.name}.offload.", dir=folder.parent))
        try:
            loaded = load_pruned_lm(folder, device_map=device_map, offload_folder=str(offload),
                                    dtype=next(pruned.parameters()).dtype)
            _compare_saved(pruned, loaded, example_input, device)
        finally:
            shutil.rmtree(offload, ignore_errors=True)
        return
    _compare_saved(pruned, load_pruned_lm(folder).to(device), example_input, device)


def _compare_saved(pruned: nn.Module, loaded: nn.Module, example_input: object, device: torch.device) -> None:
    if isinstance(example_input, dict):
        inputs = {key: value.to(device) if isinstance(value, torch.Tensor) else value
                  for key, value in example_input.items()}
    else:
        inputs = {"input_ids": example_input.to(device)}
    with model_preserved(pruned), torch.no_grad():
        expected = logits_of(pruned(**inputs))
        difference = _largest_difference(logits_of(loaded(**inputs)), expected)
        scale = max(1.0, float(expected.abs().max()))
    if not difference <= 1e-4 * scale:  # also catches NaN
        raise ProbeError(f"the saved pruned model computes other logits than the pruned copy (by {difference:.3g}): "
                         "a config setting numbers layers in a way probe does not know.")
