"""The dataflow graph of a model's forward, by tracing it or by recording one real forward.

Block discovery (`probe.discovery.find`) reads residual additions off a `torch.fx.Graph` whose nodes
carry fx's `nn_module_stack` metadata (which module calls each operation ran inside). There are
two ways to get one:

- `trace(model)`: symbolic tracing with torch.fx; needs no input, fails on models whose Python
  control flow depends on tensor values (or that call untraceable code);
- `record(model, example_input)`: run one forward and record every torch function it calls, with
  a `TorchFunctionMode` and module hooks, into a graph of the same shape. Works on any model
  that runs, but sees only the path that this input takes.

Both also say, for every module call, which tensors it was given: a block's shortcut is "the
block's input" only when it is the value the block was called with.

While it traces, torch.fx patches `nn.Module.__call__` (and more) for the whole process, and
undoes that in a `finally` that a Ctrl-C can cut short: every probe trace runs inside
`fx_tracing`, one at a time in the process (a lock), and checks afterwards that the patches are
gone. Module calls of other threads that reach the patches meanwhile run untraced.
"""

from __future__ import annotations

import contextlib
import operator
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import chain

import torch
import torch.fx as fx
from torch import nn
from torch.fx import _symbolic_trace
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from probe.batches import call_model
from probe.instrument.hooks import attached, model_preserved, restoring


@dataclass
class Recording:
    """A forward's dataflow graph and the module calls it went through.

    graph:       nodes in execution order; `node.meta["nn_module_stack"]` maps each enclosing
                 module call's key to (qualified name, type), outermost first, as torch.fx writes
                 it. A key is the module's qualified name, with `@k` for its (k+1)-th call.
    call_inputs: module call key -> the nodes of the tensors passed to that call, in argument
                 order ("" is the model itself: its inputs).
    calls:       module qualified name -> how many times one forward calls it.
    source:      how the graph was made, for messages ("its torch.fx trace", "one forward pass").
    learned:     the names of the model's parameters, and of the modules that hold some (fx
                 traces call leaf modules as one node): what tells a learned function apart.
    not_tensor:  module call keys whose output is not one tensor (Hugging Face's GPT-2 attention
                 returns (output, weights)): a forward hook on them sees no tensor to measure or
                 replace. Recorded forwards only; empty for an fx trace.
    """

    graph: fx.Graph
    call_inputs: dict[str, list[fx.Node]] = field(default_factory=dict)
    calls: dict[str, int] = field(default_factory=dict)
    source: str = "its torch.fx trace"
    learned: set[str] = field(default_factory=set)
    not_tensor: set[str] = field(default_factory=set)


class _Tracer(fx.Tracer):
    """fx's tracer, also noting the tensor arguments of every module call."""

    def __init__(self) -> None:
        super().__init__()
        self.call_inputs: dict[str, list[fx.Node]] = {}

    def call_module(self, m, forward, args, kwargs):
        name = self.path_of_module(m)
        count = self.num_calls.get(name, 0)
        key = f"{name}@{count}" if count else name  # the key fx gives this call in nn_module_stack
        self.call_inputs[key] = [leaf.node for leaf in pytree.tree_leaves((args, kwargs)) if isinstance(leaf, fx.Proxy)]
        return super().call_module(m, forward, args, kwargs)


# A trace patches nn.Module for every thread: probe's traces take turns (re-entrant: a trace
# may build another, as the fast sweep's do).
_ONE_TRACE = threading.RLock()
# The nn.Module attributes fx replaces while it traces.
_PATCHED_MODULE_ATTRIBUTES = ("__call__", "__getattr__")


class _FxState:
    """What a torch.fx trace changes for the process, as it was before the trace (fx's private
    state, read and put back the way fx itself does)."""

    def __init__(self) -> None:
        self.patcher = getattr(_symbolic_trace, "CURRENT_PATCHER", None)
        self.tracing = _fx_tracing_flag()
        self.module_attributes = {name: nn.Module.__dict__[name] for name in _PATCHED_MODULE_ATTRIBUTES}

    def restore(self) -> None:
        leftover = getattr(_symbolic_trace, "CURRENT_PATCHER", None)
        if leftover is not self.patcher:  # fx was interrupted while undoing its patches: finish that
            for patch in leftover.patches_made:
                with contextlib.suppress(KeyError):  # a name fx added, deleted already
                    patch.revert()
            _symbolic_trace.CURRENT_PATCHER = self.patcher
        for name, value in self.module_attributes.items():
            if nn.Module.__dict__[name] is not value:
                setattr(nn.Module, name, value)
        _set_fx_tracing_flag(self.tracing)


# fx's "tracing now" flag: a module global in older torch, a thread-local behind these functions
# in newer torch (whose `is_fx_tracing` also logs a warning).
def _fx_tracing_flag() -> bool:
    getter = getattr(_symbolic_trace, "_get_is_fx_tracing", None)
    return getter() if getter is not None else _symbolic_trace._is_fx_tracing_flag


def _set_fx_tracing_flag(value: bool) -> None:
    setter = getattr(_symbolic_trace, "_set_is_fx_tracing", None)
    if setter is not None:
        setter(value)
    else:
        _symbolic_trace._is_fx_tracing_flag = value


@contextlib.contextmanager
def fx_tracing(model: nn.Module, *, eval_mode: bool = False) -> Iterator[None]:
    """Hold `model` for torch.fx traces of it (see `model_preserved`; in eval mode if asked), and
    leave nn.Module and fx unpatched afterwards, also when a Ctrl-C cut fx's own undoing short."""
    with _ONE_TRACE, model_preserved(model, eval_mode=eval_mode), restoring(_FxState().restore):
        yield


def traced(tracer: fx.Tracer, root: nn.Module) -> fx.Graph:
    """`tracer.trace(root)`, inside `fx_tracing`. fx's cleanup can fail on state a Ctrl-C left
    half set, turning the Ctrl-C into an AssertionError that callers would take for an
    untraceable model: that Ctrl-C is raised instead."""
    _this_thread_only(tracer)
    try:
        return tracer.trace(root)
    except Exception as error:
        cause = error.__context__
        while cause is not None and not isinstance(cause, KeyboardInterrupt):
            cause = cause.__context__
        raise cause or error


def _this_thread_only(tracer: fx.Tracer) -> None:
    """Let fx's process-wide patches trace this thread's calls only: while it traces, another
    thread's forward (probe's own, on another model) also goes through the patched
    `nn.Module.__call__` and `__getattr__`, and would reach this tracer (fx raises "module is not
    installed as a submodule"); such calls run the original code instead."""
    owner = threading.get_ident()
    call_module, module_getattr = tracer.call_module, tracer.getattr

    def call_module_here(module, forward, args, kwargs):
        if threading.get_ident() != owner:
            return forward(*args, **kwargs)
        return call_module(module, forward, args, kwargs)

    def getattr_here(attr, attr_val, parameter_proxy_cache):
        if threading.get_ident() != owner:
            return attr_val
        return module_getattr(attr, attr_val, parameter_proxy_cache)

    tracer.call_module, tracer.getattr = call_module_here, getattr_here


def trace(model: nn.Module) -> Recording:
    """The model's symbolic trace; raises whatever torch.fx raises on untraceable code."""
    tracer = _Tracer()
    with fx_tracing(model):
        graph = traced(tracer, model)
    tracer.call_inputs[""] = [node for node in graph.nodes if node.op == "placeholder"]
    return Recording(graph, tracer.call_inputs, dict(tracer.num_calls), "its torch.fx trace", _learned(model))


def record(model: nn.Module, example_input: object) -> Recording:
    """The graph of one forward of `model` on `example_input` (a tensor, a tuple of arguments, or
    a dict of keyword arguments).

    Runs in eval mode without gradients and leaves the model as it found it. Every tensor the
    forward makes is kept until it ends, so a small input (one sample) is best.
    """
    recorder = _Recorder(model)
    arguments = example_input if isinstance(example_input, (tuple, list, dict)) else (example_input,)
    for i, value in enumerate(pytree.tree_leaves(arguments)):
        if isinstance(value, torch.Tensor):
            recorder.bind(value, recorder.graph.placeholder(f"input_{i}"))
    recorder.call_inputs[""] = [node for node in recorder.graph.nodes if node.op == "placeholder"]
    with model_preserved(model), attached() as handles, torch.no_grad():
        for module in model.modules():
            if module is model:
                continue  # fx puts no entry for the model itself in nn_module_stack: neither do we
            handles.append(module.register_forward_pre_hook(recorder.enter_call, with_kwargs=True))
            handles.append(module.register_forward_hook(recorder.leave_call, always_call=True))
        with recorder:
            call_model(model, example_input)
    return Recording(recorder.graph, recorder.call_inputs, recorder.calls, "one forward pass", _learned(model),
                     recorder.not_tensor)


def _learned(model: nn.Module) -> set[str]:
    """Parameter names, and names of the modules that hold parameters of their own."""
    names = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    return names | {name for name, module in model.named_modules()
                    if any(True for _ in module.parameters(recurse=False))}


# Conversions that return their input itself when there is nothing to convert (accelerate's hooks
# call .to(device) on every input): no new value, so no node.
_NO_OP_WHEN_SELF = frozenset({"to", "contiguous", "float", "double", "half", "bfloat16", "cpu", "cuda", "type_as"})


class _Recorder(TorchFunctionMode):
    """Appends one graph node per torch function call that returns tensors."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.graph = fx.Graph()
        self.call_inputs: dict[str, list[fx.Node]] = {}
        self.calls: dict[str, int] = {}
        self.not_tensor: set[str] = set()
        self._module_names = {module: name for name, module in model.named_modules()}
        self._modules = {name: module for module, name in self._module_names.items()}
        named_tensors = chain(model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False))
        self._tensor_names = {id(tensor): name for name, tensor in named_tensors}
        # Weights that accelerate offloaded (to the CPU or disk) wait on the meta device, and a
        # hook puts them in place for their module's forward: looked up there (`_loaded_name`).
        self._offloaded = any(tensor.is_meta for name, tensor in chain(
            model.named_parameters(remove_duplicate=False), model.named_buffers(remove_duplicate=False)))
        self._stack: dict[str, tuple[str, type]] = {}  # running module calls, outermost first
        self._keys: list[str] = []
        # id(tensor) -> the node that last wrote it (an in-place op rebinds it). Holding every
        # tensor keeps ids unique for the whole forward.
        self._nodes: dict[int, fx.Node] = {}
        self._held: list[torch.Tensor] = []

    def bind(self, tensor: torch.Tensor, node: fx.Node) -> None:
        self._nodes[id(tensor)] = node
        self._held.append(tensor)

    def _node_of(self, tensor: torch.Tensor) -> fx.Node:
        loaded = self._loaded_name(tensor) if self._offloaded else None
        if loaded is not None:  # made by the hook's copies, but what the model reads is the weight
            node = self.graph.get_attr(loaded)
            self.bind(tensor, node)
            return node
        node = self._nodes.get(id(tensor))
        if node is None:  # a parameter, a buffer, or a constant made outside any torch function
            name = self._tensor_names.get(id(tensor), f"constant_{len(self._held)}")
            node = self.graph.get_attr(name)
            self.bind(tensor, node)
        return node

    def _loaded_name(self, tensor: torch.Tensor) -> str | None:
        """The name of a parameter or buffer a running module holds now but did not when the
        recording began: accelerate's offload hooks put a layer's weights in place for its
        forward only (they are on the meta device between forwards)."""
        for name, _kind in reversed(self._stack.values()):
            module = self._modules.get(name)
            if module is None:
                continue
            for key, value in chain(module._parameters.items(), module._buffers.items()):
                if value is tensor:
                    return f"{name}.{key}"
        return None

    def _argument(self, value: object) -> object:
        if isinstance(value, torch.Tensor):
            return self._node_of(value)
        if isinstance(value, list):
            return [self._argument(v) for v in value]
        if isinstance(value, tuple):  # also torch.Size and named tuples: a plain tuple will do
            return tuple(self._argument(v) for v in value)
        if isinstance(value, dict):
            return {k: self._argument(v) for k, v in value.items()}
        if value is None or isinstance(value, (bool, int, float, complex, str, torch.dtype, torch.device)):
            return value
        return repr(value)  # only tensors' provenance matters; keep the graph free of foreign objects

    # -- module calls -------------------------------------------------------------------------

    def enter_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        name = self._module_names.get(module, type(module).__name__)
        count = self.calls.get(name, 0)
        self.calls[name] = count + 1
        key = f"{name}@{count}" if count else name
        tensors = [v for v in pytree.tree_leaves((args, kwargs)) if isinstance(v, torch.Tensor)]
        self.call_inputs[key] = [self._node_of(t) for t in tensors]
        self._stack[key] = (name, type(module))
        self._keys.append(key)

    def leave_call(self, _module: nn.Module, _args: tuple, output: object) -> None:
        if self._keys:
            key = self._keys.pop()
            if not isinstance(output, torch.Tensor):
                self.not_tensor.add(key)
            del self._stack[key]

    # -- torch functions ----------------------------------------------------------------------

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Map the arguments before running: an in-place op reads the value its input had.
        node_args, node_kwargs = self._argument(args), self._argument(kwargs)
        output = func(*args, **kwargs)
        if args and output is args[0] and getattr(func, "__name__", None) in _NO_OP_WHEN_SELF:
            return output  # x.to(its own device and dtype) is x: the value keeps its node
        if isinstance(output, torch.Tensor):
            self.bind(output, self._append(func, node_args, node_kwargs))
        elif isinstance(output, (tuple, list)) and any(isinstance(v, torch.Tensor) for v in output):
            node = self._append(func, node_args, node_kwargs)
            for i, value in enumerate(output):
                if isinstance(value, torch.Tensor):
                    self.bind(value, self._append(operator.getitem, (node, i), {}))
        return output

    def _append(self, target, args, kwargs) -> fx.Node:
        node = self.graph.call_function(target, tuple(args), dict(kwargs))
        node.meta["nn_module_stack"] = dict(self._stack)
        return node
