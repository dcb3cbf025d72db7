"""Logging under `accelerate launch`: the rank's share, the unwrapped model, one merged store.

    accelerator = Accelerator(cpu=True)          # on GPUs: Accelerator()
    model = accelerator.prepare(model)           # DDP (or FSDP2) as usual
    with accelerate_logger(accelerator, model, config, "runs/train") as logger:
        for batch in batches_of(share(accelerator, len(dataset))):
            with logger.record(ids=..., mask=...):
                ...

On a CPU-only machine, `accelerate launch --multi_gpu --num_processes 2 script.py` with
`Accelerator(cpu=True)` gives two gloo ranks (MULTI_CPU). `--cpu --num_processes 2` starts only
one process, and a plain `Accelerator()` there leaves every process believing it is rank 0 of 1;
`check_accelerator` detects that case and refuses, instead of writing two stores that clobber
each other. Do not let `accelerator.prepare` shard the logging DataLoader: its even_batches
padding repeats examples; iterate over `share(...)` instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from torch import nn

from logra import distributed
from logra.capture import GradientLogger
from logra.config import LoGraConfig
from logra.errors import ConfigError


def check_accelerator(accelerator: Any) -> None:
    """Raise ConfigError when accelerate and the launcher disagree on the number of processes."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise ConfigError(
            f"the launcher started {launched} processes (WORLD_SIZE) but this Accelerator sees "
            f"{accelerator.num_processes} (process_index {accelerator.process_index}): every rank would log as rank 0. "
            "On a CPU-only machine create Accelerator(cpu=True) and launch with "
            "`accelerate launch --multi_gpu --num_processes N`."
        )
    expected = (accelerator.process_index, accelerator.num_processes)
    if accelerator.num_processes > 1 and distributed.rank_world() != expected:
        raise ConfigError(
            f"torch.distributed says (rank, world) = {distributed.rank_world()} but the Accelerator says "
            f"{expected}; create the Accelerator before logging."
        )


def share(accelerator: Any, n: int) -> range:
    """This process's contiguous share of `n` examples (no repeats, sizes differ by at most one)."""
    return distributed.split_range(n, accelerator.process_index, accelerator.num_processes)


@contextmanager
def accelerate_logger(
    accelerator: Any,
    model: nn.Module,
    config: LoGraConfig | None,
    store: str | os.PathLike[str],
    **kwargs: Any,
) -> Iterator[GradientLogger]:
    """`logra.distributed.distributed_logger` on the accelerator's unwrapped model.

    Checks the launch (`check_accelerator`) and that every rank logs the same config, model and
    projections; on leaving the block the rank manifests are merged and the statistics all-reduced.
    """
    check_accelerator(accelerator)
    with distributed.distributed_logger(accelerator.unwrap_model(model), config, store, **kwargs) as logger:
        yield logger
