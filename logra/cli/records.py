"""Local datasets as records: the rows of a .jsonl/.json/.csv/.parquet file or a save_to_disk folder.

`load_records` reads a dataset with the `datasets` library (imported lazily) and returns one dict
per example with the roles the settings name: id, text and (when configured) prompt, label, and,
for the report, short metadata columns. Ids are checked here: ints or valid Unicode strings, each
once.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from logra.cli.settings import InputError, ModelSettings
from logra.errors import LograError


def load_records(
    path: str, settings: ModelSettings, split: str | None = None, limit: int | None = None, metadata: bool = False
) -> list[dict[str, Any]]:
    """The dataset at `path` as dicts with keys id, text and (when configured) prompt, label.

    With `metadata`, each record also has "meta": its other columns holding short scalars (title, source, ...).
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InputError(f"--limit {limit!r} must be a count >= 0.")
    data = _open_dataset(path, split)
    columns = set(data.column_names)
    wanted = {
        "text": settings.text_field,
        "prompt": settings.prompt_field,
        "label": settings.label_field,
        "id": settings.id_field,
    }
    for role, name in wanted.items():
        if name is not None and name not in columns:
            raise InputError(f"the {role} field {name!r} is not a column of {path}; its columns are {sorted(columns)}.")
    n = len(data) if limit is None else min(limit, len(data))
    if n == 0:
        raise InputError(f"the dataset {path} has no rows{' (--limit 0)' if limit == 0 else ''}.")
    try:
        table = data.select(range(n)).to_dict()
    except Exception as exc:
        raise InputError(f"cannot read the rows of {path!r}: {type(exc).__name__}: {exc}") from None
    return _records(table, data.column_names, wanted, n, path, settings, metadata)


def _open_dataset(path: str, split: str | None) -> Any:
    """The `datasets.Dataset` at `path` (the split `split` of a DatasetDict folder)."""
    import datasets

    p = Path(path)
    loaders = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
    try:
        if p.is_dir():
            data = datasets.load_from_disk(str(p))
        elif p.is_file() and p.suffix in loaders:
            data = datasets.load_dataset(loaders[p.suffix], data_files=str(p), split="train")
        else:
            raise InputError(
                f"dataset {path!r} is not a .jsonl/.json/.csv/.parquet file or a save_to_disk folder "
                f"({_why_not_data(p, loaders)})."
            )
    except LograError:
        raise
    except Exception as exc:  # datasets raises its own types (DatasetGenerationError, ...) and StopIteration
        raise InputError(f"cannot read the dataset {path!r}: {type(exc).__name__}: {exc}") from None
    if isinstance(data, datasets.DatasetDict):
        if split is None or split not in data:
            raise InputError(f"{path} holds the splits {sorted(data)}; choose one with --split.")
        data = data[split]
    return data


def _records(
    table: dict[str, list[Any]],
    column_names: list[str],
    wanted: dict[str, str | None],
    n: int,
    path: str,
    settings: ModelSettings,
    metadata: bool,
) -> list[dict[str, Any]]:
    """The first `n` rows of `table` (column -> values) as records keyed by role; ids checked, each once."""
    records = []
    seen: set[Any] = set()
    for i in range(n):
        rec = {role: table[name][i] for role, name in wanted.items() if name is not None}
        rec.setdefault("id", i)
        if not isinstance(rec["text"], str) or ("prompt" in rec and not isinstance(rec["prompt"], str)):
            raise InputError(f"row {i} of {path}: field {settings.text_field!r} (and any prompt) must be text.")
        if metadata:
            used = {name for name in wanted.values() if name is not None}
            rec["meta"] = {c: table[c][i] for c in column_names if c not in used and _is_short(table[c][i])}
        _check_id(rec["id"], i, path)
        if rec["id"] in seen:
            raise InputError(f"row {i} of {path}: id {rec['id']!r} appears twice; every example needs its own id.")
        seen.add(rec["id"])
        records.append(rec)
    return records


def _is_short(value: Any) -> bool:
    """A value worth showing beside a document: a bool, number or string of at most 200 characters."""
    return isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 200)


def _why_not_data(p: Path, loaders: dict[str, str]) -> str:
    if not p.exists():
        return "it does not exist"
    return "unsupported suffix" if p.suffix not in loaders else "it is not a regular file"


def _check_id(value: Any, row: int, path: str) -> None:
    """An example id is an int or a str that UTF-8 can encode (no lone surrogates)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise InputError(
            f"row {row} of {path}: the id {str(value)[:80]!r} is a {type(value).__name__}; ids must be ints or strings."
        )
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InputError(f"row {row} of {path}: the id {value[:80]!r} is not valid Unicode text.") from None
