"""Run under `torchrun --nproc_per_node 2`: distributed logging and scoring in several settings.

Usage: torchrun_worker.py OUT_DIR. Every scenario writes a store under OUT_DIR; rank 0 saves the
scores and the messages of the expected errors to OUT_DIR/results.pt for tests/test_distributed.py.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from common import CONFIG, N_TRAIN, hf_dataset, hf_trainer, log_batches, model, query_rows
from torch.nn.parallel import DistributedDataParallel

import logra
from logra import distributed
from logra.curvature import fit_preconditioner
from logra.integrations.hf import log_trainer


def share_batches(batch_size: int) -> list:
    rank, world = distributed.rank_world()
    return distributed.split_batches(distributed.split_range(N_TRAIN, rank, world), N_TRAIN, world, batch_size)


def plain(out: Path, results: dict) -> None:
    m = model()
    with distributed.distributed_logger(m, CONFIG, out / "plain", shard_rows=2) as logger:
        log_batches(logger, m, share_batches(2))
    store = logra.GradientStore.open(out / "plain")
    queries = query_rows(m)
    kfac = distributed.DistributedScorer(store, fit_preconditioner(store, "kfac"), chunk_rows=3)
    ekfac = distributed.shared_preconditioner(store, "ekfac", out / "ekfac")
    cosine = distributed.DistributedScorer(store, ekfac, "cosine")
    top = kfac.top_k(queries, 4)
    results["plain"] = {
        "queries": queries, "ids": list(store.ids), "kfac": kfac.score(queries),
        "ekfac_cosine": cosine.score(queries),
        "self": kfac.self_influence(), "top_ids": top.helpful_ids, "top_scores": top.helpful_scores,
        "bottom_ids": top.harmful_ids, "bottom_scores": top.harmful_scores, "shards": list(kfac.shards),
    }  # fmt: skip


def default_logger(out: Path) -> None:
    """A plain GradientLogger: rank and world from the process group, merged when the block ends."""
    m = model()
    with logra.GradientLogger(m, CONFIG, out / "default", shard_rows=2) as logger:
        log_batches(logger, m, share_batches(2))
    logra.GradientStore.open(out / "default")  # readable on every rank right after the block


def ddp(out: Path) -> None:
    wrapped = DistributedDataParallel(model())
    with distributed.distributed_logger(wrapped, CONFIG, out / "ddp") as logger, wrapped.no_sync():
        log_batches(logger, wrapped, share_batches(3), param_grads=False)


def fsdp(out: Path, results: dict) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    m = model()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in m.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(m, mesh=mesh)
    results["fsdp_sharded"] = type(m.transformer.h[0].mlp.c_fc.weight).__name__
    with distributed.distributed_logger(m, CONFIG, out / "fsdp") as logger:
        log_batches(logger, m, share_batches(2), param_grads=False)


def mismatches(results: dict) -> None:
    rank = dist.get_rank()
    m = model()
    cases = {
        "config": (m, CONFIG if rank == 0 else logra.LoGraConfig(**{**CONFIG.to_dict(), "k_in": 2})),
        "seed": (m, CONFIG if rank == 0 else logra.LoGraConfig(**{**CONFIG.to_dict(), "seed": 1})),
        "weights": (m if rank == 0 else model_with_other_weights(), CONFIG),
    }
    for name, (mm, cfg) in cases.items():
        try:
            distributed.open_logger(mm, cfg, None).close()
            results[f"mismatch_{name}"] = None
        except logra.ConfigError as exc:
            results[f"mismatch_{name}"] = str(exc)


def model_with_other_weights() -> torch.nn.Module:
    m = model()
    with torch.no_grad():
        m.transformer.h[0].mlp.c_fc.weight[0, 0] += 1.0
    return m


def hf(out: Path) -> None:
    m = model()
    log_trainer(
        hf_trainer(m, out / "trainer"),
        CONFIG,
        out / "hf",
        dataset=hf_dataset(),
        id_column="uid",
        batch_size=2,
        token_reduction="sum",
    )


def main() -> None:
    out = Path(sys.argv[1])
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    results: dict = {"world": dist.get_world_size()}
    plain(out, results)
    default_logger(out)
    ddp(out)
    fsdp(out, results)
    mismatches(results)
    hf(out)
    if dist.get_rank() == 0:
        torch.save(results, out / "results.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
