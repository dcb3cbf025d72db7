"""Overhead of `LoGraCallback` on Hugging Face Trainer training (TracIn checkpoints).

Trains the same GPT-2 twice from the same seed, without and with the callback logging the
training set at `--checkpoints` evenly spaced steps, and reports (JSON):

  train_s / train_with_callback_s   wall time of trainer.train()
  callback_s                        time spent inside the callback (its own timer)
  overhead                          (with - without) / without
  logging_examples_per_s            examples logged per second by the callback
  training_examples_per_s           examples trained per second (forward + backward + step)
  identical_weights                 whether both runs end with bit-identical weights

The callback's cost is one forward + activation-only backward per logged example per checkpoint,
so overhead ≈ checkpoints × dataset size / (steps × batch) × (logging cost / training cost per
example). Run:

    .venv/bin/python benchmarks/trainer_callback_overhead.py               # CPU defaults
    .venv/bin/python benchmarks/trainer_callback_overhead.py --device cuda --n 2048 --steps 200
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from datasets import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

import logra
from logra.integrations.hf_callback import LoGraCallback


def collate(features: list[dict]) -> dict[str, torch.Tensor]:
    ids = torch.tensor([f["input_ids"] for f in features])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def run(args: argparse.Namespace, out: Path, with_callback: bool) -> tuple[float, float, dict]:
    torch.manual_seed(0)
    gpt2 = GPT2Config(n_layer=args.layers, n_embd=args.width, n_head=4, n_positions=args.seq, vocab_size=args.vocab,
                      bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)  # fmt: skip
    model = GPT2LMHeadModel(gpt2)
    gen = torch.Generator().manual_seed(1)
    data = Dataset.from_dict({"input_ids": torch.randint(0, args.vocab, (args.n, args.seq), generator=gen).tolist()})
    training = TrainingArguments(
        output_dir=str(out / "trainer"), report_to=[], use_cpu=args.device == "cpu", max_steps=args.steps,
        per_device_train_batch_size=args.batch, per_device_eval_batch_size=args.batch, logging_strategy="no",
        save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = Trainer(model=model, args=training, train_dataset=data, data_collator=collate)
    callback = None
    if with_callback:
        every = args.steps // args.checkpoints
        config = logra.LoGraConfig(k_in=args.k, k_out=args.k)
        callback = LoGraCallback(trainer, config, out / "tracin", steps=range(every, args.steps + 1, every))
        trainer.add_callback(callback)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    return (
        seconds,
        callback.seconds if callback else 0.0,
        {k: v.detach().clone() for k, v in model.state_dict().items()},
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, default in (("n", 256), ("steps", 64), ("batch", 16), ("checkpoints", 2), ("layers", 4),
                          ("width", 128), ("seq", 64), ("vocab", 512), ("k", 32)):  # fmt: skip
        parser.add_argument(f"--{name}", type=int, default=default)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        plain, _, w0 = run(args, Path(tmp) / "a", with_callback=False)
        with_cb, inside, w1 = run(args, Path(tmp) / "b", with_callback=True)
    logged = args.checkpoints * args.n
    print(json.dumps({
        "config": vars(args), "train_s": round(plain, 2), "train_with_callback_s": round(with_cb, 2),
        "callback_s": round(inside, 2), "overhead": round((with_cb - plain) / plain, 3),
        "logging_examples_per_s": round(logged / inside, 1),
        "training_examples_per_s": round(args.steps * args.batch / plain, 1),
        "identical_weights": all(torch.equal(w0[k], w1[k]) for k in w0),
    }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
