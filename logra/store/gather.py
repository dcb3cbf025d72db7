"""Random reads of a few rows from shard files (`GradientStore.take`): only their bytes, many in flight.

A memory map faulting in one 2 KB row makes the kernel read ~128 KB around it; from a store larger
than RAM that made a 6,400-row gather cost as much as a whole pass. Here each shard is opened with
POSIX_FADV_RANDOM and each run of consecutive rows is one `preadv`, issued from a small thread pool.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from logra.errors import StoreCorruptedError


@contextlib.contextmanager
def random_reader(path: Path) -> Iterator[int]:
    """A file descriptor of the shard at `path` opened for random reads (no read-ahead), closed on exit."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as exc:
        raise StoreCorruptedError(f"{path}: cannot be opened ({exc.strerror}); removed after open?") from None
    try:
        if hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        yield fd
    finally:
        os.close(fd)


TAKE_THREADS = 16  # reads in flight in `take`: a disk serves random reads faster with a queue


def runs(fd: int, local: np.ndarray, out: np.ndarray, row_bytes: int) -> list[tuple[int, np.ndarray, int]]:
    """(fd, rows of `out`, byte offset) per run of consecutive rows in the sorted `local` [m]."""
    breaks = np.flatnonzero(np.diff(local) != 1) + 1
    starts, stops = np.concatenate([[0], breaks]), np.concatenate([breaks, [local.size]])
    return [(fd, out[a:b], int(local[a]) * row_bytes) for a, b in zip(starts.tolist(), stops.tolist())]


def read_all(reads: list[tuple[int, np.ndarray, int]]) -> None:
    """preadv each (fd, buffer, offset) fully, from up to TAKE_THREADS threads (the reads release the GIL)."""

    def run(batch: list[tuple[int, np.ndarray, int]]) -> None:
        for fd, buffer, offset in batch:
            view = buffer.data.cast("B")
            done = 0
            while done < len(view):
                n = os.preadv(fd, [view[done:]], offset + done)
                if n == 0:
                    raise StoreCorruptedError(
                        f"a shard ended at byte {offset + done}, before the rows the manifest names; it was "
                        "truncated after open. Restore it or re-log the store."
                    )
                done += n

    threads = min(TAKE_THREADS, len(reads))
    if threads <= 1:
        run(reads)
        return
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(run, [reads[i::threads] for i in range(threads)]))
