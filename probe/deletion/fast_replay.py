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

    def baseline(self, inputs: object) -> tuple[object, tuple]:
        # (output, its versions when made) of each layer's forward, before its forward hooks
        outputs_of: list[list[tuple[object, list[int]]]] = [[] for _ in self._layers]
        saved = [layer.__dict__.get("forward") for layer in self._layers]
        given = _versions(inputs)

        def recording(forward: Callable, kept: list) -> Callable:
            def record(*args: object, **kwargs: object) -> object:
                output = forward(*args, **kwargs)
                kept.append((output, _versions(output)))
                return output
            return record

        with restoring(lambda: _put_forwards_back(self._layers, saved)):
            for layer, kept in zip(self._layers, outputs_of):
                layer.forward = recording(layer.forward, kept)
            outputs = call_model(self._model, inputs)
        if any(len(kept) != 1 for kept in outputs_of):
            raise InPlaceError("a layer ran other than once in one forward: its output cannot stand for it")
        cached = [kept[0][0] for kept in outputs_of]
        # A hook writing into a layer's output in place moved its versions: replaying it would
        # apply that hook a second time to the value.
        return outputs, (inputs, cached, [kept[0][1] for kept in outputs_of], given)

    def first(self, blocks: Sequence[Block]) -> Block:
        """The block of `blocks` in the earliest layer: where the recomputation must start."""
        return min(blocks, key=lambda block: self._index[block.name])

    def suffix(self, block: Block, cache: tuple, deleted: Sequence[Block] = ()) -> object:
        """The output with the layers from `block`'s on run again (the hooks delete `deleted`)."""
        inputs, cached, versions, given = cache
        start = self._index[block.name]
        if _versions(inputs) != given:
            raise InPlaceError("the model wrote into its inputs: they are no longer the batch")
        if any(_versions(output) != version for output, version in zip(cached[:start], versions[:start])):
            raise InPlaceError("a cached layer output was modified in place")
        replaced = self._layers[:start]
        saved = [layer.__dict__.get("forward") for layer in replaced]
        with restoring(lambda: _put_forwards_back(replaced, saved)), replaying(replaced):
            for layer, output in zip(replaced, cached):
                layer.forward = lambda *_args, _output=output, **_kwargs: _output
            return call_model(self._model, inputs)


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
