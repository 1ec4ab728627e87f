"""Fast sweeps without torch.fx: replay the layers before a deletion from their cached outputs.

`probe.deletion.fast_suffix` cuts a traced graph at its blocks. Models torch.fx cannot trace (Hugging Face
transformers) still keep their layers in one `ModuleList` and call each once per forward. Deleting
a block in layer k changes nothing before layer k, so per batch we run one baseline forward that
keeps every layer's output, and for each deletion we run the model again with layers 0..k-1
answering from that cache (their `forward` swapped, for that call only, for a lookup): only the
embeddings, layers k.. and the head compute. The model's own code runs as it is; the numbers are
those of full forwards.

    runner = layer_runner_for(model, blocks)        # None when the blocks are not in one stack
    outputs, cache = runner.baseline(inputs)
    runner.suffix(runner.first(ablation_set), cache)
    outputs, cache = runner.chained_suffix(first, cache, ablation_set)  # and that network's cache

`chained_suffix` also keeps the layer outputs of the network with the set deleted: a set that
holds it (the next point of a deletion curve, a greedy step's candidates) replays every layer
before its earliest *new* block from that cache, as deleting a block changes nothing before it.

A layer whose every block is deleted (two or more: attention and MLP) adds zeros to the stream
it is given: once a run of it has shown, to the bit, that its output is its input, later calls
of it in the same evaluation pass that input on without running it (its structure taken from its
cached output: a tensor, or a tuple of it and Nones). Spans and greedy steps then cost only the
layers that remain.

What is cached is what each layer's `forward` returned, before the layer's own forward hooks:
a replayed call still goes through `nn.Module.__call__`, so the hooks on the layer (a steering
vector added to its output), and the global ones, run on the cached value as they ran on the
computed one: once. Hooks inside a layer ran while the cached value was computed, and do not run
again. Nothing is kept between calls: the model's own code runs each time, with its hooks and
attributes as they are now.

The cache holds one batch's layer outputs (memory: layers x batch x sequence x width), never
more: memory stays flat in the number of batches. A cached output modified in place after it was
made (the next layer, or a hook, writing into it), or inputs the model wrote into, raise
`InPlaceError`; a layer called other than once per forward gives no runner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from torch.utils import _pytree as pytree

from probe.batches import call_model
from probe.discovery.find import Block
from probe.instrument.hooks import restoring
from probe.instrument.intercept import replaying
from probe.discovery.layers import layer_of, layer_stack
from probe.deletion.fast_suffix import InPlaceError

__all__ = ["LayerRunner", "layer_runner_for"]


class LayerRunner:
    """`baseline(inputs) -> (outputs, cache)`; `suffix(block, cache) -> outputs` with the layers
    before `block`'s answered from the cache."""

    def __init__(self, model: nn.Module, layers: list[nn.Module], index: dict[str, int]) -> None:
        self._model, self._layers, self._index = model, layers, index
        self._blocks_in: dict[int, set[str]] = {}
        for name, layer in index.items():
            self._blocks_in.setdefault(layer, set()).add(name)
        # Layer -> whether, with its blocks deleted, it passes its input on unchanged (first seen run).
        self._passes_on: dict[int, bool] = {}

    def baseline(self, inputs: object) -> tuple[object, tuple]:
        # (output, its versions when made) of each layer's forward, before its forward hooks
        return self._run(inputs, _versions(inputs), [], [], cached_all=[])

    def _run(self, inputs: object, given: list[int], cached: list, versions: list, *, cached_all: list,
             deleted: Sequence[Block] = (), keep: bool = True) -> tuple[object, tuple | None]:
        """The model's output with the first len(cached) layers answering from `cached`, and (with
        `keep`) the cache of this forward: those outputs, then what each later layer's forward
        returned. A later layer whose every block is `deleted` (two or more) passes its input on
        without running, once a run of it has shown that it does so to the bit (x + 0 + 0 = x);
        `cached_all` (every layer's output in some forward) gives the shape of its output."""
        start = len(cached)
        outputs_of: list[list[tuple[object, list[int]]]] = [[] for _ in self._layers[start:]]
        saved = [layer.__dict__.get("forward") for layer in self._layers]
        names = {block.name for block in deleted}
        whole = [i for i in range(start, len(self._layers)) if i < len(cached_all)
                 and len(self._blocks_in.get(i, ())) >= 2 and self._blocks_in[i] <= names]
        passed = [self._layers[i] for i in whole if self._passes_on.get(i)]
        replaced = self._layers[:start]
        with restoring(lambda: _put_forwards_back(self._layers, saved)), replaying([*replaced, *passed]):
            for layer, output in zip(replaced, cached):
                layer.forward = lambda *_args, _output=output, **_kwargs: _output
            for i in whole:
                self._layers[i].forward = _passing_on(self._layers[i].forward, cached_all[i], self._passes_on, i)
            for layer, kept in zip(self._layers[start:], outputs_of):
                if keep:
                    layer.forward = _recording(layer.forward, kept)
            outputs = call_model(self._model, inputs)
        if not keep:
            return outputs, None
        if any(len(kept) != 1 for kept in outputs_of):
            raise InPlaceError("a layer ran other than once in one forward: its output cannot stand for it")
        # A hook writing into a layer's output in place moved its versions: replaying it would
        # apply that hook a second time to the value.
        return outputs, (inputs, [*cached, *(kept[0][0] for kept in outputs_of)],
                         [*versions, *(kept[0][1] for kept in outputs_of)], given)

    def first(self, blocks: Sequence[Block]) -> Block:
        """The block of `blocks` in the earliest layer: where the recomputation must start."""
        return min(blocks, key=lambda block: self._index[block.name])

    def suffix(self, block: Block, cache: tuple, deleted: Sequence[Block] = ()) -> object:
        """The output with the layers from `block`'s on run again (the hooks delete `deleted`)."""
        inputs, cached, versions, given = cache
        start = self._index[block.name]
        self._check(cache, start)
        return self._run(inputs, given, cached[:start], versions[:start], cached_all=cached, deleted=deleted,
                         keep=False)[0]

    def chained_suffix(self, block: Block, cache: tuple, deleted: Sequence[Block] = ()) -> tuple[object, tuple]:
        """`suffix`, and the cache of this network: `cache`'s outputs of the layers before
        `block`'s, then the outputs the layers from there on returned in this forward."""
        inputs, cached, versions, given = cache
        start = self._index[block.name]
        self._check(cache, start)
        return self._run(inputs, given, cached[:start], versions[:start], cached_all=cached, deleted=deleted)

    @staticmethod
    def _check(cache: tuple, start: int) -> None:
        inputs, cached, versions, given = cache
        if _versions(inputs) != given:
            raise InPlaceError("the model wrote into its inputs: they are no longer the batch")
        if any(_versions(output) != version for output, version in zip(cached[:start], versions[:start])):
            raise InPlaceError("a cached layer output was modified in place")


def _recording(forward: Callable, kept: list) -> Callable:
    """`forward`, keeping (its output, the output's tensor versions) in `kept`."""
    def record(*args: object, **kwargs: object) -> object:
        output = forward(*args, **kwargs)
        kept.append((output, _versions(output)))
        return output
    return record


def _passing_on(forward: Callable, template: object, verdicts: dict[int, bool], index: int) -> Callable:
    """A deleted layer's `forward`: its input, shaped as its output `template`, where `verdicts`
    says it passes its input on; else it runs, and its first run decides the verdict."""
    def run(*args: object, **kwargs: object) -> object:
        hidden = args[0] if args and isinstance(args[0], torch.Tensor) else kwargs.get("hidden_states")
        shaped = _shaped_like(template, hidden)
        if verdicts.get(index) and shaped is not None:
            return shaped
        output = forward(*args, **kwargs)
        if index not in verdicts:
            first = output if isinstance(output, torch.Tensor) else _shaped_first(output)
            verdicts[index] = (shaped is not None and isinstance(first, torch.Tensor) and first.shape == hidden.shape
                               and first.dtype == hidden.dtype and torch.equal(first, hidden))
        return output
    return run


def _shaped_first(output: object) -> torch.Tensor | None:
    return output[0] if isinstance(output, (tuple, list)) and output else None


def _shaped_like(template: object, hidden: object) -> object | None:
    """`hidden` in the structure of a layer's output (a tensor, or a tuple of it and Nones); None
    for any other structure (the layer then always runs)."""
    if not isinstance(hidden, torch.Tensor):
        return None
    if isinstance(template, torch.Tensor):
        return hidden
    if isinstance(template, tuple) and template and isinstance(template[0], torch.Tensor) \
            and all(item is None for item in template[1:]):
        return (hidden, *template[1:])
    return None


def _put_forwards_back(layers: Sequence[nn.Module], saved: Sequence[Callable | None]) -> None:
    """Each layer's `forward` as it was: its class's, or the one set on the instance before."""
    for layer, forward in zip(layers, saved):
        if forward is None:
            layer.__dict__.pop("forward", None)
        else:
            layer.forward = forward


def _versions(output: object) -> list[int]:
    return [leaf._version for leaf in pytree.tree_leaves(output) if isinstance(leaf, torch.Tensor)]


def layer_runner_for(model: nn.Module, blocks: Sequence[Block]) -> LayerRunner | None:
    """A LayerRunner when every block lies in a layer of one ModuleList or Sequential (a
    transformer's decoder layers), else None."""
    if not blocks:
        return None
    layer_names = {block.name: layer_of(model, block) for block in blocks}
    found = layer_stack(model, sorted(set(layer_names.values())))
    if found is None:
        return None
    parent, container = found
    layers = list(container)
    names = [f"{parent}.{i}" if parent else str(i) for i in range(len(layers))]
    position = {name: i for i, name in enumerate(names)}
    if any(name not in position for name in layer_names.values()):
        return None
    return LayerRunner(model, layers, {block: position[layer] for block, layer in layer_names.items()})
