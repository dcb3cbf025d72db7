"""Inputs of the `logra` command line: local Hugging Face models and datasets, encoded into batches.

This module is used only by `logra.cli`; it imports transformers and datasets lazily, inside the
functions that need them, so `import logra` stays free of them. It turns

- a model (a Hugging Face model directory, a `config.json` for a freshly initialised model, or a
  `.gguf` file) and its tokenizer,
- a local dataset (`.jsonl`/`.json`, `.csv`, `.parquet`, or a `save_to_disk` folder) with a text
  field, an optional prompt field (causal LM: prompt tokens are context, not targets), an optional
  label field (classification) and an optional id field,

into padded batches and the per-example losses L_i (`logra.losses`) whose sum the CLI
backpropagates inside `GradientLogger.record()`. The settings saved beside a store live in
`logra.cli.settings`, the reading of datasets in `logra.cli.records`; both are importable from here.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from logra.capture.logger import GradientLogger
from logra.cli.records import load_records
from logra.cli.settings import DEFAULT_MAX_LENGTH, InputError, ModelSettings
from logra.errors import ConfigError, LograError
from logra.losses import IGNORE_INDEX, Task, detect_task, per_example_losses
from logra.types import ExampleId, parse_enum

__all__ = [  # what the command line imports from here, with InputError, ModelSettings and load_records
    "MODEL_DTYPES",
    "Encoded",
    "InputError",
    "ModelSettings",
    "batch_losses",
    "batches",
    "check_task_fields",
    "encode",
    "load_model",
    "load_records",
    "log_examples",
]

MODEL_DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16,
}  # fmt: skip


# --------------------------------------------------------------------------------------------
# Models.


def load_model(settings: ModelSettings) -> tuple[nn.Module, Any, Task]:
    """(model in eval mode with frozen parameters, tokenizer, task) from `settings`."""
    import transformers

    dtype = MODEL_DTYPES.get(settings.model_dtype)
    if dtype is None:
        raise InputError(f"--model-dtype {settings.model_dtype!r} is not one of {', '.join(MODEL_DTYPES)}.")
    task = parse_enum(Task, settings.task, "--task") if settings.task else None
    source, tok_source, kwargs = _model_source(settings)
    try:
        config = _model_config(transformers, source, kwargs)
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
    _settle_max_length(settings, model)
    model.eval()
    model.requires_grad_(False)  # logging needs activation gradients only: backward skips weight gradients
    return model, tokenizer, task


def _model_source(settings: ModelSettings) -> tuple[Path, str | None, dict[str, Any]]:
    """(where to load from, the tokenizer's source, from_pretrained kwargs) for --model; local paths only."""
    source = Path(settings.model)
    tok_source = settings.tokenizer
    if source.is_file() and source.suffix == ".gguf":
        return source.parent, tok_source or str(source), {"gguf_file": source.name}
    if (source.is_file() and source.suffix == ".json") or (source.is_dir() and (source / "config.json").is_file()):
        return source, tok_source, {}
    raise InputError(
        f"--model {settings.model!r} is neither a Hugging Face model directory (with config.json), a config "
        "file (*.json) nor a *.gguf file. Pass a local path: nothing is downloaded."
    )


def _model_config(transformers: Any, source: Path, kwargs: dict[str, Any]) -> Any:
    """The transformers config of a GGUF file, a config.json, or a model directory."""
    if "gguf_file" in kwargs:
        return transformers.AutoConfig.from_pretrained(source, **kwargs)
    if source.is_file():
        raw = json.loads(source.read_text(encoding="utf-8"))
        if "model_type" not in raw:
            raise InputError(f"{source} has no 'model_type'; it is not a Hugging Face config.json.")
        return transformers.AutoConfig.for_model(**raw)
    return transformers.AutoConfig.from_pretrained(source)


def _settle_max_length(settings: ModelSettings, model: nn.Module) -> None:
    """Default `settings.max_length` to the model's positions (at most 512); refuse more than it has."""
    positions = _positions(model)
    if settings.max_length is None:
        settings.max_length = min(DEFAULT_MAX_LENGTH, positions or DEFAULT_MAX_LENGTH)
    elif positions is not None and settings.max_length > positions:
        raise InputError(
            f"--max-length {settings.max_length} exceeds the {positions} positions of the model {settings.model!r}; "
            f"pass --max-length {positions} or less."
        )


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
