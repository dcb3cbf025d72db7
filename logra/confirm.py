"""Confirm a ranking by training: fine-tune on each candidate alone and measure each query's loss.

An influence score predicts how training on an example would change a query's loss. For a
shortlist (a query's top-k documents) the prediction can be checked by doing it: from the
model's weights θ, take `steps` steps of a fresh optimizer on the candidate's loss alone,
measure every query's loss at those weights θ_c, and restore θ exactly:

    gain[q, c] = L_q(θ) - L_q(θ_c)          (in per_example_loss's units, e.g. nats per token)

gain > 0: training on candidate c lowers query q's loss, the direction of a *helpful* logra score.
This is the counterfactual that first-order scores approximate (one SGD step of a small
learning rate gives gain ≈ lr · g_qᵀ g_c). Several steps follow the candidate as the model
learns it, which a gradient taken at θ cannot: on the demo's SmolLM2 passages five Adam steps on
the whole model rank the source article first where no first-order score does (README).

Cost: per candidate, `steps` forward/backward passes and optimizer updates of the trained
parameters, then one forward pass of every query it is measured on (`pairs`), so it is for
shortlists, not for a corpus. Memory: about four more copies of the trained parameters (the
snapshot, their gradients, Adam's two moments; one optimizer serves every candidate, its state
zeroed in place).
The model is run in eval mode (no dropout: a candidate's gain does not depend on a random
draw); its training mode, weights and gradients are restored after each candidate, also when a
candidate fails.

    gains = fine_tune_gains(model, [doc_batch(i) for i in shortlist], query_batches, per_example_loss)
    order = gains[q].argsort(descending=True)     # query q's shortlist, most loss-lowering first
"""

from __future__ import annotations

import enum
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from logra.curvature.objective import Batch
from logra.errors import ConfigError, LograError
from logra.types import parse_enum

PerExampleLoss = Callable[[nn.Module, Batch], Tensor]
"""(model, batch) -> (B,) each example's own loss."""


class FineTuneOptimizer(str, enum.Enum):
    """The optimizer of each candidate's fine-tuning, with a fresh state per candidate.

    adam: torch.optim.Adam (betas 0.9, 0.999; eps 1e-8); its first step moves every weight by
    about lr · sign(g), as a fine-tuning run's first steps do.
    sgd: plain gradient descent, θ ← θ - lr · g; one step is the first-order score's regime.
    """

    ADAM = "adam"
    SGD = "sgd"


class FineTuneError(LograError, ArithmeticError):
    """A candidate's fine-tuning met a non-finite loss, or left a measured query's loss non-finite."""


def fine_tune_gains(
    model: nn.Module,
    candidates: Sequence[Batch],
    queries: Sequence[Batch],
    per_example_loss: PerExampleLoss,
    *,
    steps: int = 5,
    lr: float = 5e-5,
    optimizer: FineTuneOptimizer | str = FineTuneOptimizer.ADAM,
    parameters: Sequence[nn.Parameter] | None = None,
    pairs: Sequence[Sequence[int]] | None = None,
    progress: bool = True,
) -> Tensor:
    """(Q, C) float64 gains: query q's loss at the weights minus after fine-tuning on candidate c alone.

    candidates: C batches; candidate c's loss is the sum of its examples' per_example_loss (one
    training example, or a group trained together). queries: batches whose examples, in order,
    are the Q queries; their losses are per_example_loss at the model's weights (no gradient).
    parameters: what is trained, whatever its requires_grad (default: every parameter of `model`
    that requires a gradient); the rest stay fixed. pairs: pairs[c] lists the positions in
    `queries` of the batches measured after candidate c (default: all of them); the gains of the
    others are NaN, and their forward passes are saved (a query's own shortlist is usually a few
    of all the candidates). See the module docstring for the definition and the restoring.
    """
    steps, lr, kind = _checked(candidates, queries, steps, lr, optimizer)
    measured = _checked_pairs(pairs, len(candidates), len(queries))
    trained = _trained_parameters(model, parameters)
    with _restoring(model, trained):
        model.eval()
        before = [_losses(model, b, per_example_loss) for b in queries]  # per batch: (B_j,)
        for j, losses in enumerate(before):
            if not bool(torch.isfinite(losses).all()):
                raise ConfigError(
                    f"query batch {j}'s loss is {losses.tolist()[:4]} at the model's weights: no gain can be measured "
                    "from it; check that query's inputs."
                )
        rows = torch.tensor([0, *(len(b) for b in before)]).cumsum(0).tolist()  # batch j: rows[j]:rows[j + 1]
        snapshot = [p.detach().clone() for p in trained]
        gains = torch.full((rows[-1], len(candidates)), float("nan"), dtype=torch.float64)
        opt = _optimizer(trained, lr, kind)
        for c, batch in enumerate(tqdm(candidates, desc="fine-tuning candidates", disable=not progress)):
            try:
                _fine_tune(model, opt, batch, per_example_loss, steps, c)
                for j in measured[c]:
                    after = _losses(model, queries[j], per_example_loss)
                    if not bool(torch.isfinite(after).all()):  # cheaper than checking every gradient
                        raise FineTuneError(
                            f"candidate {c}: query batch {j}'s loss is {after.tolist()[:4]} after {steps} fine-tuning "
                            "steps (a non-finite gradient or update); a smaller lr or fewer steps, or check the "
                            "candidate's inputs."
                        )
                    gains[rows[j] : rows[j + 1], c] = before[j] - after
            finally:
                _reset(trained, snapshot)
    return gains


def _checked(
    candidates: Sequence[Batch], queries: Sequence[Batch], steps: int, lr: float, optimizer: FineTuneOptimizer | str
) -> tuple[int, float, FineTuneOptimizer]:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps={steps!r} must be an integer >= 1 (optimizer steps on each candidate).")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise ConfigError(f"lr={lr!r} must be a finite number > 0, e.g. the learning rate of the fine-tuning.")
    for name, value in (("candidates", candidates), ("queries", queries)):
        if not isinstance(value, Sequence) and not (isinstance(value, Tensor) or hasattr(value, "__len__")):
            raise ConfigError(
                f"{name} must be a sequence of batches (a list), not {type(value).__name__}; e.g. list({name})."
            )
    if isinstance(candidates, (Tensor, dict)) or len(candidates) == 0:
        raise ConfigError(
            "candidates must be a non-empty sequence of batches, one per candidate (e.g. [batch_of(i) for i in "
            f"shortlist]); got {type(candidates).__name__} of length {len(candidates)}."
        )
    if isinstance(queries, (Tensor, dict)) or len(queries) == 0:
        raise ConfigError(
            f"queries must be a non-empty sequence of batches (e.g. [query_batch]); got {type(queries).__name__}."
        )
    return steps, float(lr), parse_enum(FineTuneOptimizer, optimizer, "optimizer")


def _trained_parameters(model: nn.Module, parameters: Sequence[nn.Parameter] | None) -> list[nn.Parameter]:
    own = {id(p): p for p in model.parameters()}
    if parameters is None:
        trained = [p for p in own.values() if p.requires_grad]
    else:
        trained = list({id(p): p for p in parameters}.values())
        foreign = [n for n, p in enumerate(trained) if id(p) not in own]
        if foreign:
            raise ConfigError(
                f"parameters {foreign[:5]} (by position) are not parameters of the model; pass parameters of "
                "`model`, or None for all of those that require a gradient."
            )
    if not trained:
        raise ConfigError(
            "there is nothing to fine-tune: no parameter was given and none of the model's requires a gradient; "
            "pass parameters=[...] (they are trained whatever their requires_grad)."
        )
    return trained


@contextmanager
def _restoring(model: nn.Module, trained: list[nn.Parameter]) -> Iterator[None]:
    """Give back the model's training mode, every parameter's requires_grad and gradient on exit."""
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad, p.grad) for p in model.parameters()]
    chosen = {id(p) for p in trained}
    try:
        for p, _, _ in flags:
            p.requires_grad_(id(p) in chosen)
            p.grad = None
        yield
    finally:
        for m, mode in modes:
            m.train(mode)
        for p, requires, grad in flags:
            p.requires_grad_(requires)
            p.grad = grad


def _checked_pairs(pairs: Sequence[Sequence[int]] | None, n_candidates: int, n_batches: int) -> list[list[int]]:
    if pairs is None:
        return [list(range(n_batches))] * n_candidates
    if isinstance(pairs, (Tensor, dict)) or len(pairs) != n_candidates:
        raise ConfigError(
            f"pairs must hold one list of query-batch positions per candidate ({n_candidates}); got "
            f"{type(pairs).__name__} of length {len(pairs)}."
        )
    out = []
    for c, positions in enumerate(pairs):
        if not isinstance(positions, (Sequence, set, frozenset)) or isinstance(positions, str):
            raise ConfigError(f"pairs[{c}] is {positions!r}, not a list of query-batch positions (e.g. [0, 2]).")
        chosen = list(positions)
        bad = [j for j in chosen if isinstance(j, bool) or not isinstance(j, int) or not 0 <= j < n_batches]
        if bad:
            raise ConfigError(
                f"pairs[{c}] holds {bad[:5]}, not positions of the {n_batches} query batches (0 to {n_batches - 1})."
            )
        out.append(sorted(set(chosen)))
    return out


def _losses(model: nn.Module, batch: Batch, per_example_loss: PerExampleLoss) -> Tensor:
    """(B,) float64 per-example losses of one batch, without a graph."""
    with torch.no_grad():
        return per_example_loss(model, batch).detach().reshape(-1).double()


def _optimizer(trained: list[nn.Parameter], lr: float, kind: FineTuneOptimizer) -> torch.optim.Optimizer:
    """One optimizer for every candidate: `_fresh` resets its state in place (no reallocation)."""
    if kind is FineTuneOptimizer.SGD:
        return torch.optim.SGD(trained, lr=lr)
    fused = all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in trained)
    return torch.optim.Adam(trained, lr=lr, fused=fused or None)  # fused: the same update in one pass


def _fresh(opt: torch.optim.Optimizer) -> None:
    """Give `opt` a fresh optimizer's state: every state tensor (Adam's step, exp_avg, exp_avg_sq) zeroed."""
    for state in opt.state.values():
        for value in state.values():
            if isinstance(value, Tensor):
                value.zero_()


def _fine_tune(
    model: nn.Module, opt: torch.optim.Optimizer, batch: Batch, per_example_loss: PerExampleLoss, steps: int, index: int
) -> None:
    _fresh(opt)
    for step in range(steps):
        opt.zero_grad(set_to_none=False)  # the gradient buffers are reused from step to step
        loss = per_example_loss(model, batch).sum()
        if not torch.isfinite(loss):
            raise FineTuneError(
                f"candidate {index}: its loss is {float(loss.detach())} at fine-tuning step {step + 1} of {steps}; "
                "a smaller lr or fewer steps keeps it finite, or check the candidate's inputs."
            )
        loss.backward()
        opt.step()


def _reset(trained: list[nn.Parameter], snapshot: list[Tensor]) -> None:
    with torch.no_grad():
        for p, saved in zip(trained, snapshot):
            p.copy_(saved)
