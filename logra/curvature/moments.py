"""Curvature statistics beyond the Kronecker factors, and where a preconditioner's curvature comes from.

Two accumulators take row chunks [n, D] in the layer table's layout, in one pass:
`EigenbasisMoments` (EK-FAC's eigenvalues: the mean of (Q_Sᵀ G_i Q_A)² in KFAC's eigenbasis) and
`GradientCovariance` (the raw preconditioner's (1/N) Σ vec(G_i) vec(G_i)ᵀ). Both sum in float64
on the rows' device, so statistics of disjoint chunks merge by addition and chunking changes
nothing beyond rounding.

`curvature_source` resolves `fit_preconditioner(statistics=...)`: the store's own (empirical
Fisher) statistics, a given {layer: KroneckerStatistics} dict, or the `FisherStatistics` of a
true-Fisher pass (`logra.curvature.fisher`).
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor
from tqdm.auto import tqdm

from logra.errors import ConfigError, StoreError
from logra.store.reader import GradientStore
from logra.types import KroneckerStatistics, LayerInfo

Grams = Mapping[str, tuple[Tensor | None, Tensor | None]]
"""{layer: (P_out P_outᵀ, P_in P_inᵀ)}, None for a side whose Gram is the identity (`projection_grams`)."""


def generalized_eigh(c: Tensor, gram: Tensor | None) -> tuple[Tensor, Tensor]:
    """(λ, B) with C B = M B diag(λ) and Bᵀ M B = I, float64; M = `gram`, None for the identity.

    C (k, k) is a projected curvature P C_full Pᵀ and M = P Pᵀ; then C + λ_d M = P (C_full + λ_d I) Pᵀ
    has the inverse B diag(1 / (λ + λ_d)) Bᵀ. With M = I, B is C's orthonormal eigenbasis. Computed
    by whitening: M = V diag(μ) Vᵀ, W = V diag(μ^-1/2), eigh of Wᵀ C W = U Λ Uᵀ, B = W U. A
    rank-deficient projection (two equal rademacher rows of a narrow layer) has M singular; its
    null space holds no projected gradient (uᵀ P g = 0 when Pᵀ u = 0), so B gets a zero column with
    λ = 0 there, and the inverse is the pseudo-inverse on the projected gradients' span.
    Eigenvalues are clamped at 0 (roundoff).
    """
    c = c.to(torch.float64)
    if gram is None:
        lam, vecs = torch.linalg.eigh(c)
        return lam.clamp_min(0.0), vecs
    mu, v = torch.linalg.eigh(gram.to(torch.float64))
    kept = mu > 1e-10 * float(mu.max())
    w = v[:, kept] / mu[kept].sqrt()  # (k, r)
    white = w.T @ c @ w
    lam, u = torch.linalg.eigh((white + white.T) / 2)
    k, r = c.shape[0], int(kept.sum())
    zeros = torch.zeros(k - r, dtype=torch.float64)
    return torch.cat([zeros, lam.clamp_min(0.0)]), torch.cat([torch.zeros(k, k - r, dtype=torch.float64), w @ u], 1)


def kronecker_eigenbases(
    statistics: Mapping[str, KroneckerStatistics], grams: Grams | None = None
) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """{layer: (B_S, λ_S, B_A, λ_A)}: float64 `generalized_eigh` of S against P_out P_outᵀ and of A
    against P_in P_inᵀ (plain eigh, orthonormal B, where a Gram is None or `grams` is None)."""
    out = {}
    for name, s in statistics.items():
        gram_out, gram_in = (grams or {}).get(name, (None, None))
        lam_s, q_s = generalized_eigh(s.grad_covariance(), gram_out)
        lam_a, q_a = generalized_eigh(s.input_covariance(), gram_in)
        out[name] = (q_s, lam_s, q_a, lam_a)
    return out


class RowAccumulator:
    """Per-layer float64 sums over rows, kept on the device of the rows that are added."""

    def __init__(self, layers: Iterable[LayerInfo]) -> None:
        self.layers = tuple(layers)
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def _term(self, layer: LayerInfo, block: Tensor) -> Tensor:
        """The sum over the n rows of `block` (n, k_out*k_in) float64 of this statistic."""
        raise NotImplementedError

    def add(self, rows: Tensor) -> None:
        """Add rows (n, D) in the layer table's layout (any float dtype, any device)."""
        for layer in self.layers:
            block = rows[:, layer.offset : layer.offset + layer.size].to(torch.float64)
            term = self._term(layer, block)
            old = self.sums.get(layer.name)
            self.sums[layer.name] = term if old is None else old + term.to(old.device)
        self.count += int(rows.shape[0])

    def result(self) -> dict[str, Tensor]:
        """{layer: the mean over every added row}, float64 on the CPU."""
        if self.count == 0:
            raise StoreError("no gradient rows to fit a preconditioner on: the store is empty; log examples first.")
        return {name: (s / self.count).cpu() for name, s in self.sums.items()}


class EigenbasisMoments(RowAccumulator):
    """Mean over rows of (Q_Sᵀ G_i Q_A)², (k_out, k_in) per layer: EK-FAC's eigenvalues.

    Args:
        layers: the layer table of the rows that will be added.
        bases: {layer: (Q_S (k_out, k_out), Q_A (k_in, k_in))} float64: the `kronecker_eigenbases`
            (orthonormal columns, or M-orthonormal ones where a projection's Gram M is not I).
    """

    def __init__(self, layers: Iterable[LayerInfo], bases: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        super().__init__(layers)
        self.bases = dict(bases)

    def _term(self, layer: LayerInfo, block: Tensor) -> Tensor:
        q_s, q_a = (q.to(block.device) for q in self.bases[layer.name])
        rotated = q_s.T @ block.reshape(-1, layer.k_out, layer.k_in) @ q_a  # (n, k_out, k_in)
        return rotated.square().sum(0)


class GradientCovariance(RowAccumulator):
    """Mean over rows of vec(G_i) vec(G_i)ᵀ, (k_out*k_in, k_out*k_in) per layer."""

    def _term(self, layer: LayerInfo, block: Tensor) -> Tensor:
        return block.T @ block


def accumulate_store(
    store: GradientStore,
    accumulator: RowAccumulator,
    chunk_rows: int,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> None:
    """Feed every row of `store` to `accumulator`, one chunk at a time (memory ~ one chunk)."""
    total = -(-len(store) // chunk_rows) if len(store) else 0
    chunks = store.iter_chunks(chunk_rows)
    disable = None if progress is None else not progress
    for _, chunk in tqdm(chunks, total=total, desc="logra: curvature pass", disable=disable):
        accumulator.add(chunk if device is None else chunk.to(device))


@dataclass(frozen=True)
class FisherStatistics:
    """Curvature measured with labels sampled from the model's predictive distribution.

    kronecker: {layer: KroneckerStatistics} (kfac, ekfac).  eigenvalues: {layer: (k_out, k_in)}
    EK-FAC second moments in the eigenbasis of `kronecker`, or None.  covariance:
    {layer: (k_out*k_in, k_out*k_in)} mean outer product for raw, or None.  n_examples: examples
    seen per sample; n_samples: backwards per example (label draws, or the classes when exact);
    exact: whether the expectation over labels was summed over every class rather than sampled.
    """

    kronecker: dict[str, KroneckerStatistics]
    eigenvalues: dict[str, Tensor] | None
    covariance: dict[str, Tensor] | None
    n_examples: int
    n_samples: int
    exact: bool = False


# --------------------------------------------------------------------------------------------
# Where a preconditioner's curvature comes from.


class FisherKind(str, enum.Enum):
    """Whose labels a preconditioner's curvature was measured with.

    empirical: the logged labels (the store's own rows and statistics).  true: labels drawn from
    the model (`logra.curvature.fisher`).  custom: Kronecker statistics the caller passed in.
    """

    EMPIRICAL = "empirical"
    TRUE = "true"
    CUSTOM = "custom"


@dataclass(frozen=True)
class CurvatureSource:
    """Kronecker statistics and, when given (true Fisher), precomputed EK-FAC moments or covariance."""

    kronecker: Mapping[str, KroneckerStatistics]
    moments: Mapping[str, Tensor] | None
    covariance: Mapping[str, Tensor] | None
    fisher: FisherKind


def curvature_source(
    store: GradientStore, statistics: Mapping[str, KroneckerStatistics] | FisherStatistics | None, raw: bool
) -> CurvatureSource:
    """Resolve `fit_preconditioner(statistics=...)` for `store`; `raw`: for method='raw'."""
    if statistics is None:
        source = CurvatureSource({} if raw else store.statistics(), None, None, FisherKind.EMPIRICAL)
    elif isinstance(statistics, FisherStatistics):
        if raw and statistics.covariance is None:
            raise ConfigError(
                "these FisherStatistics hold no covariance; compute them with method='raw' for method='raw'."
            )
        source = CurvatureSource(
            statistics.kronecker, statistics.eigenvalues, statistics.covariance, FisherKind.TRUE
        )
    elif isinstance(statistics, Mapping):
        if raw:
            raise ConfigError(
                "method='raw' cannot use Kronecker statistics; pass statistics=None (the store's rows) or the "
                "FisherStatistics of true_fisher_statistics(..., method='raw')."
            )
        source = CurvatureSource(dict(statistics), None, None, FisherKind.CUSTOM)
    else:
        raise ConfigError(
            "statistics must be None, a {layer: KroneckerStatistics} dict or FisherStatistics, "
            f"got a {type(statistics).__name__}."
        )
    if not raw:
        check_statistics(store, source.kronecker)
    names = [layer.name for layer in store.layers]
    for extra in (source.moments, source.covariance):
        if extra is not None and sorted(extra) != sorted(names):
            raise ConfigError(f"the FisherStatistics cover layers {sorted(extra)} but the store logs {names}.")
    return source


def check_statistics(store: GradientStore, kron: Mapping[str, KroneckerStatistics]) -> None:
    """Raise ConfigError unless `kron` holds KroneckerStatistics of the store's layers and sizes."""
    names = [layer.name for layer in store.layers]
    if sorted(kron) != sorted(names):
        raise ConfigError(f"statistics cover layers {sorted(kron)} but the store at {store.root} logs {names}.")
    for layer in store.layers:
        s = kron[layer.name]
        if not isinstance(s, KroneckerStatistics):
            raise ConfigError(f"statistics[{layer.name!r}] is a {type(s).__name__}, not KroneckerStatistics.")
        if s.input_sum.shape != (layer.k_in, layer.k_in) or s.grad_sum.shape != (layer.k_out, layer.k_out):
            raise ConfigError(
                f"statistics[{layer.name!r}] has factors {tuple(s.input_sum.shape)}/{tuple(s.grad_sum.shape)} but the "
                f"layer is logged at k_in={layer.k_in}, k_out={layer.k_out}; compute them with the store's LoGraConfig."
            )
        if s.n_examples < 1:
            raise ConfigError(f"statistics[{layer.name!r}] count no examples; log some rows with statistics=True.")
        if s.n_tokens < 1:
            raise ConfigError(
                f"statistics[{layer.name!r}] count {s.n_examples} examples but no tokens: every mask was all zero, "
                "so no position reached the loss. Pass masks that select each example's tokens."
            )
