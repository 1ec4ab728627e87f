"""Run only what follows an ablation site: the engine behind fast, exact sweeps.

Deleting block k changes nothing before block k. So per batch we run one baseline forward that
also returns every value that crosses a block boundary, and for each ablation we run only the
suffix of the network from the earliest ablated block on, fed from those cached values.

We trace the model with `torch.fx`, keeping each block module as one opaque call, and cut the
graph at every block call into compiled suffix GraphModules. GraphModules hold the user's own
submodules (not copies), so the ablation hooks on them fire in the suffixes too. A model that
cannot be traced this way gets `None`, and the caller loops over full forwards instead.

Tracing and compiling the suffixes costs about as much as a few dozen forwards of a small
model, more than a whole sweep of a small data set on a GPU; `runner_for` keeps the runners of
each model and reuses them while its module tree and blocks are the same.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence

import torch
import torch.fx as fx
from torch import nn

from probe.discovery.additions import is_addition
from probe.batches import call_model
from probe.discovery.find import Block, module_tree
from probe.discovery.tracing import fx_tracing, traced


class ModulesAsLeaves(fx.Tracer):
    """A tracer that keeps each named module as one opaque call node, whatever it contains."""

    def __init__(self, leaves: set[str]) -> None:
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, module: nn.Module, qualified_name: str) -> bool:
        return qualified_name in self.leaves or super().is_leaf_module(module, qualified_name)


class SuffixRunner:
    """`baseline(x) -> (output, cache)`; `suffix(block, cache, deleted) -> output` from that block on.

    Cut points are keyed by block name. Where `surgery` holds a block's own forward with the
    branch replaced, its suffix starts with that code instead of the block call: the branch is
    dead code, eliminated, so deleting a block costs less than running it. Later calls of such
    a block go through a switch that runs the same branchless code while the block is among
    the `deleted` of the current `suffix` call, and the block itself otherwise: a set of many
    deleted blocks (a deletion curve) costs only the blocks that still run.
    """

    def __init__(self, model: nn.Module, graph: fx.Graph, starts: dict[str, int],
                 surgery: dict[str, fx.Graph], replacement: _Replacement | None = None,
                 hosts: dict[str, str] | None = None) -> None:
        self._replacement = replacement
        self._deleted = _Deleted()
        nodes = list(graph.nodes)
        order = {node: i for i, node in enumerate(nodes)}
        # The values each suffix needs: defined before its start, used at or after it.
        self._live = {name: [n for n in nodes[:start] if any(order[user] >= start for user in n.users)]
                      for name, start in starts.items()}
        cached = list(dict.fromkeys(n for live in self._live.values() for n in live))
        self._slot = {node: i for i, node in enumerate(cached)}
        self._baseline = fx.GraphModule(model, _with_cache_output(graph, cached))
        # block module -> a function that runs it, or its branchless code while it is deleted
        switches = {module: _switch(model, module, name, _compiled(model, _standalone(surgery[name])), self._deleted)
                    for name, module in (hosts or {}).items() if name in surgery}
        self._suffixes = {name: _compiled(model, _suffix_graph(nodes, start, self._live[name], surgery.get(name),
                                                               switches))
                          for name, start in starts.items()}
        self._order = starts
        # Suffixes that also return the cached values they remake, built when first asked for.
        self._chained: dict[str, tuple[fx.GraphModule, list[int]]] = {}
        self._plain: dict[str, fx.GraphModule] = {}  # suffixes without inlined deletions, for stacking
        self._parts = (model, nodes, cached, order, surgery, switches)  # what those two are built from

    def baseline(self, inputs: object) -> tuple[object, tuple]:
        """The model's output and the cached values; raises InPlaceError when a cached value
        was modified in place after it was made (the cache would not hold what suffixes need).
        inputs: a tensor, a tuple (positional arguments) or a dict (keywords), as `Batch.inputs`."""
        output, *rest = call_model(self._baseline, inputs)
        cache, versions = tuple(rest[: len(rest) // 2]), rest[len(rest) // 2:]
        self.check(cache, versions)
        return output, cache

    def check(self, cache: tuple, versions: Sequence[int]) -> None:
        if any(_version_of(value) != version for value, version in zip(cache, versions)):
            raise InPlaceError("a value crossing a block boundary was modified in place")

    def use(self, replacement: Callable[[Block, torch.Tensor], torch.Tensor] | None) -> SuffixRunner:
        """Make the inlined blocks add `replacement(block, shortcut)` from now on."""
        if self._replacement is not None:
            self._replacement.current = replacement
        return self

    def first(self, blocks: Sequence[Block]) -> Block:
        """The earliest of `blocks` in forward order: where a suffix must start."""
        return min(blocks, key=lambda block: self._order[block.name])

    def suffix(self, block: Block, cache: tuple, deleted: Sequence[Block] = ()) -> torch.Tensor:
        """The output with the network run from `block` on; `deleted`: every block of the
        current set (the hooks delete those without a switch; those with one skip their branch)."""
        self._deleted.names = frozenset(b.name for b in deleted if b.name != block.name)
        try:
            return self._suffixes[block.name](*(cache[self._slot[node]] for node in self._live[block.name]))
        finally:
            self._deleted.names = frozenset()

    def chained_suffix(self, block: Block, cache: tuple, deleted: Sequence[Block] = ()) -> tuple[object, tuple]:
        """`suffix`, and the cache of this network: `cache` with the values from `block` on
        remade. A set that adds blocks after `block` to `deleted` can start from it there, as
        deleting a block changes nothing before it (a deletion curve's next point)."""
        graph, slots = self._chained_graph(block.name)
        self._deleted.names = frozenset(b.name for b in deleted if b.name != block.name)
        try:
            output, *remade = graph(*(cache[self._slot[node]] for node in self._live[block.name]))
        finally:
            self._deleted.names = frozenset()
        new = list(cache)
        for slot, value in zip(slots, remade):
            new[slot] = value
        return output, tuple(new)

    def stacked_suffix(self, block: Block, cache: tuple, copies: int, batch_size: int) -> object:
        """The network from `block` on, every block called as it is (deletions are the hooks'
        business), on `copies` copies of the batch stacked along the first dimension: several
        ablations in one forward (`probe.deletion.evaluation`, `stack=`). Cached tensors whose first
        dimension is `batch_size` are stacked; others (constants) are passed as they are."""
        if block.name not in self._plain:
            model, nodes, *_ = self._parts
            self._plain[block.name] = _compiled(model, _suffix_graph(nodes, self._order[block.name],
                                                                     self._live[block.name], None))
        inputs = (cache[self._slot[node]] for node in self._live[block.name])
        return self._plain[block.name](*(_stacked(value, copies, batch_size) for value in inputs))

    def _chained_graph(self, name: str) -> tuple[fx.GraphModule, list[int]]:
        if name not in self._chained:
            model, nodes, cached, order, surgery, switches = self._parts
            start = self._order[name]
            kept = [node for node in cached if order[node] >= start]
            graph = _suffix_graph(nodes, start, self._live[name], surgery.get(name), switches, kept)
            self._chained[name] = (_compiled(model, graph), [self._slot[node] for node in kept])
        return self._chained[name]


def _stacked(value: object, copies: int, batch_size: int) -> object:
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size:
        return value.repeat(copies, *[1] * (value.dim() - 1))
    return value


class InPlaceError(RuntimeError):
    """The model changes a cached value in place: only full forwards give exact results."""


def _version_of(value: object) -> int:
    return value._version if isinstance(value, torch.Tensor) else -1


class _Deleted:
    """The blocks deleted in the suffix call under way, read by the switches."""

    def __init__(self) -> None:
        self.names: frozenset[str] = frozenset()


def _switch(model: nn.Module, module: str, name: str, deleted_code: fx.GraphModule,
            deleted: _Deleted) -> Callable:
    block_module = model.get_submodule(module)

    def run(*args: object) -> object:
        return deleted_code(*args) if name in deleted.names else block_module(*args)

    run.__name__ = "block_or_shortcut_" + "".join(c if c.isalnum() else "_" for c in name)
    return run


def _standalone(inner: fx.Graph) -> fx.Graph:
    """A copy of a block's branchless code (`_deleted_branch_graph`, targets relative to the
    model) to compile on its own: the graph itself is also spliced into suffixes."""
    copy = fx.Graph()
    copy.output(copy.graph_copy(inner, {}))
    return copy


class _Replacement:
    """What inlined blocks add instead of their branch; swapped per sweep (`SuffixRunner.use`),
    so that a runner serves zero and mean ablations alike."""

    def __init__(self, current: Callable[[Block, torch.Tensor], torch.Tensor]) -> None:
        self.current = current

    def __call__(self, block: Block, shortcut: torch.Tensor) -> torch.Tensor:
        return self.current(block, shortcut)


# model -> {(module tree, blocks, inlined or not): runner or None}, a few per model.
_runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> its module tree when torch.fx could not trace it
_untraceable: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RUNNERS_PER_MODEL = 4


def runner_for(model: nn.Module, blocks: Sequence[Block],
               replacement: Callable[[Block, torch.Tensor], torch.Tensor] | None = None) -> SuffixRunner | None:
    """`build_runner`, reused while `model`'s module tree (the same module objects) and `blocks`
    are unchanged; set to `replacement` (see `SuffixRunner.use`)."""
    tree = module_tree(model)
    if _untraceable.get(model) == tree:
        return None  # tracing failed for this model before: each try can cost seconds (a large LM)
    key = (tree, tuple(blocks), replacement is not None)
    cached = _runners.setdefault(model, {})
    if key not in cached:
        if len(cached) >= _RUNNERS_PER_MODEL:
            del cached[next(iter(cached))]  # the oldest
        cached[key] = build_runner(model, blocks, replacement)
    runner = cached[key]
    return runner.use(replacement) if runner is not None else None


def build_runner(model: nn.Module, blocks: Sequence[Block],
                 replacement: Callable[[Block, torch.Tensor], torch.Tensor] | None = None) -> SuffixRunner | None:
    """A SuffixRunner for `model`, or None when its blocks cannot be cut out of a trace.

    With `replacement` ((block, shortcut) -> what the deleted branch adds instead), the suffix
    of a block whose branch ends in a module starts with that block's own code inlined and its
    addition fed `replacement(shortcut)`: the deleted branch is never computed.
    """
    # Traced in eval mode, the mode sweeps run in: fx bakes `self.training` into the graph as a
    # constant (`F.dropout(x, p, self.training)`, `if self.training:`).
    with fx_tracing(model, eval_mode=True):
        return _build_runner(model, blocks, replacement)


def _build_runner(model: nn.Module, blocks: Sequence[Block],
                  replacement: Callable[[Block, torch.Tensor], torch.Tensor] | None) -> SuffixRunner | None:
    block_modules = {block.module for block in blocks}
    if "" in block_modules:
        return None  # the model itself performs the addition: there is nothing to cut
    try:
        graph = traced(ModulesAsLeaves(block_modules), model)
    except Exception:  # an untraceable model still sweeps (`probe.deletion.fast_replay`, or full forwards)
        _untraceable[model] = module_tree(model)
        return None
    if sum(n.op == "output" for n in graph.nodes) != 1:
        return None
    nodes = list(graph.nodes)
    starts = _call_starts(nodes, blocks)
    if starts is None:
        return None
    hosts = [block.module for block in blocks]
    surgery = {}
    current = _Replacement(replacement) if replacement is not None else None
    for block in blocks:
        if current is None or block.strategy != "hooks" or hosts.count(block.module) != 1:
            continue
        found = _deleted_branch_graph(model, block, lambda shortcut, block=block: current(block, shortcut))
        call = nodes[starts[block.name]]
        if found is not None and not call.kwargs and len(call.args) == sum(n.op == "placeholder" for n in found.nodes):
            surgery[block.name] = found
    return SuffixRunner(model, graph, starts, surgery, current, {block.name: block.module for block in blocks})


def _call_starts(nodes: list[fx.Node], blocks: Sequence[Block]) -> dict[str, int] | None:
    """Block -> index of its module's call node (blocks traced as opaque calls)."""
    calls: dict[str, list[int]] = {}
    for i, node in enumerate(nodes):
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(i)
    if any(len(calls.get(block.module, [])) != 1 for block in blocks):
        return None  # a block module called twice, or not at all, has no single cut point
    return {block.name: calls[block.module][0] for block in blocks}


def _deleted_branch_graph(model: nn.Module, block: Block, replace: Callable) -> fx.Graph | None:
    """The block module's own forward, traced, with `replace(shortcut)` added instead of F(x).

    Module names in it are made absolute so the graph can be spliced into the model's.
    """
    try:
        inner = traced(ModulesAsLeaves(set()), model.get_submodule(block.module))
    except Exception:
        return None
    nodes = list(inner.nodes)
    branch_name = block.branch[len(block.module) + 1:]
    scope = {n for n in nodes if branch_name in (n.meta.get("nn_module_stack") or {})}
    leaving = [n for n in nodes if n in scope and any(u not in scope for u in n.users)]
    if len(leaving) != 1 or len(leaving[0].users) != 1:
        return None
    branch = leaving[0]
    addition = next(iter(branch.users))
    if not is_addition(addition) or branch not in addition.args[:2] or addition.args[0] is addition.args[1]:
        return None
    shortcut = addition.args[1] if addition.args[0] is branch else addition.args[0]
    with inner.inserting_before(addition):
        replaced = inner.call_function(replace, (shortcut,))
    addition.args = tuple(replaced if arg is branch else arg for arg in addition.args)
    for node in nodes:
        if node.op in ("call_module", "get_attr"):
            node.target = f"{block.module}.{node.target}"
    return inner


def _with_cache_output(graph: fx.Graph, cached: list[fx.Node]) -> fx.Graph:
    """A copy of `graph` returning (output, *cached values, *their version counters when made)."""
    copy = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    versions: dict[fx.Node, fx.Node] = {}
    cached_set = set(cached)
    for node in graph.nodes:
        if node.op == "output":
            # The model's own output may be a tensor, a tuple, a list or a dict of them.
            output = fx.node.map_arg(node.args[0], env.__getitem__)
            copy.output((output, *(env[n] for n in cached), *(versions[n] for n in cached)))
            continue
        env[node] = copy.node_copy(node, env.__getitem__)
        if node in cached_set:
            versions[node] = copy.call_function(_version_of, (env[node],))
    return copy


def _suffix_graph(nodes: list[fx.Node], start: int, live: list[fx.Node], inner: fx.Graph | None,
                  switches: dict[str, Callable] | None = None, kept: list[fx.Node] | None = None) -> fx.Graph:
    """The nodes from `start` on, with the live values before it as inputs; with `inner`, the
    block call at `start` is replaced by that graph of the block's own forward; later calls of
    a module in `switches` call its switch instead (same arguments). With `kept`, it returns
    (output, *their values) instead of the output."""
    switches = switches or {}
    graph = fx.Graph()
    env = {node: graph.placeholder(f"cached_{i}") for i, node in enumerate(live)}
    for node in nodes[start:]:
        if inner is not None and node is nodes[start]:
            inputs = iter(node.args)
            local: dict[fx.Node, fx.Node] = {}
            for inner_node in inner.nodes:
                if inner_node.op == "placeholder":
                    local[inner_node] = env[next(inputs)]
                elif inner_node.op == "output":
                    env[node] = local[inner_node.args[0]]
                else:
                    local[inner_node] = graph.node_copy(inner_node, local.__getitem__)
        elif node.op == "call_module" and node.target in switches and not node.kwargs:
            env[node] = graph.call_function(switches[node.target], fx.node.map_arg(node.args, env.__getitem__))
        elif node.op == "output" and kept is not None:
            graph.output((fx.node.map_arg(node.args[0], env.__getitem__), *(env[n] for n in kept)))
        else:
            env[node] = graph.node_copy(node, env.__getitem__)
    return graph


def _compiled(model: nn.Module, graph: fx.Graph) -> fx.GraphModule:
    """Python code for `graph` over `model`'s own modules, without the nodes nothing uses."""
    module = fx.GraphModule(model, graph)
    if module.graph.eliminate_dead_code():  # needs the owning module to know which calls are pure
        module.recompile()
    return module
