"""The command line under torchrun or `accelerate launch`: one process group, work split by rank.

`logra.cli.main` calls `process_group()` around every command. Launched with WORLD_SIZE > 1 it
initialises the default group from the launcher's environment (gloo on CPUs, NCCL on GPUs) and
destroys it when the command ends. `logra log` logs each rank's contiguous share of the data into
one store; `score` and `self-influence` split the store's shards across ranks (the results equal
a single process's); `fit`, `report`, `confirm` and `verify` run on rank 0 while the other ranks
wait. Only rank 0 writes outputs and prints messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from logra.errors import LograError

RANK0_ONLY = frozenset({"fit", "report", "confirm", "validate", "verify"})


def rank_world() -> tuple[int, int]:
    """(rank, world) of the initialised group, (0, 1) without one; cheap when torch is not loaded yet."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@contextmanager
def process_group() -> Iterator[tuple[int, int]]:
    """Initialise the launcher's process group for one command (if launched so); destroy it after."""
    from logra import distributed

    if distributed.launched_world() == 1 or distributed.is_distributed():
        yield rank_world()
        return
    import torch.distributed as dist

    yield distributed.init_from_env()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def on_rank0(fn: Callable[[], int]) -> int:
    """`fn()` on rank 0 only; every rank returns its status, or raises its error (no rank is left waiting)."""
    import torch.distributed as dist

    rank, world = rank_world()
    if world == 1:
        return fn()
    status, error = 0, None
    if rank == 0:
        try:
            status = fn()
        except Exception as exc:  # re-raised below, after the other ranks are told
            error = exc
    box = [(status, None if error is None else str(error) if isinstance(error, LograError) else repr(error))]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0][1] is not None:
        raise LograError(f"rank 0 failed: {box[0][1]}")
    return int(box[0][0])
