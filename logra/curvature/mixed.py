"""Mixed curvature (TrackStar): R = (1 - λ) R_train + λ R_query.

TrackStar (Chang et al. 2024, §A.1.3) preconditions with a mix of the training data's gradient
second moments and the query (task) data's: directions in which every query's gradient is large
(the template of a task, shared by all its queries) get large curvature and are downweighted, so
scores follow what is specific to each query. Bergson's implementation mixes the raw per-module
second-moment matrices and picks λ so that, with the eigenvalues of both pooled over layers and
sorted, λ σ_query[t] = (1 - λ) σ_train[t] at the t-th component, t about 1.5 % of them (1,000 of
65,536; λ ≈ 0.90 on T-REx, 0.99 on C4 in the paper). logra applies the same mix to each of its
curvatures, both sides measured as means over their own examples:

- raw: the (k_out k_in)² covariance of the stored rows and of the query rows.
- kfac: the Kronecker factors, A = (1 - λ) A_train + λ A_query and likewise S; the query factors
  are the query logger's `statistics()`.
- ekfac: the eigenbasis of those mixed factors, and as eigenvalues the mix of the two sides'
  mean squared gradients in that basis ((1 - λ) E_train[(Q_Sᵀ G Q_A)²] + λ E_query[...]).

Damping is as in `fit_preconditioner` (full-size units; default 0.1 x the mixed curvature's mean
eigenvalue). The result is an ordinary `Preconditioner` (fisher "custom") for the `Scorer`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from logra.capture.layers import projection_grams
from logra.curvature.moments import (
    EigenbasisMoments,
    GradientCovariance,
    accumulate_store,
    check_statistics,
    generalized_eigh,
    kronecker_eigenbases,
)
from logra.curvature.precondition import (
    Preconditioner,
    PreconditionerMethod,
    _kron_gram,
    _resolve_damping,
)
from logra.errors import ConfigError
from logra.store.reader import GradientStore, LoggedRows, check_compatible
from logra.types import KroneckerStatistics, parse_enum

DOWNWEIGHT_FRACTION = 1000 / 65536
"""The share of pooled curvature components the automatic λ downweights (TrackStar: 1,000 of 65,536)."""


def mixing_weight(train: list[Tensor], query: list[Tensor], fraction: float = DOWNWEIGHT_FRACTION) -> float:
    """λ with λ σ_query[t] = (1 - λ) σ_train[t] at t = round(fraction x the pooled count) (§A.1.3).

    train, query: per-layer eigenvalues (any shapes, equal totals), pooled and sorted separately.
    Returns λ in [0, 1]; when both t-th eigenvalues are 0, 0.5. Raises ConfigError when only the
    query's is (numerically) 0, i.e. the query curvature's rank is below t + 1: λ would be 1 and the
    training curvature unused.
    """
    if not 0 < fraction <= 1:
        raise ConfigError(f"fraction={fraction!r} must be in (0, 1].")
    a = torch.cat([t.reshape(-1).to(torch.float64).clamp_min(0) for t in train]).sort(descending=True).values
    b = torch.cat([t.reshape(-1).to(torch.float64).clamp_min(0) for t in query]).sort(descending=True).values
    if a.numel() != b.numel() or a.numel() == 0:
        raise ConfigError(f"train and query curvatures have {a.numel()} and {b.numel()} eigenvalues; they must agree.")
    t = min(a.numel(), max(1, round(fraction * a.numel()))) - 1
    tol = float(b[0]) * b.numel() * torch.finfo(torch.float64).eps  # numerical rank, as matrix_rank's
    if b[t] <= tol and a[t] > 0:  # λ would be 1: R_train dropped, R_query (rank < t) and damping alone
        rank = int((b > tol).sum())
        raise ConfigError(
            f"the query curvature has {rank} non-zero eigenvalues of {b.numel()}, fewer than the {t + 1} the "
            f"automatic mix compares (fraction={fraction:g}), so λ would be 1 and the training curvature would be "
            "ignored; with raw curvature each query adds at most one eigenvalue per layer. Pass mix= (CLI: --mix), "
            "use more queries, or use method kfac/ekfac, whose query factors are measured per token."
        )
    total = float(a[t] + b[t])
    return 0.5 if total == 0 else float(a[t]) / total


def mixed_preconditioner(
    store: GradientStore,
    query_rows: Tensor | LoggedRows,
    method: PreconditionerMethod | str = PreconditionerMethod.EKFAC,
    *,
    mix: float | None = None,
    query_statistics: Mapping[str, KroneckerStatistics] | None = None,
    damping: float | Mapping[str, float] | None = None,
    chunk_rows: int = 4096,
) -> tuple[Preconditioner, float]:
    """(the preconditioner of R = (1 - λ) R_train + λ R_query, λ) for `store` and its queries.

    Args:
        store: the training store (its rows and Kronecker statistics give R_train).
        query_rows: [Q, D] query rows logged with the store's config (a `QueryRows`' `.rows`).
        method: raw | kfac | ekfac.
        mix: λ in [0, 1]; None picks it with `mixing_weight` (TrackStar's rule).
        query_statistics: for kfac/ekfac, the query logger's `statistics()` (R_query's factors).
        damping: as in `fit_preconditioner`.
        chunk_rows: rows per chunk of the pass over the store.
    """
    method = parse_enum(PreconditionerMethod, method, "method")
    if method not in (PreconditionerMethod.RAW, PreconditionerMethod.KFAC, PreconditionerMethod.EKFAC):
        raise ConfigError(f"mixed curvature supports raw, kfac and ekfac, not {method.value!r}.")
    q = _check_rows(store, query_rows)
    if mix is not None and (isinstance(mix, bool) or not isinstance(mix, (int, float)) or not 0 <= mix <= 1):
        raise ConfigError(f"mix={mix!r} must be a number in [0, 1], or None for TrackStar's automatic choice.")
    if method is PreconditionerMethod.RAW:
        factors, lam = _mixed_raw(store, q, mix, chunk_rows)
    else:
        if query_statistics is None:
            raise ConfigError(
                f"method={method.value!r} mixes Kronecker factors: pass query_statistics, the statistics() of the "
                "GradientLogger that logged the queries (statistics=True), or use method='raw'."
            )
        check_statistics(store, query_statistics)
        factors, lam = _mixed_kronecker(store, q, query_statistics, method, mix, chunk_rows)
    cls = Preconditioner.registry[method]
    resolved = _resolve_damping(cls, store.layers, factors, damping, store.config.init)
    return cls(store.layers, factors, resolved, store.config.projection_fingerprint(), "custom"), lam


def _check_rows(store: GradientStore, given: Tensor | LoggedRows) -> Tensor:
    rows: Any = given
    if not isinstance(given, Tensor):  # a QueryRows or Record: check its provenance, take its rows
        check_compatible(store, given)
        rows = given.rows
    if not isinstance(rows, Tensor) or rows.dim() != 2 or rows.shape[1] != store.dim or rows.shape[0] < 1:
        shape = tuple(rows.shape) if isinstance(rows, Tensor) else type(rows).__name__
        raise ConfigError(f"query rows must be [Q >= 1, D={store.dim}] logged with the store's config, got {shape}.")
    return rows.detach().to("cpu", torch.float64)


def _mixed_raw(
    store: GradientStore, q: Tensor, mix: float | None, chunk_rows: int
) -> tuple[dict[str, dict[str, Tensor]], float]:
    train_acc, query_acc = GradientCovariance(store.layers), GradientCovariance(store.layers)
    accumulate_store(store, train_acc, chunk_rows, progress=False)
    query_acc.add(q)
    train, query = train_acc.result(), query_acc.result()
    names = [layer.name for layer in store.layers]
    if mix is None:
        mix = mixing_weight([torch.linalg.eigvalsh(train[n]) for n in names],
                            [torch.linalg.eigvalsh(query[n]) for n in names])  # fmt: skip
    grams = projection_grams(store.config, store.layers)
    factors = {}
    for layer in store.layers:
        cov = (1 - mix) * train[layer.name] + mix * query[layer.name]
        lam, vecs = generalized_eigh(cov, _kron_gram(layer, *grams[layer.name]))
        factors[layer.name] = {"eigenvectors": vecs, "eigenvalues": lam}
    return factors, float(mix)


def _mixed_kronecker(
    store: GradientStore,
    q: Tensor,
    query_stats: Mapping[str, KroneckerStatistics],
    method: PreconditionerMethod,
    mix: float | None,
    chunk_rows: int,
) -> tuple[dict[str, dict[str, Tensor]], float]:
    train_stats = store.statistics()
    names = [layer.name for layer in store.layers]
    if mix is None:
        eig = {side: kronecker_eigenbases(stats) for side, stats in (("t", train_stats), ("q", query_stats))}
        mix = mixing_weight([torch.outer(eig["t"][n][1], eig["t"][n][3]) for n in names],
                            [torch.outer(eig["q"][n][1], eig["q"][n][3]) for n in names])  # fmt: skip
    mixed = {n: _mix_statistics(train_stats[n], query_stats[n], mix) for n in names}
    bases = kronecker_eigenbases(mixed, projection_grams(store.config, store.layers))
    if method is PreconditionerMethod.KFAC:
        keys = ("grad_eigenvectors", "grad_eigenvalues", "input_eigenvectors", "input_eigenvalues")
        return {n: dict(zip(keys, bases[n])) for n in names}, float(mix)
    pairs = {n: (bases[n][0], bases[n][2]) for n in names}
    train_acc, query_acc = EigenbasisMoments(store.layers, pairs), EigenbasisMoments(store.layers, pairs)
    accumulate_store(store, train_acc, chunk_rows, progress=False)
    query_acc.add(q)
    train_m, query_m = train_acc.result(), query_acc.result()
    return {
        n: {
            "grad_eigenvectors": pairs[n][0],
            "input_eigenvectors": pairs[n][1],
            "eigenvalues": (1 - mix) * train_m[n] + mix * query_m[n],
        }
        for n in names
    }, float(mix)


def _mix_statistics(train: KroneckerStatistics, query: KroneckerStatistics, mix: float) -> KroneckerStatistics:
    """Statistics whose covariances are (1 - mix) x train's + mix x query's (counts normalised to 1)."""
    return KroneckerStatistics(
        (1 - mix) * train.input_covariance() + mix * query.input_covariance(),
        (1 - mix) * train.grad_covariance() + mix * query.grad_covariance(),
        n_tokens=1,
        n_examples=1,
    )
