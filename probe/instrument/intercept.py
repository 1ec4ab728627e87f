"""Intercept a residual addition at run time, where no module outputs F(x) or s(x).

Forward hooks see module outputs only. `x + F.gelu(self.fc(x))`, `x + self.gamma * self.f(x)`
and ViT's `x + mlp(ln_2(x))` (whose shortcut `x` is the output of the block's first addition)
have no module whose output is F(x) or s(x). For those we watch the addition itself: while a
watched block module runs, a `TorchFunctionMode` sees every torch call; it counts the tensor +
tensor additions made *by the block's own forward* and, at the k-th one, hands its operands to
the registered visitors, which may substitute the branch operand.

"By the block's own forward" means: not inside a child module (fx's discovery counts those as
the child's), and not inside a hook (another probe hook may do its own arithmetic while the
block runs). The Python stack tells both apart: walking up from the addition, the first frame of
`nn.Module`'s call machinery belongs to the innermost running module call, and the frames
below it are that module's forward, or a hook it runs.

The mode is entered only while a watched module runs (a pre-hook and an always-called forward
hook on that module), and every hook goes when the last site's handle is removed. A
KeyboardInterrupt skips always-called hooks, so the mode can be left on the stack: removing the
last site, or `restore_mode_stack`, takes it off again.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
import threading
import types
import weakref
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode, _get_current_function_mode_stack

from probe.discovery.additions import ADD_FUNCTIONS, IN_PLACE_ADDS
from probe.errors import ProbeError

# nn.Module.__call__ and the hooks it runs live in this file: the boundary of a module call.
_CALL_MACHINERY = nn.modules.module.__file__

# (branch F(x), shortcut s(x)) -> a tensor to add instead of F(x), or None to leave it.
Visitor = Callable[[torch.Tensor, torch.Tensor], "torch.Tensor | None"]


def is_tensor_addition(func: Callable, args: tuple) -> bool:
    """True for an addition of two tensors (a `x + 1` or a shape sum is never residual)."""
    return (func in ADD_FUNCTIONS and len(args) >= 2
            and isinstance(args[0], torch.Tensor) and isinstance(args[1], torch.Tensor))


class _Site:
    """One residual addition to watch: the `index`-th tensor addition of a module's forward."""

    __slots__ = ("index", "branch_operand", "visitor", "label")

    def __init__(self, index: int, branch_operand: int, visitor: Visitor, label: str) -> None:
        self.index, self.branch_operand, self.visitor, self.label = index, branch_operand, visitor, label


class _Watch:
    """A watched module: its sites, and the additions its current call has made so far."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.forward_code = _code_of(module.forward)
        self.sites: dict[int, list[_Site]] = {}
        self.additions = 0
        self.hooks: list = []

    def attach(self) -> None:
        if not self.hooks:
            self.hooks.append(self.module.register_forward_pre_hook(self._enter))
            # always_call: a forward that raises an Exception still leaves the mode.
            self.hooks.append(self.module.register_forward_hook(self._leave, always_call=True))

    def _enter(self, _module: nn.Module, _args: tuple) -> None:
        self.additions = 0
        _MODE.enter()

    def _leave(self, _module: nn.Module, _args: tuple, output: object) -> None:
        _MODE.leave()
        if output is None or self.module in _replayed:
            return  # the forward raised (let that error through), or its output was replayed
        missing = [site for index, sites in self.sites.items() if index >= self.additions for site in sites]
        if missing:
            raise ProbeError(
                f"block {missing[0].label!r} is the tensor addition #{missing[0].index} of its module's forward, "
                f"but this forward made only {self.additions}: the model took another path than when its blocks "
                "were found (or the block spec names an addition that does not exist)."
            )

    def detach(self) -> None:
        while self.hooks:
            self.hooks[-1].remove()  # then pop: an interrupt in between leaves it to remove again
            self.hooks.pop()


class _AdditionMode(TorchFunctionMode):
    """The one mode, on a thread's mode stack while a watched module runs in that thread.

    Mode stacks are per thread, and so is the count of watched calls running (nesting).
    """

    def __init__(self) -> None:
        super().__init__()
        self._running = threading.local()

    def enter(self) -> None:
        self._running.depth = getattr(self._running, "depth", 0) + 1
        if self not in _get_current_function_mode_stack():
            self.__enter__()

    def leave(self) -> None:
        depth = getattr(self._running, "depth", 0)
        self._running.depth = max(depth - 1, 0)
        if depth <= 1 and _top_mode() is self:
            self.__exit__(None, None, None)

    def reset(self) -> None:
        """Leave this thread's mode stack after an interrupt skipped the always-called hooks."""
        self._running.depth = 0
        while _top_mode() is self:
            self.__exit__(None, None, None)

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_tensor_addition(func, args):
            watch = _watch_making(sys._getframe(1))
            if watch is not None:
                index = watch.additions
                watch.additions += 1
                for site in watch.sites.get(index, ()):
                    args, kwargs = _visit(site, func, args, kwargs)
        return func(*args, **kwargs)


_MODE = _AdditionMode()
# Watched module -> its watch. Sites added by separate calls (an ablation, and a measurement
# inside it) share one count and run in registration order, as forward hooks do.
_watches: weakref.WeakKeyDictionary[nn.Module, _Watch] = weakref.WeakKeyDictionary()


def _watch_making(frame: types.FrameType | None) -> _Watch | None:
    """The watch of the module whose own forward runs `frame`'s code (an addition), or None."""
    own_code = []
    while frame is not None:
        if frame.f_code.co_filename == _CALL_MACHINERY:
            # The innermost running module call: the addition is its forward's only if the
            # frames below the call machinery include that forward (and not just a hook).
            module = frame.f_locals.get("self")
            watch = _watches.get(module) if isinstance(module, nn.Module) else None
            if watch is not None and watch.forward_code in own_code:
                return watch
            return None
        own_code.append(frame.f_code)
        frame = frame.f_back
    return None


def _code_of(method: Callable) -> types.CodeType | None:
    function = inspect.unwrap(getattr(method, "__func__", method))
    return getattr(function, "__code__", None)


def _visit(site: _Site, func: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
    """Show the site its (F, s) and put its replacement of F into the addition's arguments."""
    operands = [args[0], args[1]]
    alpha = kwargs.get("alpha", 1)
    if alpha != 1:  # torch.add(a, b, alpha=k) adds k * b: fold k in, so F and s are what is summed
        operands[1] = operands[1] * alpha
        kwargs = {k: v for k, v in kwargs.items() if k != "alpha"}
    branch, shortcut = operands[site.branch_operand], operands[1 - site.branch_operand]
    replacement = site.visitor(branch, shortcut)
    if replacement is not None:
        if func in IN_PLACE_ADDS and site.branch_operand == 0:
            # `f.add_(s)` returns f itself, and the caller may keep using f rather than the
            # result: the replacement must go into f's own storage, which the add overwrites anyway.
            operands[0] = branch.copy_(replacement)
        else:
            operands[site.branch_operand] = replacement
    return (operands[0], operands[1], *args[2:]), kwargs


def _top_mode() -> TorchFunctionMode | None:
    stack = _get_current_function_mode_stack()
    return stack[-1] if stack else None


def restore_mode_stack(length: int) -> None:
    """Pop the torch function modes pushed since this thread's stack held `length` (an
    interrupt can leave probe's mode, or a recorder, on it)."""
    while len(_get_current_function_mode_stack()) > length:
        _top_mode().__exit__(None, None, None)
    if _MODE not in _get_current_function_mode_stack():
        _MODE.reset()


class SiteHandle:
    """Removes one watched addition, like a hook's RemovableHandle.

    Every step of `remove` can run again, and it undoes a registration that an interrupt cut
    short: removing twice, or after a Ctrl-C anywhere, leaves no watch, hook or mode behind.
    """

    def __init__(self, module: nn.Module, site: _Site) -> None:
        self._module, self._site = module, site

    def remove(self) -> None:
        watch, site = _watches.get(self._module), self._site
        if watch is not None:
            sites = watch.sites.get(site.index, [])
            if site in sites:
                sites.remove(site)
            if not sites:
                watch.sites.pop(site.index, None)
            if not watch.sites:
                watch.detach()
                _watches.pop(self._module, None)
        if not _watches:
            _MODE.reset()


# Modules whose calls answer from a cache (`probe.deletion.fast_replay`): they make no additions, and none is missing.
_replayed: weakref.WeakSet = weakref.WeakSet()


@contextlib.contextmanager
def replaying(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Within the body, calls of `modules` are replays of cached outputs: their watched additions
    are not expected to happen."""
    _replayed.update(modules)
    try:
        yield
    finally:
        for module in modules:
            _replayed.discard(module)


def watch_addition(module: nn.Module, index: int, branch_operand: int, visitor: Visitor, handles: list,
                   label: str = "") -> None:
    """Call `visitor(F, s)` at the `index`-th tensor addition made by `module`'s own forward.

    `branch_operand` (0 or 1) says which operand of that addition is F(x); additions inside
    child modules and hooks are not counted. The site's handle goes into `handles` first, then
    the site is attached: removing every handle there undoes it all, even after an interrupt
    part-way. The last removal takes the module's hooks (and, at the very end, the mode) away.
    """
    if branch_operand not in (0, 1):
        raise ValueError(f"branch_operand must be 0 or 1, not {branch_operand!r}")
    site = _Site(index, branch_operand, visitor, label)
    handles.append(SiteHandle(module, site))
    watch = _watches.get(module)
    if watch is None:
        watch = _watches[module] = _Watch(module)
    watch.sites.setdefault(index, []).append(site)
    watch.attach()
