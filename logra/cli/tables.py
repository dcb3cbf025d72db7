"""Output tables of the command line: equal-length columns as CSV, JSONL or parquet, written durably."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, BinaryIO

from logra.errors import ConfigError, LograError
from logra.store.files import no_space, write_durable

TABLE_SUFFIXES = (".csv", ".jsonl", ".parquet")


def write_table(path: Path, columns: dict[str, list[Any]]) -> None:
    """Write equal-length columns as CSV, JSONL or parquet, chosen by the suffix of `path`.

    The file appears whole or not at all (`logra.store.files.write_durable`). Text that UTF-8
    cannot encode (a lone surrogate) raises ConfigError naming it; a full disk raises StoreError.
    """
    if path.suffix not in TABLE_SUFFIXES:
        raise ConfigError(f"output {path} must end in one of {', '.join(TABLE_SUFFIXES)}.")
    for name, values in columns.items():
        for v in values:
            if isinstance(v, str):
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    raise ConfigError(
                        f"column {name!r} of {path} holds {v[:80]!r}, which is not valid Unicode (a lone "
                        "surrogate); fix that id in the dataset."
                    ) from None
    try:
        _write(path, columns)
    except OSError as exc:
        if isinstance(exc, LograError):
            raise
        raise no_space(path, None, exc) from None


def _write(path: Path, columns: dict[str, list[Any]]) -> None:
    if path.suffix == ".parquet":
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("writing .parquet needs pyarrow (pip install pyarrow); or write .csv/.jsonl.") from None
        table = pa.table({c: _arrow_column(v) for c, v in columns.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        write_durable(path, lambda f: pq.write_table(table, f))
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durable(path, lambda f: _write_text(f, path.suffix, columns))


def _write_text(raw: BinaryIO, suffix: str, columns: dict[str, list[Any]]) -> None:
    names = list(columns)
    f = io.TextIOWrapper(raw, encoding="utf-8", newline="")
    try:
        if suffix == ".csv":
            writer = csv.writer(f)
            writer.writerow(names)
            writer.writerows(zip(*(columns[c] for c in names)))
        else:
            for i in range(len(columns[names[0]])):
                f.write(json.dumps({c: columns[c][i] for c in names}) + "\n")
        f.flush()
    finally:
        f.detach()  # the caller owns (fsyncs and closes) the binary file


def _arrow_column(values: list[Any]) -> list[Any]:
    """Parquet columns need one type: mixed int/str ids become strings."""
    kinds = {type(v) for v in values}
    return [str(v) for v in values] if len(kinds) > 1 else values
