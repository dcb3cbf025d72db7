"""The true Fisher: curvature measured with labels drawn from the model's predictive distribution.

The *empirical* Fisher uses the gradients of the logged labels (the store's own rows and
statistics). The *true* Fisher replaces each label by one drawn from the model:
`true_fisher_statistics` runs a statistics-only pass (a `GradientLogger` without a store) over
the user's batches with a loss function that samples labels (for instance with
`sampled_cross_entropy`), and returns `FisherStatistics` for `fit_preconditioner(statistics=...)`.
This is the one module of `logra.curvature` that runs the model, so the only one that imports
the capture stage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from logra.capture.logger import GradientLogger
from logra.config import LoGraConfig
from logra.curvature.moments import (
    EigenbasisMoments,
    FisherStatistics,
    GradientCovariance,
    RowAccumulator,
    kronecker_eigenbases,
)
from logra.curvature.precondition import PreconditionerMethod
from logra.errors import CaptureError, ConfigError
from logra.types import parse_enum


def sampled_cross_entropy(logits: Tensor, generator: torch.Generator, mask: Tensor | None = None) -> Tensor:
    """Per-example Σ_t CE(logits_t, y_t) with y_t drawn from softmax(logits_t).

    Args:
        logits: (B, C) or (B, T, C).  generator: a CPU generator (labels are drawn on the CPU, so
            the draw does not depend on the device).  mask: optional (B, T); 0 drops a position.

    Returns:
        (B,) losses whose gradients are true-Fisher samples.
    """
    probs = torch.softmax(logits.detach().to(torch.float64), dim=-1).cpu()
    labels = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(probs.shape[:-1])
    ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1).to(logits.device), reduction="none")
    ce = ce.reshape(logits.shape[:-1])
    if mask is not None:
        ce = ce * mask.to(ce.dtype)
    return ce.reshape(ce.shape[0], -1).sum(1)


LossFn = Callable[[nn.Module, Any, torch.Generator], Tensor]


def true_fisher_statistics(
    model: nn.Module,
    config: LoGraConfig,
    batches: Iterable[Any],
    loss_fn: LossFn,
    *,
    method: PreconditionerMethod | str = PreconditionerMethod.KFAC,
    num_samples: int = 1,
    seed: int = 0,
    batch_size_fn: Callable[[Any], int] | None = None,
    mask_fn: Callable[[Any], Tensor | None] | None = None,
    progress: bool | None = None,
) -> FisherStatistics:
    """Statistics of the true Fisher, for `fit_preconditioner(store, method, statistics=...)`.

    Args:
        model, config: the model and the LoGraConfig the training store was logged with.
        batches: an iterable of batches (re-iterable, e.g. a list or DataLoader, for method="ekfac",
            whose eigenvalues take a second pass with the same label draws).
        loss_fn: loss_fn(model, batch, generator) -> (B,) per-example losses of labels sampled
            from the model with `generator` (see `sampled_cross_entropy`).
        method: the preconditioner the statistics are for: kfac | ekfac | raw.
        num_samples: label draws per example (more draws, less noise).
        seed: seeds the CPU generator passed to loss_fn.
        batch_size_fn: batch -> B; default: the first dimension of the batch's first tensor.
        mask_fn: batch -> (B, T) mask or None; default: batch["attention_mask"] when present.

    Gradients accumulate in the model's `.grad` as in any backward; zero them afterwards if needed.
    """
    method = parse_enum(PreconditionerMethod, method, "true_fisher_statistics(method)")
    if method is PreconditionerMethod.IDENTITY:
        raise ConfigError(
            "true_fisher_statistics(method='identity') has no curvature to measure; pass kfac, ekfac or raw."
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples={num_samples!r} must be a positive int.")
    if method is PreconditionerMethod.EKFAC and iter(batches) is batches:  # type: ignore[comparison-overlap]
        raise ConfigError(
            "method='ekfac' takes two passes over `batches`: pass a list or a DataLoader, not an iterator."
        )
    with GradientLogger(model, config, store=None, statistics=True) as logger:
        covariance = GradientCovariance(logger.layers) if method is PreconditionerMethod.RAW else None
        n = _sampled_pass(logger, batches, loss_fn, num_samples, seed, batch_size_fn, mask_fn, progress, covariance)
        kronecker = logger.statistics()
        eigenvalues = None
        if method is PreconditionerMethod.EKFAC:
            bases = {name: (q_s, q_a) for name, (q_s, _, q_a, _) in kronecker_eigenbases(kronecker).items()}
            moments = EigenbasisMoments(logger.layers, bases)
            _sampled_pass(logger, batches, loss_fn, num_samples, seed, batch_size_fn, mask_fn, progress, moments)
            eigenvalues = moments.result()
    return FisherStatistics(kronecker, eigenvalues, covariance.result() if covariance else None, n, num_samples)


def _sampled_pass(
    logger: GradientLogger,
    batches: Iterable[Any],
    loss_fn: LossFn,
    num_samples: int,
    seed: int,
    batch_size_fn: Callable[[Any], int] | None,
    mask_fn: Callable[[Any], Tensor | None] | None,
    progress: bool | None,
    accumulator: RowAccumulator | None,
) -> int:
    """One pass of sampled-label backwards through `logger`; returns the number of examples."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    n_examples = 0
    disable = None if progress is None else not progress
    for batch in tqdm(batches, desc="logra: true Fisher", disable=disable):
        size = batch_size_fn(batch) if batch_size_fn is not None else _batch_size(batch)
        mask = mask_fn(batch) if mask_fn is not None else _default_mask(batch)
        for _ in range(num_samples):
            with logger.record(ids=list(range(size)), mask=mask) as rec:
                losses = loss_fn(logger.model, batch, generator)
                if not isinstance(losses, Tensor) or losses.shape != (size,):
                    got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                    raise CaptureError(f"loss_fn must return ({size},) per-example losses, got {got}.")
                losses.sum().backward()
            if accumulator is not None and rec.rows is not None:
                accumulator.add(rec.rows)
        n_examples += size
    return n_examples


def _batch_size(batch: Any) -> int:
    first = batch
    if isinstance(batch, Mapping):
        first = next((v for v in batch.values() if isinstance(v, Tensor)), None)
    elif isinstance(batch, (tuple, list)):
        first = next((v for v in batch if isinstance(v, Tensor)), None)
    if not isinstance(first, Tensor) or first.dim() == 0:
        raise ConfigError(
            f"cannot tell the batch size of a {type(batch).__name__}; pass true_fisher_statistics(batch_size_fn=...)."
        )
    return int(first.shape[0])


def _default_mask(batch: Any) -> Tensor | None:
    if isinstance(batch, Mapping):
        mask = batch.get("attention_mask")
        return mask if isinstance(mask, Tensor) else None
    return None
