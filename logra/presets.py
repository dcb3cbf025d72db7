"""Named presets: a recipe of capture, curvature and scoring choices under one name.

`trackstar` (Chang et al. 2024, "Scalable Influence and Fact Tracing for LLM Pretraining";
Bergson's default) combines three parts, each usable alone:

1. Optimizer correction (log side): every gradient is divided by the square root of Adam's
   second moment, factorised row x column so that it folds into the projections
   (`logra.curvature.optimizer.OptimizerCorrection`; the store records it).
2. Mixed curvature: R = (1 - λ) R_train + λ R_query, λ by TrackStar's rule unless given
   (`logra.curvature.mixed.mixed_preconditioner`).
3. Unit normalisation: the cosine of the two gradients in the R⁻¹ metric,
   g_qᵀR⁻¹g_i / sqrt(g_qᵀR⁻¹g_q · g_iᵀR⁻¹g_i) (`Normalization.COSINE`), which is TrackStar's
   cos(R^-1/2 g_q, R^-1/2 g_i).

    moments = adam_second_moments(optimizer, model)            # or trainer_second_moments(ckpt, model)
    config, correction = trackstar_config(model, LoGraConfig(), moments)
    with GradientLogger(model, config, "runs/train", correction=correction) as logger: ...
    with GradientLogger(model, config, correction=correction) as q: ...   # queries, statistics on
    scorer, lam = trackstar_scorer(store, QueryRows.of(records), q.statistics())
    scores = scorer.score(QueryRows.of(records))
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from torch import nn

from logra.config import LoGraConfig
from logra.curvature.mixed import mixed_preconditioner
from logra.curvature.optimizer import DEFAULT_EPS, TRACKSTAR_POWER, OptimizerCorrection, SecondMoments
from logra.curvature.precondition import PreconditionerMethod
from logra.errors import ConfigError
from logra.score import Normalization, Scorer
from logra.store.reader import GradientStore
from logra.types import KroneckerStatistics


class Preset(str, enum.Enum):
    """A named recipe (module docstring)."""

    TRACKSTAR = "trackstar"


TRACKSTAR_METHOD = PreconditionerMethod.EKFAC
"""The curvature the Python preset mixes by default (Bergson mixes the raw matrices; `method='raw'`)."""


def trackstar_config(
    model: nn.Module,
    config: LoGraConfig,
    moments: SecondMoments,
    *,
    eps: float = DEFAULT_EPS,
    power: float = TRACKSTAR_POWER,
) -> tuple[LoGraConfig, OptimizerCorrection]:
    """(config naming the correction, the correction) for logging `model` the TrackStar way.

    power: TrackStar's 0.5 (each side / sqrt(v̂)) or `ADAM_STEP_POWER` 0.25 (see OptimizerCorrection).
    """
    correction = OptimizerCorrection.from_moments(moments, model, config, eps=eps, power=power)
    return correction.configure(config), correction


def trackstar_scorer(
    store: GradientStore,
    queries: Any,
    query_statistics: Mapping[str, KroneckerStatistics] | None = None,
    *,
    method: PreconditionerMethod | str = TRACKSTAR_METHOD,
    mix: float | None = None,
    damping: float | Mapping[str, float] | None = None,
    require_correction: bool = True,
    chunk_rows: int = 4096,
    progress: bool | None = None,
) -> tuple[Scorer, float]:
    """(a cosine `Scorer` with the mixed curvature of `store` and `queries`, the λ used).

    Args:
        store: the training store, logged with an optimizer correction (unless `require_correction`
            is False: then the preset's other two parts alone).
        queries: the query rows (a `QueryRows`, `Record`, or [Q, D] tensor) logged with the store's
            config and correction; they are also what R_query is measured on.
        query_statistics: the query logger's `statistics()`, for method kfac/ekfac.
        method, mix, damping: of `mixed_preconditioner`.
    """
    if not isinstance(store, GradientStore):
        raise ConfigError(f"trackstar_scorer needs a GradientStore, got {type(store).__name__}.")
    if require_correction and store.config.optimizer_correction is None:
        raise ConfigError(
            f"the store at {store.root} was logged without an optimizer correction, which TrackStar needs: log it "
            "with trackstar_config(...) (CLI: logra log --preset trackstar --optimizer-state CKPT), or pass "
            "require_correction=False for mixed curvature and cosine alone."
        )
    pre, lam = mixed_preconditioner(
        store, queries, method, mix=mix, query_statistics=query_statistics, damping=damping, chunk_rows=chunk_rows
    )
    return Scorer(store, pre, Normalization.COSINE, chunk_rows, progress=progress), lam
