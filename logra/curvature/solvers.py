"""The seeds' influence solvers without Kronecker factors: exact, conjugate gradients and LiSSA.

Each applies (H + λI)⁻¹, H the mean per-example curvature of the training loss (the Hessian,
or its Gauss-Newton part; `logra.curvature.hvp`), to unprojected gradient rows:

- exact (Koh & Liang 2017, small models): H as a dense [P, P] float64 matrix from P products,
  inverted through its eigendecomposition. Refused above `Exact.max_parameters`.
- cg: conjugate gradients on (H + λI) x = g, all query columns at once; stops at a relative
  residual ‖r‖ ≤ tol ‖g‖ or after max_iter products, and warns (`ConvergenceWarning`, with the
  residual) when a column did not converge.
- lissa (Koh & Liang's stochastic recursion): h_0 = g, h_j = g + h_{j-1} - (H_j + λI) h_{j-1} / s,
  H_j the curvature of a random minibatch of `batch_size` training examples, s the scale; after
  `depth` steps h / s ≈ (H + λI)⁻¹ g (the series converges when every eigenvalue of H_j + λI lies
  in (0, 2s)); averaged over `repeats` seeded runs. A growing h raises `SolverError` suggesting a
  larger scale.

`fit_solver(store, model, loss, batches, solver, damping=λ)` returns a `SolverPreconditioner`
for a store logged with `full_config(config)` (exact per-example gradients): the `Scorer` then
streams the store as for any preconditioner, so the score matrix, top-k and self-influence come
out in logra's sign and scale (score / N ≈ the leave-one-out change). Self-influence needs one
solve per training row: cheap for exact, N solves for cg and lissa.
"""

from __future__ import annotations

import enum
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from logra.capture.adapters import select_layers
from logra.capture.logger import model_fingerprint
from logra.curvature.hvp import DEFAULT_CHUNK, CurvatureOperator
from logra.curvature.objective import (
    Batch,
    Curvature,
    LossFn,
    ParameterSpace,
    SolverError,
    concat_batches,
    is_full,
    take,
)
from logra.curvature.precondition import Preconditioner
from logra.errors import ConfigError
from logra.store.reader import GradientStore
from logra.types import LayerInfo, parse_enum


class SolverMethod(str, enum.Enum):
    """The solvers of this module (see the module docstring); arnoldi lives in `logra.curvature.arnoldi`."""

    EXACT = "exact"
    CG = "cg"
    LISSA = "lissa"


class ConvergenceWarning(UserWarning):
    """An iterative solver stopped before reaching its tolerance."""


@dataclass(frozen=True)
class Exact:
    """Dense H: P products and a float64 eigendecomposition; P above `max_parameters` is refused."""

    max_parameters: int = 10_000

    def __post_init__(self) -> None:
        _check_int("Exact.max_parameters", self.max_parameters)


@dataclass(frozen=True)
class CG:
    """Conjugate gradients to a relative residual `tol`, at most `max_iter` products per column."""

    tol: float = 1e-6
    max_iter: int = 200

    def __post_init__(self) -> None:
        _check_positive("CG.tol", self.tol)
        _check_int("CG.max_iter", self.max_iter)


@dataclass(frozen=True)
class LiSSA:
    """Koh & Liang's recursion: `depth` steps of minibatches of `batch_size`, `repeats` runs, scale s."""

    scale: float = 10.0
    depth: int = 1000
    repeats: int = 1
    batch_size: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        _check_positive("LiSSA.scale", self.scale)
        for name in ("depth", "repeats", "batch_size"):
            _check_int(f"LiSSA.{name}", getattr(self, name))


Solver = Exact | CG | LiSSA
_DEFAULTS: dict[SolverMethod, type[Exact] | type[CG] | type[LiSSA]] = {
    SolverMethod.EXACT: Exact, SolverMethod.CG: CG, SolverMethod.LISSA: LiSSA,
}  # fmt: skip


def _check_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive int.")


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{name}={value!r} must be a finite number > 0.")


def _check_damping(damping: object) -> float:
    if isinstance(damping, bool) or not isinstance(damping, (int, float)) or not math.isfinite(damping) or damping < 0:
        raise ConfigError(
            f"damping={damping!r} must be a finite number >= 0: the λ of (H + λI)⁻¹, per example (an L2 penalty "
            "(λ/2)‖θ‖² summed over N examples is damping λ/N)."
        )
    return float(damping)


def resolve_solver(solver: Solver | SolverMethod | str) -> Solver:
    """A solver spec from a spec, a `SolverMethod` or its value (defaults for the latter)."""
    if isinstance(solver, (Exact, CG, LiSSA)):
        return solver
    return _DEFAULTS[parse_enum(SolverMethod, solver, "solver")]()


# --------------------------------------------------------------------------------------------
# The solvers: (H + λI)⁻¹ applied to columns B [m, P], float64.


def exact_factors(operator: CurvatureOperator, spec: Exact, damping: float) -> tuple[Tensor, Tensor]:
    """(eigenvalues [P], eigenvectors [P, P]) of the dense H; refuses a P above the limit or H + λI ⪯ 0."""
    P = operator.dim
    if P > spec.max_parameters:
        raise ConfigError(
            f"exact needs a dense {P:,} x {P:,} float64 matrix ({8 * P * P / 2**30:.1f} GiB) and {P:,} curvature "
            f"products: P={P:,} parameters exceeds Exact.max_parameters={spec.max_parameters:,}. Choose fewer modules "
            "(LoGraConfig.modules), raise max_parameters, or use solver='cg' or the arnoldi eigenbasis."
        )
    eigenvalues, eigenvectors = torch.linalg.eigh(operator.dense())
    _check_positive_definite("exact", float(eigenvalues.min()), float(eigenvalues.max()), damping)
    return eigenvalues, eigenvectors


def _check_positive_definite(method: str, smallest: float, largest: float, damping: float) -> None:
    if smallest + damping <= 1e-12 * max(abs(largest), damping, 1e-300):
        raise ConfigError(
            f"{method}: H + λI is not positive definite: H's smallest eigenvalue is {smallest:.4g} (largest "
            f"{largest:.4g}) and damping is {damping:.4g}. Pass damping > {max(-smallest, 0.0):.4g}, or "
            "curvature='ggn' (positive semi-definite) for a non-convex model."
        )


def conjugate_gradients(operator: CurvatureOperator, B: Tensor, spec: CG, damping: float) -> Tensor:
    """(H + λI)⁻¹ B by CG on every column of B [m, P] at once (converged columns stop)."""
    X = torch.zeros_like(B)
    R = B.clone()
    D = R.clone()
    b_norm = B.norm(dim=1)
    rs = (R * R).sum(1)
    active = (rs.sqrt() > spec.tol * b_norm).nonzero().flatten()
    for _ in range(spec.max_iter):
        if active.numel() == 0:
            return X
        d = D[active]
        hd = operator.matvec(d) + damping * d
        curv = (d * hd).sum(1)
        if not (curv > 0).all():
            raise SolverError(
                f"cg met a direction of non-positive curvature ({float(curv.min()):.4g}): H + λI with damping "
                f"{damping:.4g} is not positive definite. Raise damping, or use curvature='ggn'."
            )
        alpha = rs[active] / curv
        X[active] += alpha[:, None] * d
        R[active] -= alpha[:, None] * hd
        rs_new = (R[active] ** 2).sum(1)
        D[active] = R[active] + (rs_new / rs[active])[:, None] * d
        rs[active] = rs_new
        active = active[rs_new.sqrt() > spec.tol * b_norm[active]]
    if active.numel():
        residual = float((rs[active].sqrt() / b_norm[active]).max())
        warnings.warn(
            f"cg did not converge on {active.numel()} of {B.shape[0]} vectors in max_iter={spec.max_iter} "
            f"iterations: relative residual {residual:.3g} > tol={spec.tol:g}. Raise max_iter, or damping (a better "
            "conditioned H + λI converges faster).",
            ConvergenceWarning,
            stacklevel=3,
        )
    return X


def lissa(operator: CurvatureOperator, B: Tensor, spec: LiSSA, damping: float) -> Tensor:
    """(H + λI)⁻¹ B by the LiSSA recursion (module docstring), averaged over spec.repeats runs."""
    data = concat_batches(operator.batches)
    n = operator.n_examples
    gen = torch.Generator().manual_seed(spec.seed)
    size = min(spec.batch_size, n)
    b_norm = B.norm(dim=1)
    total = torch.zeros_like(B)
    for _ in range(spec.repeats):
        h = B.clone()
        for step in range(spec.depth):
            batch = take(data, torch.randperm(n, generator=gen)[:size])
            hv = operator.batch_product(batch, h, f"(a LiSSA minibatch at step {step})") / size
            h = B + h - (hv + damping * h) / spec.scale
            grown = h.norm(dim=1) > 2 * (step + 2) * b_norm  # a converging series stays below (step + 2) ‖b‖
            if not torch.isfinite(h).all() or grown.any():
                raise SolverError(
                    f"lissa diverged at step {step + 1} of {spec.depth} with scale={spec.scale:g}: the curvature of a "
                    f"minibatch plus damping ({damping:.4g}) has eigenvalues outside (0, 2 x scale). Pass a larger "
                    f"scale (e.g. LiSSA(scale={4 * spec.scale:g})), a larger batch_size, or a larger damping."
                )
        total += h / spec.scale
    return total / spec.repeats


# --------------------------------------------------------------------------------------------
# The preconditioner the Scorer uses.


class SolverPreconditioner(Preconditioner):
    """(H + λI)⁻¹ by exact, cg or lissa, over the rows of an unprojected store (see `fit_solver`).

    It holds the model and the training batches, so it is not saved: fit it again. `apply` runs
    the solver on the rows given (float64) and returns them in their dtype on their device.
    """

    method = SolverMethod.CG  # type: ignore[assignment]  # a solver, not a PreconditionerMethod: never saved

    def __init__(
        self,
        layers: Sequence[LayerInfo],
        fingerprint: str,
        operator: CurvatureOperator,
        solver: Solver,
        damping: float,
    ) -> None:
        super().__init__(layers, {}, {}, fingerprint, fisher="custom")  # the curvature is `self.curvature`
        self.operator, self.solver, self.lam = operator, solver, damping
        self.curvature = operator.curvature
        self.damping = {layer.name: damping for layer in self.layers}
        self.solver_method = {Exact: SolverMethod.EXACT, CG: SolverMethod.CG, LiSSA: SolverMethod.LISSA}[type(solver)]
        self._eigen = exact_factors(operator, solver, damping) if isinstance(solver, Exact) else None

    def apply(self, G: Tensor) -> Tensor:
        """(H + λI)⁻¹ applied to rows G [Q, P] -> [Q, P] (G is not modified)."""
        if not isinstance(G, Tensor) or G.dim() != 2 or G.shape[1] != self.dim or not G.is_floating_point():
            shape = tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__
            raise ConfigError(
                f"apply() needs floating rows [Q, P={self.dim}] logged with full_config on this model, got {shape}."
            )
        B = G.detach().to("cpu", torch.float64)
        if self._eigen is not None:
            lam, vecs = self._eigen
            X = ((B @ vecs) / (lam + self.lam)) @ vecs.T
        elif isinstance(self.solver, CG):
            X = conjugate_gradients(self.operator, B, self.solver, self.lam)
        else:
            assert isinstance(self.solver, LiSSA)
            X = lissa(self.operator, B, self.solver, self.lam)
        return X.to(device=G.device, dtype=torch.promote_types(G.dtype, torch.float32))

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Preconditioner:
        """This preconditioner: it computes in float64 and returns rows on their own device."""
        return self

    def save(self, directory: str | os.PathLike[str]) -> Path:
        raise ConfigError(
            f"a {self.solver_method.value} solver holds the model and the training batches and is not saved; fit it "
            "again with fit_solver(...), or save an arnoldi eigenbasis (logra.curvature.arnoldi) instead."
        )

    def __repr__(self) -> str:
        return f"SolverPreconditioner({self.solver!r}, P={self.dim}, damping={self.lam:g}, {self.curvature.value})"


def check_model(model: nn.Module, store: GradientStore) -> None:
    """Raise ConfigError unless `model`'s chosen layers are those the store was logged with."""
    selected = select_layers(model, store.config.modules, store.config.exclude)
    if model_fingerprint(model, selected) != store.model_fingerprint:
        raise ConfigError(
            f"the model is not the one the store at {store.root} was logged with (other layers or weights); the "
            "solvers differentiate the training model: pass that one."
        )


def fit_solver(
    store: GradientStore,
    model: nn.Module,
    loss: LossFn,
    batches: Sequence[Batch],
    solver: Solver | SolverMethod | str = SolverMethod.CG,
    *,
    damping: float,
    curvature: Curvature | str = Curvature.HESSIAN,
    chunk: int = DEFAULT_CHUNK,
) -> SolverPreconditioner:
    """A `SolverPreconditioner` for `store`, whose rows must be unprojected (`full_config`).

    Args:
        store: the training store, logged with `full_config(config)` on `model`.
        model: the trained model (eval mode); its chosen layers are the store's.
        loss: loss(model, batch) -> the summed loss of the batch, or an `OutputLoss`.
        batches: the training batches H averages over (usually the store's examples).
        solver: an `Exact`, `CG` or `LiSSA` spec, or "exact" | "cg" | "lissa" for the defaults.
        damping: λ >= 0 of (H + λI)⁻¹, on the mean per-example curvature.
        curvature: hessian | ggn.  chunk: vectors per batched backward (no effect on results).
    """
    if not isinstance(store, GradientStore):
        raise ConfigError(f"fit_solver needs a GradientStore.open(path), got a {type(store).__name__}.")
    if not is_full(store.config, store.layers):
        raise ConfigError(
            f"the store at {store.root} holds projected gradients (init={store.config.init.value}); exact, cg and "
            "lissa need the exact per-example gradients: log the store with logra.curvature.full_config(config)."
        )
    spec = resolve_solver(solver)
    lam = _check_damping(damping)
    check_model(model, store)
    operator = CurvatureOperator(model, ParameterSpace(model, store.layers), loss, batches, curvature, chunk)
    return SolverPreconditioner(store.layers, store.config.projection_fingerprint(), operator, spec, lam)


def inverse_hvp(
    operator: CurvatureOperator, vectors: Tensor, solver: Solver | SolverMethod | str, damping: float
) -> Tensor:
    """(H + λI)⁻¹ V for V [m, P] (float64), by the given solver, without a store."""
    spec, lam = resolve_solver(solver), _check_damping(damping)
    B = vectors.detach().to("cpu", torch.float64)
    if isinstance(spec, Exact):
        eigenvalues, eigenvectors = exact_factors(operator, spec, lam)
        return ((B @ eigenvectors) / (eigenvalues + lam)) @ eigenvectors.T
    if isinstance(spec, CG):
        return conjugate_gradients(operator, B, spec, lam)
    return lissa(operator, B, spec, lam)
