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
"""

from __future__ import annotations

import hashlib

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
