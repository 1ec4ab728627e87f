"""`Block`: one residual block as probe names it (the record discovery, specs, hooks and every
table share), and the check that the modules it names exist. Finding blocks is `probe.discovery.find`."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from probe.errors import ProbeError, unknown_name

__all__ = ["STRATEGIES", "Block", "check_block"]

STRATEGIES = ("hooks", "intercept")


@dataclass(frozen=True)
class Block:
    """One residual addition `out = F(x) + s(x)` and where its operands come from.

    name:     unique name; the block module's qualified name (`layer1.0`), with a suffix when
              one module performs several residual additions: the sublayer its branch comes
              from (`encoder_layer_0[mlp]`) or its place (`[1]`).
    module:   qualified name of the module whose forward performs the addition ("" for the
              model itself, whose block is named "<model>").
    branch:   with strategy "hooks", the qualified name of the module whose output is F(x);
              with "intercept", a description of F(x) (a module name, or "gelu(blocks.0.fc)").
    shortcut: None when s(x) is the block's input (identity); with "hooks", the module whose
              output is s(x); with "intercept", a description of s(x).
    position: 0-based index of the block in forward order.
    strategy: "hooks" (forward hooks on `branch` and `shortcut`, cheapest) or "intercept" (the
              addition itself is caught at run time; see probe.instrument.intercept).
    add_index: which tensor + tensor addition executed directly in `module`'s forward (0-based,
              not counting additions inside child modules) is this block's; needed by "intercept".
    branch_operand: which operand of that addition is F(x): 0 (left) or 1 (right); needed by
              "intercept".
    """

    name: str
    module: str
    branch: str
    shortcut: str | None
    position: int
    strategy: str = "hooks"
    add_index: int | None = None
    branch_operand: int | None = None

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ProbeError(f"block {self.name!r} has strategy {self.strategy!r}; use one of {STRATEGIES}.")
        if self.strategy == "intercept" and (not isinstance(self.add_index, int) or self.add_index < 0
                                             or self.branch_operand not in (0, 1)):
            raise ProbeError(f"block {self.name!r} is intercepted at its addition, so it needs add_index "
                             f"(an int >= 0, got {self.add_index!r}) and branch_operand (0 or 1, got "
                             f"{self.branch_operand!r}).")


def check_block(block: Block, modules: dict[str, nn.Module]) -> Block:
    """`block`, after checking that the modules it names exist in the model."""
    named = [("module", block.module)]
    if block.strategy == "hooks":
        named += [("branch", block.branch)] + ([("shortcut", block.shortcut)] if block.shortcut else [])
    for role, name in named:
        if name not in modules:
            raise unknown_name(f"{role} module of block {block.name!r}", name, [n for n in modules if n])
    return block
