"""Curvature: what H is and how H⁻¹ is applied to gradient rows.

- `moments`: statistics beyond the Kronecker factors (EK-FAC eigenvalues, raw covariance) from
  one pass over a store, and the resolution of where a preconditioner's curvature comes from.
- `fisher`: the true Fisher, a statistics-only capture pass with labels drawn from the model.
- `precondition`: the preconditioners (identity, kfac, ekfac, raw), their damping and fitting.
- `saved`: a preconditioner on disk (JSON and an .npz, checksummed, no pickle).
"""

from logra.curvature.fisher import sampled_cross_entropy, true_fisher_statistics
from logra.curvature.moments import FisherKind, FisherStatistics
from logra.curvature.precondition import Preconditioner, PreconditionerMethod, fit_preconditioner
from logra.curvature.saved import load_preconditioner

__all__ = [
    "FisherKind",
    "FisherStatistics",
    "Preconditioner",
    "PreconditionerMethod",
    "fit_preconditioner",
    "load_preconditioner",
    "sampled_cross_entropy",
    "true_fisher_statistics",
]
