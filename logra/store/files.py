"""Durable file I/O: the one way logra writes a file, and the one streaming SHA-256.

`write_durable` writes a temp file beside the target, fsyncs it, renames it over the target and
fsyncs the directory, so the target holds either its old or its whole new content, even after
SIGKILL or a power cut. A failure (ENOSPC, EIO, an interrupt) removes the temp file and leaves
the target as it was. Every file logra writes (manifests, shards' ids, statistics,
preconditioners, CLI settings, checkpoint lists) goes through it or through `write_atomic`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from logra.errors import StoreError

TMP_SUFFIX = ".tmp"


def fsync_dir(path: Path) -> None:
    """Make the directory entries of `path` (renames, creations) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: str | os.PathLike[str], write: Callable[[BinaryIO], object]) -> None:
    """Write `path` through `write(file)` on a temp file: temp, fsync, rename, fsync of the directory.

    On any error the temp file is removed and the old `path` (if any) is untouched; the error
    propagates unchanged for the caller to describe.
    """
    path = Path(path)
    tmp = path.with_name(path.name + TMP_SUFFIX)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | os.PathLike[str], data: bytes) -> None:
    """Write the bytes `data` to `path` durably (see `write_durable`)."""
    write_durable(path, lambda f: f.write(data))


def json_checksum(data: dict[str, Any], skip: str) -> str:
    """SHA-256 of the canonical JSON of `data` without its field `skip` (the signature of a JSON file)."""
    body = {k: v for k, v in data.items() if k != skip}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def read_regular(path: str | os.PathLike[str], limit: int, what: str) -> bytes:
    """The bytes of the regular file `path`, refusing anything else and anything over `limit` bytes.

    A FIFO, a device (e.g. a symlink to /dev/zero), a directory or an over-long file raises
    `StoreError` naming `path` before anything is read, so a read never hangs and never grows past
    `limit`. A missing file raises FileNotFoundError for the caller to describe.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)  # O_NONBLOCK: opening a FIFO does not wait for a writer
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise StoreError(f"{path}: {what} is not a regular file (a FIFO, device or directory); it is not read.")
        if info.st_size > limit:
            raise StoreError(f"{path}: {what} holds {info.st_size} bytes, more than the {limit} expected; not read.")
        with os.fdopen(fd, "rb", closefd=False) as f:
            data = f.read(limit + 1)
    finally:
        os.close(fd)
    if len(data) > limit:
        raise StoreError(f"{path}: {what} grew past the {limit} bytes expected while it was read.")
    return data


def free_bytes(path: str | os.PathLike[str]) -> int | None:
    """Bytes free for writing in the directory of `path`, when the file system says."""
    try:
        return shutil.disk_usage(Path(path).parent).free
    except OSError:
        return None


def no_space(path: str | os.PathLike[str], needed: int | None, exc: OSError) -> StoreError:
    """The StoreError of a write of `needed` bytes to `path` that failed with `exc` (ENOSPC, EIO, ...)."""
    name = errno.errorcode.get(exc.errno or 0, "OSError")
    free = free_bytes(path)
    room = f", {free} bytes are free" if free is not None else ""
    size = f"{needed} bytes" if needed else "the file"
    full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    fix = "Free space (or choose another path)" if full else "Check the path and its permissions"
    return StoreError(
        f"{path}: cannot write {size} ({name}: {exc.strerror or exc}{room}); nothing was left behind. "
        f"{fix} and run again."
    )


def preallocate(f: BinaryIO, size: int) -> None:
    """Reserve `size` bytes for the open file `f`, so a memory map of it can never hit a full disk.

    Uses posix_fallocate (glibc writes the blocks itself where the file system lacks it); where
    the call is missing, the file is written with zeros in 4 MiB blocks. Raises OSError (ENOSPC)
    when the space is not there.
    """
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(f.fileno(), 0, size)
            return
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
    f.seek(0)
    block = bytes(1 << 22)
    for start in range(0, size, len(block)):
        f.write(block[: min(len(block), size - start)])
    f.flush()


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a file, read in 4 MiB blocks (memory does not grow with the file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
