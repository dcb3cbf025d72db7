"""Raw-text datasets for log_trainer: tokenised with the Trainer's tokenizer, or refused before
anything is written, naming the column and the fix."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_cli as cli_env
import torch

from logra import LoGraConfig
from logra.errors import ConfigError
from logra.integrations.hf import log_trainer

CONFIG = LoGraConfig(k_in=3, k_out=3, modules=["*mlp*"], dtype="float64")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return cli_env.make_env(tmp_path_factory.mktemp("cli"))


def _trainer(env: dict[str, Path], tmp: Path, with_tokenizer: bool):  # noqa: ANN202
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        DataCollatorForLanguageModeling,
        Trainer,
        TrainingArguments,  # fmt: skip
    )

    tokenizer = AutoTokenizer.from_pretrained(env["gpt2"])
    model = AutoModelForCausalLM.from_pretrained(env["gpt2"], dtype=torch.float64)
    args = TrainingArguments(output_dir=str(tmp / "t"), report_to=[], use_cpu=True, disable_tqdm=True)
    collator = DataCollatorForLanguageModeling(tokenizer, mlm=False)
    return Trainer(model=model, args=args, data_collator=collator,
                   processing_class=tokenizer if with_tokenizer else None), tokenizer  # fmt: skip


def _raw():  # noqa: ANN202
    from datasets import Dataset

    return Dataset.from_list([{"id": f"doc{i}", "text": t, "source": "toy"} for i, t in enumerate(cli_env.TRAIN)])


def test_raw_text_is_tokenised_with_the_trainer_s_tokenizer(env: dict[str, Path], tmp_path: Path) -> None:
    trainer, tokenizer = _trainer(env, tmp_path, with_tokenizer=True)
    raw = _raw()
    by_hand = raw.map(lambda b: tokenizer(b["text"], truncation=True), batched=True, remove_columns=["text"])
    got = log_trainer(trainer, CONFIG, tmp_path / "raw", dataset=raw, id_column="id", batch_size=3,
                      text_column="text", progress=False)  # fmt: skip
    found = log_trainer(
        trainer,
        CONFIG,
        tmp_path / "found",
        dataset=raw.remove_columns(["source"]),
        id_column="id",
        batch_size=4,
        progress=False,
    )  # the one text column, found by itself
    want = log_trainer(trainer, CONFIG, tmp_path / "tok", dataset=by_hand, id_column="id", progress=False)
    assert got.ids == want.ids == found.ids == [f"doc{i}" for i in range(len(cli_env.TRAIN))]
    assert torch.allclose(got.rows(), want.rows(), rtol=1e-12, atol=1e-12 * want.rows().abs().max().item())
    assert torch.allclose(found.rows(), want.rows(), rtol=1e-12, atol=1e-12 * want.rows().abs().max().item())


def test_raw_text_without_a_tokenizer_is_refused_before_anything_is_written(
    env: dict[str, Path], tmp_path: Path
) -> None:
    trainer, _ = _trainer(env, tmp_path, with_tokenizer=False)
    with pytest.raises(ConfigError, match=r"raw text in column 'text'.*processing_class=tokenizer.*b\['text'\]"):
        log_trainer(trainer, CONFIG, tmp_path / "s", dataset=_raw().remove_columns(["source"]), id_column="id")
    assert not (tmp_path / "s").exists()
    trainer, _ = _trainer(env, tmp_path, with_tokenizer=True)
    with pytest.raises(ConfigError, match=r"several text columns \['body', 'source'\]; pass text_column="):
        log_trainer(trainer, CONFIG, tmp_path / "s", dataset=_raw().rename_column("text", "body"), id_column="id")
    with pytest.raises(ConfigError, match="text_column='body' is not a column"):
        log_trainer(trainer, CONFIG, tmp_path / "s", dataset=_raw(), id_column="id", text_column="body")
    assert not (tmp_path / "s").exists()
