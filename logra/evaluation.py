"""Measuring attribution quality against retraining: LDS and leave-one-out correlation.

- `retrain(train_fn, subsets)` runs a user training function on given training subsets and
  collects the query outputs it returns; `random_subsets` draws seeded subsets, and
  `retrain_on_random_subsets` does both.
- `linear_datamodeling_score(scores, subsets, outputs)`: the LDS of Park et al. (TRAK): per query,
  the Spearman correlation over subsets S between the summed attribution Σ_{i∈S} score(q, i) and
  the retrained model's measured output, averaged over queries.
- `validate(train_fn, score_fn, n_train, ...)`: the above end to end for each (damping, k) setting,
  with a bootstrap confidence interval over queries and the best setting (`ValidationResult`).
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


# --------------------------------------------------------------------------------------------
# validate: retrain on random subsets with the user's recipe, LDS per (damping, k), bootstrap CI.


def per_query_lds(scores: ArrayLike, subsets: Tensor, outputs: ArrayLike, outputs_are_losses: bool = True) -> Tensor:
    """[Q] float64: each query's LDS term (its Spearman correlation); `linear_datamodeling_score` is the mean.

    Shapes as in `linear_datamodeling_score`: scores [Q, N], subsets [M, N] bool, outputs [M, Q].
    """
    s, y = _as_tensor(scores, "scores"), _as_tensor(outputs, "outputs")
    if s.dim() != 2 or subsets.dim() != 2 or subsets.shape[1] != s.shape[1] or y.shape != (len(subsets), len(s)):
        raise ConfigError(
            f"LDS needs scores [Q, N], subsets [M, N], outputs [M, Q]; got {tuple(s.shape)}, "
            f"{tuple(subsets.shape)}, {tuple(y.shape)}."
        )
    predicted = subsets.to(torch.float64) @ s.T
    return spearman(predicted.T, (-y if outputs_are_losses else y).T)


@dataclass(frozen=True)
class ValidationSetting:
    """The LDS of one (damping, k) setting: the mean over queries and a bootstrap interval over queries.

    per_query: [Q] float64, each query's Spearman correlation; lds is its mean; (ci_low, ci_high)
    is the percentile bootstrap interval of that mean, resampling queries with replacement.
    """

    damping: float | None
    k: int | None
    lds: float
    ci_low: float
    ci_high: float
    per_query: Tensor


@dataclass(frozen=True)
class ValidationResult:
    """What `validate` measured: one `ValidationSetting` per (damping, k) tried, and the best one.

    The confidence interval is over queries (the subsets and retrained outputs are held fixed),
    so it measures how much the LDS depends on which queries were chosen, not retraining noise.
    """

    settings: tuple[ValidationSetting, ...]
    n_train: int
    n_subsets: int
    n_queries: int
    fraction: float
    confidence: float
    retraining: Retraining

    @property
    def best(self) -> ValidationSetting:
        """The setting with the highest mean LDS (the first one on ties)."""
        return max(self.settings, key=lambda s: s.lds)

    def __str__(self) -> str:
        pct = f"{self.confidence:.0%} CI"
        rows = [("damping", "k", "LDS", f"{pct} (over queries)", "")]
        best = self.best
        for s in self.settings:
            rows.append(
                (
                    "default" if s.damping is None else f"{s.damping:g}",
                    "default" if s.k is None else str(s.k),
                    f"{s.lds:+.3f}",
                    f"[{s.ci_low:+.3f}, {s.ci_high:+.3f}]",
                    "<- best" if s is best else "",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(5)]
        lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
        head = (
            f"LDS on {self.n_queries} queries, {self.n_subsets} retrainings on random "
            f"{self.fraction:.0%} subsets of {self.n_train} training examples"
        )
        return "\n".join([head, lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def _bootstrap_interval(per_query: Tensor, n_bootstrap: int, confidence: float, seed: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    q = len(per_query)
    picks = torch.randint(0, q, (n_bootstrap, q), generator=gen)
    means = per_query[picks].mean(1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)).tolist()
    return float(lo), float(hi)


def validate(
    train_fn: Callable[[Tensor], Any],
    score_fn: Callable[..., ArrayLike] | ArrayLike,
    n_train: int,
    n_subsets: int = 20,
    fraction: float = 0.5,
    seed: int = 0,
    dampings: Sequence[float | None] = (None,),
    ks: Sequence[int | None] = (None,),
    measure: Callable[[Any], Any] | None = None,
    outputs_are_losses: bool = True,
    n_bootstrap: int = 1000,
    confidence: float = 0.95,
    progress: bool | None = None,
) -> ValidationResult:
    """Check attribution quality on your own task: retrain on random subsets, LDS per setting.

    Retrains `n_subsets` times on random `fraction` subsets of the n_train examples with your
    recipe (`retrain`), then for each (damping, k) in dampings x ks computes the per-query LDS of
    `score_fn(damping=..., k=...)` and a percentile bootstrap interval over queries.

    Args:
        train_fn: train_fn(indices LongTensor [n_keep]) -> [Q] query outputs (e.g. query losses)
            of a model trained from scratch on those examples, or a model (then pass `measure`).
            It must be deterministic apart from the subset, or the LDS measures training noise.
        score_fn: score_fn(damping=d, k=k) -> [Q, N] scores of the queries against all n_train
            examples (rows in train-index order), computed once from the full-data model; or a
            [Q, N] array when there is one setting (dampings and ks left at (None,)).
        n_train, n_subsets, fraction, seed: as in `random_subsets`.
        dampings, ks: the settings tried (None: your score_fn's default); every pair is scored.
        measure, outputs_are_losses, progress: as in `retrain` and `linear_datamodeling_score`.
        n_bootstrap, confidence: the bootstrap resamples over queries and the interval's level.

    Returns: a `ValidationResult`; `str()` of it is a table, `.best` the best setting.
    """
    dampings, ks = _checked_settings(train_fn, score_fn, dampings, ks, n_bootstrap, confidence)
    subsets = random_subsets(n_train, n_subsets, fraction, seed)  # validates n_train, n_subsets, fraction
    retraining = retrain(train_fn, subsets, measure, progress)
    n_queries = retraining.outputs.shape[1]
    if n_queries < 2:
        raise ConfigError(
            f"train_fn measured {n_queries} query output(s); a bootstrap over queries needs >= 2 (use 20+)."
        )
    settings = [
        _setting(score_fn, d, k, subsets, retraining.outputs, outputs_are_losses, n_bootstrap, float(confidence), seed)
        for d in dampings
        for k in ks
    ]
    return ValidationResult(tuple(settings), n_train, n_subsets, n_queries, fraction, float(confidence), retraining)


def _checked_settings(
    train_fn: Any, score_fn: Any, dampings: Sequence[float | None], ks: Sequence[int | None], n_bootstrap: Any,
    confidence: Any,
) -> tuple[tuple[float | None, ...], tuple[int | None, ...]]:  # fmt: skip
    """(dampings, ks) as tuples; ConfigError on any argument of `validate` that cannot work, before retraining."""
    if not callable(train_fn):
        raise ConfigError(f"train_fn={train_fn!r} is not callable; pass train_fn(indices) -> query outputs.")
    if isinstance(n_bootstrap, bool) or not isinstance(n_bootstrap, int) or n_bootstrap < 100:
        raise ConfigError(f"n_bootstrap={n_bootstrap!r} must be an int >= 100 for a stable interval.")
    if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence < 1.0:
        raise ConfigError(f"confidence={confidence!r} must be a number in [0.5, 1), e.g. 0.95.")
    dampings, ks = tuple(dampings), tuple(ks)
    if not dampings or not ks:
        raise ConfigError("dampings and ks must each hold at least one value (None: the default).")
    for d in dampings:
        if d is not None and (isinstance(d, bool) or not isinstance(d, (int, float)) or not 0 < d < float("inf")):
            raise ConfigError(f"damping {d!r} in dampings must be a positive finite number or None (the default).")
    for k in ks:
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise ConfigError(f"k {k!r} in ks must be a positive int or None (the default).")
    if not callable(score_fn) and (dampings != (None,) or ks != (None,)):
        raise ConfigError(
            "score_fn is a fixed [Q, N] array but several dampings/ks were asked for; pass a function "
            "score_fn(damping=..., k=...) -> [Q, N] scores, or leave dampings and ks at (None,)."
        )
    return dampings, ks


def _setting(
    score_fn: Any, damping: float | None, k: int | None, subsets: Tensor, outputs: Tensor, outputs_are_losses: bool,
    n_bootstrap: int, confidence: float, seed: int,
) -> ValidationSetting:  # fmt: skip
    """The per-query LDS of `score_fn(damping=, k=)` against the retrained `outputs` [S, Q], and its interval."""
    n_queries, n_train = outputs.shape[1], subsets.shape[1]
    scores = score_fn(damping=damping, k=k) if callable(score_fn) else score_fn
    s = _as_tensor(scores, f"the scores for damping={damping}, k={k}")
    if s.shape != (n_queries, n_train):
        raise ConfigError(
            f"the scores for damping={damping}, k={k} have shape {tuple(s.shape)}; expected "
            f"[{n_queries} queries, {n_train} training examples] (one row per measured query output)."
        )
    per_q = per_query_lds(s, subsets, outputs, outputs_are_losses)
    lo, hi = _bootstrap_interval(per_q, n_bootstrap, confidence, seed)
    return ValidationSetting(damping, k, float(per_q.mean()), lo, hi, per_q)
