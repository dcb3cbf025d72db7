"""The subcommands of the `logra` command line, one function each (`logra.cli` parses and dispatches).

Each `cmd_*` takes the parsed arguments and returns an exit status; errors are raised as
`LograError`s, which `logra.cli.main` prints and turns into status 2. Heavy imports (transformers,
datasets, the scorer) happen inside the commands, so `logra --help` stays fast.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logra.cli.tables import write_table
from logra.errors import ConfigError, StoreError
from logra.store.files import write_atomic, write_durable


def _say(msg: str) -> None:
    print(f"[logra] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Commands.


def _settings_from(args: argparse.Namespace, base: Any = None) -> Any:
    from logra.cli.inputs import ModelSettings

    if base is None:
        if args.model is None:
            raise ConfigError("--model is required (a Hugging Face model directory, config.json or .gguf file).")
        base = ModelSettings(model=args.model)
    for name in (
        "model",
        "tokenizer",
        "task",
        "model_dtype",
        "init_seed",
        "max_length",
        "token_reduction",
        "text_field",
        "prompt_field",
        "label_field",
        "id_field",
    ):
        value = getattr(args, name, None)
        if value is not None:
            setattr(base, name, value)
    return base


def cmd_log(args: argparse.Namespace) -> int:
    from logra.capture.logger import GradientLogger
    from logra.cli.inputs import ModelSettings, check_task_fields, encode, load_model, load_records, log_examples
    from logra.config import LoGraConfig
    from logra.store.manifest import MANIFEST

    out = Path(args.out)
    if (out / MANIFEST).exists() and not args.resume:
        raise StoreError(f"{out} already holds a store; pass --resume to continue it, or choose another --out.")
    settings = _settings_from(args)
    config = LoGraConfig(
        k_in=args.k_in or args.k,
        k_out=args.k_out or args.k,
        init=args.init,
        seed=args.seed,
        modules=args.modules,
        exclude=tuple(args.exclude or ()),
        dtype=args.dtype,
        include_bias=args.include_bias,
        nonfinite=args.nonfinite,
        pca_statistics=args.pca_statistics,
    )
    model, tokenizer, task = load_model(settings)
    settings.task = task.value
    check_task_fields(task, settings)
    saved = ModelSettings.load(out)
    if args.resume and saved is not None and {**vars(saved), "extra": {}} != {**vars(settings), "extra": {}}:
        raise ConfigError(f"--resume with other settings than the store at {out} was logged with: {vars(saved)}.")
    records = load_records(args.data, settings, args.split, args.limit)
    encoded = encode(records, tokenizer, task, settings.max_length, getattr(model.config, "label2id", None))
    settings.extra = {"data": str(Path(args.data).resolve()), "split": args.split, "limit": args.limit}
    start = time.perf_counter()
    with GradientLogger(
        model, config, store=out, shard_rows=args.shard_rows, statistics=not args.no_statistics
    ) as logger:
        settings.save(out)
        if logger.committed_ids:
            _say(f"resuming: {len(logger.committed_ids)} examples already committed are skipped")
        n, _ = log_examples(
            model,
            logger,
            encoded,
            task,
            batch_size=args.batch_size,
            token_reduction=settings.token_reduction,
            desc="logra log",
        )
        layers, dim = logger.layers, logger.dim
    elapsed = time.perf_counter() - start
    _say(
        f"logged {n} examples in {elapsed:.1f} s ({len(layers)} layers, D={dim}, "
        f"{dim * config.dtype.itemsize / 1024:.1f} KiB per example) -> {out}"
    )
    return 0


def _preconditioner(args: argparse.Namespace, store: Any) -> Any:
    from logra.curvature.precondition import fit_preconditioner
    from logra.curvature.saved import load_preconditioner

    if args.preconditioner:
        return load_preconditioner(args.preconditioner)
    saved = store.root / f"preconditioner-{args.method}"
    if (saved / "preconditioner.json").is_file() and args.damping is None:
        _say(f"using the {args.method} preconditioner saved at {saved}")
        return load_preconditioner(saved)
    _say(f"fitting a {args.method} preconditioner in memory (save one with `logra fit`)")
    return fit_preconditioner(store, args.method, damping=args.damping)


def cmd_fit(args: argparse.Namespace) -> int:
    from logra.curvature.precondition import fit_preconditioner
    from logra.store.reader import GradientStore

    store = GradientStore.open(args.store)
    pre = fit_preconditioner(store, args.method, damping=args.damping, progress=True)
    out = Path(args.out) if args.out else store.root / f"preconditioner-{args.method}"
    pre.save(out)
    _say(f"fitted a {args.method} preconditioner on {len(store)} rows -> {out}")
    return 0


def _query_rows(args: argparse.Namespace, store: Any) -> tuple[list[Any], torch.Tensor, dict[str, Any]]:
    """Log the query file with the store's config and settings; (query ids, rows [Q, D], the fields read)."""
    from logra.capture.logger import GradientLogger
    from logra.cli.inputs import ModelSettings, encode, load_model, load_records, log_examples

    saved = ModelSettings.load(store.root)
    settings = _settings_from(args, saved)
    model, tokenizer, task = load_model(settings)
    records = load_records(args.queries, settings, args.split, args.limit)
    encoded = encode(records, tokenizer, task, settings.max_length, getattr(model.config, "label2id", None))
    with GradientLogger(model, store.config, store=None, statistics=False) as logger:
        if logger.model_fingerprint != store.manifest.model_fingerprint:
            raise ConfigError(
                f"the model {settings.model!r} is not the one the store at {store.root} was logged with "
                "(different layers or weights); score queries with the training model."
            )
        _, rows = log_examples(
            model,
            logger,
            encoded,
            task,
            batch_size=args.batch_size,
            token_reduction=settings.token_reduction,
            desc="logra queries",
            keep_rows=True,
        )
    if rows is None or rows.shape[0] != len(encoded.ids):
        raise ConfigError(
            f"{len(encoded.ids)} queries gave {0 if rows is None else rows.shape[0]} gradients; "
            "a query was dropped (NaN/Inf loss?). Check the query file."
        )
    fields = {
        "text_field": settings.text_field,
        "prompt_field": settings.prompt_field,
        "label_field": settings.label_field,
        "id_field": settings.id_field,
        "split": args.split,
        "limit": args.limit,
    }
    return encoded.ids, rows, fields


def cmd_score(args: argparse.Namespace) -> int:
    from logra.score import Scorer
    from logra.store.reader import GradientStore

    if not args.out and not args.matrix:
        raise ConfigError("pass --out FILE (top-k table), --matrix FILE.npy (all scores), or both.")
    store = GradientStore.open(args.store)
    query_ids, rows, fields = _query_rows(args, store)
    scorer = Scorer(store, _preconditioner(args, store), args.normalization, args.chunk_rows, progress=True)
    if args.matrix:
        matrix = Path(args.matrix)
        if matrix.suffix != ".npy":
            raise ConfigError(f"--matrix {matrix} must end in .npy.")
        matrix.parent.mkdir(parents=True, exist_ok=True)
        scorer.score(rows, out=matrix)
        meta = {
            "query_ids": query_ids,
            "store": str(store.root.resolve()),
            "queries": str(Path(args.queries).resolve()),
            "query_fields": fields,
            "normalization": args.normalization,
            "preconditioner": args.preconditioner or args.method,
        }
        write_atomic(Path(str(matrix) + ".json"), json.dumps(meta, indent=1).encode())
        _say(f"wrote the [{len(query_ids)}, {len(store)}] score matrix -> {matrix}")
    if args.out:
        k = min(args.top_k, len(store))
        top = scorer.top_k(rows, k)
        cols: dict[str, list[Any]] = {"query_id": [], "direction": [], "rank": [], "train_id": [], "score": []}
        for q, qid in enumerate(query_ids):
            for direction, ids, values in (
                ("helpful", top.helpful_ids, top.helpful_scores),
                ("harmful", top.harmful_ids, top.harmful_scores),
            ):
                for r in range(k):
                    for c, v in zip(cols, (qid, direction, r + 1, ids[q][r], float(values[q, r]))):
                        cols[c].append(v)
        write_table(Path(args.out), cols)
        _say(f"wrote the top {k} helpful and harmful examples of {len(query_ids)} queries -> {args.out}")
    return 0


def cmd_self_influence(args: argparse.Namespace) -> int:
    from logra.score import Scorer
    from logra.store.reader import GradientStore

    store = GradientStore.open(args.store)
    values = Scorer(store, _preconditioner(args, store), progress=True).self_influence().double().numpy()
    order = np.argsort(-values, kind="stable")
    out = Path(args.out)
    if out.suffix == ".npy":
        write_durable(out, lambda f: np.save(f, values))
    else:
        rank = np.empty(len(values), dtype=np.int64)
        rank[order] = np.arange(1, len(values) + 1)
        write_table(out, {"train_id": list(store.ids), "self_influence": values.tolist(), "rank": rank.tolist()})
    for j in order[: args.show]:
        print(f"{values[j]:.6g}\t{store.ids[j]}")
    _say(f"wrote the self-influence of {len(store)} examples -> {out}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from logra.cli.inputs import ModelSettings, load_records
    from logra.report import build_queries, format_summary, write_report
    from logra.store.reader import GradientStore

    matrix = Path(args.scores)
    meta_path = Path(str(matrix) + ".json")
    if not matrix.is_file() or not meta_path.is_file():
        raise ConfigError(f"{matrix} and {meta_path} must exist; write them with `logra score --matrix {matrix}`.")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    store = GradientStore.open(args.store or meta["store"])
    settings = ModelSettings.load(store.root)
    if settings is None:
        raise ConfigError(
            f"the store at {store.root} was not logged by `logra log`; it has no settings to find its texts."
        )
    data = args.data or settings.extra.get("data")
    if not isinstance(data, str):
        raise ConfigError(f"the store at {store.root} does not say which dataset it was logged from; pass --data.")
    train = {r["id"]: r["text"] for r in load_records(data, settings, settings.extra.get("split"))}
    fields = dict(meta["query_fields"])
    q_split, q_limit = fields.pop("split"), fields.pop("limit")
    queries = load_records(args.queries or meta["queries"], replace(settings, **fields), q_split, q_limit)
    by_id = {r["id"]: r for r in queries}
    qids = meta["query_ids"]
    scores = np.load(matrix, mmap_mode="r")
    built = build_queries(
        np.asarray(scores),
        qids,
        [by_id[i]["text"] for i in qids],
        store.ids,
        train,
        args.top_k,
        [by_id[i].get("prompt") for i in qids],
    )
    info = {
        "model": settings.model,
        "training examples": len(store),
        "layers logged": len(store.layers),
        "row width D": store.dim,
        "preconditioner": meta["preconditioner"],
        "normalization": meta["normalization"],
    }
    write_report(args.out, built, args.title, info)
    print(format_summary(built, show=args.show))
    _say(f"wrote the HTML report -> {args.out}")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from logra.store.reader import GradientStore

    store = GradientStore.open(args.store)
    store.verify()
    print(f"{args.store}: OK ({len(store)} rows, D={store.dim}, {len(store.manifest.shards)} shards, checksums match)")
    return 0
