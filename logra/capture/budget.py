"""A storage budget shared across layers: each layer's (k_in, k_out) chosen from its curvature.

One k everywhere spends bytes where they matter least. A language model's LM head has a
vocabulary-wide output side whose gradients (p - onehot over the vocabulary) spread over
hundreds of directions, while a narrow MLP side may need a few dozen. `allocate_k` divides a
budget of D floats per example among the layers from a cheap *probe*: the Kronecker statistics
of a statistics-only pass over a sample of the data, logged at a generous sketch size k0 (for
example 512; no rows are stored).

The rule. For each layer, let μ_out and μ_in be the eigenvalues of the probe's S and A (a
gaussian or rademacher sketch keeps a covariance's trace and, for the directions that carry it,
its top eigenvalues; a side probed at its full width is exact), and λ the layer's default
damping (0.1 x the full-size mean eigenvalue, as `fit_preconditioner` uses). A Kronecker
direction (a, b) with curvature m = μ_out[a] μ_in[b] adds m / (m + λ) to the layer's effective
number of parameters: about 1 for a direction well above the damping, about 0 for one the
damping drowns. `allocate_k` maximises the effective parameters kept by all layers together,
Σ_l Σ over the top k_out x k_in directions, subject to Σ_l k_in k_out ≤ budget, over sides of
k_min, k_min + step, ... rows: a Lagrangian relaxation (a price per stored float, each layer
then choosing on its own) solved by bisection, what is left of the budget spent greedily, and
exchanges of one step between sides while they keep more. The result is a `layer_k` mapping for `LoGraConfig`.

    with logra.GradientLogger(model, logra.LoGraConfig(k_in=512, k_out=512), statistics=True) as probe:
        for batch in sample:                      # a few hundred examples are enough
            with probe.record(ids=..., param_grads=False):
                loss(model, batch).sum().backward()
    layer_k = allocate_k(probe.statistics(), probe.layers, budget=36_864)
    config = logra.LoGraConfig(layer_k=layer_k)  # then log the corpus as usual
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from logra.errors import ConfigError
from logra.types import KroneckerStatistics, LayerInfo

DEFAULT_RELATIVE_DAMPING = 0.1  # the same rule as the preconditioners' default damping


def _spectrum(covariance: Tensor) -> Tensor:
    """Eigenvalues, largest first, clamped at 0 (float64)."""
    return torch.linalg.eigvalsh(covariance.to(torch.float64)).flip(0).clamp_min(0.0)


def allocate_k(
    statistics: Mapping[str, KroneckerStatistics],
    layers: Sequence[LayerInfo],
    budget: int,
    *,
    k_min: int = 8,
    step: int = 8,
    relative_damping: float = DEFAULT_RELATIVE_DAMPING,
) -> dict[str, tuple[int, int]]:
    """{layer name: (k_in, k_out)} with Σ k_in·k_out ≤ `budget`, from the curvature of a probe pass.

    Args:
        statistics: {layer: KroneckerStatistics} of the probe (`GradientLogger.statistics()`).
        layers: the probe's layer table (`GradientLogger.layers`): full widths n and probe sizes k.
        budget: floats per example (the row width D) to divide among the layers.
        k_min: the smallest k of a side (clipped to its width).
        step: rows added to a side at a time.
        relative_damping: λ = relative_damping x the layer's full-size mean eigenvalue.

    Returns a mapping for `LoGraConfig(layer_k=...)` (exact layer names are valid patterns).
    A side never grows past its width, nor past what the probe saw (its k): probe generously.
    """
    for name, value in (("budget", budget), ("k_min", k_min), ("step", step)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"allocate_k({name}={value!r}): must be a positive int.")
    if not relative_damping > 0:
        raise ConfigError(f"allocate_k(relative_damping={relative_damping!r}) must be > 0.")
    spectra = _spectra(statistics, layers, relative_damping)
    tables = {
        name: _gain_table(mu_in, mu_out, damping, k_min, step) for name, (mu_in, mu_out, damping) in spectra.items()
    }
    floor = sum(int(t.cost[0, 0]) for t in tables.values())
    if floor > budget:
        raise ConfigError(
            f"budget={budget} floats cannot give every one of the {len(layers)} layers k_min={k_min} per side "
            f"(that alone takes {floor}); raise the budget or lower k_min."
        )
    price = _price(tables, budget)
    choice = {name: t.best(price) for name, t in tables.items()}
    used = sum(int(tables[n].cost[c]) for n, c in choice.items())
    _fill(tables, choice, budget - used)
    _exchange(tables, choice, budget)
    return {name: (int(tables[name].k_in[i]), int(tables[name].k_out[j])) for name, (i, j) in choice.items()}


def _spectra(
    statistics: Mapping[str, KroneckerStatistics], layers: Sequence[LayerInfo], relative_damping: float
) -> dict[str, tuple[Tensor, Tensor, float]]:
    """{layer: (μ_in, μ_out, λ)}: the probe's input- and output-side eigenvalues and the layer's damping."""
    missing = [layer.name for layer in layers if layer.name not in statistics]
    if missing or not layers:
        raise ConfigError(
            f"allocate_k needs the probe's statistics of every layer of `layers`; missing {missing[:5]}. Pass "
            "probe.statistics() and probe.layers of one statistics=True GradientLogger."
        )
    spectra: dict[str, tuple[Tensor, Tensor, float]] = {}
    for layer in layers:
        s = statistics[layer.name]
        if s.n_examples < 1 or s.n_tokens < 1:
            raise ConfigError(f"the probe statistics of layer {layer.name!r} count no examples; run the probe first.")
        mu_out, mu_in = _spectrum(s.grad_covariance()), _spectrum(s.input_covariance())
        full_mean = float(mu_out.sum()) * float(mu_in.sum()) / (layer.n_out * layer.n_in)  # traces are kept
        spectra[layer.name] = (mu_in, mu_out, relative_damping * full_mean)
    return spectra


def _price(tables: dict[str, _GainTable], budget: int) -> float:
    """The smallest price ν per float at which every layer's own best choice fits the budget together.

    Lagrangian relaxation: with a price ν per float each layer independently takes the grid point
    of largest gain - ν·cost; the smallest ν whose choices fit the budget is found by bisection.
    """
    lo, hi = 0.0, max(float(t.gain.max()) for t in tables.values()) + 1.0
    if _cost(tables, lo) <= budget:
        return lo
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _cost(tables, mid) > budget else (lo, mid)
    return hi


class _GainTable:
    """A layer's grid of (k_in, k_out) choices: gain (effective parameters kept) and cost (floats)."""

    def __init__(self, k_in: Tensor, k_out: Tensor, gain: Tensor) -> None:
        self.k_in, self.k_out, self.gain = k_in, k_out, gain
        self.cost = torch.outer(k_in, k_out).to(torch.float64)

    def best(self, price: float) -> tuple[int, int]:
        flat = int(torch.argmax(self.gain - price * self.cost))
        return divmod(flat, self.gain.shape[1])


def _grid(limit: int, k_min: int, step: int) -> Tensor:
    """k_min, k_min + step, ... up to `limit`, which is always included (k_min clipped to it)."""
    ks = list(range(min(k_min, limit), limit + 1, step))
    if ks[-1] != limit:
        ks.append(limit)
    return torch.tensor(ks)


def _gain_table(mu_in: Tensor, mu_out: Tensor, damping: float, k_min: int, step: int) -> _GainTable:
    """Gains of every grid point: Σ over the top k_out x k_in Kronecker directions of m / (m + λ)."""
    m = torch.outer(mu_in, mu_out)  # (n_in, n_out), both sides largest first
    kept = (m / (m + damping)) if damping > 0 else (m > 0).to(torch.float64)
    cumulative = kept.cumsum(0).cumsum(1)
    k_in, k_out = _grid(len(mu_in), k_min, step), _grid(len(mu_out), k_min, step)
    return _GainTable(k_in, k_out, cumulative[k_in - 1][:, k_out - 1])


def _cost(tables: Mapping[str, _GainTable], price: float) -> int:
    return sum(int(t.cost[t.best(price)]) for t in tables.values())


def _fill(tables: Mapping[str, _GainTable], choice: dict[str, tuple[int, int]], left: int) -> None:
    """Spend what the relaxation left: repeatedly the one-step growth of largest gain per float that fits."""
    while True:
        best: tuple[float, str, tuple[int, int], int] | None = None
        for name, (i, j) in choice.items():
            t = tables[name]
            for step in ((i + 1, j), (i, j + 1)):
                if step[0] >= t.gain.shape[0] or step[1] >= t.gain.shape[1]:
                    continue
                extra = int(t.cost[step] - t.cost[i, j])
                if extra <= left:
                    rate = float(t.gain[step] - t.gain[i, j]) / extra
                    if best is None or rate > best[0]:
                        best = (rate, name, step, extra)
        if best is None:
            return
        _, name, step, extra = best
        choice[name] = step
        left -= extra


def _moves(t: _GainTable, at: tuple[int, int], grow: bool) -> list[tuple[int, int]]:
    i, j = at
    d = 1 if grow else -1
    return [m for m in ((i + d, j), (i, j + d)) if 0 <= m[0] < t.gain.shape[0] and 0 <= m[1] < t.gain.shape[1]]


def _exchange(tables: Mapping[str, _GainTable], choice: dict[str, tuple[int, int]], budget: int) -> None:
    """Close the relaxation's integrality gap: while shrinking one side by a step and growing another
    (the same layer or another) within the budget keeps more effective parameters, do the best such pair."""
    while True:
        left = budget - sum(int(tables[n].cost[c]) for n, c in choice.items())
        best: tuple[float, str, tuple[int, int], str, tuple[int, int]] | None = None
        for a, at in choice.items():
            ta = tables[a]
            for shrunk in _moves(ta, at, grow=False):
                freed = int(ta.cost[at] - ta.cost[shrunk])
                loss = float(ta.gain[at] - ta.gain[shrunk])
                for b, bt in choice.items():
                    base = shrunk if b == a else bt
                    tb = tables[b]
                    for grown in _moves(tb, base, grow=True):
                        if b == a and grown == at:
                            continue
                        if int(tb.cost[grown] - tb.cost[base]) > left + freed:
                            continue
                        delta = float(tb.gain[grown] - tb.gain[base]) - loss
                        if delta > 1e-12 and (best is None or delta > best[0]):
                            best = (delta, a, shrunk, b, grown)
        if best is None:
            return
        _, a, shrunk, b, grown = best
        choice[a] = shrunk
        choice[b] = grown
        _fill(tables, choice, budget - sum(int(tables[n].cost[c]) for n, c in choice.items()))
