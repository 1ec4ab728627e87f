"""Find the residual blocks of a model.

A residual addition adds a tensor to a function of that same tensor: `F(x) + s(x)`, where the
shortcut `s` is the identity or a short projection of `x`. We find those additions in the
dataflow graph of the model's forward (`probe.discovery.tracing`: a torch.fx trace, or, for models fx
cannot trace, one recorded forward on an example input), then map each one back to modules of
the *user's* model, so that measuring and ablating work on the original:

- `Block.module`: the innermost module whose forward performs the addition;
- `Block.branch`: the outermost module inside the block whose output *is* `F(x)`;
- `Block.shortcut`: the module whose output is `s(x)`, or None when `s(x)` is the block's input.

When both are module outputs (torchvision's ResNets, MobileNets, ConvNeXt, RegNet) plain
forward hooks on them see F(x) and s(x): `strategy="hooks"`. When F(x) ends in a function or a
learned scale (`x + F.gelu(self.fc(x))`, `x + self.gamma * self.f(x)`), when its module runs
more than once (Swin reuses `stochastic_depth`), or when s(x) is an intermediate value (ViT's
second addition adds to the output of its first), the block is `strategy="intercept"`: it is
the `add_index`-th tensor addition executed directly in `module`'s forward, and `probe.instrument.intercept`
catches that addition at run time. `branch` and `shortcut` then describe the operands.

The graph is used only to discover; nothing runs through it afterwards.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Iterable, Iterator, Sequence

import torch
import torch.fx as fx
from torch import nn

from probe.batches import first_inputs
from probe.discovery.block import Block, check_block
from probe.errors import ProbeError, close_matches
from probe.discovery.additions import is_addition
from probe.discovery.tracing import Recording, record, trace
from probe.discovery.spec import blocks_from_spec, check_operands

# Shape queries make a tensor "depend" on x without carrying its values: they cut the data flow.
_SHAPE_METHODS = {"size", "dim"}
# Methods whose result is a number or a shape, never a tensor.
_NON_TENSOR_METHODS = {"size", "dim", "numel", "nelement", "ndimension", "item", "tolist", "stride"}
# A projection shortcut is a short path (conv + bn, pool + conv + bn, subsample + pad).
_MAX_PROJECTION_NODES = 4
# How deep `branch`/`shortcut` descriptions of non-module values go: "gelu(fc)", "mul(gamma, f)".
_DESCRIPTION_DEPTH = 2

# Traced discovery per model, reused while the model's module tree is the same objects.
_discovered: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def module_tree(model: nn.Module) -> tuple:
    """The module tree as it is now: names, classes and identities (any change retraces)."""
    return tuple((name, type(module), id(module)) for name, module in model.named_modules())


def find_blocks(model: nn.Module, *, example_input: object = None, spec: object = None) -> list[Block]:
    """Every residual block of `model`, in forward order.

    Discovery traces the model with torch.fx. A model fx cannot trace is found from one forward
    on `example_input` instead (a tensor, or a tuple of the forward's arguments; one sample is
    enough). `spec` skips discovery and builds the blocks the user names (see `probe.discovery.spec`:
    a string such as "layer1.0=bn2,downsample;layer1.1=bn2", a JSON text or file, or a list of
    BlockSpec, dicts or Blocks).

    Raises ProbeError when the model has no residual addition, or cannot be traced and no
    example input or spec was given, or is a model no Python hook can instrument (TorchScript,
    integer-quantized tensors: `refuse_uninstrumentable`).
    """
    refuse_uninstrumentable(model)
    if spec is not None:
        return blocks_from_spec(model, spec)
    structure = module_tree(model)
    cached = _discovered.get(model)
    if cached is not None and cached[0] == structure:  # found before, traced or from a forward
        return list(cached[1])
    recording = _recording(model, example_input)
    # quantize_dynamic's layers keep their weights packed, not as nn.Parameters: still learned.
    recording.learned.update(_dynamically_quantized(model))
    blocks = blocks_in(recording)
    if blocks:
        _discovered[model] = (structure, tuple(blocks))
    if not blocks:
        raise ProbeError(
            f"no residual blocks found in {type(model).__name__}: searched {recording.source} for "
            "additions of a tensor to a function of that same tensor (F(x) + x or F(x) + proj(x)) "
            "and found none. A plain network has nothing to measure; pass a residual model "
            "(or name the blocks with a spec)."
        )
    return blocks


def resolve_blocks(model: nn.Module, names: Iterable[str | Block] | str | Block | None = None, *,
                   example_input: object = None, data: Iterable | None = None, unique: bool = True) -> list[Block]:
    """The blocks of `model` that `names` selects (all when None), validated up front.

    A name is looked up among the discovered blocks (`example_input` as for find_blocks; for a
    model torch.fx cannot trace, without one, the first batch of `data` when it can be read
    twice: a DataLoader or a list, not a generator); a
    Block object is used as given (after checking that its modules exist), so blocks from a
    spec or from `find_blocks(model, example_input=...)` need no new discovery. A block named
    twice is refused (it would be measured twice), unless `unique=False` (sets of blocks that
    share blocks, flattened).
    """
    refuse_uninstrumentable(model)
    if names is None:
        return _discover(model, example_input, data)
    if isinstance(names, (str, Block)):
        names = [names]
    names = list(names)
    modules = dict(model.named_modules())
    needs_discovery = any(not isinstance(n, Block) for n in names)
    by_name = {b.name: b for b in _discover(model, example_input, data)} if needs_discovery else {}
    chosen = []
    for name in names:
        if isinstance(name, Block):
            chosen.append(check_operands(check_block(name, modules)))
            continue
        if name not in by_name:
            shown = ", ".join(list(by_name)[:10]) + (", ..." if len(by_name) > 10 else "")
            raise ProbeError(
                f"unknown block {name!r}.{close_matches(str(name), by_name)} "
                f"The model's blocks are: {shown} (probe.find_blocks(model) lists them all)."
            )
        chosen.append(by_name[name])
    if unique:
        _refuse_repeats([block.name for block in chosen])
    return chosen


def _discover(model: nn.Module, example_input: object, data: Iterable | None) -> list[Block]:
    try:
        return find_blocks(model, example_input=example_input)
    except UntraceableError:
        if data is None or isinstance(data, Iterator):
            raise
    return find_blocks(model, example_input=first_inputs(data, model))


def refuse_uninstrumentable(model: nn.Module) -> None:
    """ProbeError for a model probe cannot measure or ablate, saying why and what to pass instead:
    a TorchScript module (its forward is compiled: no Python hook runs inside it) and a model
    converted to integer-quantized tensors (`torch.ao.quantization.convert`: probe's statistics
    and the zeros of a deleted branch are float). A dynamically quantized model
    (`quantize_dynamic`) keeps float activations and is measured as it is. And anything that is
    no nn.Module at all (None, a function)."""
    if not isinstance(model, nn.Module):
        raise ProbeError(f"model is a {type(model).__name__}, not a torch.nn.Module: probe finds blocks among a "
                         "module's submodules and hooks them; pass the model itself (an nn.Module).")
    if isinstance(model, torch.jit.ScriptModule):
        raise ProbeError(
            f"{type(model).__name__} is a TorchScript module (torch.jit.script, torch.jit.trace or torch.jit.load): its "
            "forward is compiled code that no Python hook enters, so probe cannot find, measure or delete its blocks. "
            "Pass the Python nn.Module it was made from (for a file saved with torch.jit.save: build the model in "
            "Python and load its weights, e.g. --model mypkg.models:build --checkpoint weights.pt).")
    for name, module in model.named_modules():
        origin = type(module).__module__
        packed = type(module).__name__.endswith("PackedParams")  # the weights inside a dynamic layer too
        if origin.startswith(_QUANTIZED) and not packed and not any(part in origin for part in (".dynamic", ".reference")):
            raise ProbeError(
                f"{type(model).__name__} computes on integer-quantized tensors ({name or 'the model'!r} is "
                f"{origin}.{type(module).__name__}, from torch.ao.quantization.convert): probe measures float "
                "activations and deletes a branch by adding float zeros. Pass the float model (before convert), or "
                "one quantized with torch.ao.quantization.quantize_dynamic, whose activations stay float.")


# Where torch keeps the modules of integer-quantized models (their dynamic and reference kinds are float).
_QUANTIZED = ("torch.ao.nn.quantized", "torch.nn.quantized", "torch.ao.nn.intrinsic.quantized",
              "torch.nn.intrinsic.quantized")


def _dynamically_quantized(model: nn.Module) -> set[str]:
    """Names of `model`'s dynamically quantized modules (`quantize_dynamic`'s Linear, LSTM, ...)."""
    return {name for name, module in model.named_modules()
            if type(module).__module__.startswith(_QUANTIZED) and ".dynamic" in type(module).__module__}


class UntraceableError(ProbeError):
    """torch.fx cannot trace the model, and no input was given to run it on instead."""


def _refuse_repeats(names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ProbeError(f"blocks= names {name!r} more than once; name each block once "
                             "(sets of blocks deleted together go to probe.evaluate_ablations).")
        seen.add(name)


# -- discovery on a recorded graph -----------------------------------------------------------


def _recording(model: nn.Module, example_input: object) -> Recording:
    try:
        return trace(model)
    except Exception as error:  # fx raises many types; the user needs the reason, not the type
        reason = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        if example_input is None:
            raise UntraceableError(
                f"could not trace {type(model).__name__} with torch.fx to find its residual blocks "
                f"({reason}). Find them in a forward pass instead with probe.find_blocks(model, "
                "example_input=<one batch of inputs>) and pass those blocks on (blocks=...), or name "
                "them with a spec (spec='layer1.0=bn2,downsample;...')."
            ) from error
    try:
        return record(model, example_input)
    except ProbeError:
        raise
    except Exception as error:  # the example input is the user's: say so, with the model's reason
        raise ProbeError(
            f"torch.fx cannot trace {type(model).__name__}, and running it on the example input failed "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); pass one batch "
            "the model accepts (a tensor, or a tuple of its forward's arguments)."
        ) from error


def blocks_in(recording: Recording) -> list[Block]:
    """The residual blocks whose additions appear in `recording`, in forward order."""
    graph = recording.graph
    scopes = _scopes(graph)
    tensors = _tensor_valued(graph)
    additions_per_call: dict[str, int] = {}
    # First the residual additions, then their names (which descriptions of later blocks use:
    # the shortcut of a later addition is often the output of an earlier one), then the fields.
    found: dict[tuple[str, int], tuple[fx.Node, str, int, tuple[fx.Node, fx.Node]]] = {}
    for node in graph.nodes:
        if not (is_addition(node) and len(node.args) >= 2 and all(a in tensors for a in node.args[:2])):
            continue
        key = _innermost_key(node)
        add_index = additions_per_call.get(key, 0)
        additions_per_call[key] = add_index + 1
        operands = _residual_operands(node, recording.learned)
        if operands is None:
            continue
        module = _qualified_name(node, key)
        if (module, add_index) not in found:  # not the same addition again, in a later call of a reused module
            found[module, add_index] = (node, key, add_index, operands)
    names = _block_names([(module, _branch_child(operands[0], key, recording.learned))
                          for (module, _), (_, key, _, operands) in found.items()])
    residual_names = {node: name for (node, *_), name in zip(found.values(), names)}
    return [Block(name=name, position=position,
                  **_classify(node, key, add_index, operands, recording, scopes, residual_names))
            for position, ((node, key, add_index, operands), name) in enumerate(zip(found.values(), names))]


def _classify(node: fx.Node, key: str, add_index: int, operands: tuple[fx.Node, fx.Node],
              recording: Recording, scopes: dict[str, set[fx.Node]], residual_names: dict[fx.Node, str]) -> dict:
    """Block fields (all but name and position) of the residual addition `node` in call `key`."""
    branch_node, shortcut_node = operands
    branch_module = _module_with_output(branch_node, key, scopes, recording.calls, recording.not_tensor)
    shortcut_module = None
    # s(x) is "the block's input" when it comes from outside the block; an embedding added to it
    # on the way (x + self.position: no function of the data) starts no new residual stream.
    identity = not _computed_inside(_without_embeddings(shortcut_node), key)
    if not identity:
        shortcut_module = _module_with_output(shortcut_node, key, scopes, recording.calls, recording.not_tensor)
    # Hooks see s(x) = the block's input only as the first tensor it is called with.
    first_input = recording.call_inputs.get(key, [])[:1] == [shortcut_node]
    fields = {"module": _qualified_name(node, key), "add_index": add_index,
              "branch_operand": 0 if node.args[0] is branch_node else 1}
    if branch_module is not None and (shortcut_module is not None or (identity and first_input)):
        return {**fields, "branch": branch_module, "shortcut": shortcut_module, "strategy": "hooks"}
    describe = lambda value: _describe(value, key, scopes, residual_names, _DESCRIPTION_DEPTH)  # noqa: E731
    return {**fields, "strategy": "intercept", "branch": describe(branch_node),
            "shortcut": None if identity else describe(shortcut_node)}


def _without_embeddings(node: fx.Node) -> fx.Node:
    """`node` with additions of data-independent tensors (positional embeddings) peeled off."""
    while is_addition(node) and len(node.args) >= 2 and all(isinstance(a, fx.Node) for a in node.args[:2]):
        data = [a for a in node.args[:2] if _depends_on_data(_ancestors(a))]
        if len(data) != 1:
            break
        node = data[0]
    return node


def _tensor_valued(graph: fx.Graph) -> set[fx.Node]:
    """The nodes whose value is a tensor (not a shape, a size or a number), in one pass.

    An addition counts towards `add_index` only when both operands are tensors, as at run time,
    where `x.size(0) + 1` is plain Python and never reaches torch.
    """
    tensors: set[fx.Node] = set()
    for node in graph.nodes:
        if node.op in ("placeholder", "get_attr", "call_module"):
            tensors.add(node)
        elif node.op == "call_method":
            if node.target not in _NON_TENSOR_METHODS and node.args and node.args[0] in tensors:
                tensors.add(node)
        elif node.op == "call_function":
            if node.target in (getattr, len):
                continue  # x.shape, x.dtype, len(x)
            if node.target is operator.getitem:
                if node.args[0] in tensors:
                    tensors.add(node)  # x[:, 0] (not x.shape[0])
            elif str(getattr(node.target, "__module__", None) or "").startswith("torch") or any(
                    n in tensors for n in node.all_input_nodes):
                tensors.add(node)
    return tensors


def _tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The nodes whose values flow into `node` (shape queries carry no values)."""
    if node.op == "call_method" and node.target in _SHAPE_METHODS:
        return []
    if node.op == "call_function" and node.target is getattr:
        return []  # x.shape, x.dtype
    return list(node.all_input_nodes)


def _ancestors(node: fx.Node) -> dict[fx.Node, int]:
    """Every node `node` depends on through values, mapped to its shortest distance."""
    distance = {node: 0}
    frontier = [node]
    while frontier:
        following = []
        for current in frontier:
            for parent in _tensor_inputs(current):
                if parent not in distance:
                    distance[parent] = distance[current] + 1
                    following.append(parent)
        frontier = following
    return distance


def _depends_on_data(ancestors: dict[fx.Node, int]) -> bool:
    return any(n.op == "placeholder" for n in ancestors)


def _residual_operands(node: fx.Node, learned: set[str]) -> tuple[fx.Node, fx.Node] | None:
    """(branch, shortcut) when `node` adds a tensor to a function of that tensor, else None.

    The branch must be a learned function of the shortcut (or, with a projection shortcut, of
    the x both are computed from): some operation on the way uses a parameter. Rotary position
    embeddings (`q * cos + rotate_half(q) * sin`) and the tanh approximation of GELU
    (`x + 0.044715 * x ** 3`) add parameter-free functions of a tensor, and are no residual blocks.
    """
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2 or operands[0] is operands[1]:
        return None
    a, b = operands
    ancestors_a, ancestors_b = _ancestors(a), _ancestors(b)
    # A parameter (ViT's positional embedding) is no function of the data: not a residual.
    if not (_depends_on_data(ancestors_a) and _depends_on_data(ancestors_b)):
        return None
    if a in ancestors_b:  # identity shortcut: b = F(a)
        return (b, a) if _learned_path(a, b, ancestors_b, learned) else None
    if b in ancestors_a:
        return (a, b) if _learned_path(b, a, ancestors_a, learned) else None
    # Projection shortcut: both sides start from the nearest common x; the short side is s(x).
    common = [n for n in ancestors_a if n in ancestors_b]
    x = min(common, key=lambda n: ancestors_a[n] + ancestors_b[n])
    if ancestors_a[x] <= ancestors_b[x]:
        shortcut, branch, shortcut_length = a, b, ancestors_a[x]
    else:
        shortcut, branch, shortcut_length = b, a, ancestors_b[x]
    if shortcut_length > _MAX_PROJECTION_NODES or shortcut_length >= max(ancestors_a[x], ancestors_b[x]):
        return None  # two deep paths summed (an Inception-style merge), not a residual
    if not _learned_path(x, branch, ancestors_b if branch is b else ancestors_a, learned):
        return None
    return branch, shortcut


def _learned_path(start: fx.Node, end: fx.Node, ancestors_of_end: dict[fx.Node, int], learned: set[str]) -> bool:
    """Whether an operation on a path from `start` to `end` uses a parameter (or is a module
    holding some)."""
    on_path, frontier = {start}, [start]
    while frontier:
        following = [user for node in frontier for user in node.users
                     if user in ancestors_of_end and user not in on_path]
        on_path.update(following)
        frontier = following
    for node in on_path:
        if node.op == "call_module" and node.target in learned:
            return True
        if any(parent.op == "get_attr" and parent.target in learned for parent in node.all_input_nodes):
            return True
    return False


# -- module calls ----------------------------------------------------------------------------
# A module call is named by its nn_module_stack key: the qualified name, "@k" for later calls.


def _stack(node: fx.Node) -> dict[str, tuple[str, type]]:
    return node.meta.get("nn_module_stack") or {}


def _innermost_key(node: fx.Node) -> str:
    stack = _stack(node)
    return next(reversed(stack)) if stack else ""


def _qualified_name(node: fx.Node, key: str) -> str:
    return _stack(node)[key][0] if key else ""


def _keys_inside(node: fx.Node, key: str) -> list[str]:
    """The module calls enclosing `node` that lie strictly inside call `key`, outermost first."""
    keys = list(_stack(node))
    if not key:
        return keys
    return keys[keys.index(key) + 1:] if key in keys else []


def _computed_inside(node: fx.Node, key: str) -> bool:
    """True when `node` is computed during module call `key` (not handed to it)."""
    if not key:
        return node.op != "placeholder"
    return key in _stack(node)


def _scopes(graph: fx.Graph) -> dict[str, set[fx.Node]]:
    """Module call key -> the nodes executed inside that call."""
    scopes: dict[str, set[fx.Node]] = {}
    for node in graph.nodes:
        for key in _stack(node):
            scopes.setdefault(key, set()).add(node)
    return scopes


def _outputs_of(node: fx.Node, key: str, scopes: dict[str, set[fx.Node]]) -> list[tuple[str, str]]:
    """(call key, qualified name) of the calls inside `key` whose one output is `node`, outermost first.

    A call qualifies when `node` is the only value of its scope used outside it, so hooking that
    module's output sees exactly `node`.
    """
    stack = _stack(node)
    qualifying = []
    for inner in _keys_inside(node, key):
        scope = scopes.get(inner, set())
        leaving = {n for n in scope if any(user not in scope for user in n.users)}
        if leaving == {node}:
            qualifying.append((inner, stack[inner][0]))
    return qualifying


def _module_with_output(node: fx.Node, key: str, scopes: dict[str, set[fx.Node]], calls: dict[str, int],
                        not_tensor: set[str] = frozenset()) -> str | None:
    """The outermost module inside call `key` whose output is `node`, and that runs once per
    forward (a hook on a module called twice would fire twice) and returns that one tensor (a
    hook on a module returning (output, weights) sees a tuple), or None."""
    for inner, name in _outputs_of(node, key, scopes):
        if calls.get(name, 1) == 1 and inner not in not_tensor:
            return name
    return None


def _describe(node: fx.Node, key: str, scopes: dict[str, set[fx.Node]], residual_names: dict[fx.Node, str],
              depth: int) -> str:
    """A short description of a value inside call `key`: a module name, an earlier block's name
    (its residual sum), "input", "gelu(blocks.0.fc)", "mul(blocks.0.gamma, blocks.0.f)"."""
    outputs = _outputs_of(node, key, scopes)
    if outputs:
        return outputs[0][1]
    if node in residual_names:
        return residual_names[node]
    if node.op in ("get_attr", "call_module"):
        return str(node.target)  # a parameter (a learned scale), a buffer, a module
    if not _computed_inside(node, key):
        return "input"
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    if depth == 0:
        return f"{name}(...)"
    inputs = [_describe(n, key, scopes, residual_names, depth - 1) for n in _tensor_inputs(node)]
    return f"{name}({', '.join(inputs)})"


def _block_names(additions: Sequence[tuple[str, str | None]]) -> list[str]:
    """Names for residual additions given as (module, branch child) in forward order.

    A block is named by its module; a module with several additions names each by the child
    module its branch comes from ("model.layers.0[self_attn]", "model.layers.0[mlp]": a
    transformer layer's two sublayers) when those differ, else by its place ("...[0]", "[1]").
    """
    by_module: dict[str, list[str | None]] = {}
    for module, child in additions:
        by_module.setdefault(module, []).append(child)
    seen: dict[str, int] = {}
    names = []
    for module, child in additions:
        index = seen.get(module, 0)
        seen[module] = index + 1
        children = by_module[module]
        label = module or "<model>"
        if len(children) > 1:
            readable = all(children) and len(set(children)) == len(children)
            label += f"[{child if readable else index}]"
        names.append(label)
    return names


def _branch_child(branch: fx.Node, key: str, learned: set[str]) -> str | None:
    """The child of the block's module whose learned computation the branch ends in
    (`self_attn` for a branch computed in "model.layers.0.self_attn"), found by walking back
    from the branch to its nearest operation that uses a parameter; None when there is none
    inside the block, or it lies in no child. Normalization children are walked past."""
    for node in sorted(_ancestors(branch).items(), key=lambda item: item[1]):
        node = node[0]
        uses_parameter = (node.op == "call_module" and node.target in learned) or any(
            parent.op == "get_attr" and parent.target in learned for parent in node.all_input_nodes)
        if not uses_parameter or not _computed_inside(node, key):
            continue
        inside = _keys_inside(node, key)
        if not inside and node.op == "call_module":
            # fx calls a leaf module as one node, with no stack entry of its own
            inside = [node.target]
        if not inside:
            return None
        child = _stack(node)[inside[0]][0] if inside[0] in _stack(node) else inside[0]
        module = _qualified_name(node, key) if key else ""
        child = child[len(module) + 1:].split(".")[0] if module else child.split(".")[0]
        if not _is_norm(child):  # a post-norm branch (norm1(attn(x))) is named by its sublayer
            return child
    return None


def _is_norm(name: str) -> bool:
    lowered = name.lower()
    return "norm" in lowered or lowered.startswith("ln")
