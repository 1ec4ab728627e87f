"""The memory a forward takes: the bytes of tensor storage it makes, live at once and at their peak.

    with TensorMemory() as memory:
        outputs = model(inputs)
    memory.peak        # the most bytes of storage made inside the block that were alive at once

Counted below autograd, per aten call (a `TorchDispatchMode`), so it is the same on every device
and needs no allocator statistics (the CPU has none): each call's outputs whose storage is new
(not one of the call's inputs: views and in-place calls make none) are added, and subtracted when
torch frees that storage. Tensors that existed before the block (weights, the inputs) are not
counted; weights a dispatched model loads from disk for one forward are, since they are made
there. What an allocator keeps beyond that (its rounding, a CUDA cache) is not: budgets leave a
margin for it (`probe.commands.batch_size`).
"""

from __future__ import annotations

import weakref

import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["TensorMemory"]


class TensorMemory(TorchDispatchMode):
    """Bytes of tensor storage made inside the `with` block: `live` now, `peak` the most at once."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._held: dict[int, weakref.ref] = {}  # a counted storage's address -> a reference that counts it off

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        outputs = func(*args, **(kwargs or {}))
        given = {_address(t) for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for tensor in pytree.tree_leaves(outputs):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                address = _address(tensor)
                if address not in given and address not in self._held:
                    self._count(tensor.untyped_storage(), address)
        return outputs

    def _count(self, storage: torch.UntypedStorage, address: int) -> None:
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        # torch keeps one Python object per storage while the storage lives (PyObject
        # preservation), so the reference dies exactly when the storage is freed.
        self._held[address] = weakref.ref(storage, lambda _, address=address, size=size: self._free(address, size))

    def _free(self, address: int, size: int) -> None:
        self.live -= size
        self._held.pop(address, None)


def _address(tensor: torch.Tensor) -> int:
    return tensor.untyped_storage()._cdata
