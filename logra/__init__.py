"""logra: which training examples made the model say what it said.

LoGra influence functions: low-rank projected per-example gradients captured with hooks, stored
in crash-safe memory-mapped shards, preconditioned (KFAC / EK-FAC / raw / identity) and scored
with one matmul per chunk.
"""

from logra import evaluation
from logra.capture import LayerAdapter, LayerInfo
from logra.config import LoGraConfig, LossReduction, NonFinitePolicy, ProjectionInit, StorageDtype
from logra.curvature import FisherStatistics, sampled_cross_entropy, true_fisher_statistics
from logra.errors import (
    CaptureError,
    ConfigError,
    DuplicateIdError,
    LograError,
    NonFiniteGradientError,
    StoreCorruptedError,
    StoreError,
)
from logra.logger import GradientLogger, Record
from logra.precondition import Preconditioner, PreconditionerMethod, fit_preconditioner, load_preconditioner
from logra.score import Normalization, Scorer, TopK
from logra.statistics import KroneckerStatistics
from logra.store import GradientStore

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "ConfigError",
    "DuplicateIdError",
    "GradientLogger",
    "GradientStore",
    "KroneckerStatistics",
    "LayerAdapter",
    "LayerInfo",
    "LoGraConfig",
    "LograError",
    "LossReduction",
    "NonFiniteGradientError",
    "NonFinitePolicy",
    "ProjectionInit",
    "Record",
    "StorageDtype",
    "StoreCorruptedError",
    "StoreError",
    "FisherStatistics",
    "Normalization",
    "Preconditioner",
    "PreconditionerMethod",
    "Scorer",
    "TopK",
    "evaluation",
    "fit_preconditioner",
    "load_preconditioner",
    "sampled_cross_entropy",
    "true_fisher_statistics",
]
