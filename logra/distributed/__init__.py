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

The package: `process_group` (rank and world, work splits, the collectives), `logger` (the agreement
check, `finalize_store`) and `scoring` (`DistributedScorer`); every name is importable from here.
"""

from logra.distributed.logger import (
    check_agreement,
    distributed_logger,
    finalize_store,
    open_logger,
    projection_digest,
)
from logra.distributed.process_group import (
    Group,
    all_reduce_statistics,
    assign_shards,
    barrier,
    batches_per_rank,
    comm_device,
    gather_columns,
    init_from_env,
    is_distributed,
    launched_world,
    rank_world,
    run_on_rank0,
    split_batches,
    split_range,
    unwrap_model,
)
from logra.distributed.scoring import DistributedScorer, shard_view, shared_preconditioner

__all__ = [
    "DistributedScorer",
    "Group",
    "all_reduce_statistics",
    "assign_shards",
    "barrier",
    "batches_per_rank",
    "check_agreement",
    "comm_device",
    "distributed_logger",
    "finalize_store",
    "gather_columns",
    "init_from_env",
    "is_distributed",
    "launched_world",
    "open_logger",
    "projection_digest",
    "rank_world",
    "run_on_rank0",
    "shard_view",
    "shared_preconditioner",
    "split_batches",
    "split_range",
    "unwrap_model",
]
