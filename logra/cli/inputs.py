"""Inputs of the `logra` command line: local Hugging Face models and datasets, encoded into batches.

This module is used only by `logra.cli`; it imports transformers and datasets lazily, inside the
functions that need them, so `import logra` stays free of them. It turns

- a model (a Hugging Face model directory, a `config.json` for a freshly initialised model, or a
  `.gguf` file) and its tokenizer,
- a local dataset (`.jsonl`/`.json`, `.csv`, `.parquet`, or a `save_to_disk` folder) with a text
  field, an optional prompt field (causal LM: prompt tokens are context, not targets), an optional
  label field (classification) and an optional id field,

into padded batches and the per-example losses L_i (`logra.losses`) whose sum the CLI
backpropagates inside `GradientLogger.record()`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from logra.capture.logger import GradientLogger
from logra.errors import ConfigError, LograError, StoreCorruptedError
from logra.losses import IGNORE_INDEX, Task, TokenReduction, detect_task, per_example_losses
from logra.store.files import json_checksum, no_space, read_regular, write_atomic
from logra.types import ExampleId, parse_enum

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
MODEL_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
}  # fmt: skip


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


# --------------------------------------------------------------------------------------------
# Models.


def load_model(settings: ModelSettings) -> tuple[nn.Module, Any, Task]:
    """(model in eval mode with frozen parameters, tokenizer, task) from `settings`."""
    import transformers

    source = Path(settings.model)
    dtype = MODEL_DTYPES.get(settings.model_dtype)
    if dtype is None:
        raise InputError(f"--model-dtype {settings.model_dtype!r} is not one of {', '.join(MODEL_DTYPES)}.")
    task = parse_enum(Task, settings.task, "--task") if settings.task else None
    tok_source = settings.tokenizer
    if source.is_file() and source.suffix == ".gguf":
        kwargs: dict[str, Any] = {"gguf_file": source.name}
        source, tok_source = source.parent, tok_source or str(source)
    elif source.is_file() and source.suffix == ".json":
        kwargs = {}
    elif source.is_dir() and (source / "config.json").is_file():
        kwargs = {}
    else:
        raise InputError(
            f"--model {settings.model!r} is neither a Hugging Face model directory (with config.json), a config "
            "file (*.json) nor a *.gguf file. Pass a local path: nothing is downloaded."
        )
    try:
        if "gguf_file" in kwargs:
            config = transformers.AutoConfig.from_pretrained(source, **kwargs)
        elif source.is_file():
            raw = json.loads(source.read_text(encoding="utf-8"))
            if "model_type" not in raw:
                raise InputError(f"{source} has no 'model_type'; it is not a Hugging Face config.json.")
            config = transformers.AutoConfig.for_model(**raw)
        else:
            config = transformers.AutoConfig.from_pretrained(source)
        task = task or detect_task(config)
        auto = (
            transformers.AutoModelForCausalLM
            if task is Task.CAUSAL_LM
            else transformers.AutoModelForSequenceClassification
        )
        if source.is_file() and "gguf_file" not in kwargs:
            if tok_source is None:
                raise InputError(f"--model {source} is a config without a tokenizer; pass --tokenizer DIR.")
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(settings.init_seed)
                model = auto.from_config(config, dtype=dtype)
        else:
            model = auto.from_pretrained(source, dtype=dtype, **kwargs)
        tokenizer = _load_tokenizer(transformers, tok_source or str(source), kwargs)
    except LograError:
        raise
    except Exception as exc:  # transformers raises many types (OSError, UnpicklingError, RuntimeError, ...)
        raise InputError(f"cannot load the model {settings.model!r}: {type(exc).__name__}: {exc}") from None
    positions = _positions(model)
    if settings.max_length is None:
        settings.max_length = min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    elif positions is not None and settings.max_length > positions:
        raise InputError(
            f"--max-length {settings.max_length} exceeds the {positions} positions of the model {settings.model!r}; "
            f"pass --max-length {positions} or less."
        )
    model.eval()
    model.requires_grad_(False)  # logging needs activation gradients only: backward skips weight gradients
    return model, tokenizer, task


def _positions(model: nn.Module) -> int | None:
    """The number of positions a model with learned position embeddings has, or None."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _load_tokenizer(transformers: Any, source: str, kwargs: dict[str, Any]) -> Any:
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(source)
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise InputError(f"the tokenizer at {source} has neither a pad nor an eos token; add a pad token to it.")
        tokenizer.pad_token = tokenizer.eos_token  # padding is masked out; its id does not matter
    return tokenizer


# --------------------------------------------------------------------------------------------
# Datasets.


def load_records(
    path: str, settings: ModelSettings, split: str | None = None, limit: int | None = None, metadata: bool = False
) -> list[dict[str, Any]]:
    """The dataset at `path` as dicts with keys id, text and (when configured) prompt, label.

    With `metadata`, each record also has "meta": its other columns holding short scalars (title, source, ...).
    """
    import datasets

    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise InputError(f"--limit {limit!r} must be a count >= 0.")
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
    records = []
    seen: set[Any] = set()
    for i in range(n):
        rec = {role: table[name][i] for role, name in wanted.items() if name is not None}
        rec.setdefault("id", i)
        if not isinstance(rec["text"], str) or ("prompt" in rec and not isinstance(rec["prompt"], str)):
            raise InputError(f"row {i} of {path}: field {settings.text_field!r} (and any prompt) must be text.")
        if metadata:
            used = {name for name in wanted.values() if name is not None}
            rec["meta"] = {c: table[c][i] for c in data.column_names if c not in used and _is_short(table[c][i])}
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


# --------------------------------------------------------------------------------------------
# Encoding and batches.


@dataclass
class Encoded:
    """Tokenised examples: ids, token lists, and per-token targets (LM) or one label each."""

    ids: list[ExampleId]
    tokens: list[list[int]]
    targets: list[list[int]] | list[Any]
    pad_id: int


def encode(
    records: Sequence[dict[str, Any]],
    tokenizer: Any,
    task: Task,
    max_length: int | None,
    label2id: dict[str, int] | None,
) -> Encoded:
    """Tokenise `records`, truncated to `max_length` tokens (prompt tokens are not LM targets)."""
    if max_length is None or max_length < 2:
        raise InputError(f"--max-length {max_length} must be at least 2 tokens.")
    ids, tokens, targets = [], [], []
    for rec in records:
        if "prompt" in rec:  # the prompt with the tokenizer's special tokens, then the text without
            prompt_ids = tokenizer(rec["prompt"])["input_ids"]
            seq = (prompt_ids + tokenizer(rec["text"], add_special_tokens=False)["input_ids"])[:max_length]
        else:
            prompt_ids, seq = [], tokenizer(rec["text"], truncation=True, max_length=max_length)["input_ids"]
        if not seq:
            raise InputError(f"example {rec['id']!r} has no tokens; drop empty texts from the dataset.")
        if task is Task.CAUSAL_LM:
            n_prompt = min(len(prompt_ids), len(seq))
            targets.append([IGNORE_INDEX] * n_prompt + seq[n_prompt:])
        else:
            targets.append(_label(rec, label2id))
        ids.append(rec["id"])
        tokens.append(seq)
    return Encoded(ids, tokens, targets, int(tokenizer.pad_token_id))


def _label(rec: dict[str, Any], label2id: dict[str, int] | None) -> Any:
    if "label" not in rec:
        raise InputError("classification needs the label of every example: pass --label-field.")
    label = rec["label"]
    if isinstance(label, str):
        if not label2id or label not in label2id:
            known = sorted(label2id) if label2id else []
            raise InputError(f"label {label!r} of example {rec['id']!r} is not in the model's label2id {known}.")
        return label2id[label]
    return label


def batches(
    encoded: Encoded, batch_size: int, skip: frozenset[ExampleId] = frozenset()
) -> Iterator[tuple[list[ExampleId], dict[str, Tensor]]]:
    """Right-padded batches (ids, {input_ids, attention_mask, labels}) of the examples not in `skip`."""
    if batch_size < 1:
        raise InputError(f"--batch-size {batch_size} must be positive.")
    todo = [i for i, ex_id in enumerate(encoded.ids) if ex_id not in skip]
    for start in range(0, len(todo), batch_size):
        idx = todo[start : start + batch_size]
        T = max(len(encoded.tokens[i]) for i in idx)
        input_ids = torch.full((len(idx), T), encoded.pad_id, dtype=torch.long)
        mask = torch.zeros(len(idx), T, dtype=torch.long)
        lm = isinstance(encoded.targets[idx[0]], list)
        labels = (
            torch.full((len(idx), T), IGNORE_INDEX, dtype=torch.long)
            if lm
            else torch.tensor([encoded.targets[i] for i in idx])
        )
        for r, i in enumerate(idx):
            n = len(encoded.tokens[i])
            input_ids[r, :n] = torch.tensor(encoded.tokens[i])
            mask[r, :n] = 1
            if lm:
                labels[r, :n] = torch.tensor(encoded.targets[i])
        yield [encoded.ids[i] for i in idx], {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def batch_losses(model: nn.Module, batch: dict[str, Tensor], task: Task, token_reduction: str) -> Tensor:
    """Per-example losses (B,) of one batch."""
    outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    return per_example_losses(model, outputs, batch["labels"], task, token_reduction)


def log_examples(
    model: nn.Module,
    logger: GradientLogger,
    encoded: Encoded,
    task: Task,
    *,
    batch_size: int,
    token_reduction: str,
    desc: str,
    keep_rows: bool = False,
    timed: tuple[int, Callable[[int, float], None]] | None = None,
) -> tuple[int, Tensor | None]:
    """Run every example not yet committed through `logger`; (number logged, rows [n, D] if keep_rows).

    `timed=(b, report)` calls `report(examples, seconds)` once, after the first b batches.
    """
    skip = logger.committed_ids
    todo = sum(1 for i in encoded.ids if i not in skip)
    rows: list[Tensor] = []
    done = 0
    start = time.perf_counter()
    with tqdm(total=todo, desc=desc, unit="ex") as bar:
        for b, (ids, batch) in enumerate(batches(encoded, batch_size, skip)):
            with logger.record(ids=ids, mask=batch["attention_mask"]) as rec:
                batch_losses(model, batch, task, token_reduction).sum().backward()
            if keep_rows and rec.rows is not None:
                rows.append(rec.rows.detach().cpu())
            done += len(ids)
            bar.update(len(ids))
            if timed is not None and b + 1 == timed[0]:
                bar.clear()
                timed[1](done, time.perf_counter() - start)
    if keep_rows:
        return done, torch.cat(rows) if rows else None
    return done, None


def check_task_fields(task: Task, settings: ModelSettings) -> None:
    if task is Task.SEQUENCE_CLASSIFICATION and settings.label_field is None:
        raise ConfigError("a classification model needs --label-field (the column holding each example's label).")
    if task is Task.SEQUENCE_CLASSIFICATION and settings.prompt_field is not None:
        raise ConfigError("--prompt-field applies to causal_lm only; drop it for a classification model.")
