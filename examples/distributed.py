"""Distributed logging and scoring with torchrun or accelerate (CPU/gloo or GPU/NCCL).

    torchrun --nproc_per_node 2 examples/distributed.py OUT_DIR
    accelerate launch --multi_gpu --num_processes 2 examples/distributed.py --accelerate OUT_DIR
    python examples/distributed.py OUT_DIR            # one process: the same store, the same scores

Each rank builds the same model (same seed), logs its contiguous share of the corpus into its own
shards of one store, and the statistics are all-reduced once when the logging block ends. Scoring
splits the shards across ranks; scores and the top-k are gathered on every rank and rank 0
prints them. On a CPU-only machine accelerate needs `--multi_gpu` plus `Accelerator(cpu=True)`
(done here when no GPU is visible). Under FSDP2 (`fully_shard`) the same code works; every rank
then runs the same number of batches, which `split_batches` guarantees.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

import logra
from logra import distributed
from logra.curvature import fit_preconditioner

N, T, VOCAB = 64, 10, 50


def corpus(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (n, T), generator=torch.Generator().manual_seed(seed))


def per_example_loss(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """(B,) token cross-entropy summed over each sequence."""
    logits = model(input_ids=ids).logits[:, :-1]
    token = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1), reduction="none")
    return token.view(ids.shape[0], -1).sum(dim=1)


def main() -> None:
    use_accelerate = "--accelerate" in sys.argv
    out = Path([a for a in sys.argv[1:] if not a.startswith("--")][0])
    device = torch.device("cpu")
    if use_accelerate:
        from accelerate import Accelerator

        from logra.integrations.accelerate import check_accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        check_accelerator(accelerator)
        device = accelerator.device
    elif "WORLD_SIZE" in os.environ:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        if torch.cuda.is_available():
            device = torch.device("cuda", dist.get_rank() % torch.cuda.device_count())
            torch.cuda.set_device(device)
    rank, world = distributed.rank_world()

    torch.manual_seed(0)  # every rank builds the same model; check_agreement verifies it
    gpt2 = GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=T, vocab_size=VOCAB, bos_token_id=0, eos_token_id=0,
                      tie_word_embeddings=False)  # fmt: skip
    model = GPT2LMHeadModel(gpt2).to(device).eval()
    config = logra.LoGraConfig(k_in=16, k_out=16, modules=["*mlp*"])
    train = corpus(N, seed=1)
    share = distributed.split_range(N, rank, world)
    with distributed.distributed_logger(model, config, out / "store", shard_rows=8) as logger:
        for batch in distributed.split_batches(share, N, world, batch_size=8):
            ids = train[batch.start : batch.stop].to(device)
            with logger.record(ids=list(batch), param_grads=False):
                per_example_loss(model, ids).sum().backward()

    store = logra.GradientStore.open(out / "store")
    with logra.GradientLogger(model, config, statistics=False) as query_logger:
        with query_logger.record(ids=[0, 1]) as rec:
            per_example_loss(model, corpus(2, seed=2).to(device)).sum().backward()
    scorer = distributed.DistributedScorer(store, fit_preconditioner(store, "kfac"), device=device)
    scores = scorer.score(rec.rows)
    top = scorer.top_k(rec.rows, 3)
    if rank == 0:
        print(f"{world} process(es): {len(store)} rows from shards {[s.file for s in store.manifest.shards][:4]} ...")
        print(f"scores {tuple(scores.shape)}, rank 0 scored shards {list(scorer.shards)}")
        print("most helpful per query:", top.helpful_ids)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
