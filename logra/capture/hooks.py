"""Capturing projected per-example gradients with forward hooks and tensor hooks.

For a linear layer y = W x (+ b) seen on tokens t of example i, the weight gradient of example
i's loss is G_i = Σ_t g_t x_tᵀ with g_t = ∂L_i/∂y_t. LoGra logs P_out G_i P_inᵀ
= Σ_t (P_out g_t)(P_in x_t)ᵀ: the forward hook keeps only x̃ = P_in x (B, M, k_in), a tensor hook
on the output keeps only g̃ = P_out g (B, M, k_out), and one batched matmul g̃ᵀ x̃ gives the
(B, k_out, k_in) rows. No per-token outer product and no full gradient is ever formed.

Which layers are supported is `logra.capture.adapters`' business. Hooks are owned by
`LayerCapture` and removed by `close()`.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from logra.capture.projection import SparseRows
from logra.errors import CaptureError
from logra.types import LayerInfo

# --------------------------------------------------------------------------------------------
# Hooks.


@dataclass
class _Call:
    """One forward call of a layer inside a record block: projected inputs and, later, outputs."""

    x: Tensor  # (B, M, k_in), masked
    mask: Tensor | None  # (B, M) or None
    g: Tensor | None = None  # (B, M, k_out), masked, filled by the tensor hook


class LayerCapture:
    """Owns the hooks of one layer and the projected tensors of the current batch.

    The capture is active only while the logger's record block is open: `active` is a zero-arg
    callable returning the open batch (or None), read by the forward hook at every call.
    `take()` hands over the finished batch's calls; `close()` removes the hook.
    """

    def __init__(
        self,
        info: LayerInfo,
        module: nn.Module,
        source: Callable[[], tuple[Tensor, Tensor]],
        active: Callable[[], Any],
        shared_inputs: dict[tuple[Any, ...], Tensor] | None = None,
        scaled: bool = False,
    ) -> None:
        self.info = info
        self.module = module
        # Draws (P_in (k_in, n_in), P_out (k_out, n_out)) in float64 on the CPU, the bias column last
        # when info.bias. Only the copies in the compute dtype and device are kept, not the float64 draw.
        self._source = source
        self._cache: dict[tuple[torch.device, torch.dtype], tuple[Tensor, Tensor]] = {}
        # The same copies as `SparseRows` where few entries per row are nonzero (init=sjlt): applied by
        # a gather instead of a matmul. Derived from the copies themselves, so scalings folded into them count.
        self._sparse: dict[tuple[torch.device, torch.dtype], tuple[SparseRows | None, SparseRows | None]] = {}
        # When input projections are shared: one P_in copy per (n_in, k_in, device, dtype), owned by
        # the logger, so that layers of one width hold one matrix and can reuse each other's x̃.
        self._shared_inputs = shared_inputs
        self._active = active
        # A side whose k equals its width is the identity for every init (logra.capture.projection):
        # it is applied as a copy, not as an (n, n) matmul per token.
        # `scaled`: an optimizer correction is folded into the projections, so a full-width side is
        # diag(scale), not the identity: it goes through `_project` (one gather slot by SparseRows, n >= 16).
        self._identity_in = info.k_in == info.n_in and not scaled
        self._identity_out = info.k_out == info.n_out and not scaled
        self.calls: list[_Call] = []
        # Draw the copies for the weight's device and dtype now, so the first batch does no setup.
        weight = getattr(module, "weight", None)
        if isinstance(weight, Tensor) and weight.is_floating_point() and weight.device.type != "meta":
            self.sparse_projections(weight.device, _compute_dtype(weight.dtype))  # draws the projections too
        self._handle: RemovableHandle | None = module.register_forward_hook(self._forward_hook)

    def projections(self, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        key = (device, dtype)
        if key not in self._cache:
            p_in, p_out = self._source()
            p_in = p_in.to(device, dtype)
            if self._shared_inputs is not None:
                p_in = self._shared_inputs.setdefault((self.info.n_in, self.info.k_in, device, dtype), p_in)
            self._cache[key] = (p_in, p_out.to(device, dtype))
        return self._cache[key]

    def sparse_projections(
        self, device: torch.device, dtype: torch.dtype
    ) -> tuple[SparseRows | None, SparseRows | None]:
        """(P_in without its bias column, P_out) of `projections` as `SparseRows`, None where a side is dense."""
        key = (device, dtype)
        if key not in self._sparse:
            p_in, p_out = self.projections(device, dtype)
            self._sparse[key] = (SparseRows.of(p_in[:, :-1] if self.info.bias else p_in), SparseRows.of(p_out))
        return self._sparse[key]

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
        self.calls.clear()
        self._cache.clear()
        self._sparse.clear()

    # The forward hook keeps x̃ and puts a hook on the output for g̃.
    def _forward_hook(self, module: nn.Module, inputs: tuple[Any, ...], output: Any) -> None:
        batch = self._active()
        if batch is None or not torch.is_grad_enabled():
            return
        if not isinstance(output, Tensor) or not inputs or not isinstance(inputs[0], Tensor):
            raise CaptureError(f"layer {self.info.name!r} did not map a tensor to a tensor; it cannot be logged.")
        x = inputs[0]
        B = batch.size
        if x.dim() < 2 or x.shape[0] != B:
            raise CaptureError(
                f"layer {self.info.name!r} saw an input of shape {tuple(x.shape)} but record() was given {B} ids; "
                "the first dimension of every logged layer's input must be the batch."
            )
        x3 = x.reshape(B, -1, x.shape[-1])  # (B, M, n_w)
        p_in, p_out = self.projections(x.device, _compute_dtype(x.dtype))
        mask = batch.mask_for(x3.shape[1], self.info.name, x.device, p_in.dtype)
        # A layer that reads the same tensor (unchanged since) through the same P_in as the layer
        # before it (q, k and v; gate and up) reuses that x̃. Only the last input per P_in is kept.
        seen = batch.projected_inputs.get(id(p_in))
        if seen is not None and seen[0]() is x and seen[1] == x._version:
            xt = seen[2]
        else:
            xc = x3.detach().to(p_in.dtype)
            if self._identity_in:  # (B, M, n_in): a copy, so that later in-place edits of x do not reach it
                ones = torch.ones((*xc.shape[:2], 1), dtype=xc.dtype, device=xc.device)
                xt = torch.cat([xc, ones], dim=-1) if self.info.bias else xc.clone()
            else:
                sparse_in = self.sparse_projections(x.device, p_in.dtype)[0]
                xt = _project(xc, p_in[:, :-1] if self.info.bias else p_in, sparse_in)  # (B, M, k_in)
                if self.info.bias:
                    xt = xt + p_in[:, -1]  # the bias input is a constant 1
            if mask is not None:
                xt = _apply_mask(xt, mask)
            batch.projected_inputs[id(p_in)] = (weakref.ref(x), x._version, xt)
        call = _Call(xt, mask)
        self.calls.append(call)
        if not output.requires_grad:
            output.requires_grad_(True)  # frozen model: let the gradient reach this layer's output

        def grad_hook(grad: Tensor) -> None:
            flat = grad.detach().reshape(B, -1, grad.shape[-1]).to(p_out.dtype)
            sparse_out = None if self._identity_out else self.sparse_projections(flat.device, p_out.dtype)[1]
            g = flat.clone() if self._identity_out else _project(flat, p_out, sparse_out)  # (B, M, k_out)
            if call.mask is not None:
                g = _apply_mask(g, call.mask)
            call.g = g if call.g is None else call.g + g

        output.register_hook(grad_hook)

    def take(self) -> list[_Call]:
        """The calls of the finished batch (then forgotten)."""
        calls, self.calls = self.calls, []
        return calls


def _project(x: Tensor, p: Tensor, sparse: SparseRows | None) -> Tensor:
    """x (..., n) @ p (k, n)ᵀ -> (..., k): by a gather where `sparse` holds p's rows, else a matmul."""
    return x @ p.T if sparse is None else sparse.apply(x)


def _apply_mask(t: Tensor, mask: Tensor) -> Tensor:
    """t (B, M, k) weighted by mask (B, M); masked positions become exactly 0 even where t is NaN/Inf.

    Padding may hold non-finite activations or gradients (e.g. a fully masked softmax row); they
    must not leak into the rows through NaN * 0 = NaN.
    """
    m = mask.unsqueeze(-1)
    return torch.where(m != 0, t * m, torch.zeros((), dtype=t.dtype, device=t.device))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Projections run in the model dtype, but half types are upcast to float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def per_example_gradients(calls: list[_Call], B: int, k_out: int, k_in: int) -> Tensor | None:
    """Σ over calls of g̃ᵀ x̃: (B, k_out, k_in), or None when no gradient reached the layer."""
    total: Tensor | None = None
    for call in calls:
        if call.g is None:
            continue
        grad = torch.bmm(call.g.transpose(1, 2), call.x)  # (B, k_out, M) @ (B, M, k_in)
        total = grad if total is None else total + grad
    return total
