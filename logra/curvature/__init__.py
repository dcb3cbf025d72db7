"""Curvature: what H is and how H⁻¹ is applied to gradient rows.

- `moments`: statistics beyond the Kronecker factors (EK-FAC eigenvalues, raw covariance) from
  one pass over a store, and the resolution of where a preconditioner's curvature comes from.
- `fisher`: the true Fisher, a statistics-only capture pass with labels drawn from the model.
- `precondition`: the preconditioners (identity, kfac, ekfac, raw), their damping and fitting.
- `saved`: a preconditioner on disk (JSON and an .npz, checksummed, no pickle).
- `optimizer`: Adam's second moments (live optimizer or Trainer checkpoint), factorised into scalings
  folded into the projections (TrackStar's optimizer correction).
- `mixed`: TrackStar's mixed curvature (1 - λ) R_train + λ R_query for raw, kfac and ekfac.
- `objective`, `hvp`, `solvers`, `arnoldi`: the seeds' solvers without Kronecker factors (exact,
  CG, LiSSA on unprojected stores; Arnoldi's eigenbasis as a projection), from Hessian- or
  Gauss-Newton-vector products of the training loss.
"""

from logra.curvature.arnoldi import (
    ArnoldiBasis,
    ArnoldiPreconditioner,
    arnoldi_preconditioner,
    fit_arnoldi,
    load_eigenbasis,
    log_arnoldi,
)
from logra.curvature.fisher import FisherLabels, sampled_cross_entropy, true_fisher_statistics
from logra.curvature.hvp import CurvatureOperator
from logra.curvature.moments import FisherKind, FisherStatistics
from logra.curvature.objective import Curvature, LossKind, OutputLoss, ParameterSpace, SolverError, full_config
from logra.curvature.precondition import Preconditioner, PreconditionerMethod, fit_preconditioner
from logra.curvature.saved import load_preconditioner
from logra.curvature.solvers import (
    CG,
    ConvergenceWarning,
    Exact,
    LiSSA,
    SolverMethod,
    SolverPreconditioner,
    fit_solver,
    inverse_hvp,
)

__all__ = [
    "CG",
    "ArnoldiBasis",
    "ArnoldiPreconditioner",
    "ConvergenceWarning",
    "Curvature",
    "CurvatureOperator",
    "Exact",
    "LiSSA",
    "LossKind",
    "OutputLoss",
    "ParameterSpace",
    "SolverError",
    "SolverMethod",
    "SolverPreconditioner",
    "arnoldi_preconditioner",
    "fit_arnoldi",
    "fit_solver",
    "full_config",
    "inverse_hvp",
    "load_eigenbasis",
    "log_arnoldi",
    "FisherKind",
    "FisherLabels",
    "FisherStatistics",
    "Preconditioner",
    "PreconditionerMethod",
    "fit_preconditioner",
    "load_preconditioner",
    "sampled_cross_entropy",
    "true_fisher_statistics",
]
