"""logra with a Hugging Face Trainer: TracIn checkpoints during training, then a LoGra logging pass.

    OMP_NUM_THREADS=1 python examples/hf_trainer.py [OUT_DIR]     # CPU, about 10 seconds

A tiny GPT-2 (built from a config, nothing downloaded) learns a toy language: sequences that
count upwards modulo the vocabulary, plus a few "noise" sequences of random tokens. The script

1. trains with `LoGraCallback`, which logs projected gradients of the training and query sets at
   two steps (TracIn checkpoints), and prints the callback's share of the training time;
2. runs `log_trainer` after training: the Trainer's own model, collator and loss, no optimizer
   step, ids from the dataset's "uid" column, into a gradient store;
3. scores the queries with KFAC and with TracIn, joins the scores back to the dataset by id and
   writes them to parquet.

The same script runs under `torchrun --nproc_per_node 2 examples/hf_trainer.py OUT_DIR`: every
rank logs its share of the data and the store is merged (on CPU the ranks use gloo).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import logra
from logra import distributed
from logra.curvature import fit_preconditioner
from logra.integrations.hf import log_trainer, trainer_rows
from logra.integrations.hf_callback import LoGraCallback, tracin_scores
from logra.integrations.hf_export import add_scores_column, save_parquet, scores_table
from logra.score import Scorer

VOCAB, LENGTH = 32, 12


def toy_data(n: int, noisy: int, seed: int) -> Dataset:
    """`n` counting sequences (each from a random start); the first `noisy` are random tokens instead."""
    gen = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(n):
        start = int(torch.randint(0, VOCAB, (), generator=gen))
        ids = (torch.arange(LENGTH) + start) % VOCAB
        if i < noisy:
            ids = torch.randint(0, VOCAB, (LENGTH,), generator=gen)
        rows.append({"uid": f"{'noise' if i < noisy else 'count'}-{i:03d}", "input_ids": ids.tolist()})
    return Dataset.from_list(rows)


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def main(out: Path) -> None:
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=LENGTH, vocab_size=VOCAB,
                                       bos_token_id=0, eos_token_id=0, tie_word_embeddings=False))  # fmt: skip
    train, queries = toy_data(96, noisy=8, seed=1), toy_data(4, noisy=0, seed=2)
    args = TrainingArguments(output_dir=str(out / "trainer"), report_to=[], use_cpu=True, max_steps=40,
                             per_device_train_batch_size=16, learning_rate=3e-3, logging_strategy="no",
                             save_strategy="no", disable_tqdm=True)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=train, data_collator=collate)
    config = logra.LoGraConfig(k_in=16, k_out=16, modules=["*mlp*", "*attn.c_attn"])
    callback = LoGraCallback(trainer, config, out / "tracin", steps=[20, 40], query_dataset=queries,
                             id_column="uid", query_id_column="uid")  # fmt: skip
    trainer.add_callback(callback)
    start = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - start
    rank, _ = distributed.rank_world()

    # LoGra with KFAC at the end of training: the Trainer's model, collator and loss.
    store = log_trainer(trainer, config, out / "store", id_column="uid")
    q = trainer_rows(trainer, config, queries, id_column="uid")
    scores = distributed.DistributedScorer(store, fit_preconditioner(store, "kfac")).score(q.rows)
    tracin = tracin_scores(out / "tracin")
    if rank != 0:
        return
    share = 100 * callback.seconds / total
    print(f"training: {total:.1f} s, of which the callback logged for {callback.seconds:.1f} s ({share:.0f}%, "
          f"{len(callback.checkpoints)} checkpoints x {len(train)} examples)")  # fmt: skip
    for name, matrix in (("kfac", scores), ("tracin", tracin.scores)):
        mean = matrix.mean(dim=0)
        order = mean.argsort()
        print(f"{name}: most harmful on average: {[store.ids[j] for j in order[:4].tolist()]}")
    joined = add_scores_column(train, scores.mean(dim=0), store.ids, id_column="uid", name="kfac_mean")
    print(joined.select_columns(["uid", "kfac_mean"]).sort("kfac_mean")[:3])
    save_parquet(scores_table(scores, store.ids, q.ids), out / "scores.parquet")
    print(f"wrote {out / 'scores.parquet'} ({scores.numel()} rows); self-influence via Scorer:",
          Scorer(store, fit_preconditioner(store, "kfac")).self_influence()[:3].tolist())  # fmt: skip


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/hf_trainer_example"))
