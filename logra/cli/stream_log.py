"""`logra log --streaming`: the data file is read as a stream, one batch in memory at a time.

`stream_records` opens a .jsonl/.json/.csv/.parquet file with `datasets`' streaming mode (a
save_to_disk folder through `to_iterable_dataset`) and yields the same records `load_records`
returns, checked row by row; its first record is read, and checked, before the model loads or
anything is written. `log_stream` then logs batches from `logra.stream_batches`: ids from
`--id-field` or the row number, committed ids skipped on `--resume` before anything is computed,
rows split round-robin across ranks under torchrun.
"""

from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from logra.cli.inputs import InputError

LOADERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


def stream_records(path: str, settings: Any, split: str | None, limit: int | None) -> Iterator[dict[str, Any]]:
    """The records of `path` (id, text and, when configured, prompt and label), streamed; the first
    one is read and checked when this is called (not lazily at the first `next`)."""
    rows = _rows(path, split)
    records = _records(rows, path, settings, limit)
    try:
        first = next(records)
    except StopIteration:
        raise InputError(f"the dataset {path} has no rows{' (--limit 0)' if limit == 0 else ''}.") from None
    return itertools.chain([first], records)


def _rows(path: str, split: str | None) -> Any:
    import datasets

    p = Path(path)
    try:
        if p.is_dir():
            data = datasets.load_from_disk(str(p))
            if isinstance(data, datasets.DatasetDict):
                if split is None or split not in data:
                    raise InputError(f"{path} holds the splits {sorted(data)}; choose one with --split.")
                data = data[split]
            return data.to_iterable_dataset()
        if p.is_file() and p.suffix in LOADERS:
            return datasets.load_dataset(LOADERS[p.suffix], data_files=str(p), split="train", streaming=True)
    except InputError:
        raise
    except Exception as exc:  # datasets raises its own types
        raise InputError(f"cannot read the dataset {path!r}: {type(exc).__name__}: {exc}") from None
    why = "it does not exist" if not p.exists() else "unsupported suffix"
    raise InputError(f"dataset {path!r} is not a .jsonl/.json/.csv/.parquet file or a save_to_disk folder ({why}).")


def _records(rows: Any, path: str, settings: Any, limit: int | None) -> Iterator[dict[str, Any]]:
    from logra.cli.records import _check_id

    wanted = {"text": settings.text_field, "prompt": settings.prompt_field, "label": settings.label_field,
              "id": settings.id_field}  # fmt: skip
    seen: set[Any] = set()
    try:
        for i, row in enumerate(rows):
            if limit is not None and i >= limit:
                return
            for role, name in wanted.items():
                if name is not None and name not in row:
                    raise InputError(
                        f"the {role} field {name!r} is not a column of {path} (row {i}); its columns are {sorted(row)}."
                    )
            rec = {role: row[name] for role, name in wanted.items() if name is not None}
            rec.setdefault("id", i)
            if not isinstance(rec["text"], str) or ("prompt" in rec and not isinstance(rec["prompt"], str)):
                raise InputError(f"row {i} of {path}: field {settings.text_field!r} (and any prompt) must be text.")
            _check_id(rec["id"], i, path)
            if rec["id"] in seen:
                raise InputError(f"row {i} of {path}: id {rec['id']!r} appears twice; every example needs its own id.")
            seen.add(rec["id"])
            yield rec
    except InputError:
        raise
    except Exception as exc:
        raise InputError(f"cannot read the rows of {path!r}: {type(exc).__name__}: {exc}") from None


def log_stream(
    args: argparse.Namespace, out: Path, model: Any, tokenizer: Any, task: Any, settings: Any, config: Any,
    records: Iterator[dict[str, Any]], say: Any, correction: Any = None,
) -> int:  # fmt: skip
    """Log the streamed `records` into the store `out` (or, with --dry-run, time a few batches).

    correction: the OptimizerCorrection `config` names (--optimizer-state), or None."""
    from tqdm.auto import tqdm

    from logra.capture.logger import GradientLogger
    from logra.cli.inputs import batch_losses, batches, encode, log_examples
    from logra.cli.ranks import rank_world
    from logra.estimate import estimate_run
    from logra.streaming import stream_batches

    label2id = getattr(model.config, "label2id", None)
    rank, _ = rank_world()
    with GradientLogger(model, config, statistics=not args.no_statistics, correction=correction) as probe:
        estimate = estimate_run(probe, None)
        if args.dry_run:
            sample = encode(list(itertools.islice(records, args.time_batches * args.batch_size)), tokenizer, task,
                            settings.max_length, label2id)  # fmt: skip
            start = time.perf_counter()
            log_examples(model, probe, sample, task, batch_size=args.batch_size,
                         token_reduction=settings.token_reduction, desc="logra timing")  # fmt: skip
            estimate = estimate.timed(len(sample.ids), time.perf_counter() - start)
            say("dry run, nothing written: " + estimate.describe())
            return 0
    say("estimate: " + estimate.describe())
    start, n = time.perf_counter(), 0
    with GradientLogger(model, config, store=out, shard_rows=args.shard_rows, statistics=not args.no_statistics,
                        correction=correction) as lg:  # fmt: skip
        if rank == 0:
            settings.save(out)
        if lg.committed_ids:
            say(f"resuming: {len(lg.committed_ids)} examples already committed are skipped")
        with tqdm(desc="logra log", unit="ex", disable=rank != 0) as bar:
            for _, recs in stream_batches(records, args.batch_size, id_key="id", skip=lg.committed_ids):
                encoded = encode(recs, tokenizer, task, settings.max_length, label2id)
                for ids, batch in batches(encoded, args.batch_size):
                    with lg.record(ids=ids, mask=batch["attention_mask"]):
                        batch_losses(model, batch, task, settings.token_reduction).sum().backward()
                    n += len(ids)
                    bar.update(len(ids))
        dim = lg.dim
    say(f"logged {n} new examples{' on rank 0' if rank_world()[1] > 1 else ''} in "
        f"{time.perf_counter() - start:.1f} s (streamed, D={dim}) -> {out}")  # fmt: skip
    return 0
