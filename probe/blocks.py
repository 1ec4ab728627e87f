"""Find the residual blocks of a model.

A residual addition adds a tensor to a function of that same tensor: `F(x) + s(x)`, where the
shortcut `s` is the identity or a short projection of `x`. We find those additions in a
`torch.fx` trace of the model, then map each one back to modules of the *user's* model so that
measuring and ablating can work with plain forward hooks on the original:

- `Block.module`: the innermost module whose forward performs the addition;
- `Block.branch`: the outermost module inside the block whose output *is* `F(x)`;
- `Block.shortcut`: the module whose output is `s(x)`, or None when `s(x)` is the block's input.

The trace is used only to discover; nothing runs through it afterwards.
"""

from __future__ import annotations

import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch import nn

from probe.errors import ProbeError, close_matches

_ADD_FUNCTIONS = {operator.add, operator.iadd, torch.add}
_ADD_METHODS = {"add", "add_"}
# Shape queries make a tensor "depend" on x without carrying its values: they cut the data flow.
_SHAPE_METHODS = {"size", "dim"}
# A projection shortcut is a short path (conv + bn, pool + conv + bn, subsample + pad).
_MAX_PROJECTION_NODES = 4


@dataclass(frozen=True)
class Block:
    """One residual addition `out = F(x) + s(x)` and the modules it comes from.

    name:     unique name; the block module's qualified name (`layer1.0`), with a `[i]` suffix
              when one module performs several residual additions (`encoder_layer_0[1]`).
    module:   qualified name of the module whose forward performs the addition.
    branch:   qualified name of the module whose output is the branch F(x).
    shortcut: qualified name of the module whose output is the shortcut s(x), or None when the
              shortcut is the block's input itself (identity).
    position: 0-based index of the block in forward order.
    """

    name: str
    module: str
    branch: str
    shortcut: str | None
    position: int


def find_blocks(model: nn.Module) -> list[Block]:
    """Every residual block of `model`, in forward order.

    Raises ProbeError when the model cannot be traced or has no residual addition.
    """
    graph = _trace(model)
    scopes = _scopes(graph)
    found: list[tuple[str, str, str | None]] = []
    for node in graph.nodes:
        if not _is_add(node):
            continue
        operands = _residual_operands(node)
        if operands is None:
            continue
        branch_node, shortcut_node = operands
        block_module = _innermost_module(node)
        branch = _module_with_output(branch_node, block_module, scopes)
        if shortcut_node.meta.get("nn_module_stack") and _inside(_innermost_module(shortcut_node), block_module):
            shortcut = _module_with_output(shortcut_node, block_module, scopes)
            if shortcut is None:
                continue  # the shortcut is an intermediate value, not a module output (see issue #3)
        else:
            shortcut = None  # the block's own input
        if branch is None:
            continue  # the branch ends in a function, not a module (see issue #3)
        found.append((block_module, branch, shortcut))
    if not found:
        raise ProbeError(
            f"no residual blocks found in {type(model).__name__}: searched its traced graph for "
            "additions of a tensor to a function of that same tensor (F(x) + x or F(x) + proj(x)) "
            "and found none. A plain network has nothing to measure; pass a residual model."
        )
    return _name_blocks(found)


def resolve_blocks(model: nn.Module, names: Iterable[str | Block] | None = None) -> list[Block]:
    """The blocks of `model` that `names` selects (all when None), validated up front."""
    blocks = find_blocks(model)
    if names is None:
        return blocks
    if isinstance(names, (str, Block)):
        names = [names]
    by_name = {b.name: b for b in blocks}
    chosen = []
    for name in names:
        key = name.name if isinstance(name, Block) else name
        if key not in by_name:
            shown = ", ".join(list(by_name)[:10]) + (", ..." if len(by_name) > 10 else "")
            raise ProbeError(
                f"unknown block {key!r}.{close_matches(str(key), by_name)} "
                f"The model's blocks are: {shown} (probe.find_blocks(model) lists them all)."
            )
        chosen.append(by_name[key])
    return chosen


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return fx.Tracer().trace(model)
    except Exception as error:  # fx raises many types; the user needs the reason, not the type
        raise ProbeError(
            f"could not trace {type(model).__name__} with torch.fx to find its residual blocks "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})."
        ) from error


def _is_add(node: fx.Node) -> bool:
    if node.op == "call_function" and node.target in _ADD_FUNCTIONS:
        return True
    return node.op == "call_method" and node.target in _ADD_METHODS


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


def _residual_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """(branch, shortcut) when `node` adds a tensor to a function of that tensor, else None."""
    operands = [a for a in node.args[:2] if isinstance(a, fx.Node)]
    if len(operands) != 2 or operands[0] is operands[1]:
        return None
    a, b = operands
    ancestors_a, ancestors_b = _ancestors(a), _ancestors(b)
    # A parameter (ViT's positional embedding) is no function of the data: not a residual.
    if not (_depends_on_data(ancestors_a) and _depends_on_data(ancestors_b)):
        return None
    if a in ancestors_b:
        return b, a  # identity shortcut: b = F(a)
    if b in ancestors_a:
        return a, b
    # Projection shortcut: both sides start from the nearest common x; the short side is s(x).
    common = [n for n in ancestors_a if n in ancestors_b]
    x = min(common, key=lambda n: ancestors_a[n] + ancestors_b[n])
    if ancestors_a[x] <= ancestors_b[x]:
        shortcut, branch, shortcut_length = a, b, ancestors_a[x]
    else:
        shortcut, branch, shortcut_length = b, a, ancestors_b[x]
    if shortcut_length > _MAX_PROJECTION_NODES or shortcut_length >= max(ancestors_a[x], ancestors_b[x]):
        return None  # two deep paths summed (an Inception-style merge), not a residual
    return branch, shortcut


def _innermost_module(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack)[-1] if stack else ""


def _module_stack(node: fx.Node) -> list[str]:
    return list(node.meta.get("nn_module_stack") or {})


def _inside(name: str, container: str) -> bool:
    """True when module `name` lies strictly inside module `container`."""
    if name == container:
        return False
    return container == "" or name.startswith(container + ".")


def _scopes(graph: fx.Graph) -> dict[str, list[fx.Node]]:
    """Module qualified name -> the traced nodes executed inside it."""
    scopes: dict[str, list[fx.Node]] = {}
    for node in graph.nodes:
        for name in _module_stack(node):
            scopes.setdefault(name, []).append(node)
    return scopes


def _module_with_output(node: fx.Node, block_module: str, scopes: dict[str, list[fx.Node]]) -> str | None:
    """The outermost module strictly inside `block_module` whose one output is `node`.

    A module qualifies when `node` is the only value of its scope used outside it, so hooking
    that module's output sees exactly `node`, and the module runs once per block call.
    """
    for name in _module_stack(node):
        if not _inside(name, block_module):
            continue
        scope = set(scopes[name])
        leaving = {n for n in scope if any(user not in scope for user in n.users)}
        calls = sum(1 for n in scope if n.op == "call_module" and n.target == name)
        if leaving == {node} and calls <= 1:
            return name
    return None


def _name_blocks(found: Sequence[tuple[str, str, str | None]]) -> list[Block]:
    per_module: dict[str, int] = {}
    for module, _, _ in found:
        per_module[module] = per_module.get(module, 0) + 1
    seen: dict[str, int] = {}
    blocks = []
    for position, (module, branch, shortcut) in enumerate(found):
        index = seen.get(module, 0)
        seen[module] = index + 1
        name = module if per_module[module] == 1 else f"{module}[{index}]"
        blocks.append(Block(name=name or "<model>", module=module, branch=branch, shortcut=shortcut, position=position))
    return blocks
