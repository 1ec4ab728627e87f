"""Run only what follows an ablation site: the engine behind fast, exact sweeps.

Deleting block k changes nothing before block k. So per batch we run one baseline forward that
also returns every value that crosses a block boundary, and for each ablation we run only the
suffix of the network from the earliest ablated block on, fed from those cached values.

We trace the model with `torch.fx`, keeping each block module as one opaque call, and cut the
graph at every block call into compiled suffix GraphModules. GraphModules hold the user's own
submodules (not copies), so the ablation hooks on them fire in the suffixes too. A model that
cannot be traced this way gets `None`, and the caller loops over full forwards instead.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.fx as fx
from torch import nn

from probe.blocks import Block


class ModulesAsLeaves(fx.Tracer):
    """A tracer that keeps each named module as one opaque call node, whatever it contains."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.leaves or super().is_leaf_module(module, qualified_name)


class SuffixRunner:
    """`baseline(x) -> (output, cache)`; `suffix(module, cache) -> output` from that block on."""

    def __init__(self, model: nn.Module, graph: fx.Graph, block_modules: Sequence[str]) -> None:
        nodes = list(graph.nodes)
        order = {node: i for i, node in enumerate(nodes)}
        calls = {node.target: node for node in nodes if node.op == "call_module" and node.target in block_modules}
        # The values each suffix needs: defined before its block call, used at or after it.
        self._live: dict[str, list[fx.Node]] = {}
        for name, call in calls.items():
            start = order[call]
            self._live[name] = [n for n in nodes[:start] if n.op != "output"
                                and any(order[user] >= start for user in n.users)]
        cached = list(dict.fromkeys(n for live in self._live.values() for n in live))
        self._slot = {node: i for i, node in enumerate(cached)}
        self._baseline = fx.GraphModule(model, _with_cache_output(graph, cached))
        self._suffixes = {name: fx.GraphModule(model, _suffix_graph(nodes, order[call], self._live[name]))
                          for name, call in calls.items()}
        self._order = {name: order[call] for name, call in calls.items()}

    def baseline(self, inputs: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        """The model's output and the cached values; raises InPlaceError when a cached value
        was modified in place after it was made (the cache would not hold what suffixes need)."""
        output, *rest = self._baseline(inputs)
        cache, versions = tuple(rest[: len(rest) // 2]), rest[len(rest) // 2:]
        self.check(cache, versions)
        return output, cache

    def check(self, cache: tuple, versions: Sequence[int]) -> None:
        if any(_version_of(value) != version for value, version in zip(cache, versions)):
            raise InPlaceError("a value crossing a block boundary was modified in place")

    def first(self, modules: Sequence[str]) -> str:
        """The earliest of `modules` in forward order: where a suffix must start."""
        return min(modules, key=self._order.__getitem__)

    def suffix(self, module: str, cache: tuple) -> torch.Tensor:
        return self._suffixes[module](*(cache[self._slot[node]] for node in self._live[module]))


class InPlaceError(RuntimeError):
    """The model changes a cached value in place: only full forwards give exact results."""


def _version_of(value: object) -> int:
    return value._version if isinstance(value, torch.Tensor) else -1


def build_runner(model: nn.Module, blocks: Sequence[Block]) -> SuffixRunner | None:
    """A SuffixRunner for `model`, or None when its blocks cannot be cut out of a trace."""
    block_modules = {block.module for block in blocks}
    if "" in block_modules:
        return None  # the model itself performs the addition: there is nothing to cut
    try:
        graph = ModulesAsLeaves(block_modules).trace(model)
    except Exception:  # an untraceable model still sweeps, with full forwards
        return None
    calls = [n.target for n in graph.nodes if n.op == "call_module" and n.target in block_modules]
    if sorted(calls) != sorted(block_modules):
        return None  # a block module called twice, or not at all, has no single cut point
    outputs = [n for n in graph.nodes if n.op == "output"]
    if len(outputs) != 1 or not isinstance(outputs[0].args[0], fx.Node):
        return None  # we compare one logits tensor; tuples and dicts go the slow way
    return SuffixRunner(model, graph, sorted(block_modules))


def _with_cache_output(graph: fx.Graph, cached: list[fx.Node]) -> fx.Graph:
    """A copy of `graph` returning (output, *cached values, *their version counters when made)."""
    copy = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    versions: dict[fx.Node, fx.Node] = {}
    cached_set = set(cached)
    for node in graph.nodes:
        if node.op == "output":
            copy.output((env[node.args[0]], *(env[n] for n in cached), *(versions[n] for n in cached)))
            continue
        env[node] = copy.node_copy(node, env.__getitem__)
        if node in cached_set:
            versions[node] = copy.call_function(_version_of, (env[node],))
    return copy


def _suffix_graph(nodes: list[fx.Node], start: int, live: list[fx.Node]) -> fx.Graph:
    """The nodes from `start` on, with the live values before it as inputs."""
    graph = fx.Graph()
    env = {node: graph.placeholder(f"cached_{i}") for i, node in enumerate(live)}
    for node in nodes[start:]:
        env[node] = graph.node_copy(node, env.__getitem__)
    return graph
