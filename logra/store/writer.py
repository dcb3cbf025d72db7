"""The crash-safe writer of a gradient store, and the layout it writes.

Layout of a store directory::

    manifest.json                  format, config, fingerprints, layer table, shards, checksums
    shard-RRR-NNNNNN.bin           rows [n, D] in the storage dtype, C order, no header (np.memmap)
    shard-RRR-NNNNNN.ids.json      the n example ids of that shard, in row order
    shard-RRR-NNNNNN.scales.bin    float16 stores only: n float32 per-row scales (logra.encoding)
    statistics-RRR-NNNNNN.npz      float64 Kronecker sums matching exactly the committed rows

A store logged by W > 1 processes (`StoreWriter(..., world_size=W)`) has one manifest per rank,
`manifest-rank-RRR.json`, each listing only that rank's shards; after every rank has closed its
writer, `merge_rank_manifests` (run once, by rank 0) writes the single `manifest.json` that
readers open, listing every rank's shards in rank order with the summed statistics
(`statistics-all-NNNNNN.npz`). The rank manifests stay, so a run can be resumed with the same W.

Commit protocol (crash safety): rows are appended to `shard-….bin.tmp`; at commit the shard, its
ids, scales and the statistics are written to temp files, fsynced and renamed (each statistics
commit gets a new file name, so the committed one is never overwritten), the directory is
fsynced, and only then is the manifest replaced (temp, fsync, rename, fsync of the directory).
The statistics file the previous manifest named is kept until the next commit (or `close()`),
so a reader that opened that manifest a moment ago still finds it.
The manifest records the SHA-256 of every file it names, and of itself. A reader therefore sees
whole committed shards or nothing; files the manifest does not name are leftovers, which readers
ignore and a resuming writer deletes.

Failures: any error while the writer writes (ENOSPC, EIO, an interrupt) stops it. The rows not
yet committed are discarded, later calls raise `StoreError`, and the committed store stays as it
was: readable and verifiable. A new writer on the same directory resumes it (committed ids are
reported so the caller skips them). The reader is `logra.store.reader`, the manifest format
`logra.store.manifest`, the checks a writer runs when it opens a store `logra.store.resume`, and
the merge of rank manifests `logra.store.merge`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch import Tensor

from logra.config import LoGraConfig, StorageDtype
from logra.errors import DuplicateIdError, LograError, StoreError
from logra.store.encoding import encode_rows, encoded_finite, underflowed
from logra.store.files import TMP_SUFFIX, write_atomic
from logra.store.manifest import (
    MANIFEST,
    SHARD_RE,
    STATS_RE,
    Manifest,
    ShardInfo,
    rank_manifest_name,
    read_manifest,
    shard_file_names,
    write_manifest,
)
from logra.store.reader import GradientStore
from logra.store.resume import (
    acquire_lock,
    check_process_count,
    check_same_header,
    describe_os_error,
    remove_leftovers,
)
from logra.store.statistics import write_statistics
from logra.types import ExampleId, KroneckerStatistics, LayerInfo

_WIDER = {StorageDtype.FLOAT16: "float32", StorageDtype.BFLOAT16: "float32", StorageDtype.FLOAT32: "float64"}


def check_unique(ids: list[ExampleId], known: set[ExampleId] | frozenset[ExampleId], where: str) -> None:
    """Raise DuplicateIdError naming ids repeated within `ids` or already in `known` (`where`)."""
    seen: set[ExampleId] = set()
    repeated = [i for i in ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
    if repeated:
        raise DuplicateIdError(
            f"example ids {repeated[:10]}{' ...' if len(repeated) > 10 else ''} appear twice within this batch; "
            "give every example of a batch its own id."
        )
    dup = [i for i in ids if i in known]
    if dup:
        raise DuplicateIdError(
            f"example ids {dup[:10]}{' ...' if len(dup) > 10 else ''} are already in {where}; every example "
            "must be logged once. On resume, skip the ids in logger.committed_ids."
        )


def _number_of(pattern: re.Pattern[str], name: str, rank: int) -> int | None:
    """The NNNNNN of a file name `pattern` matches, when the file is rank `rank`'s."""
    match = pattern.fullmatch(name)
    return int(match.group(2)) if match is not None and match.group(1) == f"{rank:03d}" else None


def _encode_checked(ids: list[ExampleId], rows: Tensor, dtype: StorageDtype) -> tuple[np.ndarray, np.ndarray | None]:
    """(n, D) rows in the storage dtype, and their per-row scales (float16 only).

    Raises StoreError naming the examples whose rows overflow `dtype`; warns about those with
    nonzero entries that underflow to 0.
    """
    data, scales = encode_rows(rows, dtype)
    wider = _WIDER.get(dtype, "float64")
    finite = encoded_finite(data, scales, dtype)
    if not finite.all():
        bad = [i for i, ok in zip(ids, finite.tolist()) if not ok]
        raise StoreError(
            f"the rows of examples {bad[:10]} overflow the storage dtype {dtype.value} (their largest "
            f"|entry| is {rows.abs().max().item():.3g}); check the loss for divergence, or log into a "
            f"new store with LoGraConfig(dtype={wider!r})."
        )
    lost = underflowed(rows, data, dtype)
    if lost.any():
        small = [i for i, x in zip(ids, lost.tolist()) if x]
        warnings.warn(
            f"the rows of examples {small[:10]}{' ...' if len(small) > 10 else ''} have nonzero entries "
            f"that underflow to 0 in the storage dtype {dtype.value}; their scores lose those "
            f"entries. Scale the loss up, or log with LoGraConfig(dtype={wider!r}).",
            UserWarning,
            stacklevel=5,  # this helper, append, and the two logger frames above: the user's call
        )
    return data, scales


class StoreWriter:
    """Appends rows to a store, committing whole shards atomically; resumes a partial store.

    Args:
        root: the store directory (created when missing).
        config, model_fingerprint, layers: the header; a store that exists must have the same.
        shard_rows: a shard is committed at the first batch boundary where it holds this many rows.
        rank: the writer's rank; ranks write disjoint shard files.
        world_size: the number of writing processes. With more than one, this writer keeps its own
            manifest `manifest-rank-RRR.json`; `merge_rank_manifests` then writes `manifest.json`.

    Resuming validates the committed store (sizes, id and statistics checksums) and refuses a
    damaged one. After any failure while writing, the writer is stopped (see the module doc).
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        config: LoGraConfig,
        model_fingerprint: str,
        layers: Sequence[LayerInfo],
        shard_rows: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if not isinstance(shard_rows, int) or isinstance(shard_rows, bool) or shard_rows < 1:
            raise StoreError(f"shard_rows={shard_rows!r} must be a positive int.")
        if not isinstance(world_size, int) or not isinstance(rank, int) or not 0 <= rank < world_size <= 1000:
            raise StoreError(f"rank={rank!r}, world_size={world_size!r}: need 0 <= rank < world_size <= 1000.")
        self.root = Path(root)
        self.shard_rows = shard_rows
        self.rank = rank
        self.manifest_name = rank_manifest_name(rank) if world_size > 1 else MANIFEST
        self.dtype = config.dtype
        self._failure: str | None = None
        self._file: Any = None
        self._hash = hashlib.sha256()
        self._pending_ids: list[ExampleId] = []
        self._pending_skipped: list[ExampleId] = []
        self._pending_scales: list[np.ndarray] = []
        self._lock: weakref.finalize | None = None
        check_process_count(self.root, rank, world_size)
        committed = self._open_or_create(Manifest(config, model_fingerprint, config.dtype, tuple(layers), (), None, ()))
        self._committed_ids: set[ExampleId] = set(committed.ids) | set(committed.skipped)
        numbers = [_number_of(SHARD_RE, s.file, rank) for s in self.manifest.shards]
        self._index = 1 + max((n for n in numbers if n is not None), default=-1)  # the next shard of this rank
        stats = _number_of(STATS_RE, self.manifest.statistics[0], rank) if self.manifest.statistics else None
        self._stats_generation = 0 if stats is None else stats + 1  # each commit writes a new statistics file
        self._retired: str | None = None  # the previous manifest's statistics file, kept for open snapshots

    def _open_or_create(self, fresh: Manifest) -> GradientStore:
        """Resume the store (same header, undamaged, leftovers removed) or create it empty."""
        try:
            if self.root.exists() and not self.root.is_dir():
                raise StoreError(f"store path {self.root} exists and is not a directory; choose another path.")
            self.root.mkdir(parents=True, exist_ok=True)
            self._lock = acquire_lock(self, self.root, self.rank)
            if (self.root / self.manifest_name).exists():
                self.manifest = read_manifest(self.root, self.manifest_name)
                check_same_header(self.root, self.manifest, fresh)
            else:
                self.manifest = fresh
                write_manifest(self.root, fresh, self.manifest_name)
            committed = GradientStore(self.root, self.manifest)  # refuses a damaged store
            remove_leftovers(self.root, self.manifest, self.manifest_name, self.rank)
            return committed
        except BaseException as exc:
            self._release_lock()
            if isinstance(exc, OSError) and not isinstance(exc, LograError):
                raise StoreError(
                    f"cannot open the store at {self.root} for writing: {describe_os_error(exc)}. Fix the cause "
                    "(free space, permissions), then try again: a partly created store resumes."
                ) from exc
            raise

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock()  # closing the descriptor drops the flock
            self._lock = None

    @property
    def committed_ids(self) -> frozenset[ExampleId]:
        """Ids already durable in the store (and ids recorded as skipped)."""
        return frozenset(self._committed_ids)

    @property
    def failed(self) -> bool:
        """Whether the writer stopped after a failure (it then refuses every call)."""
        return self._failure is not None

    def check_new(self, ids: list[ExampleId]) -> None:
        """Raise DuplicateIdError if any id is committed, pending or repeated (StoreError if stopped)."""
        self._check_usable()
        check_unique(
            ids, self._committed_ids.union(self._pending_ids, self._pending_skipped), f"the store at {self.root}"
        )

    def append(self, ids: list[ExampleId], rows: Tensor, skipped: Sequence[ExampleId] = ()) -> None:
        """Append (n, D) rows for `ids`; `skipped` ids are recorded as logged-but-dropped."""
        if rows.dim() != 2 or rows.shape != (len(ids), self.manifest.dim):
            raise StoreError(f"rows of shape {tuple(rows.shape)} do not match {len(ids)} ids x D={self.manifest.dim}.")
        self.check_new(list(ids) + list(skipped))
        tmp = self.root / (shard_file_names(self.rank, self._index)[0] + TMP_SUFFIX)
        with self._guard(f"writing {len(ids)} rows to {tmp.name}"):
            if ids:
                data, scales = _encode_checked(ids, rows, self.dtype)
                if self._file is None:
                    self._file = open(tmp, "wb")
                    self._hash = hashlib.sha256()
                payload = data.tobytes()
                self._file.write(payload)
                self._hash.update(payload)
                if scales is not None:
                    self._pending_scales.append(scales)
            self._pending_ids.extend(ids)
            self._pending_skipped.extend(skipped)

    def commit_if_full(self, statistics: dict[str, KroneckerStatistics] | None) -> None:
        if len(self._pending_ids) >= self.shard_rows:
            self.commit(statistics)

    def commit(self, statistics: dict[str, KroneckerStatistics] | None) -> None:
        """Make every appended row durable. `statistics` must cover exactly the committed rows.

        A store has statistics for all its rows or for none: passing None to a store that has
        them (or statistics to a store with rows but none) raises StoreError.
        """
        self._check_usable()
        has_content = bool(self.manifest.shards or self.manifest.skipped)
        mismatch = (statistics is None) != (self.manifest.statistics is None)
        if not (self._pending_ids or self._pending_skipped):
            if has_content or not mismatch:
                return  # nothing to commit (an empty store only records whether it has statistics)
        elif has_content and mismatch:
            have = "has" if self.manifest.statistics is not None else "has no"
            raise StoreError(
                f"the store at {self.root} {have} statistics, so it must be resumed with "
                f"GradientLogger(..., statistics={self.manifest.statistics is not None}); "
                "statistics must cover every row."
            )
        step = [f"committing to {self.manifest_name}"]
        with self._guard(step):
            shards = list(self.manifest.shards)
            if self._pending_ids:
                step[0] = f"writing shard {shard_file_names(self.rank, self._index)[0]} and its ids"
                shards.append(self._seal_shard())
            stats_entry = None
            if statistics is not None:
                name = f"statistics-{self.rank:03d}-{self._stats_generation:06d}.npz"
                step[0] = f"writing the statistics file {name}"
                stats_entry = write_statistics(self.root, name, statistics)
            old = self.manifest
            new = Manifest(old.config, old.model_fingerprint, old.dtype, old.layers, tuple(shards), stats_entry,
                           old.skipped + tuple(self._pending_skipped))  # fmt: skip
            step[0] = f"replacing {self.manifest_name}"
            write_manifest(self.root, new, self.manifest_name)
            self.manifest = new
            self._committed_ids.update(self._pending_ids, self._pending_skipped)
            self._index += 1 if self._pending_ids else 0
            self._stats_generation += 1 if statistics is not None else 0
            self._pending_ids, self._pending_skipped, self._pending_scales = [], [], []
            if old.statistics is not None and (stats_entry is None or old.statistics[0] != stats_entry[0]):
                # A reader may hold a snapshot of `old`: its statistics file stays until the next commit.
                self._drop_retired()
                self._retired = old.statistics[0]

    def _drop_retired(self) -> None:
        if self._retired is not None:
            (self.root / self._retired).unlink(missing_ok=True)
            self._retired = None

    def _seal_shard(self) -> ShardInfo:
        """Make the pending shard and its id (and scale) files durable under their final names."""
        name, ids_name, scales_name = shard_file_names(self.rank, self._index)
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        os.replace(self.root / (name + TMP_SUFFIX), self.root / name)
        ids_bytes = json.dumps(self._pending_ids).encode()
        write_atomic(self.root / ids_name, ids_bytes)
        scales_file = scales_sha = None
        if self.dtype is StorageDtype.FLOAT16:
            scales_bytes = np.concatenate(self._pending_scales).astype("<f4").tobytes()
            write_atomic(self.root / scales_name, scales_bytes)
            scales_file, scales_sha = scales_name, hashlib.sha256(scales_bytes).hexdigest()
        ids_sha = hashlib.sha256(ids_bytes).hexdigest()
        return ShardInfo(name, ids_name, len(self._pending_ids), self._hash.hexdigest(), ids_sha, scales_file,
                         scales_sha, len(ids_bytes))  # fmt: skip

    def close(self, statistics: dict[str, KroneckerStatistics] | None, *, commit: bool = True) -> None:
        """Commit what is pending (unless `commit` is False), then release the store.

        A stopped writer commits nothing: its failure was raised already.
        """
        try:
            if commit and self._failure is None:
                self.commit(statistics)
        finally:
            with contextlib.suppress(OSError):  # a temp file left here is deleted by the next writer
                self.discard_pending()
                self._drop_retired()
            self._release_lock()

    def discard_pending(self) -> None:
        """Forget uncommitted rows (their temp file is removed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            (self.root / (shard_file_names(self.rank, self._index)[0] + TMP_SUFFIX)).unlink(missing_ok=True)
        self._pending_ids, self._pending_skipped, self._pending_scales = [], [], []

    # ------------------------------------------------------------ failure handling

    def _check_usable(self) -> None:
        if self._failure is not None:
            raise StoreError(
                f"the writer of the store at {self.root} stopped after an earlier failure ({self._failure}). The "
                "committed shards are intact; fix the cause and resume with a new GradientLogger on the same store."
            )

    @contextlib.contextmanager
    def _guard(self, what: str | list[str]) -> Iterator[None]:
        """Stop the writer on any exception inside; raise OS errors as StoreError naming the store.

        `what` names the operation; a one-item list may be updated inside, step by step.
        """
        try:
            yield
        except BaseException as exc:
            action = what if isinstance(what, str) else what[0]
            self._failure = f"{action}: {describe_os_error(exc) if isinstance(exc, OSError) else repr(exc)[:300]}"
            with contextlib.suppress(OSError):
                self.discard_pending()
            if isinstance(exc, OSError) and not isinstance(exc, LograError):
                raise StoreError(
                    f"cannot write the store at {self.root}: {action} failed with {describe_os_error(exc)}. "
                    "Every shard committed "
                    "before is intact and readable; free space (or fix the cause), then resume with a new "
                    "GradientLogger on the same store and config: committed ids are skipped."
                ) from exc
            raise
