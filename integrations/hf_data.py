"""The data side of a Trainer pass: ids from the dataset, raw text tokenised, batches collated as the Trainer does.

`dataset_ids` reads the example ids (a column, or row indices), `tokenized_dataset` tokenises a
raw-text `datasets.Dataset` with the Trainer's tokenizer (or says why it cannot), and `collate`
builds a batch with the Trainer's collator, keeping the columns its `remove_unused_columns` keeps,
on `trainer.args.device`. Used by `logra.integrations.hf`, which re-exports the public names.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from logra.errors import ConfigError
from logra.types import ExampleId, normalize_ids


def dataset_ids(dataset: Any, id_column: str | None) -> list[ExampleId]:
    """The example ids of `dataset`: its `id_column` (ints or strs), or its row indices."""
    if id_column is None:
        return list(range(len(dataset)))
    names = getattr(dataset, "column_names", None)
    if names is not None and id_column not in names:
        raise ConfigError(f"id_column={id_column!r} is not a column of the dataset; its columns are {names}.")
    ids = list(dataset[id_column]) if names is not None else [dataset[i][id_column] for i in range(len(dataset))]
    out = normalize_ids(ids)
    if len(set(out)) != len(out):
        raise ConfigError(f"id_column={id_column!r} repeats ids; every example needs its own id (or pass None).")
    return out


MODEL_INPUTS = ("input_ids", "inputs_embeds", "pixel_values", "input_features", "input_values")


def tokenized_dataset(trainer: Any, dataset: Any, id_column: str | None, text_column: str | None = None) -> Any:
    """`dataset` ready for the model: raw text tokenised with the Trainer's tokenizer, or refused.

    A `datasets.Dataset` without model inputs (input_ids, ...) but with a text column (`text_column`,
    else `text`, else its one string column other than the id) is tokenised with
    `trainer.processing_class` (truncated to the tokenizer's max length; the text column removed).
    Without a tokenizer or an unambiguous text column, ConfigError names the columns and the fix,
    before anything is logged or written. Datasets without column names pass unchanged.
    """
    names = getattr(dataset, "column_names", None)
    if names is None or (text_column is None and any(c in names for c in MODEL_INPUTS)):
        return dataset
    if text_column is not None and text_column not in names:
        raise ConfigError(f"text_column={text_column!r} is not a column of the dataset; its columns are {names}.")
    features = getattr(dataset, "features", {}) or {}
    strings = ("string", "large_string")
    texts = [c for c in names if c != id_column and getattr(features.get(c), "dtype", None) in strings]
    column = text_column or ("text" if "text" in texts else texts[0] if len(texts) == 1 else None)
    tokenizer = getattr(trainer, "processing_class", None) or getattr(trainer, "tokenizer", None)
    if column is None:
        raise ConfigError(
            f"the dataset has no model inputs ({', '.join(MODEL_INPUTS[:1])} ...) among its columns {names}"
            + (f" and several text columns {texts}; pass text_column=... to log_trainer" if texts else
               "; tokenise it first: dataset.map(lambda b: tokenizer(b['text'], truncation=True), batched=True)")
            + "."
        )  # fmt: skip
    if tokenizer is None or not callable(tokenizer):
        raise ConfigError(
            f"the dataset holds raw text in column {column!r} (columns {names}) and no input_ids, and the Trainer has "
            "no tokenizer to encode it: create it with Trainer(..., processing_class=tokenizer), or tokenise first: "
            f"dataset = dataset.map(lambda b: tokenizer(b[{column!r}], truncation=True), batched=True, "
            f"remove_columns=[{column!r}])."
        )
    try:
        return dataset.map(lambda b: tokenizer(b[column], truncation=True), batched=True, remove_columns=[column])
    except Exception as exc:
        raise ConfigError(
            f"tokenising column {column!r} with the Trainer's tokenizer failed ({type(exc).__name__}: {exc}); "
            "tokenise the dataset yourself and pass it with input_ids."
        ) from None


def model_columns(trainer: Any, model: nn.Module) -> set[str] | None:
    """The feature keys the Trainer would keep (None keeps all), as its `remove_unused_columns` does."""
    if not getattr(trainer.args, "remove_unused_columns", True):
        return None
    keep = set(inspect.signature(model.forward).parameters)
    return keep | {"label", "label_ids"} | set(getattr(trainer, "label_names", None) or [])


def collate(trainer: Any, dataset: Any, indices: Sequence[int], columns: set[str] | None) -> dict[str, Any]:
    return collate_features(trainer, [dataset[int(i)] for i in indices], columns)


def collate_features(trainer: Any, features: list[Any], columns: set[str] | None) -> dict[str, Any]:
    from transformers import default_data_collator

    if columns is not None:
        features = [{k: v for k, v in f.items() if k in columns} for f in features]
    collate = trainer.data_collator if trainer.data_collator is not None else default_data_collator
    batch = collate(features)
    return {k: v.to(trainer.args.device) if isinstance(v, Tensor) else v for k, v in batch.items()}
