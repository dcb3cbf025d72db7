"""Projection matrices: a pure function of (seed, layer name, side, shape, init).

Each selected layer gets an input projection P_in (k_in, n_in) and an output projection
P_out (k_out, n_out). They are drawn on the CPU in float64 from a generator seeded by a hash of
(seed, layer name, side, k, n), so every process, every later run and the query side get
bit-identical matrices without exchanging them. With `LoGraConfig.share_input_projection` (the
default), P_in is drawn under the name `SHARED_INPUT` instead of the layer's, so layers of one
input width share it.

A side whose k equals its width n (k is clipped to the width, so this is every k >= n) is the
identity for every init: it is exact and distorts nothing. A square gaussian or rademacher matrix
would be invertible but badly conditioned, so damping added in its basis would act on a distorted
curvature; a square orthogonal or pca matrix is a rotation, which the identity is equivalent to.

init=sjlt is FactGraSS's structured sparse projection (GraSS, arXiv 2505.18976) applied per side:
a random mask keeps k' = min(n, SJLT_MASK_FACTOR * k) of the n coordinates, then a sparse
Johnson-Lindenstrauss transform maps them to k numbers. FactGraSS itself applies its SJLT after
the Kronecker product; logra keeps the factorised (k_out x k_in) row layout that KFAC and EK-FAC
need, so both the mask and the SJLT act on each side separately. It is still returned as a dense
(k, n) matrix, so every code path works unchanged; `SparseRows` is how the hooks apply any
matrix with few nonzeros per row (a gather and a short sum instead of a matmul).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from logra.config import ProjectionInit
from logra.errors import ConfigError

SHARED_INPUT = "*"
"""The name that seeds a shared input projection (LoGraConfig.share_input_projection): with it,
every layer of input width n and projection size k uses the P_in of ("*", "in", k, n)."""


def projection_seed(seed: int, name: str, side: str, k: int, n: int) -> int:
    """A 63-bit generator seed derived from everything that identifies one matrix."""
    digest = hashlib.sha256(f"logra/{seed}/{name}/{side}/{k}x{n}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def make_projection(
    init: ProjectionInit,
    seed: int,
    name: str,
    side: str,
    k: int,
    n: int,
    factor: Tensor | None = None,
) -> Tensor:
    """Draw one projection matrix.

    Args:
        init: the distribution.
        seed, name, side: identify the matrix; `side` is "in" or "out".
        k, n: the matrix is (k, n): it maps a width-n vector to k numbers. Requires k <= n; at
            k = n the identity, whatever the init (module docstring).
        factor: for init=pca only, the (n, n) covariance whose top-k eigenvectors become the rows.

    Returns:
        (k, n) float64 CPU tensor.
    """
    if not 1 <= k <= n:
        raise ConfigError(f"projection {name!r}/{side}: k={k} must be between 1 and the layer width n={n}.")
    if k == n:
        return torch.eye(n, dtype=torch.float64)
    gen = torch.Generator(device="cpu")
    gen.manual_seed(projection_seed(seed, name, side, k, n))
    if init is ProjectionInit.GAUSSIAN:
        return torch.randn(k, n, generator=gen, dtype=torch.float64) / k**0.5
    if init is ProjectionInit.RADEMACHER:
        signs = torch.randint(0, 2, (k, n), generator=gen, dtype=torch.int64).to(torch.float64)
        return (2 * signs - 1) / k**0.5
    if init is ProjectionInit.ORTHOGONAL:
        g = torch.randn(n, k, generator=gen, dtype=torch.float64)
        q, r = torch.linalg.qr(g)  # q: (n, k) with orthonormal columns
        q = q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))  # unique QR
        return q.T.contiguous()
    if init is ProjectionInit.IDENTITY:
        return torch.eye(n, dtype=torch.float64)[:k].contiguous()
    if init is ProjectionInit.SJLT:
        return _sjlt(gen, k, n)
    if init is ProjectionInit.PCA:
        if factor is None or factor.shape != (n, n):
            got = None if factor is None else tuple(factor.shape)
            raise ConfigError(
                f"projection {name!r}/{side}: init='pca' needs an ({n}, {n}) covariance factor, got {got}; "
                "log the PCA statistics store with init='identity' and k at least the layer sizes."
            )
        evals, evecs = torch.linalg.eigh(factor.to(torch.float64))
        top = evecs[:, torch.argsort(evals, descending=True)[:k]].T  # (k, n)
        # Fix each eigenvector's sign (largest-magnitude entry positive) so the result is unique.
        pivot = top.gather(1, top.abs().argmax(dim=1, keepdim=True))
        return (top * torch.sign(pivot)).contiguous()
    raise ConfigError(f"unknown projection init {init!r}")


SJLT_MASK_FACTOR = 4
"""init=sjlt keeps k' = min(n, SJLT_MASK_FACTOR * k) coordinates of a width-n side (the random mask)."""
SJLT_NONZEROS = 1
"""init=sjlt: nonzeros per kept coordinate, s (clipped to k): one in each of s blocks of rows."""


def _sjlt(gen: torch.Generator, k: int, n: int) -> Tensor:
    """(k, n) float64: a random mask of k' = min(n, SJLT_MASK_FACTOR·k) columns, then an SJLT to k rows.

    The rows are split into s = min(SJLT_NONZEROS, k) blocks (Kane and Nelson's block construction);
    each kept column gets one ±1 in every block, in a row drawn so that the rows of a block hold
    equally many entries (loads differ by at most one). The scale sqrt(n / (k' s)) makes
    E‖P x‖² = ‖x‖² over the draw, as for the gaussian init, and every row's squared norm is about n/k.
    """
    kept = min(n, SJLT_MASK_FACTOR * k)
    s = min(SJLT_NONZEROS, k)
    cols = torch.randperm(n, generator=gen)[:kept]  # (k',) the random mask
    bounds = [(r * k) // s for r in range(s + 1)]
    p = torch.zeros(k, n, dtype=torch.float64)
    scale = (n / (kept * s)) ** 0.5
    for r in range(s):
        size = bounds[r + 1] - bounds[r]
        rows = bounds[r] + (torch.arange(kept) % size)[torch.randperm(kept, generator=gen)]  # balanced loads
        signs = 2 * torch.randint(0, 2, (kept,), generator=gen, dtype=torch.int64).to(torch.float64) - 1
        p[rows, cols] = signs * scale
    return p


SPARSE_MAX_FILL = 1 / 16
"""The hooks apply a projection by `SparseRows` when no row has more than this fraction of its width
nonzero: each of the L slots costs one k-column gather, about 16 times a column of a dense matmul
on a CPU (benchmarks/projection_init.py), so sparser rows are cheaper that way."""


@dataclass(frozen=True)
class SparseRows:
    """A (k, n) matrix with at most L nonzeros per row, stored slot by slot for a gather.

    index (L, k) int64: slot l holds, for every row, the column of its l-th nonzero; value (L, k):
    those entries, 0 where a row has fewer than l+1 nonzeros (then the slot points at a column where
    the row is 0). Built from the actual matrix (`of`), so a matrix scaled after it was drawn
    (P diag(a), diag(a) P) is represented exactly, whatever its init.
    """

    index: Tensor
    value: Tensor

    @classmethod
    def of(cls, p: Tensor, max_fill: float = SPARSE_MAX_FILL) -> SparseRows | None:
        """The rows of p (k, n), or None when some row has more than max_fill * n nonzeros."""
        nonzero = p != 0
        width = int(nonzero.sum(dim=1).max()) if p.numel() else 0
        if width > max_fill * p.shape[1]:
            return None
        width = max(width, 1)
        # A stable sort puts each row's nonzero columns first, in column order; the rest are zeros of p.
        order = torch.argsort((~nonzero).to(torch.int8), dim=1, stable=True)[:, :width]  # (k, L)
        return cls(order.T.contiguous(), p.gather(1, order).T.contiguous())

    def apply(self, x: Tensor) -> Tensor:
        """x (..., n) -> x @ pᵀ (..., k): per slot, one gather of k columns and a fused multiply-add."""
        flat = x.reshape(-1, x.shape[-1])  # (N, n): a gather along the last dim of a 2-D tensor is 2-3x faster
        out = flat.index_select(1, self.index[0]).mul_(self.value[0])
        for cols, vals in zip(self.index[1:], self.value[1:]):
            out.addcmul_(flat.index_select(1, cols), vals)
        return out.view(*x.shape[:-1], out.shape[1])
