"""benchmarks/demo_first_order.py: its two train-side maps against direct computations, float64.

- The per-article Newton score computed from T x T token Grams (Woodbury) equals the explicit
  <Q, (GᵀG + λ_B)⁻¹ GᵀX (XᵀX + λ_A)⁻¹> with the full (n_out, n_in) matrices, for one side or both.
- The Adafactor map of a rank-one gradient (whose square is rank one, so the factorisation is
  exact) is sign(G); for a general gradient it is G divided by the factorised root second moment.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import demo_first_order as fo  # noqa: E402


@pytest.mark.parametrize("sides", ["both", "inputs", "outputs"])
def test_newton_scores_match_the_explicit_solve(sides: str) -> None:
    gen = torch.Generator().manual_seed(0)
    P, N, T, n_in, n_out = 3, 4, 5, 7, 6
    X = torch.randn(N, T, n_in, generator=gen, dtype=torch.float64)
    G = torch.randn(N, T, n_out, generator=gen, dtype=torch.float64)
    X[1, 3:] = 0.0  # a shorter article: padded tokens are zero rows
    G[1, 3:] = 0.0
    Q = torch.randn(P, n_out, n_in, generator=gen, dtype=torch.float64)
    lam_k = torch.rand(N, generator=gen, dtype=torch.float64) + 0.1 if sides != "outputs" else None
    lam_l = torch.rand(N, generator=gen, dtype=torch.float64) + 0.1 if sides != "inputs" else None
    C = torch.einsum("nto,poi,nsi->pnts", G, Q, X)
    got = fo.newton_scores(C, X @ X.transpose(1, 2), G @ G.transpose(1, 2), lam_k, lam_l)
    want = torch.zeros(P, N, dtype=torch.float64)
    for n in range(N):
        step = G[n].T @ X[n]  # (n_out, n_in)
        if lam_l is not None:
            step = torch.linalg.solve(G[n].T @ G[n] + lam_l[n] * torch.eye(n_out, dtype=torch.float64), step)
        if lam_k is not None:
            step = torch.linalg.solve(X[n].T @ X[n] + lam_k[n] * torch.eye(n_in, dtype=torch.float64), step.T).T
        want[:, n] = (Q * step).sum((1, 2))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    plain = fo.newton_scores(C, X @ X.transpose(1, 2), G @ G.transpose(1, 2), None, None)
    torch.testing.assert_close(plain, torch.einsum("poi,nto,nti->pn", Q, G, X))  # no λ: the dot product


def test_adafactor_map_is_the_sign_of_a_rank_one_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    u, v = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(9, generator=gen, dtype=torch.float64)
    G = torch.outer(u, v) * 1e-3
    torch.testing.assert_close(fo.adafactor_map(G), torch.sign(G))
    H = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    sq = H * H
    V = sq.sum(1, keepdim=True) * sq.sum(0, keepdim=True) / sq.sum()
    torch.testing.assert_close(fo.adafactor_map(H), H / V.sqrt())
    torch.testing.assert_close(fo.adafactor_map(5.0 * H), fo.adafactor_map(H))  # scale-free, like Adam's step
