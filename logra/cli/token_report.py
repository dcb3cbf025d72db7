"""`logra report --tokens`: per-token shares of the report's documents and queries (`logra.tokens`).

Only the examples the page shows are run through the model again (each query's top-k helpful
and harmful documents, and the queries), in batches of `BATCH`, with the store's projections,
preconditioner and normalisation. Each document's tokens are coloured by their shares of its
score against that query; each query's tokens by the part of each document's score they carry.
The shares must sum to the matrix's scores: where they do not (the matrix was scored with
another preconditioner or damping), the command stops and says so instead of drawing colours
that do not explain those scores.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from logra.capture.rows import QueryRows
from logra.errors import ConfigError
from logra.report import ReportDocument, ReportQuery, TokenPieces
from logra.tokens import token_texts
from logra.types import ExampleId

SUM_TOLERANCE = {4: 1e-3, 8: 1e-3, 2: 3e-2}
"""Largest |Σ shares - score| / max |score| of a query accepted as the same score, by the store's
bytes per value (a half-precision store rounds its rows; the recomputed ones are not rounded)."""


def _scorer_of(store: Any, preconditioner: str, normalization: str) -> Any:
    """The Scorer the matrix was written with: a saved preconditioner's directory, or a method's."""
    from logra.curvature.precondition import fit_preconditioner
    from logra.curvature.saved import load_preconditioner
    from logra.score import Scorer

    saved = Path(preconditioner)
    if not (saved / "preconditioner.json").is_file():
        saved = store.root / f"preconditioner-{preconditioner}"
    pre = load_preconditioner(saved) if (saved / "preconditioner.json").is_file() else None
    if pre is None:
        pre = fit_preconditioner(store, preconditioner)
    return Scorer(store, pre, normalization, progress=False)


BATCH = 8
"""Examples per forward/backward when recomputing (padding does not change a share)."""


def attach_tokens(
    built: Sequence[ReportQuery],
    store: Any,
    settings: Any,
    meta: dict[str, Any],
    train_records: dict[ExampleId, dict[str, Any]],
    query_records: dict[ExampleId, dict[str, Any]],
) -> list[ReportQuery]:
    """`built` with `tokens` and `query_tokens` filled for every shown document (module docstring)."""
    from logra.cli.inputs import encode, load_model
    from logra.tokens import TokenAttributor

    if meta.get("preset") or store.config.optimizer_correction is not None:
        raise ConfigError(
            "--tokens recomputes scores with a plain preconditioner and no optimizer correction, so it cannot "
            "explain --preset trackstar or optimizer-corrected scores yet; drop --tokens."
        )
    scorer = _scorer_of(store, meta["preconditioner"], meta["normalization"])
    model, tokenizer, task = load_model(settings)
    label2id = getattr(model.config, "label2id", None)
    shown = list(dict.fromkeys(d.id for q in built for d in q.helpful + q.harmful))
    docs = encode([train_records[i] for i in shown], tokenizer, task, settings.max_length, label2id)
    queries = encode([query_records[q.id] for q in built], tokenizer, task, settings.max_length, label2id)
    run = functools.partial(_recorded, model=model, task=task, reduction=settings.token_reduction)
    with TokenAttributor(scorer, model) as attributor:
        q_shares, d_shares = _shares(attributor, run, queries, docs, shown, store.config)
    doc_texts = {i: token_texts(tokenizer, t) for i, t in zip(docs.ids, docs.tokens)}
    tolerance = SUM_TOLERANCE.get(store.config.dtype.itemsize, 3e-2)
    out = []
    for n, q in enumerate(built):
        pieces_q = token_texts(tokenizer, queries.tokens[n])
        filled = []
        for d in q.helpful + q.harmful:
            own, explained = d_shares[d.id][n], q_shares[q.id][shown.index(d.id)]
            for total in (float(own.sum()), float(explained.sum())):
                _check_sum(q, d, total, tolerance)
            filled.append(dataclasses.replace(d, tokens=_pieces(doc_texts[d.id], own),
                                              query_tokens=_pieces(pieces_q, explained)))  # fmt: skip
        k = len(q.helpful)
        out.append(dataclasses.replace(q, helpful=filled[:k], harmful=filled[k:]))
    return out


def _shares(
    attributor: Any,
    run: Callable[..., Iterator[tuple[Any, list[int]]]],
    queries: Any,
    docs: Any,
    shown: list[ExampleId],
    config: Any,
) -> tuple[dict[ExampleId, Tensor], dict[ExampleId, Tensor]]:
    """({query id: (R, T_q) its tokens' shares against the R shown documents},
    {document id: (Q, T_d) its tokens' shares against the Q queries})."""
    # Query side: each query's rows, and its tokens' shares against every shown document.
    q_rows, q_shares = [], {}
    for rec, positions in run(attributor, queries):
        q_rows.append(rec.as_queries().rows)
        shares = rec.query_shares(shown)  # (B, R, T)
        for b, ex_id in enumerate(rec.ids):
            q_shares[ex_id] = shares[b, :, : positions[b]]  # (R, T_q)
    query_rows = QueryRows(list(queries.ids), torch.cat(q_rows), config, attributor.model_fingerprint,
                           attributor.layers)  # fmt: skip
    # Document side: each shown document's tokens' shares against every query.
    d_shares = {}
    for rec, positions in run(attributor, docs):
        shares = rec.train_shares(query_rows)  # (Q, B, T)
        for b, ex_id in enumerate(rec.ids):
            d_shares[ex_id] = shares[:, b, : positions[b]]  # (Q, T_d)
    return q_shares, d_shares


def _recorded(
    attributor: Any, encoded: Any, *, model: Any, task: Any, reduction: str
) -> Iterator[tuple[Any, list[int]]]:
    """(TokenRecord, each example's number of tokens) per batch of `encoded`, run like `logra log` runs them."""
    from logra.cli.inputs import batch_losses, batches

    lengths = dict(zip(encoded.ids, (len(t) for t in encoded.tokens)))
    for ids, batch in batches(encoded, BATCH):
        with attributor.record(ids, batch["attention_mask"]) as rec:
            batch_losses(model, batch, task, reduction).sum().backward()
        yield rec, [lengths[i] for i in ids]


def _pieces(texts: list[str], shares: torch.Tensor) -> TokenPieces:
    return tuple((t, float(v)) for t, v in zip(texts, shares.tolist()))


def _check_sum(query: ReportQuery, doc: ReportDocument, total: float, tolerance: float) -> None:
    scale = max(float(abs(query.scores).max()), 1e-30)
    if abs(total - doc.score) > tolerance * scale:
        raise ConfigError(
            f"the token shares of document {doc.id!r} for query {query.id!r} sum to {total:.6g}, but the score "
            f"matrix says {doc.score:.6g}: the matrix was not scored with the preconditioner this report recomputes "
            "(the saved one of its method, else one fitted with the default damping), or with other texts. Score "
            "again with a saved preconditioner (`logra fit`, then `logra score`) and report without --tokens meanwhile."
        )
