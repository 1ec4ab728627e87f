"""What counts as an addition, in a traced graph and at run time: the one definition every
part of probe uses (discovery, the fast sweep's suffixes, the pruned export, interception).

`a + b`, `a += b`, `torch.add(a, b)`, `a.add(b)` and `a.add_(b)` are all additions. Whether an
addition is *residual* (a tensor plus a function of itself) is decided by discovery
(`probe.discovery.find`), not here.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

__all__ = ["ADD_FUNCTIONS", "IN_PLACE_ADDS", "is_addition"]

# What the spellings above reach __torch_function__ as (probe.instrument.intercept watches these).
ADD_FUNCTIONS = frozenset({
    torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__iadd__,
})
IN_PLACE_ADDS = frozenset({torch.Tensor.add_, torch.Tensor.__iadd__})

# What they become in a torch.fx graph: Python operators and torch functions are call_function
# nodes; `a.add(b)` and `a.add_(b)` are call_method nodes whose first argument is `a`.
_GRAPH_FUNCTIONS = frozenset({operator.add, operator.iadd, *ADD_FUNCTIONS})
_GRAPH_METHODS = frozenset({"add", "add_"})


def is_addition(node: fx.Node) -> bool:
    """Whether `node` adds its first two arguments (in any of the spellings above)."""
    if node.op == "call_function":
        return node.target in _GRAPH_FUNCTIONS
    return node.op == "call_method" and node.target in _GRAPH_METHODS
