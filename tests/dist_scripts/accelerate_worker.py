"""Run under `accelerate launch --multi_gpu --num_processes 2`: logging and scoring through accelerate.

Usage: accelerate_worker.py OUT_DIR. `Accelerator(cpu=True)` makes the two processes gloo ranks
on a CPU-only machine; the model is prepared (wrapped in DDP) as in a training script. Rank 0
saves the scores to OUT_DIR/results.pt for tests/test_distributed.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from common import CONFIG, N_TRAIN, log_batches, model, query_rows

import logra
from logra import distributed
from logra.curvature import fit_preconditioner
from logra.integrations.accelerate import accelerate_logger, share


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    prepared = accelerator.prepare(model())
    batches = distributed.split_batches(share(accelerator, N_TRAIN), N_TRAIN, accelerator.num_processes, 4)
    with accelerate_logger(accelerator, prepared, CONFIG, out / "accelerate", shard_rows=2) as logger:
        with accelerator.no_sync(prepared):
            log_batches(logger, prepared, batches, param_grads=False)
    store = logra.GradientStore.open(out / "accelerate")
    queries = query_rows(accelerator.unwrap_model(prepared))
    scorer = distributed.DistributedScorer(store, fit_preconditioner(store, "kfac"), chunk_rows=2)
    top = scorer.top_k(queries, 3)
    if accelerator.is_main_process:
        torch.save({
            "world": accelerator.num_processes, "distributed_type": str(accelerator.distributed_type),
            "wrapper": type(prepared).__name__, "queries": queries, "kfac": scorer.score(queries),
            "top_ids": top.helpful_ids, "top_scores": top.helpful_scores,
        }, out / "results.pt")  # fmt: skip
    else:
        scorer.score(queries)  # every rank takes part in the gather
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
