"""Arnoldi influence (Schioppa et al. 2021): the top-p eigenpairs of H as a projection of the gradients.

`fit_arnoldi` runs Arnoldi's iteration (full reorthogonalisation) on curvature products of the
training loss (`logra.curvature.hvp`, Hessian or Gauss-Newton, the mean per-example curvature),
`iterations` products in all, and keeps the p largest Ritz pairs (u_j, λ_j): the eigenbasis,
an `ArnoldiBasis`. Influence in that subspace is

    score(q, i) = Σ_j (u_jᵀ g_q)(u_jᵀ g_i) / (λ_j + damping),

so the p numbers u_jᵀ g_i are a row like any logra row: `log_arnoldi` writes them into an
ordinary store (one pseudo-layer "arnoldi", k_out = p, k_in = 1, its `kind` naming the
eigenbasis' digest, so that queries projected on another eigenbasis are refused by the layer
table checks), with the eigenbasis saved beside the shards (`STORE/eigenbasis/`, JSON and an
.npz with its SHA-256). `ArnoldiPreconditioner` (method "arnoldi") is the diagonal
1/(λ_j + damping); `fit_preconditioner(store, "arnoldi")` reads the eigenvalues from the store's
eigenbasis, and the `Scorer` streams the store with one matmul per chunk as for any method.

The store also holds Kronecker statistics of its rows (a constant input of 1), so kfac, ekfac
and raw fit on it too (the empirical Fisher inside the Arnoldi subspace).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from logra.capture.logger import GradientLogger
from logra.capture.rows import QueryRows
from logra.config import LoGraConfig, ProjectionInit
from logra.curvature.hvp import DEFAULT_CHUNK, CurvatureOperator
from logra.curvature.moments import CurvatureSource
from logra.curvature.objective import (
    Batch,
    Curvature,
    LossFn,
    ParameterSpace,
    batch_size,
    check_batches,
    full_config,
    scalar_loss,
)
from logra.curvature.precondition import Preconditioner, PreconditionerMethod, fit_preconditioner
from logra.errors import ConfigError, StoreCorruptedError, StoreError
from logra.store.files import sha256_file, write_atomic, write_durable
from logra.store.manifest import MANIFEST
from logra.store.reader import GradientStore
from logra.store.writer import StoreWriter
from logra.types import ExampleId, KroneckerStatistics, LayerInfo, normalize_ids

EIGENBASIS_DIR = "eigenbasis"
FORMAT, FORMAT_VERSION = "logra-arnoldi-eigenbasis", 1
_JSON, _NPZ = "eigenbasis.json", "eigenbasis.npz"
LAYER = "arnoldi"


@dataclass(frozen=True)
class ArnoldiBasis:
    """The kept eigenpairs of H and what they were computed from.

    eigenvalues [p] (descending) and eigenvectors [p, P] (orthonormal rows), float64, in the
    layout of an unprojected row of `source_layers` (the chosen layers of `source_config`).
    `config`, `layers` and `model_fingerprint` describe the rows `log_arnoldi` writes, so
    `check_compatible(store, basis)` and `Scorer(..., query_config=basis)` check a store against it.
    """

    eigenvalues: Tensor
    eigenvectors: Tensor
    source_config: LoGraConfig
    source_layers: tuple[LayerInfo, ...]
    model_fingerprint: str
    curvature: Curvature
    n_examples: int
    iterations: int
    seed: int
    digest: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", self._content_digest())

    @property
    def rank(self) -> int:
        return int(self.eigenvalues.numel())

    @property
    def config(self) -> LoGraConfig:
        """The config of the projected rows: the chosen layers, p x 1, orthonormal projections."""
        d = self.source_config.to_dict()
        d.update(k_in=1, k_out=self.rank, init=ProjectionInit.ORTHOGONAL.value, seed=self.seed, layer_k={})
        return LoGraConfig.from_dict(d)

    @property
    def layers(self) -> tuple[LayerInfo, ...]:
        """The one pseudo-layer of a projected row; its kind names the eigenbasis."""
        P = int(self.eigenvectors.shape[1])
        return (LayerInfo(LAYER, f"arnoldi:{self.digest[:16]}", 1, P, 1, self.rank, False, 0),)

    def metadata(self) -> dict[str, Any]:
        return {
            "source_config": self.source_config.to_dict(),
            "source_layers": [layer.to_dict() for layer in self.source_layers],
            "model_fingerprint": self.model_fingerprint, "curvature": self.curvature.value,
            "n_examples": self.n_examples, "iterations": self.iterations, "seed": self.seed,
        }  # fmt: skip

    def _content_digest(self) -> str:
        h = hashlib.sha256(json.dumps(self.metadata(), sort_keys=True).encode())
        for t in (self.eigenvalues, self.eigenvectors):
            h.update(t.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
        return h.hexdigest()

    def project(self, rows: Tensor) -> Tensor:
        """Unprojected rows [n, P] -> their coordinates [n, p] on the eigenvectors (float64)."""
        return rows.detach().to("cpu", torch.float64) @ self.eigenvectors.T

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write `eigenbasis.json` and `eigenbasis.npz` (durably; the JSON holds the .npz's SHA-256)."""
        root = Path(directory)
        root.mkdir(parents=True, exist_ok=True)
        arrays = {"eigenvalues": self.eigenvalues.numpy(), "eigenvectors": self.eigenvectors.numpy()}
        write_durable(root / _NPZ, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, **self.metadata(), "digest": self.digest,
                "arrays": {"file": _NPZ, "sha256": sha256_file(root / _NPZ)}}  # fmt: skip
        write_atomic(root / _JSON, json.dumps(meta, indent=1).encode())
        return root


def load_eigenbasis(directory: str | os.PathLike[str]) -> ArnoldiBasis:
    """Read an `ArnoldiBasis.save` directory, checking the .npz's checksum and the content digest."""
    root = Path(directory)
    if not (root / _JSON).is_file():
        raise StoreError(f"{root} holds no {_JSON}; write one with fit_arnoldi(...).save({str(root)!r}).")
    try:
        meta = json.loads((root / _JSON).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"format {meta.get('format')!r} version {meta.get('format_version')!r}")
        npz = root / _NPZ
        if meta["arrays"]["file"] != _NPZ or not npz.is_file() or sha256_file(npz) != meta["arrays"]["sha256"]:
            raise ValueError(f"{_NPZ} is missing or does not match its checksum")
        with np.load(npz, allow_pickle=False) as arrays:
            values, vectors = (torch.from_numpy(np.array(arrays[k], dtype=np.float64)) for k in ("eigenvalues",
                                                                                                 "eigenvectors"))
        basis = ArnoldiBasis(
            values, vectors, LoGraConfig.from_dict(meta["source_config"]),
            tuple(LayerInfo(**raw) for raw in meta["source_layers"]), str(meta["model_fingerprint"]),
            Curvature(meta["curvature"]), int(meta["n_examples"]), int(meta["iterations"]), int(meta["seed"]),
        )  # fmt: skip
        if basis.digest != meta["digest"]:
            raise ValueError("the eigenbasis does not match its recorded digest")
    except (ValueError, KeyError, TypeError, OSError, json.JSONDecodeError, ConfigError) as exc:
        raise StoreCorruptedError(f"{root}: not a valid saved eigenbasis ({exc}); compute and save it again.") from None
    return basis


# --------------------------------------------------------------------------------------------
# Arnoldi's iteration.


def arnoldi_eigenpairs(
    operator: CurvatureOperator, rank: int, iterations: int, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """The `rank` largest Ritz pairs of H after `iterations` products: (values [p] desc, vectors [p, P]).

    Full reorthogonalisation (Gram-Schmidt twice). When the Krylov space becomes invariant before
    `iterations` steps, the iteration goes on from a fresh random vector orthogonal to it, so that
    iterations = P gives every eigenpair.
    """
    P = operator.dim
    m = min(iterations, P)
    gen = torch.Generator().manual_seed(seed)
    Q = torch.zeros(m, P, dtype=torch.float64)
    T = torch.zeros(m, m, dtype=torch.float64)
    Q[0] = _fresh_direction(Q[:0], P, gen)
    for j in range(m):
        w = operator.matvec(Q[j])
        for _ in range(2):
            c = Q[: j + 1] @ w
            T[: j + 1, j] += c
            w = w - Q[: j + 1].T @ c
        if j + 1 == m:
            break
        beta = w.norm()
        if beta > 1e-10 * max(float(T[: j + 1, : j + 1].abs().max()), 1e-300):
            T[j + 1, j] = beta
            Q[j + 1] = w / beta
        else:  # an invariant subspace: H has no more to say along Q; continue orthogonally to it
            Q[j + 1] = _fresh_direction(Q[: j + 1], P, gen)
    values, vectors = torch.linalg.eigh((T + T.T) / 2)
    top = torch.argsort(values, descending=True)[:rank]
    return values[top], vectors[:, top].T @ Q


def _fresh_direction(Q: Tensor, P: int, gen: torch.Generator) -> Tensor:
    w = torch.randn(P, generator=gen, dtype=torch.float64)
    for _ in range(2):
        w = w - Q.T @ (Q @ w)
    return w / w.norm()


def fit_arnoldi(
    model: nn.Module,
    loss: LossFn,
    batches: Sequence[Batch],
    rank: int,
    config: LoGraConfig | None = None,
    *,
    curvature: Curvature | str = Curvature.HESSIAN,
    iterations: int | None = None,
    seed: int = 0,
    chunk: int = DEFAULT_CHUNK,
) -> ArnoldiBasis:
    """The top-`rank` eigenbasis of the mean per-example curvature of `loss` over `batches`.

    Args:
        model: the trained model (eval mode).
        loss: loss(model, batch) -> the summed loss of the batch, or an `OutputLoss`.
        batches: the training batches.
        rank: p, the eigenpairs kept (the row width of the store).
        config: which layers (modules, exclude, include_bias) and the storage dtype of the rows;
            its projection sizes are ignored (the eigenvectors are the projection).
        curvature: hessian | ggn.
        iterations: Arnoldi steps (curvature products, one pass over the batches each); default
            min(P, max(2p, p + 20)), clipped to P.
        seed: of the start vector.  chunk: vectors per batched backward.
    """
    source = full_config(config)
    with GradientLogger(model, source, statistics=False) as logger:
        layers, fingerprint = tuple(logger.layers), logger.model_fingerprint
    space = ParameterSpace(model, layers)
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= space.dim:
        raise ConfigError(f"rank={rank!r} must be an int between 1 and the {space.dim:,} chosen parameters.")
    steps = min(space.dim, max(2 * rank, rank + 20)) if iterations is None else iterations
    if isinstance(steps, bool) or not isinstance(steps, int) or not rank <= steps:
        raise ConfigError(f"iterations={iterations!r} must be an int >= rank={rank} (Arnoldi keeps p of them).")
    operator = CurvatureOperator(model, space, loss, batches, curvature, chunk)
    values, vectors = arnoldi_eigenpairs(operator, rank, steps, seed)
    return ArnoldiBasis(values, vectors, source, layers, fingerprint, operator.curvature, operator.n_examples,
                        min(steps, space.dim), seed)  # fmt: skip


# --------------------------------------------------------------------------------------------
# Rows on the eigenbasis: in memory (queries) or into a store (the training set, once).


def _projected(
    basis: ArnoldiBasis, model: nn.Module, loss: LossFn, batches: list[Batch], ids: list[ExampleId]
) -> Iterator[tuple[list[ExampleId], Tensor]]:
    """(ids, rows [B, p] float64) per batch: each example's own gradient, projected on the eigenvectors."""
    with GradientLogger(model, basis.source_config, statistics=False) as logger:
        if tuple(logger.layers) != basis.source_layers or logger.model_fingerprint != basis.model_fingerprint:
            raise ConfigError(
                "the model is not the one the eigenbasis was computed on (other layers or weights); project with "
                "the model passed to fit_arnoldi."
            )
        params = ParameterSpace(model, logger.layers).params
        start = 0
        for batch in batches:
            chunk_ids = ids[start : start + batch_size(batch)]
            start += len(chunk_ids)
            with logger.record(chunk_ids) as record:
                torch.autograd.grad(scalar_loss(loss, model, batch), params, allow_unused=True)
            assert record.rows is not None
            yield chunk_ids, basis.project(record.rows)


def log_arnoldi(
    basis: ArnoldiBasis,
    model: nn.Module,
    loss: LossFn,
    batches: Sequence[Batch],
    *,
    store: str | os.PathLike[str] | None = None,
    ids: Sequence[ExampleId] | None = None,
    shard_rows: int | None = None,
) -> QueryRows | None:
    """Per-example gradients projected on the eigenbasis: `QueryRows` of [N, p] rows, or a store of them.

    Args:
        basis: from `fit_arnoldi` (or `load_eigenbasis`).
        model, loss, batches: as for `fit_arnoldi`; each row is one example's own gradient.
        store: a new directory: the rows go into a store there, with the eigenbasis in
            `STORE/eigenbasis/` (returns None). On any error the directory is removed again.
        ids: one per example (default 0..N-1).  shard_rows: rows per shard (default 1M / p).

    Queries: pass the returned `QueryRows` to `Scorer.score`; it is checked against the store
    (a store projected on another eigenbasis has another layer table and is refused).
    """
    batch_list = check_batches(batches)
    n = sum(batch_size(b) for b in batch_list)
    id_list = normalize_ids(list(range(n)) if ids is None else ids)
    if len(id_list) != n:
        raise ConfigError(f"{len(id_list)} ids were given for the {n} examples of the batches; pass one per example.")
    rows = _projected(basis, model, loss, batch_list, id_list)
    if store is None:  # queries: rows that carry the eigenbasis' config, layer table and model for the Scorer
        return QueryRows(id_list, torch.cat([r for _, r in rows]), basis.config, basis.model_fingerprint, basis.layers)
    root = Path(store)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise StoreError(f"{root} exists and is not an empty directory; log the Arnoldi rows into a new one.")
    created = not root.exists()
    try:
        _write_store(basis, root, rows, shard_rows or max(1, (1 << 20) // basis.rank))
    except BaseException:
        if created:
            shutil.rmtree(root, ignore_errors=True)  # nothing half-done is left behind
        raise
    return None


def _write_store(
    basis: ArnoldiBasis, root: Path, rows: Iterator[tuple[list[ExampleId], Tensor]], shard_rows: int
) -> None:
    first = next(rows)  # the first batch runs before anything is written: a bad loss fails here
    basis.save(root / EIGENBASIS_DIR)
    config = basis.config
    writer = StoreWriter(root, config, basis.model_fingerprint, basis.layers, shard_rows)
    stats = {LAYER: KroneckerStatistics.zeros(1, basis.rank)}
    ok = False
    try:
        for chunk_ids, chunk in _chain(first, rows):
            stored = chunk.to(torch.float64)
            writer.append(chunk_ids, stored)
            stats[LAYER].add_(torch.ones(len(chunk_ids), 1, dtype=torch.float64), stored, len(chunk_ids),
                              len(chunk_ids))  # fmt: skip
            writer.commit_if_full(stats)
        ok = True
    finally:
        writer.close(stats, commit=ok)
    if not (root / MANIFEST).is_file():
        raise StoreError(f"no rows were committed to {root}.")


def _chain(first: Any, rest: Iterator[Any]) -> Iterator[Any]:
    yield first
    yield from rest


# --------------------------------------------------------------------------------------------
# The preconditioner.


class ArnoldiPreconditioner(Preconditioner):
    """The diagonal 1/(λ_j + damping) on a store of Arnoldi rows (its eigenvalues from `STORE/eigenbasis`)."""

    method = PreconditionerMethod.ARNOLDI

    @classmethod
    def factor_shapes(cls, layer: LayerInfo) -> dict[str, tuple[int, ...]]:
        return {"eigenvalues": (layer.size,)}

    @classmethod
    def fit_factors(
        cls, store: GradientStore, source: CurvatureSource, chunk_rows: int, device: Any, progress: bool | None
    ) -> dict[str, dict[str, Tensor]]:
        basis = store_eigenbasis(store)
        return {LAYER: {"eigenvalues": basis.eigenvalues.clone()}}

    @staticmethod
    def curvature_eigenvalues(factors: Mapping[str, Tensor]) -> Tensor:
        return factors["eigenvalues"]

    @classmethod
    def damping_reference(cls, eigenvalues: Tensor, layer: LayerInfo, init: ProjectionInit) -> float:
        """The mean of the kept eigenvalues (the top p, so larger than H's mean eigenvalue)."""
        return float(eigenvalues.mean())

    def _apply_layer(self, layer: LayerInfo, block: Tensor, f: dict[str, Tensor], damping: float) -> Tensor:
        return block / (f["eigenvalues"] + damping)


def store_eigenbasis(store: GradientStore) -> ArnoldiBasis:
    """The eigenbasis saved in an Arnoldi store, checked against the store's layer table and model."""
    root = store.root / EIGENBASIS_DIR
    if not (root / _JSON).is_file():
        raise ConfigError(
            f"the store at {store.root} holds no Arnoldi eigenbasis ({EIGENBASIS_DIR}/{_JSON}): method 'arnoldi' "
            "needs a store written by logra.curvature.log_arnoldi(fit_arnoldi(...), ..., store=...)."
        )
    basis = load_eigenbasis(root)
    if tuple(store.layers) != basis.layers or store.model_fingerprint != basis.model_fingerprint:
        raise StoreCorruptedError(
            f"{root}: the eigenbasis (digest {basis.digest[:16]}) is not the one the store's rows were projected on "
            f"(layer kind {store.layers[0].kind if store.layers else None!r}); re-log the store."
        )
    return basis


def arnoldi_preconditioner(store: GradientStore, damping: float | None = None) -> ArnoldiPreconditioner:
    """`fit_preconditioner(store, "arnoldi", damping)`: the diagonal 1/(λ_j + damping) of the store's eigenbasis.

    damping: λ (on the mean per-example curvature), or None for 0.1 x the mean kept eigenvalue.
    """
    fitted = fit_preconditioner(store, PreconditionerMethod.ARNOLDI, damping=damping)
    assert isinstance(fitted, ArnoldiPreconditioner)  # the registry's class for the method
    return fitted
