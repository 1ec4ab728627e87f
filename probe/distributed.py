"""Several processes (torchrun), one answer: shard the data, sum the statistics, rank 0 writes.

Every statistic probe accumulates is a sum (counts, sums, sums of squares), so one
`all_reduce(SUM)` per accumulator at the end makes each process hold the whole data set's
totals. Shards are strided (`rank::world_size`), without the padding DistributedSampler adds,
so every sample counts exactly once and per-sample results can be interleaved back in order.

Global rank 0 (`leader()`) alone touches the out folder; `on_leader` and `from_leader` hand what
it found to the others, so that every process takes the same path (resuming the same pieces).
Each torchrun attempt (`--max-restarts`) joins a group of its own (`init_from_environment`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from typing import TypeVar

import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

from probe.errors import ProbeError


T = TypeVar("T")
_local = False

# How long a collective waits for the other processes (torch's default for gloo): a process that
# died is noticed by torchrun at once; this bounds a wait on one that hangs.
_TIMEOUT = datetime.timedelta(minutes=30)


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


def leader() -> bool:
    """Whether this process is the one that writes: global rank 0 of the torchrun job (not each
    node's local rank 0), also before the process group is joined (torchrun's RANK)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return int(os.environ.get("RANK", "0")) == 0


def restart_count() -> int:
    """How many times torchrun has restarted this job's processes (`--max-restarts`); 0 otherwise."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def init_from_environment(device: torch.device) -> bool:
    """Join the process group torchrun describes in the environment; False when not under torchrun.

    gloo, whatever the device: every collective carries a few statistics on the CPU, so a process
    may hold a model spread over several GPUs (a device map) and no rank is tied to one GPU.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        return active()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda" and device.index is None and local_rank < torch.cuda.device_count():
        # One GPU per process: "cuda" means this node's LOCAL_RANK-th. (A model dispatched over
        # several GPUs names its devices itself.)
        torch.cuda.set_device(local_rank)
    store, global_rank, size = next(dist.rendezvous("env://", timeout=_TIMEOUT))
    # torchrun keeps one store for all restarts of a job: a restarted group that read the keys of
    # the attempt before it would connect to its dead processes and wait for them forever.
    attempt = f"probe/{os.environ.get('TORCHELASTIC_RUN_ID', 'run')}/{restart_count()}"
    dist.init_process_group(backend="gloo", store=dist.PrefixStore(attempt, store), rank=global_rank,
                            world_size=size, timeout=_TIMEOUT)
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
    if active() and tensor.device.type == "cpu":
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    elif active():  # through the CPU: gloo (see init_from_environment), whichever GPU holds it
        tensor.copy_(sum_across(tensor.cpu()))
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


def gather_objects(items: list) -> list:
    """Every process's `items` (picklable), joined in rank order; `items` itself in a single process."""
    if not active():
        return items
    parts: list = [None] * world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def from_leader(value: T | None = None) -> T:
    """Rank 0's `value` (picklable) in every process; `value` itself in a single process."""
    if not active():
        return value
    holder = [value if rank() == 0 else None]
    dist.broadcast_object_list(holder, src=0)
    return holder[0]


def on_leader(action: Callable[[], T]) -> T:
    """`action()` run by rank 0 alone (a check of the out folder, a file read), its result given to
    every process; a ProbeError it raises is raised in every process, so all of them stop with
    the same one line instead of waiting for rank 0 in their next collective."""
    if not active():
        return action()
    error = result = None
    if rank() == 0:
        try:
            result = action()
        except ProbeError as problem:
            error = str(problem)
    error, result = from_leader((error, result))
    if error is not None:
        raise ProbeError(error)
    return result


def barrier() -> None:
    if active():
        dist.barrier()
