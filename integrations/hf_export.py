"""Scores back to the data: a `datasets.Dataset` column, a long table, parquet.

Rows are joined by example id (the store's ids: a dataset id column or row indices), never by
position, so a shuffled, filtered or distributed-logged store still lands on the right rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from logra.errors import ConfigError
from logra.score import TopK
from logra.store.files import write_durable
from logra.types import ExampleId

from .hf import dataset_ids


def add_scores_column(
    dataset: Any,
    scores: Tensor | np.ndarray,
    ids: Sequence[ExampleId],
    *,
    id_column: str | None = None,
    name: str = "influence",
) -> Any:
    """`dataset` with a float column `name`: scores [N] matched to its rows by id.

    Args:
        dataset: a `datasets.Dataset` (the one that was logged).
        scores: [N] one score per store row (a tensor or a numpy array), e.g. `scores[q]` for query q
            (also a row of the matrix `logra score --matrix` writes), or self-influence.
        ids: the N store ids of `scores` (`store.ids`).
        id_column: the dataset's id column as used for logging; None for row indices.

    Rows of `dataset` that are not in the store (e.g. skipped for NaN) get None.
    """
    if isinstance(scores, np.ndarray) and scores.dtype.kind in "fiu":
        scores = torch.from_numpy(np.ascontiguousarray(scores))  # a row of a score matrix (np.load) works too
    if not isinstance(scores, Tensor) or scores.dim() != 1 or scores.shape[0] != len(ids):
        if isinstance(scores, Tensor):
            what = f"scores of shape {tuple(scores.shape)}"
        elif isinstance(scores, np.ndarray):
            what = f"a numpy array of dtype {scores.dtype} and shape {scores.shape}"
        else:
            what = f"scores of type {type(scores).__name__}"
        raise ConfigError(
            f"{what}: scores must be a float tensor or numpy array of shape [N={len(ids)}], one per id; pick one "
            "query: scores[q]."
        )
    if name in dataset.column_names:
        raise ConfigError(f"the dataset already has a column {name!r}; pass another name=.")
    position = {i: j for j, i in enumerate(ids)}
    values = scores.detach().to("cpu", torch.float64).tolist()
    rows = dataset_ids(dataset, id_column)
    if not any(i in position for i in rows):
        raise ConfigError(
            f"no id of the dataset ({rows[:3]} ...) is among the scored ids ({list(ids[:3])} ...); pass the id_column "
            "used for logging."
        )
    return dataset.add_column(name, [values[position[i]] if i in position else None for i in rows])


def scores_table(scores: Tensor, train_ids: Sequence[ExampleId], query_ids: Sequence[ExampleId]) -> Any:
    """A long `datasets.Dataset` with columns query_id, train_id, score: Q·N rows of a [Q, N] matrix."""
    from datasets import Dataset

    if scores.dim() != 2 or tuple(scores.shape) != (len(query_ids), len(train_ids)):
        raise ConfigError(f"scores of shape {tuple(scores.shape)} must be [Q={len(query_ids)}, N={len(train_ids)}].")
    Q, N = scores.shape
    return Dataset.from_dict({
        "query_id": [q for q in query_ids for _ in range(N)],
        "train_id": list(train_ids) * Q,
        "score": scores.detach().to("cpu", torch.float64).reshape(-1).tolist(),
    })  # fmt: skip


def top_k_table(top: TopK, query_ids: Sequence[ExampleId]) -> Any:
    """A long `datasets.Dataset` of a `TopK`: query_id, kind ("helpful"/"harmful"), rank, train_id, score."""
    from datasets import Dataset

    columns: dict[str, list[Any]] = {"query_id": [], "kind": [], "rank": [], "train_id": [], "score": []}
    if len(query_ids) != len(top.helpful_ids):
        raise ConfigError(f"{len(query_ids)} query ids for a top-k of {len(top.helpful_ids)} queries.")
    for kind, ids, values in (("helpful", top.helpful_ids, top.helpful_scores),
                              ("harmful", top.harmful_ids, top.harmful_scores)):  # fmt: skip
        for q, (row_ids, row_values) in enumerate(zip(ids, values.tolist())):
            for rank, (train_id, score) in enumerate(zip(row_ids, row_values)):
                for key, value in zip(columns, (query_ids[q], kind, rank, train_id, score)):
                    columns[key].append(value)
    return Dataset.from_dict(columns)


def save_parquet(table: Any, path: str | os.PathLike[str]) -> None:
    """Write a `datasets.Dataset` (e.g. from `scores_table`) to a parquet file, whole or not at all."""
    write_durable(path, lambda f: table.to_parquet(f))
