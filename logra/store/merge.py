"""The merge of a multi-process store: one `manifest.json` over every rank's shards.

A store logged by W > 1 processes has one manifest per rank (`manifest-rank-RRR.json`). After
every rank has closed its writer, `merge_rank_manifests` (run once, by rank 0) writes the single
`manifest.json` that readers open, listing every rank's shards in rank order with the summed
statistics (`statistics-all-NNNNNN.npz`). The rank manifests stay, so a run can be resumed with
the same W.
"""

from __future__ import annotations

import os
from pathlib import Path

from logra.errors import StoreError
from logra.store.manifest import MANIFEST, Manifest, rank_manifest_name, read_manifest, write_manifest
from logra.store.reader import read_shard_ids
from logra.store.statistics import write_statistics
from logra.store.writer import check_unique
from logra.types import ExampleId, KroneckerStatistics


def merge_rank_manifests(
    root: str | os.PathLike[str], world_size: int, statistics: dict[str, KroneckerStatistics] | None
) -> Manifest:
    """Write `manifest.json` listing the shards of ranks 0..world_size-1 (run once, after every rank closed).

    Args:
        root: the store directory holding `manifest-rank-RRR.json` for every rank.
        world_size: the number of ranks that logged.
        statistics: the Kronecker sums of *all* ranks (all-reduced), or None for a store without them.

    Raises StoreError when ranks disagree on the header, a rank manifest is missing or extra ones
    exist, and DuplicateIdError when two ranks logged the same example id.
    """
    path = Path(root)
    parts = [read_manifest(path, rank_manifest_name(r)) for r in range(world_size)]
    expected = {rank_manifest_name(r) for r in range(world_size)}
    extra = sorted({p.name for p in path.glob("manifest-rank-*.json")} - expected)
    if extra:
        raise StoreError(
            f"the store at {path} also holds {extra} from a run with more processes; resume it with that many."
        )
    first = parts[0]
    for r, m in enumerate(parts):
        header, first_header = (m.config.fingerprint(), m.model_fingerprint, m.layers), (
            first.config.fingerprint(), first.model_fingerprint, first.layers)  # fmt: skip
        if header != first_header:
            raise StoreError(
                f"rank {r} of the store at {path} was logged with another config, model or layer table than rank 0; "
                "every rank must log the same model with the same LoGraConfig. Re-log into a new directory."
            )
    seen: set[ExampleId] = set()
    for m in parts:
        for shard in m.shards:
            ids = read_shard_ids(path, shard)
            check_unique(ids, seen, f"the shards of another rank at {path} (did a sampler pad ranks with repeats?)")
            seen.update(ids)
    old = read_manifest(path) if (path / MANIFEST).exists() else None
    stats_entry = None
    if statistics is not None:
        index = 0 if old is None or old.statistics is None else int(old.statistics[0][-10:-4]) + 1
        stats_entry = write_statistics(path, f"statistics-all-{index:06d}.npz", statistics)
    skipped = tuple(i for m in parts for i in m.skipped)
    merged = Manifest(first.config, first.model_fingerprint, first.dtype, first.layers,
                      tuple(s for m in parts for s in m.shards), stats_entry, skipped)  # fmt: skip
    write_manifest(path, merged)
    if old is not None and old.statistics is not None and old.statistics[0].startswith("statistics-all-"):
        if stats_entry is None or old.statistics[0] != stats_entry[0]:
            (path / old.statistics[0]).unlink(missing_ok=True)
    return merged
