"""What the multi-process tests log, shared by the worker scripts and the single-process references.

A 2-layer float64 GPT-2 (tests/models.py), 11 training examples of varied lengths with string ids,
3 queries, and one LoGraConfig. `log_batches` is the user's loop: right-padded batches, the mask
passed to `record`, the sum of per-example token losses backpropagated.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

from models import build_model, collate, make_examples, per_example_loss  # noqa: E402

import logra  # noqa: E402

N_TRAIN, N_QUERY = 11, 3
CONFIG = logra.LoGraConfig(k_in=4, k_out=3, modules=["*mlp*", "*attn.c_attn"], dtype="float64")


def model() -> nn.Module:
    return build_model("gpt2", seed=0)


def train_examples() -> list[dict[str, Tensor]]:
    return make_examples("gpt2", N_TRAIN, seed=5)


def train_ids() -> list[str]:
    return [f"t{i:02d}" for i in range(N_TRAIN)]


def query_examples() -> list[dict[str, Tensor]]:
    return make_examples("gpt2", N_QUERY, seed=9)


def log_batches(
    logger: logra.GradientLogger, forward_model: nn.Module, batches: Sequence[Sequence[int]], **record: Any
) -> None:
    """Log the training examples of each batch of indices; `forward_model` may be a DDP wrapper."""
    examples, ids = train_examples(), train_ids()
    for batch_indices in batches:
        batch, mask = collate([examples[i] for i in batch_indices])
        with logger.record(ids=[ids[i] for i in batch_indices], mask=mask, **record):
            per_example_loss(forward_model, batch).sum().backward()


def query_rows(m: nn.Module) -> Tensor:
    """(N_QUERY, D) query rows, logged in memory in one batch."""
    batch, mask = collate(query_examples())
    with logra.GradientLogger(m, CONFIG, statistics=False) as logger:
        with logger.record(ids=list(range(N_QUERY)), mask=mask) as rec:
            per_example_loss(m, batch).sum().backward()
    assert rec.rows is not None
    return rec.rows.detach()


def hf_dataset() -> Any:
    """The training examples as a `datasets.Dataset` with a string id column."""
    from datasets import Dataset

    return Dataset.from_list(
        [{"uid": i, "input_ids": e["input_ids"].tolist()} for i, e in zip(train_ids(), train_examples())]
    )


def hf_collate(features: list[dict[str, Any]]) -> dict[str, Tensor]:
    """Right-pad input_ids; labels are the ids with padding set to -100."""
    T = max(len(f["input_ids"]) for f in features)
    ids = torch.zeros(len(features), T, dtype=torch.long)
    mask = torch.zeros(len(features), T, dtype=torch.long)
    for i, f in enumerate(features):
        ids[i, : len(f["input_ids"])] = torch.tensor(f["input_ids"])
        mask[i, : len(f["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def hf_trainer(m: nn.Module, output_dir: Path, dataset: Any = None, **args: Any) -> Any:
    from transformers import Trainer, TrainingArguments

    arguments = TrainingArguments(
        output_dir=str(output_dir), report_to=[], use_cpu=True, per_device_eval_batch_size=3,
        disable_tqdm=True, save_strategy="no", **args,
    )  # fmt: skip
    return Trainer(model=m, args=arguments, train_dataset=dataset, data_collator=hf_collate)
