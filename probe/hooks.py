"""Hooks that see each block's branch F(x) and shortcut s(x), and leave no trace behind.

Every probe operation runs inside `model_preserved(model)`: it puts the model in eval mode, and
on the way out (normally, on an exception, on KeyboardInterrupt) removes every hook it added and
restores every module's `training` flag.

Each block is reached the way its `strategy` says: "hooks" blocks through forward hooks on the
modules whose outputs are F(x) and s(x) (cheapest); "intercept" blocks by catching their
addition at run time (`probe.intercept`). Both give callers the same (block, F, s) view.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from probe.intercept import watch_addition

if TYPE_CHECKING:  # blocks.py records forwards with model_preserved: no import at run time
    from probe.blocks import Block

# (block, branch F(x), shortcut s(x)) -> None; called once per block per forward, before the
# addition, while both tensors hold their values.
PairCallback = Callable[["Block", torch.Tensor, torch.Tensor], None]
# (block, branch output) -> replacement tensor for the branch.
BranchReplacement = Callable[["Block", torch.Tensor], torch.Tensor]


@contextlib.contextmanager
def model_preserved(model: nn.Module, *, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Run the body on `model` in eval mode; restore every training flag afterwards."""
    flags = [(module, module.training) for module in model.modules()]
    try:
        # eval() walks the whole tree through nn.Module.__setattr__: skip it when nothing trains
        # (the usual case, and a real share of a small GPU forward's time).
        if eval_mode and any(training for _module, training in flags):
            model.eval()
        yield model
    finally:
        for module, training in flags:
            if module.training != training:
                module.training = training


@contextlib.contextmanager
def attached(handles_out: list | None = None) -> Iterator[list]:
    """Collect hook handles in the yielded list; remove them all on exit, whatever happens."""
    handles: list = [] if handles_out is None else handles_out
    try:
        yield handles
    finally:
        while handles:
            handles.pop().remove()


def _first_tensor(args: tuple) -> torch.Tensor:
    for value in args:
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError("block called without a tensor argument")


class _PairState:
    """Holds one block's branch and shortcut within one forward until both have arrived."""

    __slots__ = ("branch", "branch_version", "shortcut", "shortcut_version")

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self.branch = self.shortcut = None
        self.branch_version = self.shortcut_version = -1


def tap_pairs(model: nn.Module, blocks: Sequence[Block], callback: PairCallback, handles: list) -> None:
    """Call `callback(block, F(x), s(x))` for every block in every forward of `model`.

    No copies: we keep references and reduce as soon as the second of the two tensors exists.
    Both are still intact then (torchvision adds in place only after both exist); the version
    counters prove it, and a block that changes one of them in place earlier is reported.
    """
    modules = dict(model.named_modules())
    for block in blocks:
        if block.strategy == "intercept":
            def see(branch: torch.Tensor, shortcut: torch.Tensor, block: Block = block) -> None:
                callback(block, branch, shortcut)  # and return None: the addition goes on unchanged

            handles.append(watch_addition(modules[block.module], block.add_index, block.branch_operand,
                                          see, block.name))
            continue
        state = _PairState()

        def arrive(kind: str, tensor: torch.Tensor, block: Block = block, state: _PairState = state) -> None:
            setattr(state, kind, tensor)
            setattr(state, kind + "_version", tensor._version)
            if state.branch is None or state.shortcut is None:
                return
            if state.branch._version != state.branch_version or state.shortcut._version != state.shortcut_version:
                state.clear()
                raise RuntimeError(
                    f"block {block.name!r} modified its branch or shortcut in place before the "
                    "residual addition; probe cannot measure it without copies"
                )
            branch, shortcut = state.branch, state.shortcut
            state.clear()
            callback(block, branch, shortcut)

        owner = modules[block.module]
        if block.shortcut is None:  # one pre-hook both starts the block and hands over x
            def enter(_m: nn.Module, args: tuple, state: _PairState = state, arrive=arrive) -> None:
                state.clear()
                arrive("shortcut", _first_tensor(args))

            handles.append(owner.register_forward_pre_hook(enter))
        else:
            handles.append(owner.register_forward_pre_hook(lambda _m, _a, state=state: state.clear()))
            handles.append(modules[block.shortcut].register_forward_hook(
                lambda _m, _a, out, arrive=arrive: arrive("shortcut", out)))
        handles.append(modules[block.branch].register_forward_hook(
            lambda _m, _a, out, arrive=arrive: arrive("branch", out)))


def replace_branches(model: nn.Module, blocks: Sequence[Block], replacement: BranchReplacement,
                     handles: list, active: Callable[[Block], bool] = lambda _b: True) -> None:
    """Replace the branch output F(x) of each block (while `active(block)`) by `replacement`.

    The rest of the block (shortcut, addition, activation after it) runs as usual.
    """
    modules = dict(model.named_modules())
    for block in blocks:
        if block.strategy == "intercept":
            def visit(branch: torch.Tensor, _shortcut: torch.Tensor, block: Block = block) -> torch.Tensor | None:
                return replacement(block, branch) if active(block) else None

            handles.append(watch_addition(modules[block.module], block.add_index, block.branch_operand,
                                          visit, block.name))
            continue

        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor, block: Block = block) -> torch.Tensor | None:
            if not active(block):
                return None
            return replacement(block, output)

        handles.append(modules[block.branch].register_forward_hook(hook))
