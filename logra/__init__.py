"""logra: which training examples made the model say what it said.

LoGra influence functions: low-rank projected per-example gradients captured with hooks, stored
in crash-safe memory-mapped shards, preconditioned (KFAC / EK-FAC / raw / identity) and scored
with one matmul per chunk.
"""

from logra import evaluation
from logra.capture.adapters import LayerAdapter
from logra.capture.logger import GradientLogger
from logra.capture.rows import QueryRows, Record
from logra.config import LoGraConfig, LossReduction, NonFinitePolicy, ProjectionInit, StorageDtype
from logra.curvature.fisher import FisherLabels, sampled_cross_entropy, true_fisher_statistics
from logra.curvature.mixed import mixed_preconditioner
from logra.curvature.moments import FisherKind, FisherStatistics
from logra.curvature.optimizer import OptimizerCorrection, SecondMoments, adam_second_moments, trainer_second_moments
from logra.curvature.precondition import Preconditioner, PreconditionerMethod, fit_preconditioner
from logra.curvature.saved import load_preconditioner
from logra.ensemble import EnsembleScores, ensemble_scores
from logra.errors import (
    CaptureError,
    ConfigError,
    DuplicateIdError,
    LograError,
    NonFiniteGradientError,
    StoreCorruptedError,
    StoreError,
)
from logra.index import InfluenceIndex
from logra.presets import Preset, trackstar_config, trackstar_scorer
from logra.rerank import FullRerank, fit_full_ekfac
from logra.score import Normalization, Scorer, TopK
from logra.store.reader import GradientStore
from logra.streaming import stream_batches
from logra.tokens import TokenAttributor, TokenRecord
from logra.types import KroneckerStatistics, LayerInfo

__version__ = "0.1.0"

__all__ = [
    "CaptureError",
    "ConfigError",
    "DuplicateIdError",
    "EnsembleScores",
    "GradientLogger",
    "GradientStore",
    "InfluenceIndex",
    "KroneckerStatistics",
    "LayerAdapter",
    "LayerInfo",
    "LoGraConfig",
    "LograError",
    "LossReduction",
    "NonFiniteGradientError",
    "NonFinitePolicy",
    "OptimizerCorrection",
    "Preset",
    "ProjectionInit",
    "QueryRows",
    "Record",
    "SecondMoments",
    "StorageDtype",
    "StoreCorruptedError",
    "StoreError",
    "FisherKind",
    "FisherLabels",
    "FisherStatistics",
    "FullRerank",
    "Normalization",
    "Preconditioner",
    "PreconditionerMethod",
    "Scorer",
    "TokenAttributor",
    "TokenRecord",
    "TopK",
    "adam_second_moments",
    "ensemble_scores",
    "evaluation",
    "fit_full_ekfac",
    "fit_preconditioner",
    "load_preconditioner",
    "mixed_preconditioner",
    "sampled_cross_entropy",
    "stream_batches",
    "trackstar_config",
    "trackstar_scorer",
    "trainer_second_moments",
    "true_fisher_statistics",
]
