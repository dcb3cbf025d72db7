"""The true Fisher: curvature measured with labels drawn from the model's predictive distribution.

The *empirical* Fisher uses the gradients of the logged labels (the store's own rows and
statistics). The *true* Fisher E_y~p[∇ℓ(y) ∇ℓ(y)ᵀ] takes the expectation over labels from the
model's own predictive distribution p; for a classifier with a softmax cross-entropy loss it is
the Gauss-Newton matrix, which for a linear model (logistic or softmax regression) is the Hessian.
`true_fisher_statistics` runs a statistics-only pass (a `GradientLogger` without a store) over
the user's batches and returns `FisherStatistics` for `fit_preconditioner(statistics=...)`:

- with `logits_fn` (the model's logits of a categorical likelihood), logra takes the expectation
  itself: *exactly* when each example has one prediction over C <= `EXACT_FISHER_MAX_CLASSES`
  classes (one backward per class c of Σ_i sqrt(C p_ic) ℓ_i(c), so the C rows' outer products sum
  to C times the expectation, and the counts to C times the examples), otherwise from sampled
  labels (`sampled_cross_entropy`; a language model, whose labels are per token);
- with `loss_fn`, the user's own loss of sampled labels (any likelihood).

This is the one module of `logra.curvature` that runs the model, so the only one that imports
the capture stage.
"""

from __future__ import annotations

import enum
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from logra.capture.layers import projection_grams
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
LogitsFn = Callable[[nn.Module, Any], Tensor | tuple[Tensor, Tensor | None]]
EXACT_FISHER_MAX_CLASSES = 64
"""labels='auto' takes the exact expectation up to this many classes (one backward per class),
and samples above it: sampling `num_samples` labels costs `num_samples` backwards instead."""


class FisherLabels(str, enum.Enum):
    """How `true_fisher_statistics(logits_fn=...)` takes the expectation over the model's labels.

    exact: sum over every class, weighted by its probability (one prediction per example only).
    sampled: `num_samples` draws per example.  auto: exact for (B, C) logits with C <=
    `EXACT_FISHER_MAX_CLASSES`, sampled otherwise (per-token predictions of a language model).
    """

    AUTO = "auto"
    EXACT = "exact"
    SAMPLED = "sampled"


NOT_A_LIKELIHOOD = (
    "The true Fisher needs the logits of a categorical likelihood (a softmax cross-entropy loss): (B, C) "
    "or (B, T, C) with C >= 2. A regression, a multi-label or a custom loss is not one: pass a loss_fn "
    "that samples targets from your model's own likelihood, or use the empirical Fisher (statistics=None; "
    "--fisher empirical)."
)


def true_fisher_statistics(
    model: nn.Module,
    config: LoGraConfig,
    batches: Iterable[Any],
    loss_fn: LossFn | None = None,
    *,
    logits_fn: LogitsFn | None = None,
    labels: FisherLabels | str = FisherLabels.AUTO,
    method: PreconditionerMethod | str = PreconditionerMethod.KFAC,
    num_samples: int = 1,
    seed: int = 0,
    batch_size_fn: Callable[[Any], int] | None = None,
    mask_fn: Callable[[Any], Tensor | None] | None = None,
    param_grads: bool = True,
    progress: bool | None = None,
) -> FisherStatistics:
    """Statistics of the true Fisher, for `fit_preconditioner(store, method, statistics=...)`.

    Args:
        model, config: the model and the LoGraConfig the training store was logged with.
        batches: an iterable of batches (re-iterable, e.g. a list or DataLoader, for method="ekfac",
            whose eigenvalues take a second pass with the same label draws).
        loss_fn: loss_fn(model, batch, generator) -> (B,) per-example losses of labels sampled
            from the model with `generator` (see `sampled_cross_entropy`). Give it or `logits_fn`.
        logits_fn: logits_fn(model, batch) -> the logits of a categorical likelihood, (B, C) or
            (B, T, C), or (logits, weights) with weights (B,) or (B, T) multiplying each prediction's
            cross-entropy (0 drops it; 1/n_i for an example's mean token loss) as the logged loss does.
        labels: with `logits_fn`: exact | sampled | auto (`FisherLabels`).
        method: the preconditioner the statistics are for: kfac | ekfac | raw.
        num_samples: label draws per example when sampling (more draws, less noise).
        seed: seeds the CPU generator of the draws.
        batch_size_fn: batch -> B; default: the first dimension of the batch's first tensor.
        mask_fn: batch -> (B, T) mask of the logged layers' inputs, or None; default:
            batch["attention_mask"] when present.
        param_grads: False freezes the parameters for the pass (`GradientLogger.record`): `.grad` is
            left untouched and backward is cheaper; the statistics are the same.

    With param_grads=True gradients accumulate in the model's `.grad` as in any backward.
    """
    method = _checked_method(method, batches, loss_fn, logits_fn, num_samples)
    draw = _Draws(loss_fn, logits_fn, parse_enum(FisherLabels, labels, "labels"), num_samples, param_grads)
    with GradientLogger(model, config, store=None, statistics=True) as logger:
        covariance = GradientCovariance(logger.layers) if method is PreconditionerMethod.RAW else None
        n = _sampled_pass(logger, batches, draw, seed, batch_size_fn, mask_fn, progress, covariance)
        kronecker = logger.statistics()
        eigenvalues = None
        if method is PreconditionerMethod.EKFAC:
            grams = projection_grams(config, logger.layers)
            bases = {name: (q_s, q_a) for name, (q_s, _, q_a, _) in kronecker_eigenbases(kronecker, grams).items()}
            moments = EigenbasisMoments(logger.layers, bases)
            _sampled_pass(logger, batches, draw, seed, batch_size_fn, mask_fn, progress, moments)
            eigenvalues = moments.result()
    if draw.per_example is None or n == 0:  # set by the first batch
        raise ConfigError("true_fisher_statistics got no batches: pass the training batches (a list or DataLoader).")
    return FisherStatistics(
        kronecker, eigenvalues, covariance.result() if covariance else None, n, draw.per_example, draw.exact
    )


def _checked_method(
    method: PreconditionerMethod | str,
    batches: Iterable[Any],
    loss_fn: LossFn | None,
    logits_fn: LogitsFn | None,
    num_samples: int,
) -> PreconditionerMethod:
    """`method` parsed; ConfigError on arguments of `true_fisher_statistics` that cannot work together."""
    method = parse_enum(PreconditionerMethod, method, "true_fisher_statistics(method)")
    if method not in (PreconditionerMethod.KFAC, PreconditionerMethod.EKFAC, PreconditionerMethod.RAW):
        raise ConfigError(
            f"true_fisher_statistics(method={method.value!r}) has no Kronecker curvature to measure; "
            "pass kfac, ekfac or raw."
        )
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples={num_samples!r} must be a positive int.")
    if (loss_fn is None) == (logits_fn is None):
        raise ConfigError(
            "true_fisher_statistics needs exactly one of loss_fn= (your loss of labels sampled from the model) "
            "and logits_fn= (the model's logits; logra takes the expectation over labels)."
        )
    if method is PreconditionerMethod.EKFAC and iter(batches) is batches:  # type: ignore[comparison-overlap]
        raise ConfigError(
            "method='ekfac' takes two passes over `batches`: pass a list or a DataLoader, not an iterator."
        )
    return method


class _Draws:
    """The per-example losses of one backward: the user's sampled loss, or one class (exact) or
    one draw (sampled) of the logits' categorical likelihood. `per_example`: backwards per batch."""

    def __init__(
        self, loss_fn: LossFn | None, logits_fn: LogitsFn | None, labels: FisherLabels, num_samples: int, grads: bool
    ):
        self.loss_fn, self.logits_fn, self.labels, self.num_samples = loss_fn, logits_fn, labels, num_samples
        self.param_grads = grads
        self.exact = False
        self.per_example: int | None = None if logits_fn is not None else num_samples

    def __call__(self, model: nn.Module, batch: Any, generator: torch.Generator, index: int, size: int) -> Tensor:
        """(B,) losses of backward number `index` of this batch."""
        if self.loss_fn is not None:
            return self.loss_fn(model, batch, generator)
        assert self.logits_fn is not None
        out = self.logits_fn(model, batch)
        logits, weights = out if isinstance(out, tuple) else (out, None)
        self._check(logits, weights, size)
        if self.per_example is None:  # the first batch decides, for every batch
            classes = logits.shape[-1]
            small = logits.dim() == 2 and classes <= EXACT_FISHER_MAX_CLASSES
            if self.labels is FisherLabels.EXACT and logits.dim() != 2:
                raise ConfigError(
                    f"labels='exact' needs one prediction per example, logits (B, C); got {tuple(logits.shape)}. "
                    "Per-token labels are independent draws, so their expectation is not a sum over classes: "
                    "pass labels='sampled' (or 'auto')."
                )
            self.exact = self.labels is FisherLabels.EXACT or (self.labels is FisherLabels.AUTO and small)
            self.per_example = classes if self.exact else self.num_samples
        if not self.exact:
            return sampled_cross_entropy(logits, generator, weights)
        classes = logits.shape[-1]
        probs = torch.softmax(logits.detach().to(torch.float64), dim=-1)[:, index]  # (B,)
        target = torch.full((size,), index, dtype=torch.long, device=logits.device)
        scale = (classes * probs).sqrt().to(logits.dtype)
        if weights is not None:
            scale = scale * weights.to(scale)
        return F.cross_entropy(logits, target, reduction="none") * scale

    @staticmethod
    def _check(logits: object, weights: object, size: int) -> None:
        if not isinstance(logits, Tensor) or not logits.is_floating_point() or logits.dim() not in (2, 3):
            got = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
            raise ConfigError(f"logits_fn returned {got}. {NOT_A_LIKELIHOOD}")
        if logits.shape[0] != size or logits.shape[-1] < 2:
            shape = tuple(logits.shape)
            raise ConfigError(f"logits_fn returned logits {shape} for a batch of {size}. {NOT_A_LIKELIHOOD}")
        if weights is not None and (not isinstance(weights, Tensor) or weights.shape != logits.shape[:-1]):
            got = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
            raise ConfigError(
                f"logits_fn's weights have shape {got}, not the logits' {tuple(logits.shape[:-1])}: one per prediction."
            )


def _sampled_pass(
    logger: GradientLogger,
    batches: Iterable[Any],
    draw: _Draws,
    seed: int,
    batch_size_fn: Callable[[Any], int] | None,
    mask_fn: Callable[[Any], Tensor | None] | None,
    progress: bool | None,
    accumulator: RowAccumulator | None,
) -> int:
    """One pass of sampled-label (or per-class) backwards through `logger`; returns the number of examples."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    disable = None if progress is None else not progress
    with warnings.catch_warnings():  # a zero row (an ignored label) matters to a store, not to statistics
        warnings.filterwarnings("ignore", message="the rows of examples", category=UserWarning)
        return _pass_batches(logger, batches, draw, generator, batch_size_fn, mask_fn, disable, accumulator)


def _pass_batches(
    logger: GradientLogger,
    batches: Iterable[Any],
    draw: _Draws,
    generator: torch.Generator,
    batch_size_fn: Callable[[Any], int] | None,
    mask_fn: Callable[[Any], Tensor | None] | None,
    disable: bool | None,
    accumulator: RowAccumulator | None,
) -> int:
    n_examples = 0
    for batch in tqdm(batches, desc="logra: true Fisher", disable=disable):
        size = batch_size_fn(batch) if batch_size_fn is not None else _batch_size(batch)
        mask = mask_fn(batch) if mask_fn is not None else _default_mask(batch)
        index = 0
        while draw.per_example is None or index < draw.per_example:
            with logger.record(ids=list(range(size)), mask=mask, param_grads=draw.param_grads) as rec:
                losses = draw(logger.model, batch, generator, index, size)
                if not isinstance(losses, Tensor) or losses.shape != (size,):
                    got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                    raise CaptureError(f"loss_fn must return ({size},) per-example losses, got {got}.")
                losses.sum().backward()
            if accumulator is not None and rec.rows is not None:
                accumulator.add(rec.rows)
            index += 1
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
