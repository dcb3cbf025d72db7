"""Durable file I/O: the one way logra writes a file, and the one streaming SHA-256.

`write_durable` writes a temp file beside the target, fsyncs it, renames it over the target and
fsyncs the directory, so the target holds either its old or its whole new content, even after
SIGKILL or a power cut. A failure (ENOSPC, EIO, an interrupt) removes the temp file and leaves
the target as it was. Every file logra writes (manifests, shards' ids, statistics,
preconditioners, CLI settings, checkpoint lists) goes through it or through `write_atomic`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

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


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The hex SHA-256 of a file, read in 4 MiB blocks (memory does not grow with the file)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
