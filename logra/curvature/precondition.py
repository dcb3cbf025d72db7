"""Preconditioners: the (damped) inverse curvature H⁻¹ applied to per-layer gradient blocks.

A store row is, for each layer in the layer table, a (k_out, k_in) matrix G flattened row-major.
Every preconditioner is block diagonal over layers and maps rows [Q, D] to rows [Q, D]:

- identity: H = I, a plain gradient dot product (TracIn-style).
- kfac: H = S ⊗ A with A = Σx̃x̃ᵀ/n_tokens and S = Σg̃g̃ᵀ/n_examples. With (Q_S, λ_S) the
  generalized eigenpairs of (S, M_S) and (Q_A, λ_A) those of (A, M_A) (below; float64, a plain
  eigh where M = I), (H + λ M_S ⊗ M_A)⁻¹ vec(G) = vec(Q_S [(Q_Sᵀ G Q_A) / (λ_S λ_Aᵀ + λ)] Q_Aᵀ).
- ekfac: the kfac basis with the eigenvalues λ_S λ_Aᵀ replaced by the mean over stored rows of
  (Q_Sᵀ G_i Q_A)² (one chunked pass over the shards).
- raw: H = (1/N) Σ vec(G_i) vec(G_i)ᵀ, a (k_out·k_in)² matrix per layer, applied through its
  float64 (generalized) eigendecomposition.

Damping λ is in *full-size* units, for every method and init: it is the λ added to the layer's
full-size (n_out n_in)² curvature C before the projection P = P_out ⊗ P_in (k × n) sees it, so the
projected curvature is P (C + λI) Pᵀ = H + λ P Pᵀ with H = P C Pᵀ the curvature fitted on the
projected rows (per side for Kronecker factors: P Pᵀ = M_S ⊗ M_A with M_S = P_out P_outᵀ, M_A = P_in P_inᵀ). Every
method keeps its factors in a basis B that diagonalises H and P Pᵀ at once (`generalized_eigh`:
H B = P Pᵀ B Λ, Bᵀ P Pᵀ B = I), so H⁻¹ is B diag(1 / (Λ + λ)) Bᵀ; with orthonormal projection rows
(orthogonal, identity, pca, and a side whose k is clipped to its width, which is the identity)
P Pᵀ = I and B is the ordinary eigenbasis. Gaussian and rademacher rows have squared norm n/k,
so there P Pᵀ ≈ (n/k) I. With identity projections at full size everything is exact: damping =
the L2 coefficient of a *mean* training loss (λ_L2/N for a summed one) is the L2 term.

By default, `DEFAULT_RELATIVE_DAMPING` (0.1, as Kronfluence does) times the mean of Λ, the
curvature's eigenvalues in those same full-size units: for every projection it estimates the
full-size mean eigenvalue tr(C)/n (exactly for C ∝ I and at k = n; tr(H)/k for orthonormal rows;
about tr(H)/n for gaussian rows, whose P Pᵀ ≈ (n/k) I), so the default λ does not move with k.

Preconditioners are pure: fitting twice gives identical tensors, `apply` never edits its input or
the preconditioner. They are saved as JSON plus an .npz read with `allow_pickle=False`
(`logra.curvature.saved`).
"""

from __future__ import annotations

import enum
import functools
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import Tensor

from logra.capture.layers import projection_grams
from logra.config import ProjectionInit
from logra.curvature.moments import (
    CurvatureSource,
    EigenbasisMoments,
    FisherKind,
    FisherStatistics,
    GradientCovariance,
    accumulate_store,
    curvature_source,
    generalized_eigh,
    kronecker_eigenbases,
)
from logra.errors import ConfigError
from logra.store.reader import GradientStore
from logra.types import KroneckerStatistics, LayerInfo, parse_enum

DEFAULT_RELATIVE_DAMPING = 0.1
Device = torch.device | str | None


class PreconditionerMethod(str, enum.Enum):
    """Which curvature approximation H to invert (see the module docstring)."""

    IDENTITY = "identity"
    KFAC = "kfac"
    EKFAC = "ekfac"
    RAW = "raw"
    ARNOLDI = "arnoldi"  # a store of Arnoldi-eigenbasis rows: logra.curvature.arnoldi


# --------------------------------------------------------------------------------------------
# The preconditioners: one small class per method, found through a registry.


class Preconditioner:
    """The damped inverse curvature of one store, block diagonal over its layers.

    Attributes:
        method: the `PreconditionerMethod`.  layers: the layer table it applies to.  dim: D.
        damping: {layer: λ}, the damping added to each layer's full-size curvature (module docstring).
        factors: {layer: {name: float64 tensor}}, the fitted tensors (read them, do not edit them).
        fingerprint: the projection fingerprint of the store it was fitted on.
        fisher: the `FisherKind` of its curvature: empirical (the logged labels), true (labels drawn
            from the model) or custom (given statistics).
    """

    method: ClassVar[PreconditionerMethod]
    registry: ClassVar[dict[PreconditionerMethod, type[Preconditioner]]] = {}

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        Preconditioner.registry[cls.method] = cls

    def __init__(
        self,
        layers: Iterable[LayerInfo],
        factors: Mapping[str, Mapping[str, Tensor]],
        damping: Mapping[str, float],
        fingerprint: str,
        fisher: FisherKind | str = FisherKind.EMPIRICAL,
    ) -> None:
        self.layers = tuple(layers)
        self.factors = {layer.name: dict(factors.get(layer.name, {})) for layer in self.layers}
        missing = [layer.name for layer in self.layers if layer.name not in damping and self.factor_shapes(layer)]
        if missing:
            raise ConfigError(f"no damping given for layers {missing}; give one value per layer.")
        self.damping = {layer.name: float(damping.get(layer.name, 0.0)) for layer in self.layers}
        self.fingerprint = fingerprint
        self.fisher = parse_enum(FisherKind, fisher, "fisher")
        self.dim = sum(layer.size for layer in self.layers)
        for layer in self.layers:
            expected = self.factor_shapes(layer)
            got = {k: tuple(v.shape) for k, v in self.factors[layer.name].items()}
            if got != expected:
                raise ConfigError(f"{self.method.value} factors of layer {layer.name!r}: shapes {got}, not {expected}.")
            eigenvalues = self.curvature_eigenvalues(self.factors[layer.name])
            _check_invertible(self.method, layer.name, eigenvalues, self.damping[layer.name])

    # ------------------------------------------------------------ what each method defines

    @classmethod
    def factor_shapes(cls, layer: LayerInfo) -> dict[str, tuple[int, ...]]:
        """The names and shapes of the float64 tensors this method keeps for `layer`."""
        return {}

    @classmethod
    def fit_factors(
        cls, store: GradientStore, source: CurvatureSource, chunk_rows: int, device: Device, progress: bool | None
    ) -> dict[str, dict[str, Tensor]]:
        """{layer: factors} fitted on `store` (one pass over its rows where the method needs one)."""
        return {}

    @staticmethod
    def curvature_eigenvalues(factors: Mapping[str, Tensor]) -> Tensor | None:
        """The undamped curvature's eigenvalues of one layer (any shape); None for identity."""
        return None

    @classmethod
    def damping_reference(cls, eigenvalues: Tensor, layer: LayerInfo, init: ProjectionInit) -> float:
        """The mean eigenvalue the default damping is relative to (module docstring): the mean of the
        curvature's eigenvalues in full-size units, an estimate of the full-size mean."""
        return float(eigenvalues.mean())

    def _apply_layer(self, layer: LayerInfo, block: Tensor, f: dict[str, Tensor], damping: float) -> Tensor:
        """block (Q, k_out*k_in) -> H⁻¹ block; `f` holds the factors in block's dtype and device."""
        return block.clone()

    # ------------------------------------------------------------ shared behaviour

    def apply(self, G: Tensor) -> Tensor:
        """H⁻¹ applied to each layer block of rows G [Q, D] -> [Q, D].

        Computes in G's dtype upcast to at least float32, on G's device. G is not modified.
        """
        if not isinstance(G, Tensor) or G.dim() != 2 or G.shape[1] != self.dim or not G.is_floating_point():
            shape = tuple(G.shape) if isinstance(G, Tensor) else type(G).__name__
            raise ConfigError(
                f"apply() needs floating rows of shape [Q, D={self.dim}], got {shape}; pass rows logged with the "
                "same LoGraConfig as the store the preconditioner was fitted on."
            )
        x = G.to(torch.promote_types(G.dtype, torch.float32))
        parts = []
        for layer in self.layers:
            f = {k: v.to(device=x.device, dtype=x.dtype) for k, v in self.factors[layer.name].items()}
            block = x[:, layer.offset : layer.offset + layer.size]
            parts.append(self._apply_layer(layer, block, f, self.damping[layer.name]))
        return torch.cat(parts, dim=1)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Preconditioner:
        """A new preconditioner whose factors live on `device` in `dtype` (this one is unchanged)."""
        factors = {
            name: {k: v.to(device=device, dtype=dtype) for k, v in f.items()} for name, f in self.factors.items()
        }
        return type(self)(self.layers, factors, self.damping, self.fingerprint, self.fisher)

    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write `preconditioner.json` and `factors.npz` into `directory` (created); returns it."""
        from logra.curvature.saved import save_preconditioner  # saved.py reads the registry defined here

        return save_preconditioner(self, directory)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layers={len(self.layers)}, D={self.dim}, fisher={self.fisher.value!r})"


class IdentityPreconditioner(Preconditioner):
    """H = I: scores are plain dot products of the projected gradients (TracIn-style)."""

    method = PreconditionerMethod.IDENTITY


class KFACPreconditioner(Preconditioner):
    """H = S ⊗ A + λ P Pᵀ, inverted in the (generalized) eigenbases of the two Kronecker factors."""

    method = PreconditionerMethod.KFAC

    @classmethod
    def factor_shapes(cls, layer: LayerInfo) -> dict[str, tuple[int, ...]]:
        return {
            "grad_eigenvectors": (layer.k_out, layer.k_out),
            "grad_eigenvalues": (layer.k_out,),
            "input_eigenvectors": (layer.k_in, layer.k_in),
            "input_eigenvalues": (layer.k_in,),
        }

    @classmethod
    def fit_factors(
        cls, store: GradientStore, source: CurvatureSource, chunk_rows: int, device: Device, progress: bool | None
    ) -> dict[str, dict[str, Tensor]]:
        names = ("grad_eigenvectors", "grad_eigenvalues", "input_eigenvectors", "input_eigenvalues")
        bases = kronecker_eigenbases(source.kronecker, projection_grams(store.config, store.layers))
        return {name: dict(zip(names, eig)) for name, eig in bases.items()}

    @staticmethod
    def curvature_eigenvalues(factors: Mapping[str, Tensor]) -> Tensor:
        return torch.outer(factors["grad_eigenvalues"], factors["input_eigenvalues"])  # (k_out, k_in)

    def _apply_layer(self, layer: LayerInfo, block: Tensor, f: dict[str, Tensor], damping: float) -> Tensor:
        q_s, q_a = f["grad_eigenvectors"], f["input_eigenvectors"]
        rotated = q_s.T @ block.reshape(-1, layer.k_out, layer.k_in) @ q_a  # (Q, k_out, k_in), eigenbasis
        scaled = rotated / (self.curvature_eigenvalues(f) + damping)
        return (q_s @ scaled @ q_a.T).reshape(block.shape)


class EKFACPreconditioner(KFACPreconditioner):
    """KFAC's eigenbasis with the eigenvalues refitted to the stored rows' second moments."""

    method = PreconditionerMethod.EKFAC

    @classmethod
    def factor_shapes(cls, layer: LayerInfo) -> dict[str, tuple[int, ...]]:
        return {
            "grad_eigenvectors": (layer.k_out, layer.k_out),
            "input_eigenvectors": (layer.k_in, layer.k_in),
            "eigenvalues": (layer.k_out, layer.k_in),
        }

    @classmethod
    def fit_factors(
        cls, store: GradientStore, source: CurvatureSource, chunk_rows: int, device: Device, progress: bool | None
    ) -> dict[str, dict[str, Tensor]]:
        grams = projection_grams(store.config, store.layers)
        bases = {name: (q_s, q_a) for name, (q_s, _, q_a, _) in kronecker_eigenbases(source.kronecker, grams).items()}
        moments = source.moments
        if moments is None:
            acc = EigenbasisMoments(store.layers, bases)
            accumulate_store(store, acc, chunk_rows, device, progress)
            moments = acc.result()
        return {
            name: {"grad_eigenvectors": q_s, "input_eigenvectors": q_a, "eigenvalues": moments[name]}
            for name, (q_s, q_a) in bases.items()
        }

    @staticmethod
    def curvature_eigenvalues(factors: Mapping[str, Tensor]) -> Tensor:
        return factors["eigenvalues"]


class RawPreconditioner(Preconditioner):
    """H = (1/N) Σ vec(G_i)vec(G_i)ᵀ + λ P Pᵀ per layer, through its float64 (generalized) eigendecomposition."""

    method = PreconditionerMethod.RAW

    @classmethod
    def factor_shapes(cls, layer: LayerInfo) -> dict[str, tuple[int, ...]]:
        return {"eigenvectors": (layer.size, layer.size), "eigenvalues": (layer.size,)}

    @classmethod
    def fit_factors(
        cls, store: GradientStore, source: CurvatureSource, chunk_rows: int, device: Device, progress: bool | None
    ) -> dict[str, dict[str, Tensor]]:
        covariance = source.covariance
        if covariance is None:
            acc = GradientCovariance(store.layers)
            accumulate_store(store, acc, chunk_rows, device, progress)
            covariance = acc.result()
        grams = projection_grams(store.config, store.layers)
        factors = {}
        for layer in store.layers:
            name, cov = layer.name, covariance[layer.name]
            lam, vecs = generalized_eigh(cov, _kron_gram(layer, *grams[name]))
            factors[name] = {"eigenvectors": vecs, "eigenvalues": lam}
        return factors

    @staticmethod
    def curvature_eigenvalues(factors: Mapping[str, Tensor]) -> Tensor:
        return factors["eigenvalues"]

    def _apply_layer(self, layer: LayerInfo, block: Tensor, f: dict[str, Tensor], damping: float) -> Tensor:
        vecs = f["eigenvectors"]
        return ((block @ vecs) / (f["eigenvalues"] + damping)) @ vecs.T


# --------------------------------------------------------------------------------------------
# Fitting: the curvature source, damping, and the public entry points.


def fit_preconditioner(
    store: GradientStore,
    method: PreconditionerMethod | str = PreconditionerMethod.KFAC,
    damping: float | Mapping[str, float] | None = None,
    statistics: Mapping[str, KroneckerStatistics] | FisherStatistics | None = None,
    *,
    chunk_rows: int = 4096,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> Preconditioner:
    """Fit a preconditioner of `method` on `store`.

    Args:
        store: an open `GradientStore` (holding statistics, for kfac/ekfac without `statistics`).
        method: identity | kfac | ekfac | raw (a `PreconditionerMethod` or its value).
        damping: λ for every layer, or a {layer: λ} dict, added to the *full-size* curvature (so
            damping = the L2 coefficient of a mean training loss is that L2 term, whatever the
            projection); or None for DEFAULT_RELATIVE_DAMPING (0.1) times each layer's mean
            eigenvalue of the undamped curvature in those units (module docstring).
        statistics: replaces the store's empirical curvature: a {layer: KroneckerStatistics} dict
            (kfac, ekfac) or the `FisherStatistics` of `true_fisher_statistics` (the true Fisher).
        chunk_rows: rows per chunk of the ekfac/raw pass (results agree to rounding for any value).
        device: where the ekfac/raw pass computes (float64); default: the CPU.
        progress: a tqdm bar for that pass (None: only on a terminal).
    """
    if not isinstance(store, GradientStore):
        raise ConfigError(f"fit_preconditioner needs a GradientStore.open(path), got a {type(store).__name__}.")
    if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ConfigError(f"chunk_rows={chunk_rows!r} must be a positive int.")
    method = parse_enum(PreconditionerMethod, method, "method")
    cls = Preconditioner.registry[method]
    if method is PreconditionerMethod.IDENTITY:
        if damping is not None or statistics is not None:
            raise ConfigError("method='identity' uses no curvature: pass damping=None and statistics=None.")
        return cls(store.layers, {}, {}, store.config.projection_fingerprint())
    source = curvature_source(store, statistics, raw=method is PreconditionerMethod.RAW)
    factors = cls.fit_factors(store, source, chunk_rows, device, progress)
    resolved = _resolve_damping(cls, store.layers, factors, damping, store.config.init)
    return cls(store.layers, factors, resolved, store.config.projection_fingerprint(), source.fisher)


def _kron_gram(layer: LayerInfo, gram_out: Tensor | None, gram_in: Tensor | None) -> Tensor | None:
    """P Pᵀ (k_out k_in, k_out k_in) of P = P_out ⊗ P_in from its sides' Grams (None: the identity)."""
    if gram_out is None and gram_in is None:
        return None
    eye = functools.partial(torch.eye, dtype=torch.float64)
    out = eye(layer.k_out) if gram_out is None else gram_out
    return torch.kron(out, eye(layer.k_in) if gram_in is None else gram_in)


def _resolve_damping(
    cls: type[Preconditioner],
    layers: Iterable[LayerInfo],
    factors: Mapping[str, Mapping[str, Tensor]],
    damping: Any,
    init: ProjectionInit,
) -> dict[str, float]:
    """{layer: λ}: the given value(s), or 0.1 x the layer's mean undamped eigenvalue (module docstring)."""
    layers = tuple(layers)
    if isinstance(damping, Mapping):
        unknown = sorted(set(damping) - {layer.name for layer in layers})
        missing = sorted({layer.name for layer in layers} - set(damping))
        if unknown or missing:
            raise ConfigError(
                f"the damping dict names unknown layers {unknown} and misses layers {missing}; "
                "give one value per logged layer."
            )
    resolved: dict[str, float] = {}
    for layer in layers:
        if damping is None:
            eig = cls.curvature_eigenvalues(factors[layer.name])
            mean = cls.damping_reference(eig, layer, init) if eig is not None else 0.0
            if not mean > 0:
                raise ConfigError(
                    f"layer {layer.name!r} has zero curvature (every stored gradient of it is zero), so the default "
                    "damping 0.1 x mean eigenvalue is 0. Exclude the layer from LoGraConfig.modules or pass damping>0."
                )
            resolved[layer.name] = DEFAULT_RELATIVE_DAMPING * mean
        else:
            value = damping[layer.name] if isinstance(damping, Mapping) else damping
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ConfigError(
                    f"damping={value!r} for layer {layer.name!r} must be a finite number >= 0, or None for the default."
                )
            resolved[layer.name] = float(value)
    return resolved


def _check_invertible(method: PreconditionerMethod, name: str, eig: Tensor | None, damping: float) -> None:
    if eig is None:
        return
    top = float(eig.max()) if eig.numel() else 0.0
    if float((eig + damping).min()) <= 1e-12 * max(top, damping):
        raise ConfigError(
            f"the {method.value} curvature of layer {name!r} is singular (smallest eigenvalue {float(eig.min()):.3g}, "
            f"largest {top:.3g}) and damping is {damping}; pass damping > 0, or damping=None for the default "
            "(0.1 x the layer's mean eigenvalue)."
        )
