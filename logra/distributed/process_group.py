"""The process group and the collectives logra needs, thin over `torch.distributed`.

Rank and world from an initialised group (or a launcher's environment), the contiguous shares of
examples, batches and shards each rank takes, and the few collectives the rest of
`logra.distributed` uses: a float64 all-reduce of Kronecker statistics, a rank-ordered gather of
score columns and a run-on-rank-0 that fails on every rank. Without an initialised group every
function acts as a single process (rank 0 of 1).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from logra.errors import ConfigError, StoreError
from logra.types import KroneckerStatistics

_T = TypeVar("_T")

Group = Any  # a torch.distributed ProcessGroup, or None for the default group


def is_distributed(group: Group = None) -> bool:
    """Whether a process group with more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def launched_world() -> int:
    """The process count a launcher (torchrun, `accelerate launch`) announced in WORLD_SIZE; 1 without one."""
    raw = os.environ.get("WORLD_SIZE", "1")
    try:
        return max(1, int(raw))
    except ValueError:
        raise ConfigError(f"WORLD_SIZE={raw!r} is not an integer; unset it or launch with torchrun.") from None


def rank_world(group: Group = None) -> tuple[int, int]:
    """(rank, world_size) of this process; (0, 1) without an initialised process group.

    Raises ConfigError when a launcher started several processes (WORLD_SIZE > 1) but no process
    group is initialised: every process would otherwise log as rank 0 of 1.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(group), dist.get_world_size(group)
    world = launched_world()
    if world > 1:
        raise ConfigError(
            f"this process was launched as one of WORLD_SIZE={world} processes (RANK={os.environ.get('RANK')}, "
            "set by torchrun or accelerate launch), but no torch.distributed process group is initialised, so "
            "every process would log as rank 0 of 1. Call logra.distributed.init_from_env() (or "
            "torch.distributed.init_process_group('gloo' on CPUs, 'nccl' on GPUs)) before logging, or run one process."
        )
    return 0, 1


def init_from_env(backend: str | None = None) -> tuple[int, int]:
    """Initialise the default process group from a launcher's environment; returns (rank, world).

    Under torchrun or `accelerate launch` (WORLD_SIZE > 1) with no process group yet, this calls
    `torch.distributed.init_process_group(backend)`: `backend` defaults to NCCL when CUDA is
    available (binding the process to cuda:LOCAL_RANK) and gloo otherwise. With a group already
    initialised, or without a launcher, it changes nothing.
    """
    if (dist.is_available() and dist.is_initialized()) or launched_world() == 1:
        return rank_world()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    return rank_world()


def barrier(group: Group = None) -> None:
    if is_distributed(group):
        dist.barrier(group)


def split_range(n: int, rank: int, world: int) -> range:
    """Rank `rank`'s contiguous share of `n` items: sizes differ by at most one, nothing is repeated."""
    if not 0 <= rank < world or n < 0:
        raise ConfigError(f"split_range(n={n}, rank={rank}, world={world}) needs n >= 0 and 0 <= rank < world.")
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def batches_per_rank(n_total: int, world: int, batch_size: int) -> int:
    """ceil(ceil(n_total / world) / batch_size), at least 1: the batch count of `split_batches`."""
    largest_share = -(n_total // -world)
    return max(1, -(largest_share // -batch_size))


def split_batches(indices: Sequence[int], n_total: int, world: int, batch_size: int) -> list[Sequence[int]]:
    """This rank's `indices` (its `split_range` share) cut into consecutive batches, as many on every rank.

    Every rank gets ceil(ceil(n_total / world) / batch_size) batches of near-equal size, at most
    `batch_size`: FSDP, and DDP with buffer broadcasting, run collectives in every forward, so all
    ranks must run the same number. A rank with fewer examples than batches gets fewer (and
    `check_equal_batches` says so). Batch sizes never change the logged rows.
    """
    if batch_size < 1 or world < 1:
        raise ConfigError(f"split_batches needs batch_size >= 1 and world >= 1, got {batch_size} and {world}.")
    n_batches = batches_per_rank(n_total, world, batch_size)
    base, extra = divmod(len(indices), n_batches)
    out, start = [], 0
    for b in range(n_batches):
        size = base + (1 if b < extra else 0)
        if size:
            out.append(indices[start : start + size])
        start += size
    return out


def assign_shards(shard_rows: Sequence[int], rank: int, world: int) -> range:
    """A contiguous range of shard indices for `rank`, balanced by rows.

    Rank r takes the shards whose first row lies in [r·N/W, (r+1)·N/W); concatenating the ranges
    of ranks 0..W-1 gives every shard once, in store order. Shards are never split.
    """
    if not 0 <= rank < world:
        raise ConfigError(f"assign_shards: rank={rank} must be in [0, world={world}).")
    total = sum(shard_rows)
    starts, acc = [], 0
    for rows in shard_rows:
        starts.append(acc)
        acc += rows
    owner = [min(world - 1, (s * world) // total) if total else 0 for s in starts]
    mine = [i for i, o in enumerate(owner) if o == rank]
    return range(mine[0], mine[-1] + 1) if mine else range(0)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module to attach hooks to: DDP / DataParallel / torch.compile wrappers removed.

    Layer names (and therefore projections) must be those of the bare model on every rank, so
    `module.` prefixes added by wrappers are stripped by unwrapping. FSDP2 (`fully_shard`) modifies
    modules in place and needs no unwrapping.
    """
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):  # torch.compile
            model = model._orig_mod
        else:
            return model


# --------------------------------------------------------------------------------------------
# Collectives.


def comm_device(group: Group = None) -> torch.device:
    """Where collective tensors must live: the current CUDA device under NCCL, else the CPU."""
    if is_distributed(group) and dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_statistics(stats: dict[str, KroneckerStatistics], group: Group = None) -> dict[str, KroneckerStatistics]:
    """The sum over ranks of every layer's statistics, on every rank, in one float64 all-reduce.

    Every rank must pass the same layers in the same order with the same shapes.
    """
    if not is_distributed(group):
        return {name: s.copy() for name, s in stats.items()}
    parts = []
    for s in stats.values():
        counts = torch.tensor([s.n_tokens, s.n_examples], dtype=torch.float64)
        parts += [s.input_sum.reshape(-1), s.grad_sum.reshape(-1), counts]
    flat = torch.cat(parts).to(comm_device(group))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat = flat.cpu()
    out, i = {}, 0
    for name, s in stats.items():
        a, g = s.input_sum.numel(), s.grad_sum.numel()
        out[name] = KroneckerStatistics(
            flat[i : i + a].reshape(s.input_sum.shape).clone(),
            flat[i + a : i + a + g].reshape(s.grad_sum.shape).clone(),
            int(flat[i + a + g].item()),  # float64 counts are exact below 2**53
            int(flat[i + a + g + 1].item()),
        )
        i += a + g + 2
    return out


def run_on_rank0(fn: Callable[[], _T], group: Group = None) -> _T | None:
    """Run `fn()` on rank 0 only; every rank raises if it failed there (no rank is left waiting)."""
    rank, _ = rank_world(group)
    result, error = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as exc:  # re-raised below, after the other ranks are told
            error = exc
    if is_distributed(group):
        box = [None if error is None else f"{type(error).__name__}: {error}"]
        dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        if box[0] is not None and error is None:
            raise StoreError(f"rank 0 failed to finish the store: {box[0]}")
    if error is not None:
        raise error
    return result


def gather_columns(local: Tensor, group: Group = None) -> Tensor:
    """Concatenate every rank's (Q, n_r) block along dim 1 in rank order: (Q, Σ n_r), on every rank."""
    if not is_distributed(group):
        return local
    device = comm_device(group)
    width = torch.tensor([local.shape[1]], dtype=torch.int64, device=device)
    widths = [torch.zeros_like(width) for _ in range(dist.get_world_size(group))]
    dist.all_gather(widths, width, group=group)
    sizes = [int(w.item()) for w in widths]
    padded = torch.zeros(local.shape[0], max(sizes), dtype=local.dtype, device=device)
    padded[:, : local.shape[1]] = local.to(device)
    blocks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(blocks, padded, group=group)
    return torch.cat([b[:, :n] for b, n in zip(blocks, sizes)], dim=1).to(local.device)
