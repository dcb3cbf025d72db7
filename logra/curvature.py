"""Curvature statistics beyond the Kronecker factors, and the true Fisher.

Two accumulators take row chunks [n, D] in the layer table's layout, in one pass:
`EigenbasisMoments` (EK-FAC's eigenvalues: the mean of (Q_Sᵀ G_i Q_A)² in KFAC's eigenbasis) and
`GradientCovariance` (the raw preconditioner's (1/N) Σ vec(G_i) vec(G_i)ᵀ). Both sum in float64
on the rows' device, so statistics of disjoint chunks merge by addition and chunking changes
nothing beyond rounding.

The *empirical* Fisher uses the gradients of the logged labels (the store's own rows and
statistics). The *true* Fisher replaces each label by one drawn from the model's predictive
distribution: `true_fisher_statistics` runs a statistics-only pass (a `GradientLogger` without a
store) over the user's batches with a user loss function that samples labels (for instance with
`sampled_cross_entropy`), and returns `FisherStatistics` for `fit_preconditioner(statistics=...)`.
`curvature_source` resolves that argument (store statistics, a given dict, or FisherStatistics).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from logra.capture import LayerInfo
from logra.config import LoGraConfig
from logra.errors import CaptureError, ConfigError, StoreError
from logra.logger import GradientLogger
from logra.statistics import KroneckerStatistics
from logra.store import GradientStore


def kronecker_eigenbases(
    statistics: Mapping[str, KroneckerStatistics],
) -> dict[str, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """{layer: (Q_S, λ_S, Q_A, λ_A)}: float64 eigh of S and A; eigenvalues clamped at 0 (roundoff)."""
    out = {}
    for name, s in statistics.items():
        lam_s, q_s = torch.linalg.eigh(s.grad_covariance().to(torch.float64))
        lam_a, q_a = torch.linalg.eigh(s.input_covariance().to(torch.float64))
        out[name] = (q_s, lam_s.clamp_min(0.0), q_a, lam_a.clamp_min(0.0))
    return out


class _RowAccumulator:
    """Per-layer float64 sums over rows, kept on the device of the rows that are added."""

    def __init__(self, layers: Iterable[LayerInfo]) -> None:
        self.layers = tuple(layers)
        self.sums: dict[str, Tensor] = {}
        self.count = 0

    def _term(self, layer: LayerInfo, block: Tensor) -> Tensor:
        """The sum over the n rows of `block` (n, k_out*k_in) float64 of this statistic."""
        raise NotImplementedError

    def add(self, rows: Tensor) -> None:
        """Add rows (n, D) in the layer table's layout (any float dtype, any device)."""
        for layer in self.layers:
            block = rows[:, layer.offset : layer.offset + layer.size].to(torch.float64)
            term = self._term(layer, block)
            old = self.sums.get(layer.name)
            self.sums[layer.name] = term if old is None else old + term.to(old.device)
        self.count += int(rows.shape[0])

    def result(self) -> dict[str, Tensor]:
        """{layer: the mean over every added row}, float64 on the CPU."""
        if self.count == 0:
            raise StoreError("no gradient rows to fit a preconditioner on: the store is empty; log examples first.")
        return {name: (s / self.count).cpu() for name, s in self.sums.items()}


class EigenbasisMoments(_RowAccumulator):
    """Mean over rows of (Q_Sᵀ G_i Q_A)², (k_out, k_in) per layer: EK-FAC's eigenvalues.

    Args:
        layers: the layer table of the rows that will be added.
        bases: {layer: (Q_S (k_out, k_out), Q_A (k_in, k_in))} float64 with orthonormal columns.
    """

    def __init__(self, layers: Iterable[LayerInfo], bases: Mapping[str, tuple[Tensor, Tensor]]) -> None:
        super().__init__(layers)
        self.bases = dict(bases)

    def _term(self, layer: LayerInfo, block: Tensor) -> Tensor:
        q_s, q_a = (q.to(block.device) for q in self.bases[layer.name])
        rotated = q_s.T @ block.reshape(-1, layer.k_out, layer.k_in) @ q_a  # (n, k_out, k_in)
        return rotated.square().sum(0)


class GradientCovariance(_RowAccumulator):
    """Mean over rows of vec(G_i) vec(G_i)ᵀ, (k_out*k_in, k_out*k_in) per layer."""

    def _term(self, layer: LayerInfo, block: Tensor) -> Tensor:
        return block.T @ block


def accumulate_store(
    store: GradientStore,
    accumulator: _RowAccumulator,
    chunk_rows: int,
    device: torch.device | str | None = None,
    progress: bool | None = None,
) -> None:
    """Feed every row of `store` to `accumulator`, one chunk at a time (memory ~ one chunk)."""
    total = -(-len(store) // chunk_rows) if len(store) else 0
    chunks = store.iter_chunks(chunk_rows)
    disable = None if progress is None else not progress
    for _, chunk in tqdm(chunks, total=total, desc="logra: curvature pass", disable=disable):
        accumulator.add(chunk if device is None else chunk.to(device))


# --------------------------------------------------------------------------------------------
# The true Fisher.


@dataclass(frozen=True)
class FisherStatistics:
    """Curvature measured with labels sampled from the model's predictive distribution.

    kronecker: {layer: KroneckerStatistics} (kfac, ekfac).  eigenvalues: {layer: (k_out, k_in)}
    EK-FAC second moments in the eigenbasis of `kronecker`, or None.  covariance:
    {layer: (k_out*k_in, k_out*k_in)} mean outer product for raw, or None.  n_examples: examples
    seen per sample; n_samples: label draws per example.
    """

    kronecker: dict[str, KroneckerStatistics]
    eigenvalues: dict[str, Tensor] | None
    covariance: dict[str, Tensor] | None
    n_examples: int
    n_samples: int


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
    method: str = "kfac",
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
    if method not in ("kfac", "ekfac", "raw"):
        raise ConfigError(f"true_fisher_statistics(method={method!r}) must be 'kfac', 'ekfac' or 'raw'.")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ConfigError(f"num_samples={num_samples!r} must be a positive int.")
    if method == "ekfac" and iter(batches) is batches:  # type: ignore[comparison-overlap]
        raise ConfigError(
            "method='ekfac' takes two passes over `batches`: pass a list or a DataLoader, not an iterator."
        )
    with GradientLogger(model, config, store=None, statistics=True) as logger:
        covariance = GradientCovariance(logger.layers) if method == "raw" else None
        n = _sampled_pass(logger, batches, loss_fn, num_samples, seed, batch_size_fn, mask_fn, progress, covariance)
        kronecker = logger.statistics()
        eigenvalues = None
        if method == "ekfac":
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
    accumulator: _RowAccumulator | None,
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


# --------------------------------------------------------------------------------------------
# Where a preconditioner's curvature comes from.


@dataclass(frozen=True)
class CurvatureSource:
    """Kronecker statistics and, when given (true Fisher), precomputed EK-FAC moments or covariance."""

    kronecker: Mapping[str, KroneckerStatistics]
    moments: Mapping[str, Tensor] | None
    covariance: Mapping[str, Tensor] | None
    fisher: str  # "empirical" (the store's own), "true" (FisherStatistics) or "custom" (a given dict)


def curvature_source(store: GradientStore, statistics: Any, raw: bool) -> CurvatureSource:
    """Resolve `fit_preconditioner(statistics=...)` for `store`; `raw`: for method='raw'."""
    if statistics is None:
        source = CurvatureSource({} if raw else store.statistics(), None, None, "empirical")
    elif isinstance(statistics, FisherStatistics):
        if raw and statistics.covariance is None:
            raise ConfigError(
                "these FisherStatistics hold no covariance; compute them with method='raw' for method='raw'."
            )
        source = CurvatureSource(statistics.kronecker, statistics.eigenvalues, statistics.covariance, "true")
    elif isinstance(statistics, Mapping):
        if raw:
            raise ConfigError(
                "method='raw' cannot use Kronecker statistics; pass statistics=None (the store's rows) or the "
                "FisherStatistics of true_fisher_statistics(..., method='raw')."
            )
        source = CurvatureSource(dict(statistics), None, None, "custom")
    else:
        raise ConfigError(
            "statistics must be None, a {layer: KroneckerStatistics} dict or FisherStatistics, "
            f"got a {type(statistics).__name__}."
        )
    if not raw:
        check_statistics(store, source.kronecker)
    names = [layer.name for layer in store.layers]
    for extra in (source.moments, source.covariance):
        if extra is not None and sorted(extra) != sorted(names):
            raise ConfigError(f"the FisherStatistics cover layers {sorted(extra)} but the store logs {names}.")
    return source


def check_statistics(store: GradientStore, kron: Mapping[str, Any]) -> None:
    """Raise ConfigError unless `kron` holds KroneckerStatistics of the store's layers and sizes."""
    names = [layer.name for layer in store.layers]
    if sorted(kron) != sorted(names):
        raise ConfigError(f"statistics cover layers {sorted(kron)} but the store at {store.root} logs {names}.")
    for layer in store.layers:
        s = kron[layer.name]
        if not isinstance(s, KroneckerStatistics):
            raise ConfigError(f"statistics[{layer.name!r}] is a {type(s).__name__}, not KroneckerStatistics.")
        if s.input_sum.shape != (layer.k_in, layer.k_in) or s.grad_sum.shape != (layer.k_out, layer.k_out):
            raise ConfigError(
                f"statistics[{layer.name!r}] has factors {tuple(s.input_sum.shape)}/{tuple(s.grad_sum.shape)} but the "
                f"layer is logged at k_in={layer.k_in}, k_out={layer.k_out}; compute them with the store's LoGraConfig."
            )
        if s.n_examples < 1 or s.n_tokens < 1:
            raise ConfigError(f"statistics[{layer.name!r}] count no examples; log some rows with statistics=True.")
