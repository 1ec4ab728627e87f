"""Hooks that see each block's branch F(x) and shortcut s(x), and leave no trace behind.

Every probe operation runs inside `model_preserved(model)`: it puts the model in eval mode, and
on the way out (normally, on an exception, on KeyboardInterrupt) removes every hook it added and
restores every module's `training` flag, the thread's grad mode and torch function modes. Inside
`torch.inference_mode()` it leaves inference mode for the call (tensors made there have no
version counter, which the hooks read, and no autograd record, which gradients need); weights
made in inference mode that cannot serve then (changed in place, or differentiated) raise a
one-line ProbeError. The
restoring itself runs to the end through a second Ctrl-C (`restoring`), and every hook or watch
is put in its handle list before it is attached, so an interrupt at any point leaves nothing
behind. One probe call at a time holds a model (`held`): two calls' hooks would fire in
each other's forwards.

Each block is reached the way its `strategy` says: "hooks" blocks through forward hooks on the
modules whose outputs are F(x) and s(x) (cheapest); "intercept" blocks by catching their
addition at run time (`probe.instrument.intercept`). Both give callers the same (block, F, s) view.
"""

from __future__ import annotations

import contextlib
import functools
import threading
import weakref
from collections.abc import Callable, Iterator, Sequence
from itertools import chain

import torch
from torch import nn
from torch.overrides import _get_current_function_mode_stack

from probe.discovery.block import Block
from probe.errors import ProbeError
from probe.instrument.intercept import restore_mode_stack, watch_addition


# (block, branch F(x), shortcut s(x)) -> None; called once per call of a block's module (twice
# per forward for a module run twice), before the addition, while both tensors hold their values.
PairCallback = Callable[[Block, torch.Tensor, torch.Tensor], None]
# (block, branch output) -> replacement tensor for the branch.
BranchReplacement = Callable[[Block, torch.Tensor], torch.Tensor]


def _run_to_completion(steps: Sequence[Callable[[], None]]) -> None:
    """Run every step (each safe to run again) to its end, even through Ctrl-C: a
    KeyboardInterrupt in a step restarts it, and is raised again once all are done."""
    interrupt: KeyboardInterrupt | None = None
    for step in steps:
        while True:
            try:
                step()
                break
            except KeyboardInterrupt as error:
                interrupt = error
    if interrupt is not None:
        raise interrupt


@contextlib.contextmanager
def restoring(*steps: Callable[[], None]) -> Iterator[None]:
    """On the way out of the body, however it ends, run `steps` (each safe to run again) to
    their end, also through a Ctrl-C while they run (a second one, as the first unwinds)."""
    try:
        try:
            yield
        finally:
            _run_to_completion(steps)
    finally:
        # Once more: a Ctrl-C can also strike before the first run got into its loop. Steps
        # already done find nothing left to do.
        _run_to_completion(steps)


# Model -> the probe calls holding it, in the order they came: (thread id, token) per call, a
# thread's nested calls included (an analysis calling measure inside its own model_preserved).
# No lock: appending to and removing from a list are atomic, and there is no lock for a Ctrl-C
# to leave held.
_holders: weakref.WeakKeyDictionary[nn.Module, list[tuple[int, object]]] = weakref.WeakKeyDictionary()


def _hold(model: nn.Module, holder: tuple[int, object]) -> None:
    holders = _holders.setdefault(model, [])
    holders.append(holder)
    if holders[0][0] != holder[0]:  # the thread whose call came first holds the model
        _let_go(model, holder)
        raise ProbeError(
            f"the model {type(model).__name__} is in use by a probe call in another thread; probe "
            "calls on one model cannot overlap (each would see the other's hooks and modes). Run "
            "them one after another, or give each thread its own copy (copy.deepcopy(model))."
        )


def _let_go(model: nn.Module, holder: tuple[int, object]) -> None:
    holders = _holders.get(model, [])
    if holder in holders:
        holders.remove(holder)


@contextlib.contextmanager
def held(model: nn.Module) -> Iterator[nn.Module]:
    """Hold `model` for this thread's probe call; ProbeError while another thread holds it."""
    holder = (threading.get_ident(), object())
    with restoring(lambda: _let_go(model, holder)):
        _hold(model, holder)
        yield model


@contextlib.contextmanager
def model_preserved(model: nn.Module, *, eval_mode: bool = True) -> Iterator[nn.Module]:
    """Hold `model` and run the body on it in eval mode; restore every training flag, the
    thread's grad mode and its torch function modes afterwards, whatever happens."""
    flags = [(module, module.training) for module in model.modules()]
    modes, grad = len(_get_current_function_mode_stack()), torch.is_grad_enabled()

    def restore_flags() -> None:
        for module, training in flags:
            if module.training != training:
                module.training = training

    def restore_thread_state() -> None:
        # An interrupt can skip a `with torch.no_grad()` exit, or a mode's always-called hook.
        restore_mode_stack(modes)
        torch.set_grad_enabled(grad)

    with held(model), restoring(restore_flags, restore_thread_state), _inference_tensors_explained(model), \
            _outside_inference_mode(grad):
        # eval() walks the whole tree through nn.Module.__setattr__: skip it when nothing
        # trains (the usual case, and a real share of a small GPU forward's time).
        if eval_mode and any(training for _module, training in flags):
            model.eval()
        yield model


@contextlib.contextmanager
def _outside_inference_mode(grad: bool) -> Iterator[None]:
    """The body outside `torch.inference_mode()` when the caller is inside it, in grad mode
    `grad`, so that the tensors it makes have version counters and autograd records."""
    if not torch.is_inference_mode_enabled():
        yield
        return
    with torch.inference_mode(False):
        torch.set_grad_enabled(grad)  # inference_mode(False) turns grad mode on; its exit restores both
        yield


def outside_inference_mode(function: Callable) -> Callable:
    """`function` run outside `torch.inference_mode()` when called inside it (the grad mode kept):
    for a call that makes tensors before `model_preserved` (sums) and adds into them inside it."""

    @functools.wraps(function)
    def call(*args, **kwargs):
        with _outside_inference_mode(torch.is_grad_enabled()):
            return function(*args, **kwargs)

    return call


# What torch says when an inference tensor is changed in place outside inference mode, or saved
# for a backward pass.
_INFERENCE_ERRORS = {"Inplace update to inference tensor": "cannot be changed in place outside inference mode",
                     "Inference tensors cannot be saved for backward": "keep no record for gradients"}


@contextlib.contextmanager
def _inference_tensors_explained(model: nn.Module) -> Iterator[None]:
    """Torch's error for a tensor made under `torch.inference_mode()` that the call cannot use
    outside it (weights it must differentiate or change in place) as a one-line ProbeError."""
    try:
        yield
    except RuntimeError as error:
        text = str(error)
        what = next((what for phrase, what in _INFERENCE_ERRORS.items() if phrase in text), None)
        if what is None:
            raise
        made = next((name for name, tensor in chain(model.named_parameters(), model.named_buffers())
                     if tensor.is_inference()), None)
        if made is None:
            raise ProbeError(f"a tensor made under torch.inference_mode() was given: such tensors {what}, as this "
                             "call needs; make the data and anything else it is given outside inference mode.") \
                from error
        raise ProbeError(
            f"the model {type(model).__name__} holds tensors made under torch.inference_mode() ({made!r}); such "
            f"tensors {what}, as this call needs. Make or load the model outside inference mode (or copy it "
            "there: with torch.inference_mode(False): model = copy.deepcopy(model)).") from error


@contextlib.contextmanager
def attached(handles_out: list | None = None) -> Iterator[list]:
    """Collect hook handles in the yielded list; remove them all on exit, whatever happens."""
    handles: list = [] if handles_out is None else handles_out

    def remove_all() -> None:
        while handles:
            handles[-1].remove()  # before the pop: an interrupt in between leaves it to remove again
            handles.pop()

    with restoring(remove_all):
        yield handles


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

            watch_addition(modules[block.module], block.add_index, block.branch_operand, see, handles, block.name)
            continue
        state = _PairState()

        def arrive(kind: str, tensor: torch.Tensor, block: Block = block, state: _PairState = state) -> None:
            setattr(state, kind, tensor)
            setattr(state, kind + "_version", _version(tensor))
            if state.branch is None or state.shortcut is None:
                return
            if _version(state.branch) != state.branch_version or _version(state.shortcut) != state.shortcut_version:
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


def _version(tensor: torch.Tensor) -> int:
    """The tensor's version counter; -2 for an inference tensor, which has none (outside inference
    mode, where probe runs, it cannot be changed in place either)."""
    return -2 if tensor.is_inference() else tensor._version


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

            watch_addition(modules[block.module], block.add_index, block.branch_operand, visit, handles, block.name)
            continue

        def hook(_module: nn.Module, _args: tuple, output: torch.Tensor, block: Block = block) -> torch.Tensor | None:
            if not active(block):
                return None
            return replacement(block, output)

        handles.append(modules[block.branch].register_forward_hook(hook))
