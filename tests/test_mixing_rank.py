"""TrackStar's automatic mixing weight when the query curvature is rank-deficient.

With raw curvature each query row adds at most one eigenvalue per layer, so a few queries leave
the t-th pooled query eigenvalue at (numerically) zero and the rule λ σ_q[t] = (1 - λ) σ_train[t]
gives λ = 1: the training curvature would silently drop out. It must raise instead.
"""

from __future__ import annotations

import pytest
import torch

from logra.curvature.mixed import mixing_weight
from logra.errors import ConfigError


def _eigenvalues(n_rows: int, dim: int, seed: int) -> torch.Tensor:
    """Eigenvalues of the covariance of n_rows Gaussian rows in `dim` dimensions (rank min(n, dim))."""
    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(n_rows, dim, generator=g, dtype=torch.float64)
    return torch.linalg.eigvalsh(rows.T @ rows / n_rows)


def test_few_raw_queries_raise_instead_of_dropping_the_training_curvature() -> None:
    train = [_eigenvalues(400, 100, seed=0), _eigenvalues(400, 100, seed=1)]
    query = [_eigenvalues(2, 100, seed=2), _eigenvalues(2, 100, seed=3)]  # rank 2 + 2 of 200, the rest ~1e-16
    assert (torch.cat(query) > 1e-12).sum() == 4
    with pytest.raises(ConfigError, match=r"4 non-zero eigenvalues of 200, fewer than the 10"):
        mixing_weight(train, query, fraction=0.05)  # t + 1 = 10 > rank 4
    lam = mixing_weight(train, query, fraction=0.02)  # t + 1 = 4: the 4th query eigenvalue is still non-zero
    assert 0 < lam < 1


def test_enough_queries_give_the_rule() -> None:
    train = [_eigenvalues(400, 100, seed=0)]
    query = [_eigenvalues(50, 100, seed=4)]
    lam = mixing_weight(train, query, fraction=0.05)
    a = train[0].sort(descending=True).values[4]
    b = query[0].sort(descending=True).values[4]
    assert 0 < lam < 1
    assert lam * float(b) == pytest.approx((1 - lam) * float(a), rel=1e-12)


def test_zero_query_curvature_raises_and_zero_both_is_even() -> None:
    with pytest.raises(ConfigError, match="training curvature would be ignored"):
        mixing_weight([torch.tensor([2.0, 1.0])], [torch.zeros(2)], fraction=0.5)
    assert mixing_weight([torch.zeros(2)], [torch.zeros(2)], fraction=0.5) == 0.5
