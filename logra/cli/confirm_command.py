"""`logra confirm`: check each query's top documents by fine-tuning on each of them (`logra.confirm`).

For a score matrix of `logra score --matrix`, every query's --top-k most helpful documents are
the candidates; each distinct candidate is trained on alone (--steps of --optimizer at --lr,
from the model's weights, restored afterwards) and the losses of the queries that shortlisted it
are measured. The table
ranks each query's candidates by how much training on them lowered the query's loss (`gain`, in
the loss `logra log` used: nats per token with the default mean token reduction), beside their
scores and score ranks, in the columns of `logra score --out` (query_id, direction, rank,
train_id, ...), so what reads a top-k table reads this one.

What is trained: the parameters of the modules matching --train-modules (default: every layer
`logra log` can log, Linear and Hugging Face Conv1D, the LM head included). A parameter a
matched module shares with an unmatched one (a head tied to the input embeddings) is untied
first, so only the matched modules move.
"""

from __future__ import annotations

import argparse
import fnmatch
import time
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from logra.capture.adapters import adapter_for
from logra.cli.commands import say, write_json
from logra.errors import ConfigError


def cmd_confirm(args: argparse.Namespace) -> int:
    from logra.cli.report_command import open_scored
    from logra.cli.tables import write_table

    out = Path(args.out)
    if out.suffix not in (".csv", ".jsonl", ".parquet"):
        raise ConfigError(f"--out {out} must end in .csv, .jsonl or .parquet.")
    matrix, meta, store, settings, train_records, query_records, scores = open_scored(args)
    qids, ids = meta["query_ids"], store.ids
    shortlists = _shortlists(scores, min(args.top_k, len(store)), matrix)  # (Q, k) column indices
    chosen = sorted({int(c) for c in shortlists.ravel()})
    missing = [ids[c] for c in chosen if ids[c] not in train_records]
    if missing:
        raise ConfigError(
            f"the candidates {missing[:5]} are in the store but not in the training data read from "
            f"{args.data or settings.extra.get('data')}; pass --data with the dataset the store was logged from."
        )
    start = time.perf_counter()
    gains, recipe = _gains(args, settings, [train_records[ids[c]] for c in chosen],
                           [query_records[q] for q in qids], shortlists, chosen)  # fmt: skip
    seconds = time.perf_counter() - start
    columns, agree = _table(gains, scores, shortlists, chosen, qids, ids)
    write_table(out, columns)
    write_json(
        Path(str(out) + ".json"),
        {"provenance": meta["provenance"], "scores": str(matrix), "top_k": int(shortlists.shape[1]),
         "recipe": recipe, "candidates": len(chosen), "seconds": seconds},
    )  # fmt: skip
    print(f"training's first candidate is the score's first for {agree}/{len(qids)} queries")
    say(f"fine-tuned {len(chosen)} candidates in {seconds:.0f} s; wrote {out}")
    return 0


def _gains(
    args: argparse.Namespace,
    settings: Any,
    docs: list[dict[str, Any]],
    queries: list[dict[str, Any]],
    shortlists: np.ndarray,
    chosen: list[int],
) -> tuple[np.ndarray, dict[str, Any]]:
    """((Q, C) gains of the `chosen` candidates, NaN outside each query's shortlist; the recipe as run)."""
    from logra.cli.inputs import batch_losses, batches, encode, load_model
    from logra.confirm import fine_tune_gains

    model, tokenizer, task = load_model(settings)
    trained, untied = _trained(model, args.train_modules)
    label2id = getattr(model.config, "label2id", None)
    encoded = [encode(r, tokenizer, task, settings.max_length, label2id) for r in (docs, queries)]
    weights = sum(p.numel() for p in trained)
    say(
        f"fine-tuning on each of {len(chosen)} candidates ({args.top_k} per query) alone: {args.steps} "
        f"{args.optimizer} steps at lr {args.lr:g} on {weights:,} weights"
        + (f" (untied from the modules sharing them: {', '.join(untied)})" if untied else "")
    )
    gains = fine_tune_gains(
        model,
        [batch for _, batch in batches(encoded[0], 1)],
        [batch for _, batch in batches(encoded[1], 1)],  # one query each: a candidate is measured on its own
        lambda m, b: batch_losses(m, b, task, settings.token_reduction),
        steps=args.steps,
        lr=args.lr,
        optimizer=args.optimizer,
        parameters=trained,
        pairs=[[q for q, shortlist in enumerate(shortlists) if c in shortlist] for c in chosen],
    ).numpy()
    recipe = {"steps": args.steps, "lr": args.lr, "optimizer": args.optimizer, "train_modules": args.train_modules,
              "untied": untied, "trained_weights": weights}  # fmt: skip
    return gains, recipe


def _shortlists(scores: np.ndarray, k: int, matrix: Path) -> np.ndarray:
    """(Q, k) each query's k highest-scoring columns, highest first (ties: the earlier column)."""
    bad = ~np.isfinite(scores)
    if bad.any():
        q, n = (int(v) for v in np.argwhere(bad)[0])
        raise ConfigError(
            f"{matrix} holds {scores[q, n]} at query {q}, column {n} ({int(bad.sum())} non-finite scores): it "
            "cannot rank candidates; score again."
        )
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def _trained(model: nn.Module, patterns: list[str] | None) -> tuple[list[nn.Parameter], list[str]]:
    """(the parameters of the modules matching `patterns`, the modules whose shared weights were untied)."""
    modules = dict(model.named_modules())
    if patterns:
        names = [n for n, m in modules.items() if n and any(fnmatch.fnmatch(n, p) for p in patterns)]
    else:
        names = [n for n, m in modules.items() if adapter_for(m) is not None]  # the layers `logra log` can log
    owned = [n for n in names if any(True for _ in modules[n].parameters(recurse=False))]
    if not owned:
        raise ConfigError(
            f"--train-modules {patterns} match no module with weights of its own; name layers as `logra log "
            "--modules` does, e.g. 'model.layers.*' lm_head."
        )
    matched = {id(modules[n]) for n in owned}
    outside = {id(p) for m in modules.values() if id(m) not in matched for p in m.parameters(recurse=False)}
    untied = []
    for n in owned:
        for pname, p in list(modules[n].named_parameters(recurse=False)):
            if id(p) in outside:  # shared with an unmatched module (a tied LM head): give n its own copy
                setattr(modules[n], pname, nn.Parameter(p.detach().clone()))
                untied.append(f"{n}.{pname}")
    params = {id(p): p for n in owned for p in modules[n].parameters(recurse=False)}
    return list(params.values()), untied


def _table(
    gains: np.ndarray, scores: np.ndarray, shortlists: np.ndarray, chosen: list[int], qids: list[Any], ids: list[Any]
) -> tuple[dict[str, list[Any]], int]:
    """(the output columns: each query's candidates by gain, highest first; how many queries'
    highest-gain candidate is their highest-scoring one)."""
    where = {c: j for j, c in enumerate(chosen)}
    columns: dict[str, list[Any]] = {
        k: [] for k in ("query_id", "direction", "rank", "train_id", "gain", "score", "score_rank")
    }
    agree = 0
    for q, shortlist in enumerate(shortlists):
        g = np.array([gains[q, where[int(c)]] for c in shortlist])
        order = np.argsort(-g, kind="stable")
        agree += int(order[0] == 0)
        for rank, i in enumerate(order, start=1):
            c = int(shortlist[i])
            row = (qids[q], "helpful", rank, ids[c], float(g[i]), float(scores[q, c]), int(i) + 1)
            for name, value in zip(columns, row):
                columns[name].append(value)
    return columns, agree
