"""The subcommands of the `logra` command line, one function each (`logra.cli` parses and dispatches).

Each `cmd_*` takes the parsed arguments and returns an exit status; errors are raised as
`LograError`s, which `logra.cli.main` prints and turns into status 2. Every score output (the
matrix's FILE.json, and FILE.json beside a top-k or self-influence table) carries the provenance
of its scores: the fingerprints of the store, the preconditioner and the queries. Heavy imports (transformers,
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

from logra.cli.tables import write_table
from logra.errors import ConfigError, LograError, StoreError
from logra.store.files import no_space, write_atomic, write_durable


def _say(msg: str) -> None:
    print(f"[logra] {msg}", file=sys.stderr, flush=True)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """Write a JSON sidecar durably; a full disk raises StoreError naming it."""
    raw = json.dumps(data, indent=1).encode()
    try:
        write_atomic(path, raw)
    except OSError as exc:
        if isinstance(exc, LograError):
            raise
        raise no_space(path, len(raw), exc) from None


def _provenance(scorer: Any, queries: Any = None) -> dict[str, str]:
    """The provenance of scores (store, preconditioner and query fingerprints), also said on stderr."""
    prov: dict[str, str] = scorer.provenance(queries)
    _say("provenance: " + ", ".join(f"{k} {v[:16]}" for k, v in prov.items()))
    return prov


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
    data_path = str(Path(args.data).resolve())
    recorded = (saved.extra.get("data"), saved.extra.get("split")) if saved is not None else None
    if args.resume and recorded is not None and recorded != (data_path, args.split):
        raise ConfigError(
            f"--resume with --data {data_path} (split {args.split}), but the store at {out} was logged from "
            f"{recorded[0]} (split {recorded[1]}); resume with the same data, or log the "
            "other data into a new store."
        )
    records = load_records(args.data, settings, args.split, args.limit)
    encoded = encode(records, tokenizer, task, settings.max_length, getattr(model.config, "label2id", None))
    settings.extra = {"data": data_path, "split": args.split, "limit": args.limit}
    if args.budget:
        config = _budget_config(args, model, encoded, task, settings, config)
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


PROBE_K = 2048  # the probe's sketch size per side: sides up to this wide are seen in full


def _budget_config(
    args: argparse.Namespace, model: Any, encoded: Any, task: Any, settings: Any, config: Any
) -> Any:
    """`config` with `layer_k` from `allocate_k`: the row width of uniform --k, shared by curvature."""
    from logra.capture.budget import allocate_k
    from logra.capture.logger import GradientLogger
    from logra.cli.inputs import log_examples

    if args.k_in or args.k_out or config.layer_k:
        raise ConfigError("--budget sizes each side itself from the budget of uniform --k; drop --k-in/--k-out.")
    with GradientLogger(model, config, statistics=False) as uniform:
        budget = uniform.dim
    probe_config = replace(config, k_in=PROBE_K, k_out=PROBE_K, init="gaussian", pca_statistics=None)
    sample = replace(encoded, ids=encoded.ids[: args.probe_examples], tokens=encoded.tokens[: args.probe_examples],
                     targets=encoded.targets[: args.probe_examples])  # fmt: skip
    with GradientLogger(model, probe_config, store=None, statistics=True) as probe:
        log_examples(model, probe, sample, task, batch_size=args.batch_size,
                     token_reduction=settings.token_reduction, desc="logra probe")  # fmt: skip
        step = min(8, args.k)  # sides grow in steps of 8 rows, or of k itself below that
        layer_k = allocate_k(probe.statistics(), probe.layers, budget, k_min=step, step=step)
    _say(f"budget of D={budget} (uniform k={args.k}) shared across layers: " +
         ", ".join(f"{n} {ki}x{ko}" for n, (ki, ko) in layer_k.items()))  # fmt: skip
    return replace(config, layer_k=layer_k)


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
    out = Path(args.out) if args.out else store.root / f"preconditioner-{args.method}"
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is an existing file; a preconditioner is saved as a directory. Choose another.")
    fisher = _true_fisher(store, args.method, args.fisher_samples, args.batch_size) if args.fisher == "true" else None
    pre = fit_preconditioner(store, args.method, damping=args.damping, statistics=fisher, progress=True)
    pre.save(out)
    _say(f"fitted a {args.method} preconditioner ({pre.fisher.value} Fisher) on {len(store)} rows -> {out}")
    return 0


def _true_fisher(store: Any, method: str, num_samples: int, batch_size: int) -> Any:
    """`logra fit --fisher true`: the true Fisher of the store's model on its own training data,
    both read from the `logra-cli.json` that `logra log` wrote beside the store."""
    from logra.capture.logger import GradientLogger
    from logra.cli.inputs import ModelSettings, batches, encode, load_model, load_records
    from logra.curvature.fisher import true_fisher_statistics
    from logra.losses import hf_logits_fn

    settings = ModelSettings.load(store.root)
    if settings is None or not settings.extra.get("data"):
        raise ConfigError(
            f"--fisher true runs the model on the training data, but {store.root} has no logra-cli.json naming "
            "them (it was not written by `logra log`). Use --fisher empirical, or compute the statistics in Python "
            "with logra.true_fisher_statistics and pass them to fit_preconditioner(statistics=...)."
        )
    model, tokenizer, task = load_model(settings)
    with GradientLogger(model, store.config, store=None, statistics=False) as check:
        if check.model_fingerprint != store.manifest.model_fingerprint:
            raise ConfigError(
                f"the model {settings.model!r} is not the one the store at {store.root} was logged with; "
                "--fisher true needs the training model."
            )
    records = load_records(settings.extra["data"], settings, settings.extra.get("split"), settings.extra.get("limit"))
    encoded = encode(records, tokenizer, task, settings.max_length, getattr(model.config, "label2id", None))
    data = [batch for _, batch in batches(encoded, batch_size)]
    _say(f"true Fisher: {len(encoded.ids)} examples of {settings.extra['data']}")
    logits_fn = hf_logits_fn(task, settings.token_reduction)
    return true_fisher_statistics(
        model, store.config, data, logits_fn=logits_fn, method=method, num_samples=num_samples, param_grads=False,
        progress=True,
    )  # fmt: skip


def _query_rows(args: argparse.Namespace, store: Any) -> tuple[list[Any], Any, dict[str, Any]]:
    """Log the query file with the store's config and settings; (query ids, QueryRows, the fields read)."""
    from logra.capture.logger import GradientLogger, QueryRows
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
        fingerprint, layers = logger.model_fingerprint, tuple(logger.layers)
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
    return encoded.ids, QueryRows(list(encoded.ids), rows, store.config, fingerprint, layers), fields


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
            "provenance": _provenance(scorer, rows),
            "query_ids": query_ids,
            "store": str(store.root.resolve()),
            "queries": str(Path(args.queries).resolve()),
            "query_fields": fields,
            "normalization": args.normalization,
            "preconditioner": args.preconditioner or args.method,
        }
        _write_json(Path(str(matrix) + ".json"), meta)
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
        _write_json(Path(str(args.out) + ".json"), {"provenance": _provenance(scorer, rows), "top_k": k})
        _say(f"wrote the top {k} helpful and harmful examples of {len(query_ids)} queries -> {args.out}")
    return 0


def cmd_self_influence(args: argparse.Namespace) -> int:
    from logra.score import Scorer
    from logra.store.reader import GradientStore

    store = GradientStore.open(args.store)
    scorer = Scorer(store, _preconditioner(args, store), progress=True)
    values = scorer.self_influence().double().numpy()
    order = np.argsort(-values, kind="stable")
    out = Path(args.out)
    if out.suffix == ".npy":
        try:
            write_durable(out, lambda f: np.save(f, values))
        except OSError as exc:
            raise no_space(out, values.nbytes + 128, exc) from None
    else:
        rank = np.empty(len(values), dtype=np.int64)
        rank[order] = np.arange(1, len(values) + 1)
        write_table(out, {"train_id": list(store.ids), "self_influence": values.tolist(), "rank": rank.tolist()})
    _write_json(Path(str(out) + ".json"), {"provenance": _provenance(scorer)})
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
    meta = _matrix_meta(meta_path)
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
    data = args.data or settings.extra.get("data")
    if not isinstance(data, str):
        raise ConfigError(f"the store at {store.root} does not say which dataset it was logged from; pass --data.")
    train = {r["id"]: r["text"] for r in load_records(data, settings, settings.extra.get("split"))}
    fields = dict(meta["query_fields"])
    q_split, q_limit = fields.pop("split"), fields.pop("limit")
    queries = load_records(args.queries or meta["queries"], replace(settings, **fields), q_split, q_limit)
    by_id = {r["id"]: r for r in queries}
    qids = meta["query_ids"]
    missing = [i for i in qids if i not in by_id]
    if missing:
        raise ConfigError(f"the query ids {missing[:5]} of {meta_path} are not in the query file; pass --queries.")
    scores = _load_matrix(matrix, (len(qids), len(store)))
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
        "provenance": ", ".join(f"{k} {str(v)[:16]}" for k, v in meta["provenance"].items()),
    }
    write_report(args.out, built, args.title, info)
    print(format_summary(built, show=args.show))
    _say(f"wrote the HTML report -> {args.out}")
    return 0


_META_TYPES: dict[str, Any] = {
    "provenance": dict, "query_ids": list, "store": str, "queries": str, "query_fields": dict,
    "normalization": str, "preconditioner": str,
}  # fmt: skip


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
            f"{path}: not the metadata `logra score --matrix` writes (fields {sorted(_META_TYPES)}); score again."
        )
    return meta


def _valid_meta(meta: Any) -> bool:
    if not isinstance(meta, dict) or not all(isinstance(meta.get(k), t) for k, t in _META_TYPES.items()):
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


def cmd_verify(args: argparse.Namespace) -> int:
    from logra.cli.inputs import ModelSettings
    from logra.curvature.saved import load_preconditioner
    from logra.store.reader import GradientStore

    store = GradientStore.open(args.store)
    store.verify()
    ModelSettings.load(store.root)  # signed: an edited or damaged logra-cli.json raises
    for saved in sorted(store.root.glob("preconditioner-*/preconditioner.json")):
        load_preconditioner(saved.parent)  # signed JSON, size and checksum of its factors
    print(f"{args.store}: OK ({len(store)} rows, D={store.dim}, {len(store.manifest.shards)} shards, checksums match)")
    return 0
