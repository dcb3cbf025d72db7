"""Opening a store directory for writing: the checks and clean-up before a writer appends a row.

One writer per rank and store (an exclusive flock on `writer-RRR.lock`), the same number of
processes as the run that started the store, the same header (config, model, layer table) as
the committed manifest, and no leftovers: this rank's files that the manifest does not name are
an interrupted commit's and are deleted. `StoreWriter` (in `logra.store.writer`) runs these when
it opens a store; `describe_os_error` words an OSError for its messages.
"""

from __future__ import annotations

import errno
import os
import re
import warnings
import weakref
from pathlib import Path

from logra.errors import StoreError
from logra.store.files import TMP_SUFFIX
from logra.store.manifest import (
    IDS_RE,
    MANIFEST,
    SCALES_RE,
    SHARD_RE,
    STATS_RE,
    Manifest,
    rank_manifest_name,
    read_manifest,
)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows has no flock: one writer per store is then the user's duty
    fcntl = None  # type: ignore[assignment]
_NO_LOCKS = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}  # file systems without flock


def describe_os_error(exc: OSError) -> str:
    """`ENOSPC (No space left on device) on /path`: the errno name, its text and the file."""
    name = errno.errorcode.get(exc.errno, "") if exc.errno is not None else ""
    where = f" on {exc.filename}" if exc.filename else ""
    return f"{name + ' ' if name else ''}({exc.strerror or exc}){where}"


def acquire_lock(owner: object, root: Path, rank: int) -> weakref.finalize | None:
    """Hold an exclusive flock on `writer-RRR.lock` while `owner` lives: one writer per rank and store.

    Returns the finalizer that releases it (call it to release early), or None where the file
    system (or the platform) has no advisory locks.
    """
    if fcntl is None:
        return None
    path = root / f"writer-{rank:03d}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"another writer holds {path}: a process (or an open GradientLogger in this one) is already logging "
            f"rank {rank} into {root}. Close it first: two writers would overwrite each other's shards."
        ) from None
    except OSError as exc:
        os.close(fd)
        if exc.errno not in _NO_LOCKS:
            raise
        warnings.warn(
            f"cannot lock {path} ({describe_os_error(exc)}): this file system has no advisory locks, so make sure "
            f"that only one process writes rank {rank} of the store.",
            stacklevel=4,
        )
        return None
    return weakref.finalize(owner, os.close, fd)  # released on close(), or when the owner is collected


def check_process_count(root: Path, rank: int, world_size: int) -> None:
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


def check_same_header(root: Path, old: Manifest, fresh: Manifest) -> None:
    """Refuse to resume the store at `root` (manifest `old`) with another config, model or layer table."""
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
            f"cannot resume the store at {root}: {'; '.join(problems)}. Use the original config and model "
            "to resume, or log into a new directory."
        )


def _rank_of(pattern_match: re.Match[str] | None) -> str | None:
    return None if pattern_match is None else pattern_match.group(1)


def remove_leftovers(root: Path, manifest: Manifest, manifest_name: str, rank: int) -> None:
    """Delete rank `rank`'s files that `manifest` (saved as `manifest_name`) does not name (an interrupted commit's)."""
    named = {manifest_name} | {s.file for s in manifest.shards} | {s.ids_file for s in manifest.shards}
    named |= {s.scales_file for s in manifest.shards if s.scales_file is not None}
    if manifest.statistics is not None:
        named.add(manifest.statistics[0])
    mine = f"{rank:03d}"
    for p in root.iterdir():
        base = p.name[: -len(TMP_SUFFIX)] if p.name.endswith(TMP_SUFFIX) else p.name
        if p.name != base and base == manifest_name:
            p.unlink()
            continue
        ranks = {_rank_of(rx.fullmatch(base)) for rx in (SHARD_RE, IDS_RE, SCALES_RE, STATS_RE)}
        if mine in ranks and p.name not in named:
            p.unlink()
