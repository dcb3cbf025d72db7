"""The command line's model and encoding settings, saved beside a store as `logra-cli.json`.

`logra log` saves them; `logra score`, `fit --fisher true` and `report --tokens` load them, so
queries are encoded exactly as the training data was. `InputError` is the error of every input
(model, tokenizer, dataset) the command line cannot use as asked.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from logra.errors import LograError, StoreCorruptedError
from logra.losses import TokenReduction
from logra.store.files import json_checksum, no_space, read_regular, write_atomic

SETTINGS_FILE = "logra-cli.json"
DEFAULT_MAX_LENGTH = 512
SETTINGS_VERSION = 2  # 2: signed (sha256 of the canonical JSON), every field type-checked
_OPTIONAL = (str, type(None))
_FIELD_TYPES: dict[str, Any] = {
    "model": str, "tokenizer": _OPTIONAL, "task": _OPTIONAL, "model_dtype": str, "init_seed": int,
    "max_length": int, "token_reduction": str, "text_field": str, "prompt_field": _OPTIONAL,
    "label_field": _OPTIONAL, "id_field": _OPTIONAL, "extra": dict,
}  # fmt: skip
_EXTRA_TYPES: dict[str, Any] = {"data": str, "split": _OPTIONAL, "limit": (int, type(None))}


class InputError(LograError, ValueError):
    """A model, tokenizer or dataset given to the command line cannot be used as asked."""


@dataclass
class ModelSettings:
    """How to build the model and turn texts into losses; saved beside a store as `logra-cli.json`
    so that `logra score` encodes queries exactly as `logra log` encoded the training data.

    The file decides scores (max_length, fields, reduction), so it is signed with the SHA-256 of
    its canonical JSON and every field is type-checked on load: an edited or damaged file raises
    `StoreCorruptedError` naming it (also from `logra verify`)."""

    model: str
    tokenizer: str | None = None
    task: str | None = None  # None: from the model's architecture
    model_dtype: str = "float32"
    init_seed: int = 0  # seeds the weights of a model built from a config.json
    max_length: int | None = None  # None: DEFAULT_MAX_LENGTH, or the model's positions when fewer
    token_reduction: str = TokenReduction.MEAN.value
    text_field: str = "text"
    prompt_field: str | None = None
    label_field: str | None = None
    id_field: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def save(self, directory: Path) -> None:
        """Write `directory/logra-cli.json` durably; a full disk raises StoreError naming it."""
        body: dict[str, Any] = {"format_version": SETTINGS_VERSION, **asdict(self)}
        body["sha256"] = json_checksum(body, "sha256")
        data = json.dumps(body, indent=1).encode()
        try:
            write_atomic(directory / SETTINGS_FILE, data)
        except OSError as exc:
            if isinstance(exc, LograError):
                raise
            raise no_space(directory / SETTINGS_FILE, len(data), exc) from None

    @classmethod
    def load(cls, directory: Path) -> ModelSettings | None:
        """The settings saved in `directory`, checked; None when there are none."""
        path = directory / SETTINGS_FILE
        if not path.exists():
            return None
        try:
            raw = json.loads(read_regular(path, 2**24, "the command-line settings").decode("utf-8"))
            return cls(**_checked_settings(raw))
        except StoreCorruptedError:
            raise
        except Exception as exc:  # a parse boundary: any defect of the file is reported as one
            raise StoreCorruptedError(
                f"{path}: not valid command-line settings ({type(exc).__name__}: {str(exc)[:300]}); restore it, or "
                "log the store again with `logra log`."
            ) from None


def _checked_settings(raw: Any) -> dict[str, Any]:
    """The fields of a decoded logra-cli.json, after its signature and every type is checked."""
    if not isinstance(raw, dict) or raw.get("format_version") != SETTINGS_VERSION:
        raise ValueError(f"not a settings file of version {SETTINGS_VERSION}")
    names = {f.name for f in fields(ModelSettings)}
    if set(raw) != names | {"format_version", "sha256"}:
        raise ValueError(f"fields {sorted(str(k)[:40] for k in raw)[:14]} are not {sorted(names)}")
    if raw["sha256"] != json_checksum(raw, "sha256"):
        raise ValueError("its sha256 does not match the content: the file was edited or damaged")
    body = {k: v for k, v in raw.items() if k in names}
    if not isinstance(body["extra"], dict):
        raise ValueError("field 'extra' is not an object")
    for table, values in ((_FIELD_TYPES, body), (_EXTRA_TYPES, body["extra"])):
        for key, value in values.items():
            kind = table.get(key)
            if kind is None or isinstance(value, bool) or not isinstance(value, kind):
                raise ValueError(f"field {str(key)[:40]!r}={str(value)[:40]!r} has the wrong type")
    if not 2 <= raw["max_length"] <= 2**31 or not 0 <= raw["init_seed"] < 2**63:
        raise ValueError(f"max_length {raw['max_length']} or init_seed {raw['init_seed']} is out of range")
    if raw["extra"].get("limit") is not None and not 0 <= raw["extra"]["limit"] <= 2**53:
        raise ValueError("the recorded limit is out of range")
    return body
