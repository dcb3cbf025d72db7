"""A full disk for tests: a 1 MiB tmpfs filled to the last byte where the machine allows mounting
one (root), otherwise a directory whose writes fail with ENOSPC (`open` and `posix_fallocate`
wrapped for paths under it).

    disk = FullDisk(...)      # the `full_disk` fixture, parametrised over the kinds available
    disk.root                 # write here
    with disk.full():         # ... and every write under root fails with ENOSPC
        ...
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def tmpfs_allowed(probe: Path) -> bool:
    """Whether this process may mount a tmpfs (root in a sandbox that allows it)."""
    probe.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
    if done.returncode != 0:
        return False
    subprocess.run(["umount", str(probe)], check=True)
    return True


class FullDisk:
    """`root` lives on a disk that `full()` fills (tmpfs) or makes fail (simulated)."""

    def __init__(self, root: Path, kind: str, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root, self.kind, self._mp = root, kind, monkeypatch
        root.mkdir(parents=True, exist_ok=True)
        if kind == "tmpfs":
            subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True)

    @contextlib.contextmanager
    def full(self) -> Iterator[None]:
        if self.kind == "tmpfs":
            filler = self.root / "filler"
            with open(filler, "wb", buffering=0) as f:
                for block in (1 << 16, 4096, 512, 1):
                    with contextlib.suppress(OSError):
                        while f.write(bytes(block)) == block:
                            pass
            try:
                yield
            finally:
                filler.unlink()
            return
        with self._mp.context() as mp:
            real_open, real_fallocate, root = builtins.open, os.posix_fallocate, str(self.root)

            def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
                if str(file).startswith(root) and any(c in mode for c in "wa+"):
                    f = real_open(file, mode, *args, **kwargs)
                    return _FailingWrites(f)
                return real_open(file, mode, *args, **kwargs)

            def fallocate(fd: int, offset: int, length: int) -> None:
                if os.readlink(f"/proc/self/fd/{fd}").startswith(root):
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                real_fallocate(fd, offset, length)

            mp.setattr(builtins, "open", open_)
            mp.setattr(os, "posix_fallocate", fallocate)
            yield

    def close(self) -> None:
        if self.kind == "tmpfs":
            subprocess.run(["umount", "-l", str(self.root)], check=False)


class _FailingWrites:
    """A file whose every write fails with ENOSPC (reads and the rest pass through)."""

    def __init__(self, f: Any) -> None:
        self._f = f

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._f.name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FailingWrites:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def leftovers(root: Path) -> list[str]:
    """Temp files and half-written outputs under `root` (the filler of a tmpfs excluded)."""
    return sorted(p.name for p in root.rglob("*") if p.name.endswith(".tmp"))
