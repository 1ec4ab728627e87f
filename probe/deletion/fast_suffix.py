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
each model and reuses them while nothing a trace depends on has changed (`model_state`): the
module tree and blocks, every module's parameters and buffers (the objects), its forward hooks,
its Python attributes (a temperature, a flag choosing a path: fx bakes the values it read into
the code) and the global module hooks. A value whose changes cannot be seen (an object without
a `__dict__`) makes the caller check the first batch of each call against a whole forward.

A traced copy of the forward does not run what fx traced through as it runs in the model: hooks
on the model itself, on the containers fx inlines, global hooks. A model carrying those gets no
runner (`suffix_runner` says why); hooks on the modules fx keeps as calls (leaf layers, blocks)
run as usual, and a hooked block's own code is not inlined (its hooks would be skipped).
"""

from __future__ import annotations

import enum
import functools
import types
import weakref
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.nn.modules import module as _module_globals

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


# model -> {(module tree, blocks, inlined or not): (model_state, SuffixRunner or None, reason)}
_runners: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# model -> its module tree when torch.fx could not trace it (no hook made it fail: a model
# carrying hooks that a trace would run is refused before it is traced)
_untraceable: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_RUNNERS_PER_MODEL = 4
# model -> why its last `build_runner` gave None
_why_not: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Choice(NamedTuple):
    """`suffix_runner`'s answer. runner: None when the model cannot be cut into suffixes, and
    then `reason` says why. verify: the runner was traced in an earlier call and the model holds
    a value whose changes cannot be seen: check the first batch against a whole forward."""

    runner: SuffixRunner | None
    reason: str | None
    verify: bool = False


def runner_for(model: nn.Module, blocks: Sequence[Block],
               replacement: Callable[[Block, torch.Tensor], torch.Tensor] | None = None) -> SuffixRunner | None:
    """`suffix_runner(...).runner`, for callers that do not check a first batch: a runner that
    would need that check is traced again instead."""
    choice = suffix_runner(model, blocks, replacement)
    if choice.verify:
        forget_runners(model)
        choice = suffix_runner(model, blocks, replacement)
    return choice.runner


def suffix_runner(model: nn.Module, blocks: Sequence[Block],
                  replacement: Callable[[Block, torch.Tensor], torch.Tensor] | None = None) -> Choice:
    """`build_runner`, reused while nothing it depends on has changed (see the module docstring),
    set to `replacement` (see `SuffixRunner.use`); or None and the reason."""
    refusal = _refusal(model)
    if refusal is not None:
        return Choice(None, refusal)
    tree = module_tree(model)
    if _untraceable.get(model) == tree:
        return Choice(None, _UNTRACEABLE)  # tried before: each try can cost seconds (a large LM)
    state, opaque = model_state(model)
    key = (tree, tuple(blocks), replacement is not None)
    cached = _runners.setdefault(model, {})
    entry = cached.get(key)
    reused = entry is not None and entry[0] == state
    if not reused:
        cached.pop(key, None)
        if len(cached) >= _RUNNERS_PER_MODEL:
            del cached[next(iter(cached))]  # the oldest
        runner = build_runner(model, blocks, replacement)
        reason = None if runner is not None else _why_not.pop(model, "it could not be cut at its blocks")
        if runner is None and reason == _UNTRACEABLE:
            _untraceable[model] = tree
        entry = cached[key] = (state, runner, reason)
    _, runner, reason = entry
    if runner is None:
        return Choice(None, reason)
    return Choice(runner.use(replacement), None, verify=reused and opaque)


def forget_runners(model: nn.Module) -> None:
    """Drop `model`'s cached runners: the next `suffix_runner` traces it again."""
    _runners.pop(model, None)


def build_runner(model: nn.Module, blocks: Sequence[Block],
                 replacement: Callable[[Block, torch.Tensor], torch.Tensor] | None = None) -> SuffixRunner | None:
    """A SuffixRunner for `model`, or None when its blocks cannot be cut out of a trace.

    With `replacement` ((block, shortcut) -> what the deleted branch adds instead), the suffix
    of a block whose branch ends in a module starts with that block's own code inlined and its
    addition fed `replacement(shortcut)`: the deleted branch is never computed.
    """
    runner, reason = (None, _refusal(model))
    if reason is None:
        runner, reason = _built(model, blocks, replacement)
    if runner is None:
        _why_not[model] = reason  # for `suffix_runner`
    return runner


def _built(model: nn.Module, blocks: Sequence[Block],
           replacement: Callable[[Block, torch.Tensor], torch.Tensor] | None) -> tuple[SuffixRunner | None, str | None]:
    # Traced in eval mode, the mode sweeps run in: fx bakes `self.training` into the graph as a
    # constant (`F.dropout(x, p, self.training)`, `if self.training:`).
    with fx_tracing(model, eval_mode=True):
        return _build_runner(model, blocks, replacement)


def _build_runner(model: nn.Module, blocks: Sequence[Block], replacement: Callable[[Block, torch.Tensor], torch.Tensor]
                  | None) -> tuple[SuffixRunner | None, str | None]:
    block_modules = {block.module for block in blocks}
    if "" in block_modules:
        return None, "the model itself performs a residual addition: there is no block call to cut at"
    tracer = ModulesAsLeaves(block_modules)
    hooked = _traced_through_hooked(model, tracer)
    if hooked is not None:
        return None, (f"the module {hooked!r} carries forward hooks, and a traced forward runs that module's code "
                      "inline, without them (or with them baked in)")
    try:
        graph = traced(tracer, model)
    except Exception:  # an untraceable model still sweeps (`probe.deletion.fast_replay`, or full forwards)
        return None, _UNTRACEABLE
    if sum(n.op == "output" for n in graph.nodes) != 1:
        return None, "its trace has more than one output"
    nodes = list(graph.nodes)
    starts = _call_starts(nodes, blocks)
    if starts is None:
        return None, "a block module runs other than once per forward: it has no single place to cut at"
    hosts = [block.module for block in blocks]
    surgery = {}
    current = _Replacement(replacement) if replacement is not None else None
    for block in blocks:
        if current is None or block.strategy != "hooks" or hosts.count(block.module) != 1:
            continue
        if not _inlinable(model.get_submodule(block.module)):
            continue  # its hooks (or a forward set on the instance) must run: the block is called as it is
        found = _deleted_branch_graph(model, block, lambda shortcut, block=block: current(block, shortcut))
        call = nodes[starts[block.name]]
        if found is not None and not call.kwargs and len(call.args) == sum(n.op == "placeholder" for n in found.nodes):
            surgery[block.name] = found
    return SuffixRunner(model, graph, starts, surgery, current, {block.name: block.module for block in blocks}), None


_UNTRACEABLE = "torch.fx cannot trace the model"


# -- what a traced forward depends on ------------------------------------------------------------------

# The global hook dicts (torch.nn.modules.module's) whose entries change what a module call
# computes (backward hooks do nothing in a no-grad forward).
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_forward_hooks_with_kwargs",
                 "_global_forward_hooks_always_called")
# nn.Module's own bookkeeping, in every module's __dict__: parameters, buffers, submodules and
# hooks are read apart; `training` is always False while a runner is built and used.
_MODULE_INTERNALS = frozenset(nn.Module().__dict__)


def _hooked(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


def _global_hooks() -> bool:
    return any(getattr(_module_globals, name, None) for name in _GLOBAL_HOOKS)


def _refusal(model: nn.Module) -> str | None:
    """Why no traced copy of `model`'s forward can stand for it, whatever its blocks; or None."""
    if _global_hooks():
        return ("global module hooks are registered (torch.nn.modules.module.register_module_forward_hook and "
                "the like): a traced forward would leave them out of the code it inlines, or bake them in")
    if _hooked(model):
        return "the model itself carries forward hooks, which a traced copy of its forward does not run"
    if "forward" in model.__dict__:
        return "the model's forward is set on the instance, and torch.fx traces its class's forward"
    return None


def _traced_through_hooked(root: nn.Module, tracer: fx.Tracer, prefix: str = "") -> str | None:
    """The qualified name of a hooked module under `root` that `tracer` traces through (not a
    leaf, nor inside one: its hooks would not run as the model runs them), or None."""
    for name, child in root.named_children():
        qualified = f"{prefix}{name}"
        if tracer.is_leaf_module(child, qualified):
            continue  # called as it is: its hooks, and those of everything in it, run
        if _hooked(child):
            return qualified
        inner = _traced_through_hooked(child, tracer, qualified + ".")
        if inner is not None:
            return inner
    return None


def _inlinable(block_module: nn.Module) -> bool:
    """Whether a block module's own forward, traced, runs as its call does: no hooks on it, no
    forward set on the instance, no hooked module inside that the trace would inline."""
    return (not _hooked(block_module) and "forward" not in block_module.__dict__
            and _traced_through_hooked(block_module, ModulesAsLeaves(set())) is None)


class _Same:
    """A value compared by identity (and kept alive, so its id is not reused meanwhile)."""

    __slots__ = ("value",)

    def __init__(self, value: object) -> None:
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value

    def __hash__(self) -> int:
        return id(self.value)


_PLAIN = frozenset({type(None), bool, int, str, bytes})
_ATOMS = (type(None), bool, int, str, bytes, torch.dtype, torch.device, torch.layout, torch.memory_format, type,
          enum.Enum, range)
_FUNCTIONS_IN_C = (types.BuiltinFunctionType, types.BuiltinMethodType, types.WrapperDescriptorType,
                   types.MethodWrapperType, types.MethodDescriptorType, np.ufunc)
_DEPTH, _LENGTH = 4, 4096  # deeper or longer values are compared by identity (and verified)
_GLOBALS_DEPTH = 2  # a class's method is printed at depth 1, a function it reads at 2


class _Printer:
    """Comparable prints of Python values: what a module's attribute holds now. `opaque` turns
    True for a value only its identity stands for (an object without `__dict__`, or one too deep)."""

    def __init__(self) -> None:
        self.opaque = False
        self._memo: dict[int, object] = {}

    def value(self, value: object, depth: int = 0) -> object:
        kind = type(value)
        if kind in _PLAIN:  # the usual attributes first: sizes, flags, names
            return kind, value
        if kind is float:
            return kind, value.hex()
        if kind is tuple and all(type(item) in _PLAIN for item in value):  # kernel sizes, strides
            return kind, value, tuple(map(type, value))
        if isinstance(value, float):
            return float, float(value).hex()  # NaN equals itself, -0.0 differs from 0.0
        if isinstance(value, _ATOMS):
            return type(value), value
        if isinstance(value, complex):
            return complex, repr(value)
        if isinstance(value, torch.Tensor):  # not a parameter or buffer: fx may have read its value
            return torch.Tensor, _Same(value), value._version
        if isinstance(value, np.ndarray) and value.size <= _LENGTH and value.dtype != object:
            return np.ndarray, value.dtype.str, value.shape, value.tobytes()
        if isinstance(value, np.generic):
            return type(value), repr(value)
        if depth >= _DEPTH or isinstance(value, (nn.Module, types.ModuleType)):
            return self._identity(value, opaque=not isinstance(value, (nn.Module, types.ModuleType)))
        key = id(value)
        if key in self._memo:  # shared (one config in every layer) or cyclic
            return self._memo[key]
        self._memo[key] = ("cycle", _Same(value))
        self._memo[key] = printed = self._composite(value, depth + 1)
        return printed

    def _composite(self, value: object, depth: int) -> object:
        if isinstance(value, (tuple, list)) and len(value) <= _LENGTH:
            return type(value), tuple(self.value(item, depth) for item in value)
        if isinstance(value, dict) and len(value) <= _LENGTH:
            return type(value), tuple((self.value(k, depth), self.value(v, depth)) for k, v in value.items())
        if isinstance(value, (set, frozenset)) and len(value) <= _LENGTH:
            return type(value), frozenset(self.value(item, depth) for item in value)
        if isinstance(value, types.FunctionType):
            cells = tuple(self.value(cell.cell_contents, depth) if _filled(cell) else None
                          for cell in value.__closure__ or ())
            # The module globals its code reads (`SCALE` in `return x * SCALE`): in a forward,
            # and in the functions that reads, not deeper (library code's globals are its own).
            found = value.__globals__
            read = tuple((name, self.value(found[name], depth)) for name in _global_names(value.__code__)
                         if name in found) if depth <= _GLOBALS_DEPTH else ()
            return (types.FunctionType, value.__code__, self.value(value.__defaults__, depth),
                    self.value(value.__kwdefaults__, depth), cells, read)
        if isinstance(value, types.MethodType):
            return types.MethodType, self.value(value.__func__, depth), _Same(value.__self__)
        if isinstance(value, functools.partial):
            return (functools.partial, self.value(value.func, depth), self.value(value.args, depth),
                    self.value(value.keywords, depth))
        if isinstance(value, _FUNCTIONS_IN_C + (types.ModuleType,)):
            return self._identity(value, opaque=False)  # torch.relu, math.sqrt, torch itself: not state
        attributes = getattr(value, "__dict__", None)
        if isinstance(attributes, dict):
            return type(value), tuple((k, self.value(v, depth)) for k, v in attributes.items())
        return self._identity(value, opaque=True)

    def _identity(self, value: object, *, opaque: bool) -> object:
        self.opaque = self.opaque or opaque
        return "same", _Same(value)


@functools.lru_cache(maxsize=4096)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """The names `code` (and the code nested in it: comprehensions, lambdas) may load as globals."""
    names = list(code.co_names)
    for constant in code.co_consts:
        if isinstance(constant, types.CodeType):
            names.extend(_global_names(constant))
    return tuple(dict.fromkeys(names))


def _class_state(klass: type, printer: _Printer) -> object:
    """What a module's class holds that its traced code may read: every method (its code, and
    the globals it reads) and class attribute, along the class's bases up to nn.Module. torch's
    own classes (nn.Linear, nn.Sequential, ...): their forward, as an object."""
    if klass.__module__.startswith("torch."):
        return klass.forward
    parts = []
    for base in klass.__mro__:
        if base is nn.Module:
            break
        if base.__module__.startswith("torch.") or base is object:
            continue
        for name, attribute in vars(base).items():
            if name.startswith("__") and name.endswith("__"):
                continue
            if isinstance(attribute, (staticmethod, classmethod)):
                attribute = attribute.__func__
            elif isinstance(attribute, property):
                attribute = attribute.fget
            parts.append((base, name, printer.value(attribute)))
    return tuple(parts)


def _filled(cell: types.CellType) -> bool:
    try:
        cell.cell_contents
    except ValueError:  # an empty cell: a name the function refers to before it is bound
        return False
    return True


def model_state(model: nn.Module) -> tuple[tuple, bool]:
    """(state, opaque): everything besides the module tree that a trace of `model` depends on,
    comparable with ==, and whether part of it is only the identity of an object whose changes
    cannot be seen. Per module: its parameters and buffers (the objects: their values are read
    when the code runs), its forward hooks, and its Python attributes; per class of module: its
    methods, the module globals they read, its class attributes (`_class_state`); then the
    global module hooks. Not seen: what library code reads (torch's own flags), and globals
    read only by functions two calls below a forward."""
    printer = _Printer()
    value = printer.value
    modules, classes = [], {}
    for module in model.modules():
        klass = type(module)
        if klass not in classes:
            classes[klass] = _class_state(klass, printer)
        parameters, buffers = module._parameters, module._buffers
        modules.append((
            klass, tuple(parameters), tuple(map(id, parameters.values())), tuple(buffers),
            tuple(map(id, buffers.values())),
            # every forward hook and pre-hook is in one of these two (the others flag some of them)
            tuple(module._forward_pre_hooks), tuple(module._forward_hooks),
            tuple([(name, value(attribute)) for name, attribute in module.__dict__.items()
                   if name not in _MODULE_INTERNALS])))
    hooks = tuple(tuple(getattr(_module_globals, name, {})) for name in _GLOBAL_HOOKS)
    return (tuple(modules), tuple(classes.items()), hooks), printer.opaque


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
