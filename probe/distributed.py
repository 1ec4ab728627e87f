"""Several processes (torchrun), one answer: shard the data, sum the statistics, rank 0 writes.

Every statistic probe accumulates is a sum (counts, sums, sums of squares), so one
`all_reduce(SUM)` per accumulator at the end makes each process hold the whole data set's
totals. Shards are strided (`rank::world_size`), without the padding DistributedSampler adds,
so every sample counts exactly once and per-sample results can be interleaved back in order.
"""

from __future__ import annotations

import atexit
import contextlib
import os
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset


_local = False


def active() -> bool:
    """True inside a process group of more than one process (and not in `local()`)."""
    return not _local and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Within the body this process works alone: no sharding, no reductions (rank 0's report)."""
    global _local
    previous, _local = _local, True
    try:
        yield
    finally:
        _local = previous


def rank() -> int:
    return dist.get_rank() if active() else 0


def world_size() -> int:
    return dist.get_world_size() if active() else 1


def init_from_environment(device: torch.device) -> bool:
    """Join the process group torchrun describes in the environment; False when not under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return active()
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)
    # A group left alive at interpreter exit can abort the process ("terminate called without an
    # active exception") while gloo's threads are torn down, failing a run that succeeded.
    atexit.register(_leave)
    return True


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def shard(dataset: Dataset) -> Dataset:
    """This process's share of `dataset`: samples rank, rank + world_size, ..."""
    if not active():
        return dataset
    return Subset(dataset, range(rank(), len(dataset), world_size()))


def sum_across(tensor: torch.Tensor) -> torch.Tensor:
    """Sum `tensor` over all processes, in place; a no-op in a single process."""
    if active():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def max_across(value: int) -> int:
    if not active():
        return value
    holder = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(holder, op=dist.ReduceOp.MAX)
    return int(holder)


def interleave(part: torch.Tensor) -> torch.Tensor:
    """Per-sample values along the last dim of each rank's strided shard, back in data order."""
    if not active():
        return part
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, part.cpu())
    total = sum(p.shape[-1] for p in parts)
    whole = torch.empty(*part.shape[:-1], total, dtype=part.dtype)
    for r, p in enumerate(parts):
        whole[..., r::world_size()] = p
    return whole


def barrier() -> None:
    if active():
        dist.barrier()
