"""Streaming corpora: examples from any iterable, cut into batches, without knowing the length.

    with logra.GradientLogger(model, config, "runs/stream") as logger:
        for ids, examples in logra.stream_batches(corpus(), 16, id_key="id", skip=logger.committed_ids):
            ...                                   # collate `examples`, then logger.record(ids=ids) as usual

The iterable is read once, in order, and never held: one batch of examples is in memory at a time,
so memory does not grow with the corpus (benchmarks/streaming_memory.py measures it). Ids come
from `id_key` (a key of each example, or a function of it) or, with `id_key=None`, from a running
counter of the example's position in the stream (deterministic when the stream is). Under a
process group the stream is split round-robin by position: rank r takes positions r, r + W, ...;
every rank reads the whole stream but computes only its share. Resuming skips committed ids
before anything is computed for them. Used by `log_trainer` for `IterableDataset`s (torch and
`datasets` streaming) and by `logra log --streaming`.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator
from typing import Any

from logra.errors import ConfigError
from logra.types import ExampleId, normalize_ids

IdKey = str | Callable[[Any], ExampleId] | None


def is_stream(data: Any) -> bool:
    """Whether `data` must be streamed: an iterable without a length (a generator, an IterableDataset)."""
    try:
        len(data)
    except TypeError:
        return True
    import torch.utils.data

    return isinstance(data, torch.utils.data.IterableDataset)


def example_id(example: Any, position: int, id_key: IdKey) -> ExampleId:
    """The id of the example at `position`: the running counter, `example[id_key]` or `id_key(example)`."""
    if id_key is None:
        return position
    try:
        raw = id_key(example) if callable(id_key) else example[id_key]
    except (KeyError, TypeError, IndexError):
        keys = sorted(example) if isinstance(example, dict) else type(example).__name__
        raise ConfigError(
            f"example {position} of the stream has no id {id_key!r} (it has {keys}); pass an existing id_key, "
            "or id_key=None to number examples by their position in the stream."
        ) from None
    return normalize_ids([raw])[0]


def stream_batches(
    examples: Iterable[Any],
    batch_size: int,
    *,
    id_key: IdKey = None,
    skip: Collection[ExampleId] = frozenset(),
    rank: int | None = None,
    world: int | None = None,
) -> Iterator[tuple[list[ExampleId], list[Any]]]:
    """(ids, examples) batches of at most `batch_size` of this rank's examples not in `skip`.

    `rank`/`world` default to the initialised process group's (0 and 1 without one).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be a positive int.")
    if rank is None or world is None:
        from logra.distributed import rank_world

        rank, world = rank_world()
    if not 0 <= rank < world:
        raise ConfigError(f"rank={rank} must be in [0, world={world}).")
    ids: list[ExampleId] = []
    batch: list[Any] = []
    for position, example in enumerate(examples):
        if position % world != rank:
            continue
        ex_id = example_id(example, position, id_key)
        if ex_id in skip:
            continue
        ids.append(ex_id)
        batch.append(example)
        if len(batch) == batch_size:
            yield ids, batch
            ids, batch = [], []
    if batch:
        yield ids, batch
