"""Curvature-vector products of a training loss: Hessian (double backward) and Gauss-Newton.

`CurvatureOperator` applies H, the *mean per-example* curvature of the training loss over the
given batches, to a block of row-layout vectors V [m, P] (`logra.curvature.objective`):

    H V = (1/N) Σ_batches ∇²_θ loss(batch) V,   N = Σ batch sizes,

so that H matches logra's convention (score / N ≈ the leave-one-out change). Products are
computed per batch: one forward, one first backward with a graph, then the m vectors at once
by a batched second backward (`torch.autograd.grad(..., is_grads_batched=True)`; a loop where
an operation has no batching rule):

- hessian: ∇²L v = ∂/∂θ ⟨∇L, v⟩ (double backward).
- ggn: Jᵀ (∇²_z ℓ) J v for an `OutputLoss` (cross-entropy or squared error of the outputs z);
  J v comes from the double-vjp trick (Jv = ∂/∂u ⟨Jᵀu, v⟩), Jᵀ from one more backward.

Every product is checked to be finite; a NaN or Inf raises `SolverError` naming the batch.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from logra.curvature.objective import (
    Batch,
    Curvature,
    LossFn,
    OutputLoss,
    ParameterSpace,
    SolverError,
    batch_size,
    check_batches,
    scalar_loss,
)
from logra.errors import ConfigError
from logra.types import parse_enum

DEFAULT_CHUNK = 64  # vectors per batched backward: memory grows with it, the result does not change


def _batched_grad(outputs: Sequence[Tensor], inputs: Sequence[Tensor], vectors: Sequence[Tensor]) -> list[Tensor]:
    """[∂⟨outputs, v_j⟩/∂inputs for each j]: per input [m, *input.shape]; outputs' graph is kept.

    Outputs that do not require grad contribute nothing; inputs they never reach get zeros.
    """
    live = [(o, v) for o, v in zip(outputs, vectors) if o.requires_grad]
    m = vectors[0].shape[0]
    if not live:
        return [torch.zeros(m, *x.shape, dtype=x.dtype, device=x.device) for x in inputs]
    outs, vecs = [o for o, _ in live], [v for _, v in live]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "no batching rule, falling back to a loop": a speed note only
            grads = torch.autograd.grad(
                outs, inputs, grad_outputs=vecs, retain_graph=True, allow_unused=True, is_grads_batched=True
            )
        parts: list[Tensor | None] = list(grads)
    except RuntimeError:  # an operation vmap cannot batch: one backward per vector
        per_vector = [
            torch.autograd.grad(outs, inputs, grad_outputs=[v[j] for v in vecs], retain_graph=True, allow_unused=True)
            for j in range(m)
        ]
        parts = [None if col[0] is None else torch.stack(col) for col in zip(*per_vector)]  # type: ignore[misc]
    return [torch.zeros(m, *x.shape, dtype=x.dtype, device=x.device) if g is None else g for x, g in zip(inputs, parts)]


class CurvatureOperator:
    """H, the mean per-example curvature of `loss` over `batches`, as a map V [m, P] -> H V [m, P].

    Args:
        model: the trained model (put it in eval mode first: dropout would make H random).
        space: the chosen parameters (`ParameterSpace`).
        loss: loss(model, batch) -> the summed loss of the batch, or an `OutputLoss`.
        batches: the training batches H averages over.
        curvature: hessian | ggn (the Gauss-Newton part; needs an `OutputLoss`).
        chunk: vectors per batched backward.
    """

    def __init__(
        self,
        model: nn.Module,
        space: ParameterSpace,
        loss: LossFn,
        batches: Sequence[Batch],
        curvature: Curvature | str = Curvature.HESSIAN,
        chunk: int = DEFAULT_CHUNK,
    ) -> None:
        if not callable(loss):
            raise ConfigError(f"loss={loss!r} must be callable: loss(model, batch) -> the batch's summed loss.")
        self.curvature = parse_enum(Curvature, curvature, "curvature")
        if self.curvature is Curvature.GGN and not isinstance(loss, OutputLoss):
            raise ConfigError(
                "curvature='ggn' needs the loss as an OutputLoss(kind='cross_entropy' or 'mse', forward=...) so that "
                "the output-space curvature is known; pass one, or use curvature='hessian'."
            )
        if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
            raise ConfigError(f"chunk={chunk!r} must be a positive int.")
        self.model, self.space, self.loss, self.chunk = model, space, loss, chunk
        self.batches = check_batches(batches)
        self.sizes = [batch_size(b) for b in self.batches]
        self.n_examples = sum(self.sizes)
        self.dim = space.dim

    def matvec(self, vectors: Tensor, batches: Sequence[int] | None = None) -> Tensor:
        """H V for V [m, P] (or [P]): float64, the mean over the examples of `batches` (indices; default all)."""
        single = vectors.dim() == 1
        V = vectors[None] if single else vectors
        if V.dim() != 2 or V.shape[1] != self.dim:
            raise ConfigError(f"curvature products need vectors [m, P={self.dim}], got {tuple(vectors.shape)}.")
        chosen = range(len(self.batches)) if batches is None else batches
        total = torch.zeros(V.shape[0], self.dim, dtype=torch.float64)
        n = 0
        for index in chosen:
            total += self.batch_product(self.batches[index], V, index)
            n += self.sizes[index]
        out = total / n
        return out[0] if single else out

    def batch_product(self, batch: Batch, V: Tensor, index: int | str = "given") -> Tensor:
        """Σ_{i in batch} ∇²ℓ_i V: [m, P] float64 (a sum over the batch's examples, not a mean)."""
        params = self.space.params
        if self.curvature is Curvature.HESSIAN:
            grads = torch.autograd.grad(scalar_loss(self.loss, self.model, batch), params, create_graph=True,
                                        allow_unused=True)  # fmt: skip
            self.space.check_used(grads)  # refuses parameters the loss does not reach
            first = [g for g in grads if g is not None]  # all of them: check_used refused a None
            product = self._chunked(lambda parts: _batched_grad(first, params, parts), V)
        else:
            product = self._gauss_newton(batch, V)
        if not torch.isfinite(product).all():
            raise SolverError(
                f"the {self.curvature.value} products of training batch {index} contain NaN or Inf: the loss or its "
                "curvature overflows there. Check that batch's inputs and loss, or run the model in float64."
            )
        return product

    def _chunked(self, apply: Callable[[list[Tensor]], list[Tensor]], V: Tensor) -> Tensor:
        """apply(per-parameter vectors) on `chunk` rows of V at a time, joined back into rows [m, P]."""
        out = [self.space.join(apply(self.space.split(block)), "curvature product") for block in V.split(self.chunk)]
        return torch.cat(out)

    def _gauss_newton(self, batch: Batch, V: Tensor) -> Tensor:
        """Jᵀ (∇²_z ℓ) J V over one batch."""
        assert isinstance(self.loss, OutputLoss)  # checked in __init__
        outputs, targets = self.loss.forward(self.model, batch)
        if not isinstance(outputs, Tensor) or not outputs.requires_grad:
            raise ConfigError(
                f"OutputLoss.forward returned outputs of type {type(outputs).__name__} without an autograd graph; "
                "return the model's outputs (logits) computed outside torch.no_grad(), and their targets."
            )
        params = self.space.params
        dummy = torch.zeros_like(outputs, requires_grad=True)
        jt_u = torch.autograd.grad(outputs, params, grad_outputs=dummy, create_graph=True, allow_unused=True)
        self.space.check_used(jt_u)  # refuses parameters the outputs do not reach
        jt = [g for g in jt_u if g is not None]

        def apply(parts: list[Tensor]) -> list[Tensor]:
            jv = _batched_grad(jt, [dummy], parts)[0]  # (m, *outputs.shape)
            hjv = self.loss.curvature(outputs, targets, jv)  # type: ignore[union-attr]
            return _batched_grad([outputs], params, [hjv])

        return self._chunked(apply, V)

    def dense(self) -> Tensor:
        """H as a dense [P, P] float64 matrix (P products with the unit vectors), symmetrised."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        H = self.matvec(eye)
        return (H + H.T) / 2
