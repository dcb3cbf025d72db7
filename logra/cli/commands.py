"""The subcommands fit, score, self-influence and verify, and the helpers every command shares.

`log` lives in `logra.cli.log_command`, `report` in `logra.cli.report_command`.

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
from pathlib import Path
from typing import Any

import numpy as np

from logra.cli.ranks import rank_world
from logra.cli.tables import write_table
from logra.errors import ConfigError, LograError
from logra.store.files import no_space, write_atomic, write_durable


def say(msg: str) -> None:
    if rank_world()[0] == 0:  # one voice under torchrun
        print(f"[logra] {msg}", file=sys.stderr, flush=True)


def write_json(path: Path, data: dict[str, Any]) -> None:
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
    say("provenance: " + ", ".join(f"{k} {v[:16]}" for k, v in prov.items()))
    return prov


# --------------------------------------------------------------------------------------------
# Commands.


def settings_from(args: argparse.Namespace, base: Any = None) -> Any:
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


def _preconditioner(args: argparse.Namespace, store: Any) -> Any:
    from logra.curvature.precondition import fit_preconditioner
    from logra.curvature.saved import load_preconditioner

    if args.preconditioner:
        return load_preconditioner(args.preconditioner)
    saved = store.root / f"preconditioner-{args.method}"
    if (saved / "preconditioner.json").is_file() and args.damping is None:
        say(f"using the {args.method} preconditioner saved at {saved}")
        return load_preconditioner(saved)
    say(f"fitting a {args.method} preconditioner in memory (save one with `logra fit`)")
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
    say(f"fitted a {args.method} preconditioner ({pre.fisher.value} Fisher) on {len(store)} rows -> {out}")
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
    say(f"true Fisher: {len(encoded.ids)} examples of {settings.extra['data']}")
    logits_fn = hf_logits_fn(task, settings.token_reduction)
    return true_fisher_statistics(
        model, store.config, data, logits_fn=logits_fn, method=method, num_samples=num_samples, param_grads=False,
        progress=True,
    )  # fmt: skip


def _query_rows(
    args: argparse.Namespace, store: Any, statistics: bool = False
) -> tuple[list[Any], Any, dict[str, Any], Any]:
    """Log the query file with the store's config, settings and optimizer correction; (query ids,
    QueryRows, the fields read, the queries' Kronecker statistics with `statistics`, else None)."""
    from logra.capture.logger import GradientLogger
    from logra.capture.rows import QueryRows
    from logra.cli.inputs import ModelSettings, encode, load_model, load_records, log_examples
    from logra.curvature.optimizer import OptimizerCorrection

    saved = ModelSettings.load(store.root)
    settings = settings_from(args, saved)
    records = load_records(args.queries, settings, args.split, args.limit)  # before the model loads
    model, tokenizer, task = load_model(settings)
    encoded = encode(records, tokenizer, task, settings.max_length, getattr(model.config, "label2id", None))
    correction = OptimizerCorrection.from_store(store) if store.config.optimizer_correction else None
    with GradientLogger(model, store.config, store=None, statistics=statistics, correction=correction) as logger:
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
        kronecker = logger.statistics() if statistics else None
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
    return encoded.ids, QueryRows(list(encoded.ids), rows, store.config, fingerprint, layers), fields, kronecker


def cmd_score(args: argparse.Namespace) -> int:
    from logra.store.reader import GradientStore

    if not args.out and not args.matrix:
        raise ConfigError("pass --out FILE (top-k table), --matrix FILE.npy (all scores), or both.")
    store = GradientStore.open(args.store)
    trackstar = _check_preset(args)
    query_ids, rows, fields, kronecker = _query_rows(args, store, statistics=trackstar and args.method != "raw")
    if trackstar:
        from logra.curvature.mixed import mixed_preconditioner

        if store.config.optimizer_correction is None:
            say("warning: the store was logged without an optimizer correction (logra log --preset trackstar)")
        pre, lam = mixed_preconditioner(
            store, rows, args.method, mix=args.mix, query_statistics=kronecker, damping=args.damping
        )
        say(f"trackstar: {args.method} curvature mixed with the queries' at λ={lam:.4g}, cosine scores")
    else:
        pre = _preconditioner(args, store)
    scorer = _scorer(store, pre, args.normalization, args.chunk_rows)
    scores = _write_matrix(args, scorer, store, query_ids, rows, fields) if args.matrix else None
    if args.out:
        _write_top_k(args, scorer, store, query_ids, rows, scores)
    return 0


def _write_matrix(
    args: argparse.Namespace, scorer: Any, store: Any, query_ids: list[Any], rows: Any, fields: dict[str, Any]
) -> Any:
    """Score every query against every row; write the [Q, N] float32 --matrix and its FILE.json (rank 0)."""
    import torch

    rank, world = rank_world()
    matrix = Path(args.matrix)
    if matrix.suffix != ".npy":
        raise ConfigError(f"--matrix {matrix} must end in .npy.")
    if world == 1:
        matrix.parent.mkdir(parents=True, exist_ok=True)
        scores = scorer.score(rows, out=matrix)  # a view of the written float32 matrix
    else:  # every rank scores its shards; rank 0 writes the gathered [Q, N] matrix
        scores = scorer.score(rows).to(torch.float32)  # the table's scores are the matrix's, as on one process
        if rank == 0:
            matrix.parent.mkdir(parents=True, exist_ok=True)
            _save_npy(matrix, scores.numpy())
    meta = {
        "provenance": _provenance(scorer, rows),
        "query_ids": query_ids,
        "store": str(store.root.resolve()),
        "queries": str(Path(args.queries).resolve()),
        "query_fields": fields,
        "normalization": args.normalization,
        "preconditioner": args.preconditioner or args.method,
        "preset": args.preset,
    }
    if rank == 0:
        write_json(Path(str(matrix) + ".json"), meta)
    say(f"wrote the [{len(query_ids)}, {len(store)}] score matrix -> {matrix}")
    return scores


def _write_top_k(
    args: argparse.Namespace, scorer: Any, store: Any, query_ids: list[Any], rows: Any, scores: Any
) -> None:
    """Write the --out table of each query's --top-k helpful and harmful examples, and its FILE.json (rank 0).

    From `scores` (the matrix just written) when given, so the store is read once; else by `scorer.top_k`.
    """
    k = min(args.top_k, len(store))
    top = _top_k_of(scores, store.ids, k) if scores is not None else scorer.top_k(rows, k)
    if rank_world()[0] != 0:
        return
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
    write_json(Path(str(args.out) + ".json"), {"provenance": _provenance(scorer, rows), "top_k": k})
    say(f"wrote the top {k} helpful and harmful examples of {len(query_ids)} queries -> {args.out}")


def _check_preset(args: argparse.Namespace) -> bool:
    """Resolve --normalization against --preset; True under --preset trackstar."""
    trackstar = args.preset == "trackstar"
    if not trackstar:
        if args.mix is not None:
            raise ConfigError("--mix is the mixing weight of --preset trackstar; pass --preset trackstar or drop it.")
        args.normalization = args.normalization or "dot"
        return False
    if args.normalization not in (None, "cosine"):
        raise ConfigError(f"--preset trackstar scores by cosine; drop --normalization {args.normalization}.")
    if args.preconditioner:
        raise ConfigError("--preset trackstar fits its mixed curvature from the queries; drop --preconditioner.")
    if args.method not in ("kfac", "ekfac", "raw"):
        raise ConfigError(f"--preset trackstar mixes kfac, ekfac or raw curvature, not --method {args.method}.")
    args.normalization = "cosine"
    return True


def cmd_self_influence(args: argparse.Namespace) -> int:
    from logra.store.reader import GradientStore

    store = GradientStore.open(args.store)
    scorer = _scorer(store, _preconditioner(args, store))
    values = scorer.self_influence().double().numpy()
    if rank_world()[0] != 0:
        return 0
    order = np.argsort(-values, kind="stable")
    out = Path(args.out)
    if out.suffix == ".npy":
        _save_npy(out, values)
    else:
        rank = np.empty(len(values), dtype=np.int64)
        rank[order] = np.arange(1, len(values) + 1)
        write_table(out, {"train_id": list(store.ids), "self_influence": values.tolist(), "rank": rank.tolist()})
    write_json(Path(str(out) + ".json"), {"provenance": _provenance(scorer)})
    for j in order[: args.show]:
        print(f"{values[j]:.6g}\t{store.ids[j]}")
    say(f"wrote the self-influence of {len(store)} examples -> {out}")
    return 0


def _scorer(store: Any, preconditioner: Any, normalization: str = "dot", chunk_rows: int = 4096) -> Any:
    """A Scorer, or under a process group a DistributedScorer (each rank its shards, results gathered)."""
    from logra.score import Scorer

    rank, world = rank_world()
    if world == 1:
        return Scorer(store, preconditioner, normalization, chunk_rows, progress=True)
    from logra.distributed import DistributedScorer

    return DistributedScorer(store, preconditioner, normalization, chunk_rows, progress=rank == 0)


def _top_k_of(scores: Any, ids: Any, k: int, block: int = 256) -> Any:
    """The top-k of a [Q, N] score tensor (e.g. the matrix just written), `block` queries at a time."""
    import torch

    from logra.score import TopK

    parts: list[tuple[Any, Any]] = []
    for largest in (True, False):
        values, rows = [], []
        for q in range(0, scores.shape[0], block):
            top = torch.as_tensor(scores[q : q + block]).topk(k, dim=1, largest=largest, sorted=True)
            values.append(top.values)
            rows.append(top.indices)
        parts.append((torch.cat(values), torch.cat(rows)))
    (hv, hr), (lv, lr) = parts
    return TopK([[ids[j] for j in r] for r in hr.tolist()], hv, [[ids[j] for j in r] for r in lr.tolist()], lv, hr, lr)


def _save_npy(path: Path, values: np.ndarray) -> None:
    try:
        write_durable(path, lambda f: np.save(f, values))
    except OSError as exc:
        raise no_space(path, values.nbytes + 128, exc) from None


def cmd_verify(args: argparse.Namespace) -> int:
    from logra.cli.inputs import ModelSettings
    from logra.curvature.saved import load_preconditioner
    from logra.store.reader import GradientStore

    store = GradientStore.open(args.store)
    store.verify()
    ModelSettings.load(store.root)  # signed: an edited or damaged logra-cli.json raises
    if store.config.optimizer_correction is not None:
        from logra.curvature.optimizer import OptimizerCorrection

        OptimizerCorrection.from_store(store)  # its fingerprint is in the checksummed manifest's config
    for saved in sorted(store.root.glob("preconditioner-*/preconditioner.json")):
        load_preconditioner(saved.parent)  # signed JSON, size and checksum of its factors
    print(f"{args.store}: OK ({len(store)} rows, D={store.dim}, {len(store.manifest.shards)} shards, checksums match)")
    return 0
