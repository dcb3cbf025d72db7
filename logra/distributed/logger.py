"""Logging on every rank into one store: the agreement check before, the statistics and manifest merge after.

`open_logger` builds this rank's `GradientLogger` and checks, with one all-gather, that every rank
logs the same config, model and projections; `finalize_store` closes it, all-reduces the
Kronecker statistics once and has rank 0 merge the rank manifests; `distributed_logger` is the two
as a `with` block.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from logra.capture.logger import GradientLogger
from logra.config import LoGraConfig
from logra.distributed.process_group import (
    Group,
    all_reduce_statistics,
    barrier,
    comm_device,
    is_distributed,
    rank_world,
    run_on_rank0,
    unwrap_model,
)
from logra.errors import ConfigError
from logra.store.manifest import rank_manifest_name, read_manifest
from logra.store.merge import merge_rank_manifests
from logra.store.reader import GradientStore

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
# The merged store.


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
    has_stats = has_stats.to(comm_device(group))
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
