"""Multi-process logging and scoring, thin over `torch.distributed` (gloo on CPU, NCCL on GPU).

Launched by `torchrun` or `accelerate launch`, every rank logs its own share of the corpus into
its own shards of *one* store, then `finalize_store` all-reduces the Kronecker statistics once
and rank 0 writes the single `manifest.json` listing every rank's shards::

    with logra.distributed.distributed_logger(model, config, "runs/train") as logger:
        for i in split_range(len(dataset), *rank_world()):   # this rank's contiguous share
            ...                                              # logger.record(...) as usual
    store = GradientStore.open("runs/train")                 # on every rank, after the block

Before anything is logged, `check_agreement` gathers every rank's config, model fingerprint,
layer table and a hash of every projection matrix, and raises `ConfigError` naming the ranks and
fields that disagree. Scoring splits the store's shards into contiguous, row-balanced ranges, one
per rank; the score columns are gathered (or the per-rank top-k merged) in store row order, so the
result is the same as on one process. Without an initialised process group every function acts
as a single process (rank 0 of 1), except that a launcher's WORLD_SIZE > 1 without a group is an
error; `init_from_env` initialises the group a launcher describes. A plain `GradientLogger` with a
store takes its rank from the group too, and merges the store when its `with` block ends.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn

from logra.capture.logger import GradientLogger
from logra.config import LoGraConfig
from logra.curvature.precondition import Preconditioner, PreconditionerMethod, fit_preconditioner
from logra.curvature.saved import load_preconditioner
from logra.errors import ConfigError, StoreError
from logra.score import Queries, Scorer, TopK
from logra.store.manifest import rank_manifest_name, read_manifest
from logra.store.merge import merge_rank_manifests
from logra.store.reader import GradientStore
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
# Agreement between ranks.


def projection_digest(logger: GradientLogger) -> str:
    """A sha256 of every layer's name, shapes and float64 projection matrices (P_in, P_out)."""
    h = hashlib.sha256()
    for layer in logger.layers:
        p_in, p_out = logger.projection(layer.name)
        h.update(f"{layer.name}|{tuple(p_in.shape)}|{tuple(p_out.shape)}".encode())
        h.update(p_in.contiguous().numpy().tobytes())
        h.update(p_out.contiguous().numpy().tobytes())
    return h.hexdigest()


def _agreement_record(logger: GradientLogger) -> dict[str, Any]:
    return {
        "config": logger.config.to_dict(),
        "model": logger.model_fingerprint,
        "layers": [layer.to_dict() for layer in logger.layers],
        "projections": projection_digest(logger),
    }


def check_agreement(logger: GradientLogger, group: Group = None) -> None:
    """Raise ConfigError on every rank unless all ranks log the same config, model and projections."""
    if not is_distributed(group):
        return
    mine = _agreement_record(logger)
    records: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(records, mine, group=group)
    problems = [_describe_difference(r, records[0], rec) for r, rec in enumerate(records) if rec != records[0]]
    if problems:
        raise ConfigError(
            "ranks disagree on what to log: " + "; ".join(problems) + ". Every rank must build the same model "
            "(same weights) and pass the same LoGraConfig; a differing projection with the same config means the "
            "ranks run different torch versions."
        )


def _describe_difference(rank: int, ref: dict[str, Any], rec: dict[str, Any]) -> str:
    if rec["config"] != ref["config"]:
        diff = {k: (ref["config"].get(k), v) for k, v in rec["config"].items() if ref["config"].get(k) != v}
        return f"rank {rank} has config fields (rank 0, rank {rank}) {diff}"
    if rec["layers"] != ref["layers"]:
        names = [layer["name"] for layer in rec["layers"]]
        return f"rank {rank} logs layers {names[:6]} with another layer table than rank 0"
    if rec["model"] != ref["model"]:
        return f"rank {rank} has other model weights than rank 0 (fingerprint {rec['model']} vs {ref['model']})"
    return f"rank {rank} drew other projection matrices than rank 0 (digest {rec['projections'][:16]})"


# --------------------------------------------------------------------------------------------
# Statistics and the merged store.


def _comm_device(group: Group = None) -> torch.device:
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
    flat = torch.cat(parts).to(_comm_device(group))
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


def open_logger(
    model: nn.Module,
    config: LoGraConfig | None,
    store: str | os.PathLike[str] | None,
    *,
    group: Group = None,
    **kwargs: Any,
) -> GradientLogger:
    """A GradientLogger for this rank (wrappers removed), after checking that all ranks agree.

    `kwargs` go to GradientLogger (shard_rows, statistics). Call `finalize_store` on every rank
    when logging is done.
    """
    rank, world = rank_world(group)
    logger = GradientLogger(unwrap_model(model), config, store, rank=rank, world_size=world, **kwargs)
    try:
        check_agreement(logger, group)
    except BaseException:
        logger.close()
        raise
    return logger


def finalize_store(logger: GradientLogger, group: Group = None) -> GradientStore | None:
    """Close `logger` on every rank, all-reduce its statistics once and merge the rank manifests.

    Returns the merged store, opened on every rank (None for a logger without a store). With one
    process this is `logger.close()` and `GradientStore.open`.
    """
    path = logger.store_path
    rank, world = rank_world(group)
    logger.close()
    if path is None:
        return None
    if world == 1:
        return GradientStore.open(path)
    # A rank that logged nothing committed no statistics file; it still contributes (zero) sums.
    has_stats = torch.tensor([int(read_manifest(path, rank_manifest_name(rank)).statistics is not None)])
    has_stats = has_stats.to(_comm_device(group))
    dist.all_reduce(has_stats, op=dist.ReduceOp.MAX, group=group)
    stats = all_reduce_statistics(logger.statistics(), group) if int(has_stats.item()) else None
    barrier(group)  # every rank's manifest is durable before rank 0 reads them
    run_on_rank0(lambda: merge_rank_manifests(path, world, stats), group)
    return GradientStore.open(path)


@contextmanager
def distributed_logger(
    model: nn.Module,
    config: LoGraConfig | None,
    store: str | os.PathLike[str],
    *,
    group: Group = None,
    **kwargs: Any,
) -> Iterator[GradientLogger]:
    """`open_logger` ... `finalize_store` as a block. On an exception the rank's logger is closed
    (its complete batches committed) but nothing is merged; rerun with the same processes to resume."""
    logger = open_logger(model, config, store, group=group, **kwargs)
    try:
        yield logger
    except BaseException:
        logger.close()
        raise
    finalize_store(logger, group)


# --------------------------------------------------------------------------------------------
# Gathering.


def gather_columns(local: Tensor, group: Group = None) -> Tensor:
    """Concatenate every rank's (Q, n_r) block along dim 1 in rank order: (Q, Σ n_r), on every rank."""
    if not is_distributed(group):
        return local
    device = _comm_device(group)
    width = torch.tensor([local.shape[1]], dtype=torch.int64, device=device)
    widths = [torch.zeros_like(width) for _ in range(dist.get_world_size(group))]
    dist.all_gather(widths, width, group=group)
    sizes = [int(w.item()) for w in widths]
    padded = torch.zeros(local.shape[0], max(sizes), dtype=local.dtype, device=device)
    padded[:, : local.shape[1]] = local.to(device)
    blocks = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(blocks, padded, group=group)
    return torch.cat([b[:, :n] for b, n in zip(blocks, sizes)], dim=1).to(local.device)


# --------------------------------------------------------------------------------------------
# Scoring: each rank scores a contiguous range of shards; columns are gathered in store order.


def shard_view(store: GradientStore, shards: range) -> tuple[GradientStore, int]:
    """A read-only store of the shards `shards` of `store`, and the store row of its first row."""
    manifest = dataclasses.replace(store.manifest, shards=tuple(store.manifest.shards[i] for i in shards))
    first_row = sum(s.rows for s in store.manifest.shards[: shards.start])
    return GradientStore(store.root, manifest, statistics_rows=len(store)), first_row


def shared_preconditioner(
    store: GradientStore,
    method: PreconditionerMethod | str,
    directory: str | os.PathLike[str],
    *,
    group: Group = None,
    **kwargs: Any,
) -> Preconditioner:
    """Fit a preconditioner once, on rank 0, save it to `directory` and load it on every rank.

    Worth it for ekfac and raw, whose fit reads every row; `kwargs` go to `fit_preconditioner`.
    """
    run_on_rank0(lambda: fit_preconditioner(store, method, **kwargs).save(directory), group)
    return load_preconditioner(directory)


def _query_count(queries: Queries) -> int:
    """Q, the number of query rows (a Tensor, a query GradientStore, a Record or QueryRows)."""
    if isinstance(queries, GradientStore):
        return len(queries)
    rows = queries if isinstance(queries, Tensor) else queries.rows
    if rows is None:
        raise ConfigError("the query Record has no rows yet; score it after its record() block has exited.")
    return int(rows.shape[0])


class DistributedScorer:
    """A `Scorer` whose training rows are split across ranks; results are gathered on every rank.

    Rank r scores the shards `assign_shards` gives it (contiguous, balanced by rows). Every rank
    must call the same methods with the same query rows; each returns what `Scorer` returns for
    the whole store on one process (scores [Q, N] in store row order, top-k merged, self-influence
    [N]). `scorer_kwargs` go to `Scorer` (query_config, compute_dtype, device, progress).
    """

    def __init__(
        self,
        store: GradientStore,
        preconditioner: Preconditioner,
        normalization: Any = "dot",
        chunk_rows: int = 4096,
        *,
        group: Group = None,
        **scorer_kwargs: Any,
    ) -> None:
        rank, world = rank_world(group)
        self.store = store
        self.group = group
        self.shards = assign_shards([s.rows for s in store.manifest.shards], rank, world)
        self.local, self.first_row = shard_view(store, self.shards)
        self.scorer = Scorer(self.local, preconditioner, normalization, chunk_rows, **scorer_kwargs)

    def provenance(self, query_rows: Any = None) -> dict[str, str]:
        """`Scorer.provenance` of the whole store (not of this rank's shards)."""
        return {**self.scorer.provenance(query_rows), "store": self.store.fingerprint}

    def score(self, query_rows: Queries) -> Tensor:
        """[Q, N] scores of every query against every training row, on every rank."""
        return gather_columns(self.scorer.score(query_rows), self.group)

    def self_influence(self) -> Tensor:
        """[N] self-influence of every training row, on every rank."""
        return gather_columns(self.scorer.self_influence()[None, :], self.group)[0]

    def top_k(self, query_rows: Queries, k: int = 10) -> TopK:
        """The k most helpful and most harmful training rows per query: per-rank top-k, merged."""
        n = len(self.store)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ConfigError(f"k={k!r} must be an int between 1 and the store's {n} rows.")
        Q = _query_count(query_rows)
        k_local = min(k, len(self.local))
        local = self.scorer.top_k(query_rows, k_local) if k_local else None
        merged = []
        for largest in (True, False):
            values = torch.full((Q, k), -math.inf if largest else math.inf, dtype=self.scorer.compute_dtype)
            rows = torch.full((Q, k), -1, dtype=torch.long)
            if local is not None:
                v = local.helpful_scores if largest else local.harmful_scores
                r = local.helpful_rows if largest else local.harmful_rows
                values[:, :k_local], rows[:, :k_local] = v.cpu(), r.cpu() + self.first_row
            all_values, all_rows = gather_columns(values, self.group), gather_columns(rows, self.group)
            top = all_values.topk(k, dim=1, largest=largest, sorted=True)
            merged.append((top.values, all_rows.gather(1, top.indices)))
        ids = self.store.ids
        (hv, hr), (lv, lr) = merged
        helpful, harmful = [[ids[j] for j in r] for r in hr.tolist()], [[ids[j] for j in r] for r in lr.tolist()]
        return TopK(helpful, hv, harmful, lv, hr, lr)
