"""Ensembles: the weighted mean of scores from several models (seeds, checkpoints), as TRAK does.

One model's influence scores are noisy: they depend on the seed and the point of training at
which the gradients were taken. Averaging the scores of several independently trained models
(or checkpoints of one run) over the same training and query examples reduces that noise
(TRAK, Park et al. 2023, averages over models; TracIn sums over checkpoints weighted by their
learning rates, `logra.integrations.hf_callback.tracin_scores`).

    result = logra.ensemble_scores([(scorer_seed0, queries_seed0), (scorer_seed1, queries_seed1)])

Members are aligned by id: rows follow the first member's query ids, columns its training ids,
and every member must hold exactly those ids (in any order).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from logra.errors import ConfigError
from logra.score import Queries, Scorer
from logra.types import ExampleId


@dataclass(frozen=True)
class EnsembleScores:
    """scores [Q, N] (float64), rows by `query_ids`, columns by `train_ids`."""

    scores: Tensor
    train_ids: list[ExampleId]
    query_ids: list[ExampleId]


def align(
    scores: Tensor,
    query_ids: Sequence[ExampleId],
    train_ids: Sequence[ExampleId],
    to_query_ids: Sequence[ExampleId],
    to_train_ids: Sequence[ExampleId],
    what: str,
) -> Tensor:
    """scores [Q, N] with rows reordered to `to_query_ids` and columns to `to_train_ids`.

    Raises ConfigError naming `what` unless both id sets are the same.
    """
    row = {i: j for j, i in enumerate(query_ids)}
    col = {i: j for j, i in enumerate(train_ids)}
    if set(row) != set(to_query_ids) or set(col) != set(to_train_ids):
        extra = sorted(map(str, (set(col) ^ set(to_train_ids)) | (set(row) ^ set(to_query_ids))))
        raise ConfigError(
            f"{what} holds other examples than the first member (ids {extra[:5]} are in one only), so their scores "
            "cannot be averaged; log every member on the same training and query examples."
        )
    return scores[[row[i] for i in to_query_ids]][:, [col[i] for i in to_train_ids]]


def query_ids_of(queries: Queries) -> list[ExampleId]:
    """The ids of query rows (a GradientStore, a Record or QueryRows); bare tensors have none."""
    ids = getattr(queries, "ids", None)
    if isinstance(queries, Tensor) or ids is None:
        raise ConfigError(
            "an ensemble aligns members by query id, but bare query tensors carry no ids; pass a query "
            "GradientStore, a Record or QueryRows."
        )
    return list(ids)


def mean_scores(
    members: Sequence[tuple[Tensor, Sequence[ExampleId], Sequence[ExampleId]]],
    weights: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> EnsembleScores:
    """Σ_m w_m S_m / Σ_m w_m of (scores [Q, N], query ids, train ids) members, aligned to the first.

    weights: one finite, non-negative value per member with a positive sum; default: equal.
    """
    if not members:
        raise ConfigError("an ensemble needs at least one member.")
    w = [1.0] * len(members) if weights is None else [float(x) for x in weights]
    if len(w) != len(members) or not all(math.isfinite(x) and x >= 0 for x in w) or sum(w) <= 0:
        raise ConfigError(
            f"weights={list(weights or [])} must be {len(members)} finite non-negative numbers with a positive sum."
        )
    first, q_ids, t_ids = members[0]
    total = torch.zeros(first.shape, dtype=torch.float64)
    for m, ((scores, qi, ti), wm) in enumerate(zip(members, w)):
        what = names[m] if names is not None else f"ensemble member {m}"
        total += wm * align(scores.to(torch.float64), qi, ti, q_ids, t_ids, what)
    return EnsembleScores(total / sum(w), list(t_ids), list(q_ids))


def ensemble_scores(
    members: Sequence[tuple[Scorer, Queries]], weights: Sequence[float] | None = None
) -> EnsembleScores:
    """The weighted mean (default: the mean) of the scores of several (Scorer, queries) pairs.

    Each pair is one model: its training store with its preconditioner, and the queries logged
    with that model. Rows and columns are aligned by id to the first pair (module docstring).
    """
    parts = []
    for scorer, queries in members:
        if not isinstance(scorer, Scorer):
            raise ConfigError(f"ensemble members are (Scorer, queries) pairs, got {type(scorer).__name__}.")
        ids = query_ids_of(queries)  # before scoring: bare rows are refused, not scored
        parts.append((scorer.score(queries), ids, list(scorer.store.ids)))
    names = [f"the store at {scorer.store.root}" for scorer, _ in members]
    return mean_scores(parts, weights, names)
