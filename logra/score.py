"""Scoring: influence of every stored training example on a few query gradients.

score(q, i) = g_qᵀ H⁻¹ g_i, where g are projected per-example gradients and H⁻¹ the fitted
preconditioner. Sign and scale: a positive score means up-weighting training example i lowers
the query's loss (i is helpful); with H the mean per-example curvature of N training examples,
removing i raises the query's loss by about score / N.

The `Scorer` preconditions the queries once (float64), then streams the store in chunks and does
one matmul per chunk, [Q, D] @ [D, n], in the compute dtype (half stores are upcast a few hundred
rows at a time, into a reused buffer that stays in cache). Peak memory is one chunk plus the
queries, whatever N; the full [Q, N] matrix can go to a memory-mapped .npy file, whose space is
reserved (posix_fallocate) before the map is written, so a full disk raises `StoreError` instead
of killing the process with SIGBUS. Top-k keeps a running [Q, k] per query, merged with torch.topk.

Queries are checked against the store: a query `GradientStore`, a `Record` of
`GradientLogger.record` or a `QueryRows` carry their config, layer table and model fingerprint,
and `check_compatible` refuses a mismatch. Bare [Q, D] tensors cannot be checked; they get a
warning unless `query_config=` was given. `Scorer.provenance` names the store, preconditioner and
queries a score came from (fingerprints), for every output to carry.

Normalisations: "dot" (the score above), "cosine" (divided by sqrt(g_qᵀH⁻¹g_q · g_iᵀH⁻¹g_i),
the cosine in the H⁻¹ metric), "relative" (RelatIF: divided by sqrt(g_iᵀH⁻¹g_i), the training
example's self-influence norm). A training row whose self-influence is 0 (a zero gradient) gets
score 0 under cosine and relative; so does a zero query under cosine.
"""

from __future__ import annotations

import contextlib
import enum
import hashlib
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from logra.config import LoGraConfig
from logra.curvature.precondition import Preconditioner
from logra.curvature.saved import preconditioner_fingerprint
from logra.errors import ConfigError, NonFiniteGradientError, StoreError
from logra.store.files import TMP_SUFFIX, fsync_dir, no_space, preallocate
from logra.store.reader import GradientStore, LoggedRows, check_compatible
from logra.types import ExampleId, parse_enum

Queries = Tensor | GradientStore | LoggedRows  # LoggedRows: a capture Record or a QueryRows
_BLOCK_ROWS = 512  # rows upcast per matmul in `Scorer._scores`: 2 MiB of float32 at D = 1024


class Normalization(str, enum.Enum):
    """How raw scores g_qᵀH⁻¹g_i are normalised (see the module docstring)."""

    DOT = "dot"
    COSINE = "cosine"
    RELATIVE = "relative"


@dataclass(frozen=True)
class TopK:
    """The k most helpful and k most harmful training examples of each query.

    helpful_ids[q]: ids by decreasing score (largest positive first); helpful_scores [Q, k].
    harmful_ids[q]: ids by increasing score (most negative first); harmful_scores [Q, k].
    helpful_rows / harmful_rows [Q, k]: the same examples as store row indices.
    """

    helpful_ids: list[list[ExampleId]]
    helpful_scores: Tensor
    harmful_ids: list[list[ExampleId]]
    harmful_scores: Tensor
    helpful_rows: Tensor
    harmful_rows: Tensor


@dataclass(frozen=True)
class _Queries:
    """Query rows ready for the matmul: preconditioned [Q, D] and the cosine row scale [Q] or None."""

    pre: Tensor
    scale: Tensor | None


def _check_preconditioner(store: GradientStore, preconditioner: Preconditioner) -> None:
    """Raise ConfigError unless `preconditioner` was fitted on a store with `store`'s projections."""
    expected = store.config.projection_fingerprint()
    if preconditioner.fingerprint != expected or tuple(preconditioner.layers) != tuple(store.layers):
        raise ConfigError(
            f"the preconditioner was fitted on a store with projection fingerprint {preconditioner.fingerprint} and "
            f"{len(preconditioner.layers)} layers, but the store at {store.root} has {expected} and "
            f"{len(store.layers)} layers; fit it on this store (fit_preconditioner(store, ...))."
        )


class Scorer:
    """Streamed influence scores of query gradients against a training store.

    Args:
        store: the training `GradientStore`.
        preconditioner: fitted on a store with the same projections (`fit_preconditioner`).
        normalization: dot | cosine | relative.
        chunk_rows: training rows per matmul; does not change results beyond rounding.
        query_config: optional LoGraConfig or GradientLogger the queries were logged with; it is
            checked with `logra.store.check_compatible` (projections, layer table, model).
        check_model: for a GradientLogger or query store, also require the store's model weights.
        compute_dtype: dtype of the matmul; default float32, or float64 for a float64 store.
        device: where chunks are multiplied (e.g. "cuda"); default: the CPU.
        progress: tqdm bar over chunks (None: only on a terminal).
    """

    def __init__(
        self,
        store: GradientStore,
        preconditioner: Preconditioner,
        normalization: Normalization | str = Normalization.DOT,
        chunk_rows: int = 4096,
        *,
        query_config: Any = None,
        check_model: bool = True,
        compute_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        progress: bool | None = None,
    ) -> None:
        if not isinstance(store, GradientStore):
            raise ConfigError(f"Scorer needs a GradientStore (GradientStore.open(path)), got {type(store).__name__}.")
        if not isinstance(preconditioner, Preconditioner):
            raise ConfigError(f"Scorer needs a fit_preconditioner(...) result, got {type(preconditioner).__name__}.")
        _check_preconditioner(store, preconditioner)
        if query_config is not None:
            check_compatible(store, query_config, check_model=check_model)
        self.normalization = parse_enum(Normalization, normalization, "normalization")
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise ConfigError(f"chunk_rows={chunk_rows!r} must be a positive int.")
        self.store = store
        self.preconditioner = preconditioner
        self.chunk_rows = chunk_rows
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.compute_dtype = compute_dtype or (torch.float64 if store.dtype.value == "float64" else torch.float32)
        if self.compute_dtype not in (torch.float32, torch.float64):
            raise ConfigError(f"compute_dtype={self.compute_dtype} must be torch.float32 or torch.float64.")
        self.progress = progress
        self.check_model = check_model
        self._queries_checked = query_config is not None  # bare tensors then need no warning
        self._chunk_pre = preconditioner.to(self.device, self.compute_dtype)
        self._buffer: Tensor | None = None  # `_decoded`'s reused chunk
        self._block: Tensor | None = None  # `_scores`'s reused block

    # ------------------------------------------------------------ public surface

    def score(self, query_rows: Queries, out: str | os.PathLike[str] | None = None) -> Tensor:
        """Scores [Q, N] of every query against every training row.

        Args:
            query_rows: a `Record` or `QueryRows` of queries logged with the store's config, a query
                GradientStore, or bare [Q, D] rows (unchecked: a warning says so).
            out: a path: write a float32 [Q, N] .npy there and return a tensor view of its memory
                map. Its bytes are reserved first; on a full disk a StoreError names the path and
                the bytes needed, and nothing is left behind. The file appears whole or not at all.
        """
        q = self._prepare(query_rows)
        Q, N = q.pre.shape[0], len(self.store)
        if out is None:
            result = torch.empty(Q, N, dtype=self.compute_dtype)
            self._fill(result, q)
            return result
        path = Path(out)
        tmp = path.with_name(path.name + TMP_SUFFIX)
        try:
            memmap = _reserved_memmap(tmp, Q, N)
            self._fill(torch.from_numpy(memmap), q)
            memmap.flush()
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
            fsync_dir(path.parent)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                tmp.unlink()
            if isinstance(exc, OSError) and not isinstance(exc, StoreError):
                raise no_space(path, 128 + 4 * Q * N, exc) from None
            raise
        return torch.from_numpy(memmap)

    def _fill(self, result: Tensor, q: _Queries) -> None:
        """Write the scores [Q, N] of the prepared queries into `result`, chunk by chunk."""
        for start, chunk, col_scale in self._stream(self.normalization is not Normalization.DOT):
            result[:, start : start + chunk.shape[0]] = self._normalize(
                self._scores(q.pre, chunk), q.scale, col_scale
            ).cpu()

    def provenance(self, query_rows: Queries | None = None) -> dict[str, str]:
        """Fingerprints of what a score comes from: store, preconditioner and (when given) queries.

        store: the SHA-256 of the store's signed manifest (it names the checksum of every file).
        preconditioner: a SHA-256 over its method, Fisher kind, damping and factor bytes.
        queries: a SHA-256 over the query rows (float64) and the config they were logged with.
        """
        out = {"store": self.store.fingerprint, "preconditioner": preconditioner_fingerprint(self.preconditioner)}
        if query_rows is not None:
            rows, config = _rows_of(query_rows)
            h = hashlib.sha256((config.fingerprint() if config is not None else "unchecked").encode())
            h.update(rows.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
            out["queries"] = h.hexdigest()
        return out

    def score_by_layer(self, query_rows: Queries) -> dict[str, Tensor]:
        """{layer: [Q, N]}: the per-layer terms of `score`, in layer-table order; they sum to the total.

        Under cosine/relative normalisation each term is divided by the same total norms.
        """
        q = self._prepare(query_rows)
        Q, N = q.pre.shape[0], len(self.store)
        results = {layer.name: torch.empty(Q, N, dtype=self.compute_dtype) for layer in self.store.layers}
        for start, chunk, col_scale in self._stream(self.normalization is not Normalization.DOT):
            stop, chunk = start + chunk.shape[0], self._decoded(chunk)
            for layer in self.store.layers:
                cols = slice(layer.offset, layer.offset + layer.size)
                part = self._normalize(q.pre[:, cols] @ chunk[:, cols].T, q.scale, col_scale)
                results[layer.name][:, start:stop] = part.cpu()
        return results

    def top_k(self, query_rows: Queries, k: int = 10) -> TopK:
        """The k most helpful (largest) and k most harmful (smallest) scores per query, with ids."""
        n = len(self.store)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
            raise ConfigError(f"k={k!r} must be an int between 1 and the store's {n} rows.")
        q = self._prepare(query_rows)
        Q = q.pre.shape[0]
        empty = (torch.empty(Q, 0, dtype=self.compute_dtype), torch.empty(Q, 0, dtype=torch.long))
        best = {True: empty, False: empty}  # largest -> (values [Q, <=k], row indices [Q, <=k])
        for start, chunk, col_scale in self._stream(self.normalization is not Normalization.DOT):
            s = self._normalize(self._scores(q.pre, chunk), q.scale, col_scale).cpu()  # (Q, n)
            rows = torch.arange(start, start + s.shape[1]).expand(Q, -1)
            for largest, (values, index) in best.items():
                values, index = torch.cat([values, s], dim=1), torch.cat([index, rows], dim=1)
                top = values.topk(min(k, values.shape[1]), dim=1, largest=largest, sorted=True)
                best[largest] = (top.values, index.gather(1, top.indices))
        ids = self.store.ids
        (hv, hi), (lv, li) = best[True], best[False]
        helpful, harmful = ([[ids[j] for j in r] for r in x.tolist()] for x in (hi, li))
        return TopK(helpful, hv, harmful, lv, hi, li)

    def checked_queries(self, query_rows: Queries) -> Tensor:
        """The query rows [Q, D] as float64, after the checks every score makes (config, shape, finite)."""
        self._prepare(query_rows)
        return _rows_of(query_rows)[0].detach().to("cpu", torch.float64)

    def score_rows(self, query_rows: Queries, rows: Tensor) -> Tensor:
        """Exact scores [Q, m] of the queries against the training rows at indices `rows` [m].

        The same normalisation as `score`: equal to `score(query_rows)[:, rows]` up to rounding.
        """
        q = self._prepare(query_rows)
        chunk = self.store.take(rows).to(device=self.device, dtype=self.compute_dtype)
        need_scale = self.normalization is not Normalization.DOT
        col_scale = _inverse_sqrt(self._self_influence(chunk)) if need_scale else None
        return self._normalize(q.pre @ chunk.T, q.scale, col_scale).cpu()

    def self_influence(self) -> Tensor:
        """g_iᵀ H⁻¹ g_i for every training row: [N] (not normalised), in the compute dtype."""
        out = torch.empty(len(self.store), dtype=self.compute_dtype)
        for start, chunk in self._chunks():
            out[start : start + chunk.shape[0]] = self._self_influence(chunk).cpu()
        return out

    # ------------------------------------------------------------ internals

    def _prepare(self, queries: Queries) -> _Queries:
        """Check the queries, precondition them once in float64, move them to the compute device."""
        if isinstance(queries, Tensor):
            if not self._queries_checked:
                warnings.warn(
                    "Scorer got bare query rows, so it cannot check that they were logged with the store's seed, "
                    "projection sizes, init and model. Pass the Record of GradientLogger.record (or a QueryRows, "
                    "or a query GradientStore) instead of its .rows, or give Scorer(..., query_config=logger).",
                    UserWarning,
                    stacklevel=3,
                )
        else:
            if not isinstance(queries, GradientStore) and not isinstance(getattr(queries, "config", None), LoGraConfig):
                raise ConfigError(
                    f"queries of type {type(queries).__name__} carry no LoGraConfig; pass a Record, QueryRows, query "
                    "GradientStore or a [Q, D] tensor."
                )
            check_compatible(self.store, queries, check_model=self.check_model)
        query, _ = _rows_of(queries)
        D = self.store.dim
        if not isinstance(query, Tensor) or query.dim() != 2 or query.shape[1] != D or query.shape[0] < 1:
            shape = tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__
            raise ConfigError(
                f"query rows must be a [Q >= 1, D={D}] tensor of projected gradients, got {shape}; log the queries "
                "with the store's LoGraConfig (rows from GradientLogger(model, store.config).record(...))."
            )
        if not query.is_floating_point():
            raise ConfigError(f"query rows have dtype {query.dtype}; they must be floating point gradients.")
        q64 = query.detach().to("cpu", torch.float64)
        if not torch.isfinite(q64).all():
            bad = (~torch.isfinite(q64).all(dim=1)).nonzero().flatten().tolist()
            raise NonFiniteGradientError(f"query rows {bad[:10]} contain NaN or Inf; fix the query loss or drop them.")
        pre = self.preconditioner.apply(q64)  # (Q, D) float64
        scale = None
        if self.normalization is Normalization.COSINE:
            scale = _inverse_sqrt((pre * q64).sum(dim=1)).to(self.device, self.compute_dtype)
        return _Queries(pre.to(self.device, self.compute_dtype), scale)

    def _chunks(self) -> Iterator[tuple[int, Tensor]]:
        """(first row, chunk (n, D)) with a progress bar: on the CPU in the storage dtype (views of
        the map; `_decoded` and `_scores` upcast), on another device in the compute dtype."""
        n = len(self.store)
        total = -(-n // self.chunk_rows) if n else 0
        disable = None if self.progress is None else not self.progress
        chunks = self.store.iter_chunks(self.chunk_rows)
        for start, chunk in tqdm(chunks, total=total, desc="logra: scoring", disable=disable):
            if self.device.type == "cpu":
                yield start, chunk
            else:  # the storage dtype crosses the bus (half the bytes for bf16); decoded on the device
                yield start, chunk.to(self.device).to(self.compute_dtype)

    def _stream(self, need_scale: bool) -> Iterator[tuple[int, Tensor, Tensor | None]]:
        """(first row, chunk, column scale [n] or None): the scale is 1/sqrt(self-influence)."""
        for start, chunk in self._chunks():
            yield start, chunk, _inverse_sqrt(self._self_influence(chunk)) if need_scale else None

    def _decoded(self, chunk: Tensor) -> Tensor:
        """chunk (n, D) in the compute dtype: itself, or upcast into one buffer reused for every chunk
        (valid until the next call). A fresh float32 chunk per step cost 8x the upcast into a warm buffer."""
        if chunk.dtype == self.compute_dtype:
            return chunk
        if self._buffer is None or self._buffer.shape[0] < chunk.shape[0]:
            self._buffer = torch.empty(chunk.shape[0], chunk.shape[1], dtype=self.compute_dtype)
        return self._buffer[: chunk.shape[0]].copy_(chunk)

    def _scores(self, pre: Tensor, chunk: Tensor) -> Tensor:
        """pre [Q, D] @ chunk.T -> [Q, n]. A chunk in another dtype (bf16 on the CPU) is upcast
        _BLOCK_ROWS rows at a time into a small buffer that stays in cache for its matmul: at 1M x
        1024 bf16 rows, 1 thread, this took 0.68x the CPU time of upcasting 4096-row chunks first."""
        if chunk.dtype == self.compute_dtype:
            return pre @ chunk.T
        if self._block is None:
            self._block = torch.empty(_BLOCK_ROWS, chunk.shape[1], dtype=self.compute_dtype)
        out = torch.empty(pre.shape[0], chunk.shape[0], dtype=self.compute_dtype)
        for i in range(0, chunk.shape[0], _BLOCK_ROWS):
            rows = self._block[: min(_BLOCK_ROWS, chunk.shape[0] - i)].copy_(chunk[i : i + _BLOCK_ROWS])
            out[:, i : i + rows.shape[0]] = pre @ rows.T
        return out

    def _self_influence(self, chunk: Tensor) -> Tensor:
        """g_iᵀ H⁻¹ g_i of the chunk's rows [n]. On the CPU _BLOCK_ROWS rows at a time (upcast into
        `_block`), so its temporaries stay a few MiB whatever the chunk: whole 4096 x 1024 chunks kept
        3-6 temporaries of 16 MiB alive (32-103 MiB measured at 1M rows, from one run to the next)."""
        if chunk.device.type != "cpu":
            x = self._decoded(chunk)
            return (self._chunk_pre.apply(x) * x).sum(dim=1)
        out = torch.empty(chunk.shape[0], dtype=self.compute_dtype)
        for i in range(0, chunk.shape[0], _BLOCK_ROWS):
            rows = chunk[i : i + _BLOCK_ROWS]
            if rows.dtype != self.compute_dtype:
                if self._block is None:
                    self._block = torch.empty(_BLOCK_ROWS, chunk.shape[1], dtype=self.compute_dtype)
                rows = self._block[: rows.shape[0]].copy_(rows)
            out[i : i + rows.shape[0]] = (self._chunk_pre.apply(rows) * rows).sum(dim=1)
        return out

    @staticmethod
    def _normalize(scores: Tensor, row_scale: Tensor | None, col_scale: Tensor | None) -> Tensor:
        if col_scale is not None:
            scores = scores * col_scale
        if row_scale is not None:
            scores = scores * row_scale[:, None]
        return scores


def _rows_of(queries: Queries) -> tuple[Any, LoGraConfig | None]:
    """(the query rows, the config they were logged with, or None for bare rows)."""
    if isinstance(queries, GradientStore):
        return queries.rows(), queries.config
    if isinstance(queries, Tensor):
        return queries, None
    return queries.rows, queries.config


def _reserved_memmap(path: Path, Q: int, N: int) -> np.memmap:
    """A float32 [Q, N] .npy memory map at `path` whose every byte is allocated on disk first."""
    memmap = np.lib.format.open_memmap(os.fspath(path), mode="w+", dtype=np.float32, shape=(Q, N))
    size = int(memmap.offset) + memmap.nbytes
    del memmap  # nothing was written through the map yet; reserve the space, then map again
    with open(path, "r+b") as f:
        preallocate(f, size)
    return np.lib.format.open_memmap(os.fspath(path), mode="r+")


def _inverse_sqrt(x: Tensor) -> Tensor:
    """1/sqrt(x) where x > 0, else 0 (a zero gradient has no direction: its normalised score is 0)."""
    positive = x > 0
    return torch.where(positive, x.clamp_min(torch.finfo(x.dtype).tiny).rsqrt(), torch.zeros_like(x))
