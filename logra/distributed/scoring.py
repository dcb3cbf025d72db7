"""Scoring split across ranks: each rank scores a contiguous range of shards; columns are gathered in store order.

The result of every `DistributedScorer` method is what `Scorer` returns for the whole store on one
process; `shared_preconditioner` fits once on rank 0 and loads the saved fit on every rank.
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import torch
from torch import Tensor

from logra.curvature.precondition import Preconditioner, PreconditionerMethod, fit_preconditioner
from logra.curvature.saved import load_preconditioner
from logra.distributed.process_group import Group, assign_shards, gather_columns, rank_world, run_on_rank0
from logra.errors import ConfigError
from logra.score import Queries, Scorer, TopK
from logra.store.reader import GradientStore


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
