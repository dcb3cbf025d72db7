"""Typed, validated configuration of a logging run.

`LoGraConfig` decides everything that changes the numbers in a store: which layers are logged,
the projection sizes and their initialisation, the seed, the storage dtype and the bias column.
Execution knobs that must *not* change results (batch size, shard size, chunk size, number of
processes) are deliberately not part of it. The config is saved beside every artifact
(`to_dict`) and its `fingerprint()` guards every join between artifacts: a query logged with a
different config than the training store is refused.
"""

from __future__ import annotations

import enum
import fnmatch
import hashlib
import json
import re
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from logra.errors import ConfigError
from logra.types import parse_enum


class ProjectionInit(str, enum.Enum):
    """How projection matrices are drawn.

    gaussian: i.i.d. N(0, 1/k) entries.  rademacher: i.i.d. ±1/sqrt(k).
    orthogonal: rows orthonormal (P Pᵀ = I).  identity: the first k rows of the identity
    (with k equal to the layer size, logging is exact).  pca: the top-k eigenvectors of the
    Kronecker factors of an earlier full-size pass (see `pca_statistics`).  sjlt: FactGraSS-style
    structured sparse rows, per side a random mask of k' = min(n, 4k) coordinates followed by a
    sparse Johnson-Lindenstrauss transform to k (`logra.capture.projection`); applied by a gather
    instead of a matmul. Whatever the init, a side whose k reaches its width (k is clipped to it) is
    the identity: exact, nothing distorted.
    """

    GAUSSIAN = "gaussian"
    RADEMACHER = "rademacher"
    ORTHOGONAL = "orthogonal"
    IDENTITY = "identity"
    PCA = "pca"
    SJLT = "sjlt"

    @property
    def orthonormal_rows(self) -> bool:
        """Whether every drawn matrix has P Pᵀ = I (else full-size damping needs its Gram)."""
        return self in (ProjectionInit.ORTHOGONAL, ProjectionInit.IDENTITY, ProjectionInit.PCA)


class StorageDtype(str, enum.Enum):
    """The dtype rows are stored in. Half types halve the bytes per example."""

    FLOAT32 = "float32"
    FLOAT64 = "float64"
    BFLOAT16 = "bfloat16"
    FLOAT16 = "float16"

    @property
    def itemsize(self) -> int:
        return {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2}[self.value]


class LossReduction(str, enum.Enum):
    """How the loss the user backpropagates combines the examples of a batch.

    sum: the sum of per-example losses (recommended); the logged row is ∇L_i exactly.
    mean: the mean over the B examples of the batch; logged rows are multiplied by B so that
    they are still ∇L_i and nothing scales with batch size.
    """

    SUM = "sum"
    MEAN = "mean"


class NonFinitePolicy(str, enum.Enum):
    """What to do when an example's logged gradient has NaN or Inf entries.

    raise: raise `NonFiniteGradientError` naming the ids (nothing of that batch is written).
    skip: drop those examples, keep the rest of the batch, and record the ids in the store.
    """

    RAISE = "raise"
    SKIP = "skip"


_ENUM_FIELDS: dict[str, type[enum.Enum]] = {
    "init": ProjectionInit,
    "dtype": StorageDtype,
    "loss_reduction": LossReduction,
    "nonfinite": NonFinitePolicy,
}


@dataclass(frozen=True)
class LoGraConfig:
    """Everything that determines the values of logged, projected per-example gradients."""

    k_in: int = field(
        default=64, metadata={"help": "Input-side projection size (clipped to the layer width: then the identity)."}
    )
    k_out: int = field(
        default=64, metadata={"help": "Output-side projection size (clipped to the layer width: then the identity)."}
    )
    init: ProjectionInit = field(default=ProjectionInit.GAUSSIAN, metadata={"help": "Projection initialisation."})
    seed: int = field(default=0, metadata={"help": "Seed of every projection matrix."})
    modules: tuple[str, ...] | None = field(
        default=None,
        metadata={"help": "fnmatch patterns on qualified module names; None selects every supported layer."},
    )
    exclude: tuple[str, ...] = field(default=(), metadata={"help": "Patterns removed from the selection."})
    layer_k: dict[str, tuple[int, int]] = field(
        default_factory=dict,
        metadata={"help": "Per-layer overrides: pattern -> (k_in, k_out); the first matching pattern wins."},
    )
    dtype: StorageDtype = field(default=StorageDtype.FLOAT32, metadata={"help": "Storage dtype of rows."})
    include_bias: bool = field(
        default=False, metadata={"help": "Log the bias gradient as an extra input column of ones."}
    )
    loss_reduction: LossReduction = field(
        default=LossReduction.SUM, metadata={"help": "How the backpropagated loss combines examples."}
    )
    nonfinite: NonFinitePolicy = field(default=NonFinitePolicy.RAISE, metadata={"help": "NaN/Inf policy."})
    share_input_projection: bool = field(
        default=True,
        metadata={
            "help": "Layers of equal input width and k_in share one input projection, so an input read by "
            "several layers (q, k, v) is projected once. pca projections are always per layer."
        },
    )
    pca_statistics: str | None = field(
        default=None,
        metadata={
            "help": "For init='pca': a store logged with init='identity' at full size; its factors give projections."
        },
    )
    optimizer_correction: str | None = field(
        default=None,
        metadata={
            "help": "The fingerprint of the OptimizerCorrection (Adam's factorised second moments, "
            "logra.curvature.optimizer) folded into the projections; None: plain gradients."
        },
    )

    def __post_init__(self) -> None:
        for name, enum_type in _ENUM_FIELDS.items():
            value = getattr(self, name)
            if not isinstance(value, enum_type):
                object.__setattr__(self, name, parse_enum(enum_type, value, f"LoGraConfig.{name}"))
        for name in ("k_in", "k_out"):
            _check_positive_int(f"LoGraConfig.{name}", getattr(self, name))
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise ConfigError(f"LoGraConfig.seed={self.seed!r} must be an int.")
        if not isinstance(self.include_bias, bool):
            raise ConfigError(f"LoGraConfig.include_bias={self.include_bias!r} must be True or False.")
        if not isinstance(self.share_input_projection, bool):
            raise ConfigError(
                f"LoGraConfig.share_input_projection={self.share_input_projection!r} must be True or False."
            )
        if self.pca_statistics is not None and not isinstance(self.pca_statistics, str):
            raise ConfigError(f"LoGraConfig.pca_statistics={self.pca_statistics!r} must be a store path (str) or None.")
        if self.optimizer_correction is not None and not (
            isinstance(self.optimizer_correction, str) and re.fullmatch(r"[0-9a-f]{16}", self.optimizer_correction)
        ):
            raise ConfigError(
                f"LoGraConfig.optimizer_correction={self.optimizer_correction!r} must be the 16-hex-digit fingerprint "
                "of an OptimizerCorrection (set it with correction.configure(config)) or None."
            )
        if self.modules is not None:
            if isinstance(self.modules, str):
                object.__setattr__(self, "modules", (self.modules,))
            object.__setattr__(self, "modules", _check_patterns("modules", self.modules))
            if not self.modules:
                raise ConfigError("LoGraConfig.modules=() selects nothing; pass None to select every supported layer.")
        if isinstance(self.exclude, str):
            object.__setattr__(self, "exclude", (self.exclude,))
        object.__setattr__(self, "exclude", _check_patterns("exclude", self.exclude))
        if not isinstance(self.layer_k, dict):
            raise ConfigError(f"LoGraConfig.layer_k={self.layer_k!r} must be a dict pattern -> (k_in, k_out).")
        clean: dict[str, tuple[int, int]] = {}
        for pattern, ks in self.layer_k.items():
            if not isinstance(pattern, str) or not isinstance(ks, (tuple, list)) or len(ks) != 2:
                raise ConfigError(
                    f"LoGraConfig.layer_k entry {pattern!r}: {ks!r} must map a pattern to a pair (k_in, k_out)."
                )
            _check_positive_int(f"LoGraConfig.layer_k[{pattern!r}][0]", ks[0])
            _check_positive_int(f"LoGraConfig.layer_k[{pattern!r}][1]", ks[1])
            clean[pattern] = (int(ks[0]), int(ks[1]))
        object.__setattr__(self, "layer_k", clean)
        if self.init is ProjectionInit.PCA and not self.pca_statistics:
            raise ConfigError(
                "LoGraConfig.init='pca' needs pca_statistics: the path of a store logged with "
                "init='identity' and k at least the layer sizes, whose Kronecker factors give the projections."
            )

    def k_for(self, name: str) -> tuple[int, int]:
        """The requested (k_in, k_out) of layer `name`, before clipping to the layer's size."""
        for pattern, ks in self.layer_k.items():
            if fnmatch.fnmatchcase(name, pattern):
                return ks
        return self.k_in, self.k_out

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict; `from_dict(to_dict())` round-trips."""
        out = asdict(self)
        for name in _ENUM_FIELDS:
            out[name] = getattr(self, name).value
        out["modules"] = list(self.modules) if self.modules is not None else None
        out["exclude"] = list(self.exclude)
        out["layer_k"] = {k: list(v) for k, v in self.layer_k.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LoGraConfig:
        if not isinstance(data, dict):
            raise ConfigError(f"a LoGraConfig must be read from a dict, got {type(data).__name__}.")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown LoGraConfig fields {unknown}; known fields are {sorted(known)}.")
        kwargs = dict(data)
        for name in ("modules", "exclude"):  # JSON lists -> tuples; other types are refused by __post_init__
            if isinstance(kwargs.get(name), list):
                kwargs[name] = tuple(kwargs[name])
        if "layer_k" in kwargs and isinstance(kwargs["layer_k"], dict):
            kwargs["layer_k"] = {k: tuple(v) if isinstance(v, list) else v for k, v in kwargs["layer_k"].items()}
        try:
            return cls(**kwargs)
        except TypeError as exc:  # a wrong type deep inside, e.g. a list where a str was expected
            raise ConfigError(f"invalid LoGraConfig {data!r}: {exc}") from None

    def fingerprint(self) -> str:
        """A short hash of every field (stable across processes): stores resume only under the same one."""
        return _hash(self.to_dict())

    def projection_fingerprint(self) -> str:
        """A hash of the fields that decide the layer table and the projections.

        Query gradients can be scored against a store exactly when these agree; the storage
        dtype, loss reduction and NaN policy may differ between the two sides.
        """
        d = self.to_dict()
        for name in ("dtype", "loss_reduction", "nonfinite"):
            d.pop(name)
        return _hash(d)


def _hash(d: dict[str, Any]) -> str:
    text = json.dumps(d, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _check_positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive int (a projection size such as 64).")


def _check_patterns(name: str, patterns: object) -> tuple[str, ...]:
    if not isinstance(patterns, (tuple, list)) or not all(isinstance(p, str) for p in patterns):
        raise ConfigError(f"LoGraConfig.{name}={patterns!r} must be a list of fnmatch patterns such as '*mlp*'.")
    return tuple(patterns)
