"""`logra report`: the HTML report of a score matrix, checked against the store it was scored on."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from logra.cli.commands import say
from logra.errors import ConfigError, LograError

META_TYPES: dict[str, Any] = {
    "provenance": dict, "query_ids": list, "store": str, "queries": str, "query_fields": dict,
    "normalization": str, "preconditioner": str,
}  # fmt: skip


def cmd_report(args: argparse.Namespace) -> int:
    from logra.report import build_queries, format_summary, write_report

    matrix, meta, store, settings, train_records, by_id, scores = open_scored(args)
    qids = meta["query_ids"]
    built = build_queries(
        np.asarray(scores),
        qids,
        [by_id[i]["text"] for i in qids],
        store.ids,
        {i: r["text"] for i, r in train_records.items()},
        args.top_k,
        [by_id[i].get("prompt") for i in qids],
        train_metadata={i: r["meta"] for i, r in train_records.items() if r["meta"]},  # title, source, label, ...
    )
    info = {
        "model": settings.model,
        "training examples": len(store),
        "layers logged": len(store.layers),
        "row width D": store.dim,
        "preconditioner": meta["preconditioner"],
        "normalization": meta["normalization"],
        "provenance": ", ".join(f"{k} {str(v)[:16]}" for k, v in meta["provenance"].items()),
    }
    if args.confirmed:
        found = _confirmations(Path(args.confirmed), meta, {r: t["text"] for r, t in train_records.items()})
        built = [replace(q, confirmed=found.get(q.id)) for q in built]
    if args.tokens:
        from logra.cli.token_report import attach_tokens

        say("per-token shares: recomputing the shown documents and the queries with the model")
        built = attach_tokens(built, store, settings, meta, train_records, by_id)
    write_report(args.out, built, args.title, info)
    print(format_summary(built, show=args.show))
    say(f"wrote the HTML report -> {args.out}")
    return 0


def open_scored(
    args: argparse.Namespace,
) -> tuple[Path, dict[str, Any], Any, Any, dict[Any, Any], dict[Any, Any], np.ndarray]:
    """What `report` and `confirm` read of `--scores`: (the matrix path, its checked metadata, the
    store it was scored on, that store's `logra log` settings, the training records by id, the
    query records by id, the [Q, N] scores)."""
    matrix = Path(args.scores)
    meta_path = Path(str(matrix) + ".json")
    if not matrix.is_file() or not meta_path.is_file():
        raise ConfigError(f"{matrix} and {meta_path} must exist; write them with `logra score --matrix {matrix}`.")
    meta = _matrix_meta(meta_path)
    store, settings = _scored_store(args, matrix, meta)
    train_records, query_records = _texts(args, store, settings, meta, meta_path)
    scores = _load_matrix(matrix, (len(meta["query_ids"]), len(store)))
    return matrix, meta, store, settings, train_records, query_records, scores


def _scored_store(args: argparse.Namespace, matrix: Path, meta: dict[str, Any]) -> tuple[Any, Any]:
    """(the store `matrix` was scored on, in the state it was scored; its `logra log` settings)."""
    from logra.cli.inputs import ModelSettings
    from logra.store.reader import GradientStore

    store = GradientStore.open(args.store or meta["store"])
    if meta["provenance"]["store"] != store.fingerprint:
        raise ConfigError(
            f"{matrix} was scored against another state of a store (fingerprint {meta['provenance']['store'][:16]}) "
            f"than the store at {store.root} ({store.fingerprint[:16]}); score it again."
        )
    settings = ModelSettings.load(store.root)
    if settings is None:
        raise ConfigError(
            f"the store at {store.root} was not logged by `logra log`; it has no settings to find its texts."
        )
    return store, settings


def _texts(
    args: argparse.Namespace, store: Any, settings: Any, meta: dict[str, Any], meta_path: Path
) -> tuple[dict[Any, dict[str, Any]], dict[Any, dict[str, Any]]]:
    """(training records by id, with metadata; query records by id), read as they were logged and scored."""
    from logra.cli.inputs import load_records

    data = args.data or settings.extra.get("data")
    if not isinstance(data, str):
        raise ConfigError(f"the store at {store.root} does not say which dataset it was logged from; pass --data.")
    train_records = {r["id"]: r for r in load_records(data, settings, settings.extra.get("split"), metadata=True)}
    fields = dict(meta["query_fields"])
    q_split, q_limit = fields.pop("split"), fields.pop("limit")
    queries = load_records(args.queries or meta["queries"], replace(settings, **fields), q_split, q_limit)
    by_id = {r["id"]: r for r in queries}
    missing = [i for i in meta["query_ids"] if i not in by_id]
    if missing:
        raise ConfigError(f"the query ids {missing[:5]} of {meta_path} are not in the query file; pass --queries.")
    return train_records, by_id


def _confirmations(path: Path, meta: dict[str, Any], texts: dict[Any, str]) -> dict[Any, Any]:
    """{query id: Confirmation} from a `logra confirm` table of the same scores (checked by provenance)."""
    import csv

    from logra.report import Confirmation, ConfirmedDocument
    from logra.store.files import read_regular

    sidecar = Path(str(path) + ".json")
    if path.suffix not in (".csv", ".jsonl") or not path.is_file() or not sidecar.is_file():
        raise ConfigError(
            f"--confirmed {path}: pass the .csv or .jsonl written by `logra confirm --out`, with its .json beside it."
        )
    try:
        info = json.loads(read_regular(sidecar, 2**24, "the confirm table's metadata").decode("utf-8"))
        recipe = info["recipe"]
        line = f"{recipe['steps']} {recipe['optimizer']} steps at lr {float(recipe['lr']):g}"
        text = read_regular(path, 2**30, "the confirm table").decode("utf-8")
        rows = list(csv.DictReader(text.splitlines())) if path.suffix == ".csv" else [
            json.loads(r) for r in text.splitlines() if r.strip()
        ]  # fmt: skip
        by_query: dict[Any, list[Any]] = {}
        for r in sorted(rows, key=lambda r: int(r["rank"])):
            tid = _same_id(r["train_id"], texts)
            by_query.setdefault(_same_id(r["query_id"], dict.fromkeys(meta["query_ids"])), []).append(
                ConfirmedDocument(
                    tid, texts.get(tid, "(text not given)"), float(r["gain"]), float(r["score"]), int(r["score_rank"])
                )  # fmt: skip
            )
    except LograError:
        raise
    except Exception as exc:  # a parse boundary: any defect of the table is reported as one
        raise ConfigError(
            f"--confirmed {path}: not a table of `logra confirm` ({type(exc).__name__}: {str(exc)[:200]}); run "
            "`logra confirm` again."
        ) from None
    if info.get("provenance") != meta["provenance"]:
        raise ConfigError(
            f"--confirmed {path} confirmed another score matrix (store, preconditioner or queries differ from "
            f"{meta['store']}'s); run `logra confirm --scores` on this matrix."
        )
    return {q: Confirmation(line, tuple(docs)) for q, docs in by_query.items()}


def _same_id(text: Any, known: dict[Any, Any]) -> Any:
    """A CSV cell as the id it names: an int id is written as digits and read back as text."""
    if text in known or not isinstance(text, str):
        return text
    return int(text) if text.lstrip("-").isdigit() and int(text) in known else text


def _matrix_meta(path: Path) -> dict[str, Any]:
    """The checked content of a score matrix's FILE.npy.json."""
    from logra.store.files import read_regular

    try:
        meta = json.loads(read_regular(path, 2**28, "the score matrix' metadata").decode("utf-8"))
    except LograError:
        raise
    except Exception as exc:
        raise ConfigError(f"{path}: not valid JSON ({type(exc).__name__}: {str(exc)[:200]}).") from None
    if not _valid_meta(meta):
        raise ConfigError(
            f"{path}: not the metadata `logra score --matrix` writes (fields {sorted(META_TYPES)}); score again."
        )
    return meta


def _valid_meta(meta: Any) -> bool:
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), t) for k, t in META_TYPES.items()):
        return False
    fields = meta["query_fields"]
    names = {"text_field", "prompt_field", "label_field", "id_field", "split", "limit"}
    return (
        all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in meta["query_ids"])
        and isinstance(meta["provenance"].get("store"), str)
        and {"split", "limit"} <= set(fields) <= names
        and all(v is None or isinstance(v, str) for k, v in fields.items() if k != "limit")
        and (fields["limit"] is None or (isinstance(fields["limit"], int) and fields["limit"] >= 0))
    )


def _load_matrix(path: Path, shape: tuple[int, int]) -> np.ndarray:
    """The [Q, N] float scores of `path` (no pickle), checked against the shape the metadata implies."""
    try:
        scores = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as exc:
        raise ConfigError(f"{path}: not a score matrix ({type(exc).__name__}: {str(exc)[:200]}).") from None
    if not isinstance(scores, np.ndarray) or scores.dtype.kind != "f" or scores.shape != shape:
        kind = f"{scores.dtype} {scores.shape}" if isinstance(scores, np.ndarray) else type(scores).__name__
        raise ConfigError(f"{path}: holds {kind}, not float scores of shape {shape}; score again.")
    return np.asarray(scores)
