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
`logra.store.manifest`, and the merge of rank manifests `logra.store.merge`.
"""

from __future__ import annotations

import contextlib
import errno
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
    IDS_RE,
    MANIFEST,
    SCALES_RE,
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
from logra.store.statistics import write_statistics
from logra.types import ExampleId, KroneckerStatistics, LayerInfo

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock: one writer per store is then the user's duty
    fcntl = None  # type: ignore[assignment]
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # file systems without flock

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


def _rank_of(pattern_match: re.Match[str] | None) -> str | None:
    return None if pattern_match is None else pattern_match.group(1)


def _number_of(pattern: re.Pattern[str], name: str, rank: int) -> int | None:
    """The NNNNNN of a file name `pattern` matches, when the file is rank `rank`'s."""
    match = pattern.fullmatch(name)
    return int(match.group(2)) if match is not None and match.group(1) == f"{rank:03d}" else None


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
        _check_process_count(self.root, rank, world_size)
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
            self._acquire_lock()
            if (self.root / self.manifest_name).exists():
                self.manifest = read_manifest(self.root, self.manifest_name)
                self._check_same_header(fresh)
            else:
                self.manifest = fresh
                write_manifest(self.root, fresh, self.manifest_name)
            committed = GradientStore(self.root, self.manifest)  # refuses a damaged store
            self._remove_leftovers()
            return committed
        except BaseException as exc:
            self._release_lock()
            if isinstance(exc, OSError) and not isinstance(exc, LograError):
                raise StoreError(
                    f"cannot open the store at {self.root} for writing: {_describe(exc)}. Fix the cause (free space, "
                    "permissions), then try again: a partly created store resumes."
                ) from exc
            raise

    def _acquire_lock(self) -> None:
        """Hold an exclusive flock on `writer-RRR.lock` until close: one writer per rank and store."""
        if fcntl is None:
            return
        path = self.root / f"writer-{self.rank:03d}.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"another writer holds {path}: a process (or an open GradientLogger in this one) is already logging "
                f"rank {self.rank} into {self.root}. Close it first: two writers would overwrite each other's shards."
            ) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno not in _NO_LOCKS:
                raise
            warnings.warn(
                f"cannot lock {path} ({_describe(exc)}): this file system has no advisory locks, so make sure that "
                f"only one process writes rank {self.rank} of the store.",
                stacklevel=4,
            )
            return
        self._lock = weakref.finalize(self, os.close, fd)  # released on close(), or when the writer is collected

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock()  # closing the descriptor drops the flock
            self._lock = None

    def _check_same_header(self, fresh: Manifest) -> None:
        old = self.manifest
        problems = []
        if old.config.fingerprint() != fresh.config.fingerprint():
            new = fresh.config.to_dict()
            diff = {k: (v, new[k]) for k, v in old.config.to_dict().items() if new[k] != v}
            problems.append(f"the config differs (field: (stored, given)) {diff}")
        if old.model_fingerprint != fresh.model_fingerprint:
            problems.append("the model differs (different layers, shapes, dtypes or weights)")
        if old.layers != fresh.layers:
            problems.append("the layer table differs")
        if problems:
            raise StoreError(
                f"cannot resume the store at {self.root}: {'; '.join(problems)}. Use the original config and model "
                "to resume, or log into a new directory."
            )

    def _remove_leftovers(self) -> None:
        """Delete this rank's files that the manifest does not name (an interrupted commit's)."""
        named = (
            {self.manifest_name} | {s.file for s in self.manifest.shards} | {s.ids_file for s in self.manifest.shards}
        )
        named |= {s.scales_file for s in self.manifest.shards if s.scales_file is not None}
        if self.manifest.statistics is not None:
            named.add(self.manifest.statistics[0])
        mine = f"{self.rank:03d}"
        for p in self.root.iterdir():
            base = p.name[: -len(TMP_SUFFIX)] if p.name.endswith(TMP_SUFFIX) else p.name
            if p.name != base and base == self.manifest_name:
                p.unlink()
                continue
            ranks = {_rank_of(rx.fullmatch(base)) for rx in (SHARD_RE, IDS_RE, SCALES_RE, STATS_RE)}
            if mine in ranks and p.name not in named:
                p.unlink()

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
                data, scales = encode_rows(rows, self.dtype)
                wider = _WIDER.get(self.dtype, "float64")
                finite = encoded_finite(data, scales, self.dtype)
                if not finite.all():
                    bad = [i for i, ok in zip(ids, finite.tolist()) if not ok]
                    raise StoreError(
                        f"the rows of examples {bad[:10]} overflow the storage dtype {self.dtype.value} (their largest "
                        f"|entry| is {rows.abs().max().item():.3g}); check the loss for divergence, or log into a "
                        f"new store with LoGraConfig(dtype={wider!r})."
                    )
                lost = underflowed(rows, data, self.dtype)
                if lost.any():
                    small = [i for i, x in zip(ids, lost.tolist()) if x]
                    warnings.warn(
                        f"the rows of examples {small[:10]}{' ...' if len(small) > 10 else ''} have nonzero entries "
                        f"that underflow to 0 in the storage dtype {self.dtype.value}; their scores lose those "
                        f"entries. Scale the loss up, or log with LoGraConfig(dtype={wider!r}).",
                        UserWarning,
                        stacklevel=4,
                    )
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
            self._failure = f"{action}: {_describe(exc) if isinstance(exc, OSError) else repr(exc)[:300]}"
            with contextlib.suppress(OSError):
                self.discard_pending()
            if isinstance(exc, OSError) and not isinstance(exc, LograError):
                raise StoreError(
                    f"cannot write the store at {self.root}: {action} failed with {_describe(exc)}. "
                    "Every shard committed "
                    "before is intact and readable; free space (or fix the cause), then resume with a new "
                    "GradientLogger on the same store and config: committed ids are skipped."
                ) from exc
            raise


def _describe(exc: OSError) -> str:
    name = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    where = f" on {exc.filename}" if exc.filename else ""
    return f"{name + ' ' if name else ''}({exc.strerror or exc}){where}"


def _check_process_count(root: Path, rank: int, world_size: int) -> None:
    """Refuse to mix single- and multi-process writers, which would delete each other's shards."""
    ranked = sorted(p.name for p in root.glob("manifest-rank-*.json")) if root.is_dir() else []
    if world_size == 1 and ranked:
        raise StoreError(
            f"the store at {root} was logged by several processes ({', '.join(ranked)}); resume it with the same "
            "number of processes (GradientLogger(..., rank=r, world_size=W)), or log into a new directory."
        )
    if world_size > 1 and not (root / rank_manifest_name(rank)).exists() and (root / MANIFEST).exists():
        prefix = f"shard-{rank:03d}-"
        if any(s.file.startswith(prefix) for s in read_manifest(root).shards):
            raise StoreError(
                f"the store at {root} holds shards of rank {rank} but no {rank_manifest_name(rank)}: it was logged by "
                "a single process. Resume it with one process, or log into a new directory."
            )
