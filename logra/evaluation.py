"""Measuring attribution quality against retraining: LDS and leave-one-out correlation.

- `retrain(train_fn, subsets)` runs a user training function on given training subsets and
  collects the query outputs it returns; `random_subsets` draws seeded subsets, and
  `retrain_on_random_subsets` does both.
- `linear_datamodeling_score(scores, subsets, outputs)`: the LDS of Park et al. (TRAK): per query,
  the Spearman correlation over subsets S between the summed attribution Σ_{i∈S} score(q, i) and
  the retrained model's measured output, averaged over queries.
- `leave_one_out_correlation(scores, loo_change)`: per query, the correlation over training
  examples between the score and the actual change of the query loss when the example is removed.

Sign convention (logra's): a positive score means up-weighting the example lowers the query's
loss. So the summed score of a subset should correlate with *minus* the query loss
(`outputs_are_losses=True`, the default negates losses), and the LOO change of the query loss
(loss without i minus loss with everything) should correlate *positively* with the score.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from logra.errors import ConfigError
from logra.types import parse_enum

ArrayLike = Tensor | np.ndarray | Sequence[float] | Sequence[Sequence[float]]  # numbers, any nesting


def _as_tensor(x: ArrayLike, name: str) -> Tensor:
    try:
        t = torch.as_tensor(np.asarray(x) if not isinstance(x, Tensor) else x)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{name} must be a tensor or array of numbers ({exc}).") from None
    t = t.detach().to("cpu", torch.float64)
    if not torch.isfinite(t).all():
        raise ConfigError(f"{name} contains NaN or Inf; check the retraining runs or scores that produced it.")
    return t


def rankdata(x: Tensor) -> Tensor:
    """Ranks 1..n of a 1-D tensor along the last dimension; ties get their average rank (float64)."""
    order = torch.argsort(x, dim=-1, stable=True)
    sorted_x = torch.gather(x, -1, order)
    n = x.shape[-1]
    ranks_sorted = torch.arange(1, n + 1, dtype=torch.float64).expand_as(sorted_x).clone()
    # Average over runs of equal values: for each run, replace ranks by their mean.
    for row_values, row_ranks in zip(sorted_x.reshape(-1, n), ranks_sorted.reshape(-1, n)):
        new_run = torch.ones(n, dtype=torch.bool)
        new_run[1:] = row_values[1:] != row_values[:-1]
        run_id = torch.cumsum(new_run, 0) - 1
        sums = torch.zeros(int(run_id[-1]) + 1, dtype=torch.float64).index_add_(0, run_id, row_ranks)
        counts = torch.bincount(run_id).to(torch.float64)
        row_ranks.copy_((sums / counts)[run_id])
    ranks = torch.empty_like(ranks_sorted)
    return ranks.scatter_(-1, order, ranks_sorted)


def pearson(x: ArrayLike, y: ArrayLike) -> Tensor:
    """Pearson correlation along the last dimension: x, y [..., n] -> [...] (float64).

    A constant input has no defined correlation: it raises ConfigError rather than return NaN.
    """
    x, y = _as_tensor(x, "x"), _as_tensor(y, "y")
    if x.shape != y.shape or x.dim() == 0 or x.shape[-1] < 2:
        shapes = f"{tuple(x.shape)} and {tuple(y.shape)}"
        raise ConfigError(f"a correlation needs two arrays of one shape [..., n >= 2], got {shapes}.")
    xc, yc = x - x.mean(-1, keepdim=True), y - y.mean(-1, keepdim=True)
    denom = xc.norm(dim=-1) * yc.norm(dim=-1)
    if (denom == 0).any():
        rows = (denom == 0).nonzero().flatten().tolist() if denom.dim() == 1 else "[]"
        raise ConfigError(
            f"a correlation was asked of a constant array (zero variance; rows {rows}); it is undefined. "
            "Drop those queries (e.g. a query whose loss and gradient are 0)."
        )
    return (xc * yc).sum(-1) / denom


def spearman(x: ArrayLike, y: ArrayLike) -> Tensor:
    """Spearman rank correlation along the last dimension (Pearson of average ranks)."""
    x, y = _as_tensor(x, "x"), _as_tensor(y, "y")
    return pearson(rankdata(x), rankdata(y))


def random_subsets(n_train: int, n_subsets: int, fraction: float = 0.5, seed: int = 0) -> Tensor:
    """[n_subsets, n_train] bool masks, each selecting round(fraction * n_train) examples at random."""
    if isinstance(n_train, bool) or not isinstance(n_train, int) or n_train < 2:
        raise ConfigError(f"n_train={n_train!r} must be an int >= 2.")
    if isinstance(n_subsets, bool) or not isinstance(n_subsets, int) or n_subsets < 2:
        raise ConfigError(f"n_subsets={n_subsets!r} must be an int >= 2 (a correlation needs two points).")
    size = round(fraction * n_train)
    if not 0 < size < n_train:
        raise ConfigError(f"fraction={fraction!r} of {n_train} examples keeps {size}; choose it in (0, 1).")
    gen = torch.Generator().manual_seed(seed)
    masks = torch.zeros(n_subsets, n_train, dtype=torch.bool)
    for m in range(n_subsets):
        masks[m, torch.randperm(n_train, generator=gen)[:size]] = True
    return masks


@dataclass(frozen=True)
class Retraining:
    """The result of `retrain`: subsets [M, n_train] bool and the measured outputs [M, Q] float64."""

    subsets: Tensor
    outputs: Tensor


def retrain(
    train_fn: Callable[[Tensor], Any],
    subsets: Tensor,
    measure: Callable[[Any], Any] | None = None,
    progress: bool | None = None,
) -> Retraining:
    """Retrain on each subset and collect the query outputs.

    Args:
        train_fn: train_fn(indices LongTensor [n_keep]) -> a trained model, or directly the [Q]
            query outputs (e.g. query losses) of the model trained on those examples.
        subsets: [M, n_train] bool masks (see `random_subsets`, or LOO masks).
        measure: measure(train_fn's result) -> [Q] outputs, when train_fn returns a model.
        progress: tqdm bar (None: only on a terminal).
    """
    if not isinstance(subsets, Tensor) or subsets.dtype != torch.bool or subsets.dim() != 2:
        raise ConfigError("subsets must be an [M, n_train] bool tensor of masks (see random_subsets).")
    outputs: list[Tensor] = []
    disable = None if progress is None else not progress
    for mask in tqdm(subsets, desc="logra: retraining", disable=disable):
        result = train_fn(mask.nonzero().flatten())
        value = measure(result) if measure is not None else result
        out = _as_tensor(value, "the measured query outputs").reshape(-1)
        if outputs and out.shape != outputs[0].shape:
            shapes = f"{tuple(out.shape)} vs {tuple(outputs[0].shape)}"
            raise ConfigError(f"the measured outputs changed shape between subsets: {shapes}.")
        outputs.append(out)
    return Retraining(subsets, torch.stack(outputs))


def retrain_on_random_subsets(
    train_fn: Callable[[Tensor], Any],
    n_train: int,
    n_subsets: int,
    fraction: float = 0.5,
    seed: int = 0,
    measure: Callable[[Any], Any] | None = None,
    progress: bool | None = None,
) -> Retraining:
    """`retrain` on `random_subsets(n_train, n_subsets, fraction, seed)`: the input of an LDS."""
    return retrain(train_fn, random_subsets(n_train, n_subsets, fraction, seed), measure, progress)


def leave_one_out_subsets(n_train: int, indices: Sequence[int] | None = None) -> Tensor:
    """[len(indices), n_train] masks, each leaving out one example (all examples by default)."""
    indices = list(range(n_train)) if indices is None else list(indices)
    masks = torch.ones(len(indices), n_train, dtype=torch.bool)
    masks[torch.arange(len(indices)), torch.as_tensor(indices, dtype=torch.long)] = False
    return masks


def linear_datamodeling_score(
    scores: ArrayLike, subsets: Tensor, outputs: ArrayLike, outputs_are_losses: bool = True
) -> float:
    """LDS: the mean over queries of Spearman(Σ_{i∈S} score(q, i), measured output over subsets S).

    Args:
        scores: [Q, N] attribution scores.  subsets: [M, N] bool masks.
        outputs: [M, Q] measured outputs of the model retrained on each subset.
        outputs_are_losses: True when outputs are losses (lower is better; they are negated, so
            that helpful = positive scores give a positive LDS); False for outputs that rise with
            the training examples' help (margins, log-probabilities).
    """
    s, y = _as_tensor(scores, "scores"), _as_tensor(outputs, "outputs")
    if s.dim() != 2 or subsets.dim() != 2 or subsets.shape[1] != s.shape[1] or y.shape != (len(subsets), len(s)):
        raise ConfigError(
            f"LDS needs scores [Q, N], subsets [M, N], outputs [M, Q]; got {tuple(s.shape)}, "
            f"{tuple(subsets.shape)}, {tuple(y.shape)}."
        )
    predicted = subsets.to(torch.float64) @ s.T  # (M, Q)
    target = -y if outputs_are_losses else y
    return float(spearman(predicted.T, target.T).mean())


class Correlation(str, enum.Enum):
    """Which correlation `leave_one_out_correlation` averages."""

    PEARSON = "pearson"
    SPEARMAN = "spearman"


def leave_one_out_correlation(
    scores: ArrayLike, loo_change: ArrayLike, method: Correlation | str = Correlation.PEARSON
) -> float:
    """Mean over queries of the correlation between scores [Q, N] and actual LOO loss changes [Q, N].

    loo_change[q, i] = (query loss retrained without example i) - (query loss with all examples).
    method: a `Correlation` or its value (pearson, spearman).
    """
    method = parse_enum(Correlation, method, "method")
    s, y = _as_tensor(scores, "scores"), _as_tensor(loo_change, "loo_change")
    if s.shape != y.shape or s.dim() != 2:
        raise ConfigError(f"scores and loo_change must both be [Q, N]; got {tuple(s.shape)} and {tuple(y.shape)}.")
    corr = pearson(s, y) if method is Correlation.PEARSON else spearman(s, y)
    return float(corr.mean())
