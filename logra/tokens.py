"""Per-token influence: which tokens of a training example, or of a query, carry a score.

A LoGra row of one example is, per layer, the (k_out, k_in) block Σ_t g̃_t x̃_tᵀ (`logra.capture.hooks`),
so for any fixed block W of another row ⟨W, row⟩ = Σ_t g̃_tᵀ W x̃_t: every token position t
has an exact share, and the shares sum to the score. The Scorer's score(q, i) = (H⁻¹g_q)ᵀ g_i
gives two uses, with H⁻¹ symmetric for every preconditioner:

- training tokens (`TokenRecord.train_shares`): W = H⁻¹g_q, the preconditioned query block;
  shares[q, b, t] is token t of training example b's part of score(q, b).
- query tokens (`TokenRecord.query_shares`): W = H⁻¹g_i of a stored training row; shares[b, r, s]
  is token s of query b's part of score(b, r).

Nothing is stored for the corpus. The examples asked about (typically a query's top-k) are run
through the model again inside `TokenAttributor.record`, with the store's projections, the same
way they were logged:

    tokens = logra.TokenAttributor(scorer, model)
    with tokens.record(ids=top_ids, mask=batch["attention_mask"]) as rec:
        per_example_loss(model, batch).sum().backward()
    shares = rec.train_shares(query_rows)        # [Q, B, T]; shares.sum(-1) = the scores

Position t means the logged layers' inputs and outputs at t (for a causal LM the output at t
predicts token t + 1); padding positions get exactly 0. Under cosine/relative normalisation the
shares are divided by the same norms as the score, so they still sum to it. The recomputed rows
(`TokenRecord.rows`) equal the stored ones when the examples are the same texts, model and
padding-insensitive loss; `train_shares` sums to the score of the recomputed row.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from logra.capture.adapters import layer_module
from logra.capture.hooks import LayerCapture, per_example_gradients
from logra.capture.logger import GradientLogger, _Batch
from logra.capture.rows import QueryRows
from logra.config import LossReduction
from logra.errors import CaptureError, ConfigError
from logra.score import Normalization, Queries, Scorer, _inverse_sqrt
from logra.types import ExampleId, IdsLike, LayerInfo, normalize_ids


class TokenRecord:
    """The per-token projected gradients of one `TokenAttributor.record` block (float64, CPU).

    ids: the B examples.  rows: their (B, D) rows, Σ over positions (what the store would hold).
    mask: the (B, T) mask given to `record`, or None.  positions: T, the positions per example.
    """

    def __init__(self, attributor: TokenAttributor, ids: list[ExampleId], mask: Tensor | None) -> None:
        self._attributor = attributor
        self.ids = ids
        self.mask = mask
        self.rows: Tensor | None = None
        self.positions = 0
        self._calls: list[list[tuple[Tensor, Tensor]]] = []  # per layer: [(x̃ (B,T,k_in), g̃ (B,T,k_out))]
        self._layers: tuple[LayerInfo, ...] = ()

    def _fill(self, layers: Sequence[LayerInfo], calls: list[list[tuple[Tensor, Tensor]]], rows: Tensor) -> None:
        widths = {x.shape[1] for layer_calls in calls for x, _ in layer_calls}
        if len(widths) > 1:
            raise CaptureError(
                f"the logged layers saw different numbers of positions per example ({sorted(widths)}), so a position "
                "has no single share; log only layers that see every token (e.g. exclude pooled heads)."
            )
        self.positions = widths.pop() if widths else 0
        self._calls, self.rows = calls, rows
        self._layers = tuple(layers)

    def _shares(self, blocks: Tensor) -> Tensor:
        """Σ_layers Σ_calls g̃_tᵀ W x̃_t for every row W of blocks [R, D] -> [R, B, T] float64."""
        self._rows()  # filled only when the block has exited
        R, B = blocks.shape[0], len(self.ids)
        out = torch.zeros(R, B, self.positions, dtype=torch.float64)
        for layer, layer_calls in zip(self._layers, self._calls):
            w = blocks[:, layer.offset : layer.offset + layer.size].reshape(R, layer.k_out, layer.k_in)
            for x, g in layer_calls:
                out += torch.einsum("bto,roi,bti->rbt", g, w, x)  # (B,T,k_out) (R,k_out,k_in) (B,T,k_in)
        return out

    def train_shares(self, query_rows: Queries) -> Tensor:
        """[Q, B, T]: token t of recorded training example b's share of score(q, b).

        shares.sum(-1) equals the Scorer's score of each query against each recorded row.
        """
        scorer = self._attributor.scorer
        prepared = scorer._prepare(query_rows)  # checks the queries against the store
        pre = prepared.pre.to("cpu", torch.float64)
        shares = self._shares(pre)
        if prepared.scale is not None:
            shares = shares * prepared.scale.to("cpu", torch.float64)[:, None, None]
        if scorer.normalization is not Normalization.DOT:
            shares = shares * self._attributor.row_scale(self._rows())[None, :, None]
        return shares

    def query_shares(self, train_ids: IdsLike) -> Tensor:
        """[B, R, T]: token s of recorded query b's share of score(b, r), for the stored training ids.

        shares.sum(-1) equals the Scorer's score of each recorded query row against those rows.
        """
        attributor = self._attributor
        rows = attributor.stored_rows(normalize_ids(train_ids))  # (R, D)
        pre = attributor.scorer.preconditioner.apply(rows)  # H⁻¹ g_r, symmetric H⁻¹
        shares = self._shares(pre).transpose(0, 1)  # (B, R, T)
        normalization = attributor.scorer.normalization
        if normalization is not Normalization.DOT:
            shares = shares * attributor.row_scale(rows)[None, :, None]
        if normalization is Normalization.COSINE:
            shares = shares * attributor.row_scale(self._rows())[:, None, None]
        return shares

    def as_queries(self) -> QueryRows:
        """The recorded rows as `QueryRows`, carrying the store's config, layers and model fingerprint."""
        a = self._attributor
        return QueryRows(list(self.ids), self._rows(), a.scorer.store.config, a.model_fingerprint, a.layers)

    def _rows(self) -> Tensor:
        if self.rows is None:
            raise CaptureError("this TokenRecord is filled when its record() block exits; use it after the block.")
        return self.rows


class TokenAttributor:
    """Recompute per-token gradients of a few examples with the store's projections.

    Args:
        scorer: the `Scorer` whose scores the shares decompose (its store, preconditioner and
            normalisation).
        model: the model the store was logged with (its fingerprint is checked).
    """

    def __init__(self, scorer: Scorer, model: nn.Module) -> None:
        if not isinstance(scorer, Scorer):
            raise ConfigError(f"TokenAttributor needs a logra Scorer, got {type(scorer).__name__}.")
        self.scorer = scorer
        store = scorer.store
        # The logger gives the layer table and projections; its own hooks are removed at once.
        logger = GradientLogger(model, store.config, store=None, statistics=False)
        logger.close()
        if logger.model_fingerprint != store.manifest.model_fingerprint:
            raise ConfigError(
                f"the model is not the one the store at {store.root} was logged with (fingerprint "
                f"{logger.model_fingerprint} vs {store.manifest.model_fingerprint}); pass the training model."
            )
        self.layers = tuple(logger.layers)
        self.model_fingerprint = logger.model_fingerprint
        self._reduction = store.config.loss_reduction
        self._batch: _Batch | None = None
        self._captures = [
            LayerCapture(
                info, layer_module(model, info.name), functools.partial(logger.projection, info.name), self._open
            )
            for info in self.layers
        ]
        self._index: dict[ExampleId, int] | None = None

    def _open(self) -> _Batch | None:
        return self._batch

    def close(self) -> None:
        """Remove the hooks. Idempotent."""
        for capture in self._captures:
            capture.close()
        self._captures = []

    def __enter__(self) -> TokenAttributor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def record(self, ids: IdsLike, mask: Tensor | None = None) -> Iterator[TokenRecord]:
        """Capture per-token gradients of the forward and backward run inside the block.

        Run the same per-example loss as when logging, summed over the batch, and call backward
        inside the block. ids: B example ids; mask: optional (B, T) 0/1 mask of real tokens.
        """
        if self._batch is not None:
            raise CaptureError("TokenAttributor.record() blocks cannot be nested; close the open one first.")
        if not self._captures:
            raise CaptureError("this TokenAttributor is closed; create a new one.")
        id_list = normalize_ids(ids)
        if not id_list:
            raise CaptureError("record() got no ids: give one id per batch row.")
        if mask is not None and (not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != len(id_list)):
            shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
            raise CaptureError(f"mask of shape {shape} must be a (batch={len(id_list)}, sequence) tensor.")
        record = TokenRecord(self, id_list, mask)
        self._batch = _Batch(id_list, mask)
        try:
            yield record
        finally:
            self._batch = None
            taken = [capture.take() for capture in self._captures]
        self._finish(record, taken)

    def _finish(self, record: TokenRecord, taken: list[list[Any]]) -> None:
        B = len(record.ids)
        if all(c.g is None for layer_calls in taken for c in layer_calls):
            raise CaptureError(
                "no gradient reached the logged layers inside record(); run the forward and call backward on the "
                "sum of per-example losses inside the block."
            )
        scale = float(B) if self._reduction is LossReduction.MEAN else 1.0
        calls: list[list[tuple[Tensor, Tensor]]] = []
        parts = []
        for info, layer_calls in zip(self.layers, taken):
            kept = [c for c in layer_calls if c.g is not None]
            for c in kept:
                c.x, c.g = c.x.detach().to("cpu", torch.float64), c.g.detach().to("cpu", torch.float64) * scale
            calls.append([(c.x, c.g) for c in kept])
            grad = per_example_gradients(kept, B, info.k_out, info.k_in)
            if grad is None:
                grad = torch.zeros(B, info.k_out, info.k_in, dtype=torch.float64)
            parts.append(grad.reshape(B, -1))
        rows = torch.cat(parts, dim=1)
        if not torch.isfinite(rows).all():
            bad = [i for i, ok in zip(record.ids, torch.isfinite(rows).all(dim=1).tolist()) if not ok]
            raise CaptureError(f"the gradients of examples {bad[:10]} contain NaN or Inf; fix their loss.")
        record._fill(self.layers, calls, rows)

    def stored_rows(self, ids: list[ExampleId]) -> Tensor:
        """The store's rows of `ids` as (R, D) float64."""
        store = self.scorer.store
        if self._index is None:
            self._index = {i: j for j, i in enumerate(store.ids)}
        missing = [i for i in ids if i not in self._index]
        if missing or not ids:
            raise ConfigError(f"training ids {missing[:5] or ids} are not in the store at {store.root}; pass its ids.")
        return torch.cat([store.rows(self._index[i], self._index[i] + 1) for i in ids]).to(torch.float64)

    def row_scale(self, rows: Tensor) -> Tensor:
        """1/sqrt(g H⁻¹ g) of each row [R] (0 for a zero row), as the Scorer normalises."""
        rows = rows.to(torch.float64)
        return _inverse_sqrt((self.scorer.preconditioner.apply(rows) * rows).sum(dim=1))


def token_texts(tokenizer: Any, input_ids: Sequence[int]) -> list[str]:
    """The text piece of each token id (a Hugging Face tokenizer's decode of that token alone)."""
    return [tokenizer.decode([int(t)]) for t in input_ids]
