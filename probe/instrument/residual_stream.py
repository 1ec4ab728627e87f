"""The residual stream entering and leaving each layer of a stack, read by forward hooks.

A decoder layer takes the stream as its first positional argument (or `hidden_states=`) and
returns it (a tensor, or a tuple whose first item is one). `LayerStreams` puts a forward pre-hook
and a forward hook on each layer of a stack (`probe.discovery.decoder.decoder_layers`) and hands
each layer's incoming and outgoing hidden states to its callbacks, checking that every layer runs
exactly once per forward. `token_rows` keeps the real tokens of hidden states (attention mask 1).

    streams = LayerStreams(layers.names, layers.modules, enter, leave, reader="my analysis")
    with model_preserved(model), attached() as handles:
        streams.attach(handles)
        for batch in batches(data, device):
            streams.start()
            batch.run(model)
            streams.check()

`reader` names who reads the stream, in the messages of the ProbeErrors raised for a model whose
layers do not fit ("the lm analysis").
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from probe.batches import Batch
from probe.errors import ProbeError

__all__ = ["LayerStreams", "StreamCallback", "hidden_in", "hidden_out", "token_mask", "token_rows"]

# (layer index in the stack, hidden states) -> None
StreamCallback = Callable[[int, torch.Tensor], None]


def hidden_in(args: tuple, kwargs: dict, reader: str) -> torch.Tensor:
    """A decoder layer's input hidden states: its first positional argument, or `hidden_states=`."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    if isinstance(kwargs.get("hidden_states"), torch.Tensor):
        return kwargs["hidden_states"]
    raise ProbeError("a decoder layer was called without its hidden states as first argument or hidden_states=; "
                     f"{reader} cannot see the residual stream entering it.")


def hidden_out(output: object, reader: str) -> torch.Tensor:
    """A decoder layer's output hidden states: the tensor, or a tuple's first item."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise ProbeError(f"a decoder layer returned a {type(output).__name__}; {reader} needs its hidden states "
                     "(a tensor, or a tuple whose first item is one).")


def token_mask(batch: Batch) -> torch.Tensor | None:
    """The real tokens of a batch, (batch, seq) bool: its attention mask; None: every position."""
    mask = batch.inputs.get("attention_mask") if isinstance(batch.inputs, dict) else None
    return mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def token_rows(hidden: torch.Tensor, mask: torch.Tensor | None, reader: str) -> torch.Tensor:
    """A copy of the real tokens' hidden states, (tokens, hidden), in the model's dtype."""
    if hidden.dim() != 3:
        raise ProbeError(f"{reader} needs hidden states of shape (batch, seq, hidden); a layer gave "
                         f"{tuple(hidden.shape)}.")
    hidden = hidden.detach()
    if mask is not None and mask.shape == hidden.shape[:2]:
        return hidden[mask]  # boolean indexing copies
    return hidden.reshape(-1, hidden.shape[-1]).clone()


class LayerStreams:
    """Hooks on a stack of layers: `enter(index, hidden)` with the stream entering layer `index`
    (0-based, forward order), `leave(index, hidden)` with the stream it returns.

    `attach(handles)` registers the hooks (put in `handles`, which `probe.instrument.hooks.attached`
    removes); `start()` before each forward, `check()` after it: ProbeError when a layer did not
    run, or did not return (a layer run twice in one forward raises when it is entered again).
    """

    def __init__(self, names: Sequence[str], modules: Sequence[nn.Module], enter: StreamCallback,
                 leave: StreamCallback, *, reader: str) -> None:
        self.names, self.modules, self.reader = list(names), list(modules), reader
        self._enter, self._leave = enter, leave
        self._seen: set[int] = set()
        self._open: set[int] = set()

    def attach(self, handles: list) -> None:
        for index, module in enumerate(self.modules):
            handles.append(module.register_forward_pre_hook(
                lambda _m, args, kwargs, index=index: self._entered(index, args, kwargs), with_kwargs=True))
            handles.append(module.register_forward_hook(
                lambda _m, _a, output, index=index: self._left(index, output)))

    def start(self) -> None:
        """Before a forward: no layer has run yet."""
        self._seen, self._open = set(), set()

    def check(self) -> None:
        """After a forward: every layer ran, and returned."""
        count = len(self.names)
        if len(self._seen) != count or self._open:
            missing = [self.names[i] for i in range(count) if i not in self._seen or i in self._open]
            raise ProbeError(f"the layers {missing[:3]} did not run in a forward; {self.reader} needs every "
                             "layer to run once per forward.")

    def _entered(self, index: int, args: tuple, kwargs: dict) -> None:
        if index in self._seen:
            raise ProbeError(f"layer {self.names[index]} ran twice in one forward; {self.reader} needs each "
                             "layer to run once (a stack of distinct layers).")
        hidden = hidden_in(args, kwargs, self.reader)
        self._seen.add(index)
        self._open.add(index)
        self._enter(index, hidden)

    def _left(self, index: int, output: object) -> None:
        hidden = hidden_out(output, self.reader)
        self._open.discard(index)
        self._leave(index, hidden)
