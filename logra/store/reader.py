"""Reading a committed gradient store: `GradientStore`, `verify()` and `check_compatible`.

A `GradientStore` is a snapshot: it reads the manifest once and sees exactly the shards that
manifest names, even while a writer keeps appending (committed shards are never rewritten). At
open, every shard's size, id file (with its checksum), float16 scales and the statistics file
(with its checksum) are checked; the rows themselves are checksummed only by `verify()`, which
reads the whole store. Shards are memory-mapped on demand, one at a time, never loaded whole.
Nothing is unpickled: ids are JSON, statistics are an .npz read with `allow_pickle=False`,
shards are raw arrays.
"""

from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np
import torch
from torch import Tensor

from logra.config import LoGraConfig, StorageDtype
from logra.errors import ConfigError, StoreCorruptedError, StoreError
from logra.store.encoding import NUMPY_DTYPES, decode_rows, output_dtype
from logra.store.files import read_regular, sha256_file
from logra.store.gather import random_reader, read_all, runs
from logra.store.ids import ExampleIds
from logra.store.manifest import MANIFEST, Manifest, ShardInfo, load_manifest, parse_ids_file, read_manifest_bytes
from logra.store.statistics import parse_statistics
from logra.types import ExampleId, KroneckerStatistics, LayerInfo

if TYPE_CHECKING:  # the logger (capture) writes through this package: no import at run time
    from logra.capture.logger import GradientLogger


class LoggedRows(Protocol):
    """Rows with their provenance (a capture `Record` or `QueryRows`): what `check_compatible` reads."""

    rows: Tensor | None
    config: LoGraConfig | None
    model_fingerprint: str | None
    layers: tuple[LayerInfo, ...] | None


_OPEN_SECONDS = 120.0  # how long `open` follows a writer that keeps replacing the manifest


def _read_file(path: Path, what: str, size: int) -> bytes:
    """The `size` bytes of a regular file named by the manifest (nothing else is read)."""
    try:
        raw = read_regular(path, size, what)
    except StoreError as exc:
        raise StoreCorruptedError(f"{exc} It does not match the manifest; restore it or re-log the store.") from None
    except FileNotFoundError:
        raise StoreCorruptedError(
            f"{path}: {what} named by the manifest is missing; restore it or re-log the store."
        ) from None
    except OSError as exc:
        raise StoreError(f"{path}: {what} cannot be read ({exc.strerror or exc}).") from None
    return raw


def read_shard_ids(root: Path, shard: ShardInfo) -> list[ExampleId]:
    """The ids of one committed shard, checked against the manifest's checksum and row count."""
    path = root / shard.ids_file
    raw = _read_file(path, f"the id file of shard {shard.file}", shard.ids_bytes)
    if len(raw) != shard.ids_bytes:
        raise StoreCorruptedError(
            f"{path}: holds {len(raw)} bytes, but the manifest says {shard.ids_bytes}; restore it or re-log the store."
        )
    return parse_ids_file(raw, path, shard)


def _read_scales(root: Path, shard: ShardInfo) -> np.ndarray:
    path = root / str(shard.scales_file)
    raw = _read_file(path, f"the float16 scales of shard {shard.file}", 4 * shard.rows)
    if hashlib.sha256(raw).hexdigest() != shard.scales_sha256 or len(raw) != 4 * shard.rows:
        raise StoreCorruptedError(
            f"{path}: checksum or size mismatch ({len(raw)} bytes for {shard.rows} rows); the scales were altered "
            "after commit. Restore the file or re-log the store."
        )
    scales = np.frombuffer(raw, dtype="<f4").copy()
    if not (np.isfinite(scales).all() and (scales > 0).all()):
        raise StoreCorruptedError(f"{path}: holds scales that are not positive finite numbers; re-log the store.")
    return scales


def _check_shard_size(root: Path, shard: ShardInfo, dim: int, dtype: StorageDtype) -> None:
    path = root / shard.file
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise StoreCorruptedError(
            f"{path}: shard listed in the manifest is missing; restore it or re-log the store."
        ) from None
    expected = shard.rows * dim * dtype.itemsize
    if size != expected or not path.is_file():
        raise StoreCorruptedError(
            f"{path}: holds {size} bytes but the manifest says {shard.rows} rows x D={dim} x {dtype.itemsize} bytes "
            f"= {expected}; the shard is truncated or altered. Restore it or re-log the store."
        )


def _load_statistics(root: Path, manifest: Manifest, rows: int) -> dict[str, KroneckerStatistics]:
    assert manifest.statistics is not None  # checked by the caller
    name, digest, size = manifest.statistics
    path = root / name
    raw = _read_file(path, "the statistics file", size)
    if len(raw) != size or hashlib.sha256(raw).hexdigest() != digest:
        raise StoreCorruptedError(
            f"{path}: size or checksum mismatch ({len(raw)} bytes, the manifest says {size}); the statistics were "
            "altered after commit. Re-log the store."
        )
    return parse_statistics(raw, path, manifest.layers, rows)


class GradientStore:
    """Read-only snapshot of a committed store. Shards are memory-mapped on demand, never loaded whole.

    Attributes:
        ids: the N example ids in row order (`ExampleIds`, a compact sequence).  layers: the layer table.  dim: D.
        config: the LoGraConfig the rows were logged with.  dtype: the storage dtype.
        skipped: ids logged but dropped for NaN/Inf (`nonfinite="skip"`).

    Rows come back in the storage dtype as zero-copy views, except for float16 stores: their rows
    are rescaled by the per-row scales and returned as float32 copies (see `logra.encoding`).
    """

    def __init__(
        self, root: str | os.PathLike[str], manifest: Manifest, *, statistics_rows: int | None = None
    ) -> None:
        """A snapshot of `manifest`; `statistics_rows`: the rows its statistics count (default: its
        own rows; a view of some shards of a store passes the whole store's)."""
        self.root = Path(root)
        self.manifest = manifest
        self.config: LoGraConfig = manifest.config
        self.layers: tuple[LayerInfo, ...] = manifest.layers
        self.dim = manifest.dim
        self.dtype = manifest.dtype
        self.skipped: tuple[ExampleId, ...] = manifest.skipped
        self.ids = ExampleIds()
        self._scales: list[np.ndarray | None] = []
        for shard in manifest.shards:
            _check_shard_size(self.root, shard, self.dim, self.dtype)
            self.ids.append(read_shard_ids(self.root, shard))
            self._scales.append(_read_scales(self.root, shard) if self.dtype is StorageDtype.FLOAT16 else None)
        if self.ids.has_duplicates(self.skipped):
            raise StoreCorruptedError(
                f"{self.root}: the same example id appears in two rows (or both as a row and as skipped); "
                "the store was assembled wrongly. Re-log it."
            )
        rows = manifest.total_rows if statistics_rows is None else statistics_rows
        self._statistics = _load_statistics(self.root, manifest, rows) if manifest.statistics is not None else None
        self._manifest_name = MANIFEST  # the file `open` read the manifest from
        self._starts = np.cumsum([0] + [s.rows for s in manifest.shards])

    @classmethod
    def open(cls, root: str | os.PathLike[str], manifest_name: str = MANIFEST) -> GradientStore:
        """Open a store for reading: a consistent snapshot of what is committed at this instant.

        A writer keeps the statistics file of the previous manifest until its next commit, so a
        snapshot rarely loses a file; a reader that does (it was slower than two commits) finds the
        manifest replaced and moves to the new one. A file that is missing or damaged while the
        manifest stays the same is corruption, and raises.
        """
        path = Path(root)
        deadline = time.monotonic() + _OPEN_SECONDS
        replaced = 0
        while True:
            raw = read_manifest_bytes(path, manifest_name)
            try:
                store = cls(path, load_manifest(raw, path / manifest_name))
                store._manifest_name = manifest_name
                return store
            except StoreCorruptedError:
                if read_manifest_bytes(path, manifest_name) == raw:
                    raise  # the manifest did not change: the defect is real
                replaced += 1
                if time.monotonic() > deadline:
                    raise StoreError(
                        f"{path / manifest_name}: a writer replaced the manifest {replaced} times while this reader "
                        f"opened the store ({_OPEN_SECONDS:.0f} s); the store is healthy but busy. Open it again."
                    ) from None

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_rows(self) -> int:
        return len(self)

    @property
    def model_fingerprint(self) -> str:
        return self.manifest.model_fingerprint

    @property
    def fingerprint(self) -> str:
        """The SHA-256 of this snapshot's signed manifest, which names the checksum of every file."""
        return str(self.manifest.to_dict()["manifest_sha256"])

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise StoreError(
            f"layer {name!r} is not in the store at {self.root}; it holds {[x.name for x in self.layers]}."
        )

    def _map(self, index: int) -> np.ndarray:
        """Shard `index` as a copy-on-write memory map (n, D) in the storage dtype."""
        shard = self.manifest.shards[index]
        path = self.root / shard.file
        try:
            return np.memmap(path, dtype=NUMPY_DTYPES[self.dtype], mode="c", shape=(shard.rows, self.dim))
        except (OSError, ValueError) as exc:
            raise StoreCorruptedError(
                f"{path}: cannot be mapped ({exc}); it was removed or truncated after open."
            ) from None

    def _decode(self, index: int, array: np.ndarray, lo: int, hi: int) -> Tensor:
        """Rows [lo, hi) of shard `index` from its map: a view (a float32 copy for float16)."""
        scales = self._scales[index]
        return decode_rows(array[lo:hi], self.dtype, None if scales is None else scales[lo:hi])

    def iter_chunks(self, chunk_rows: int = 4096) -> Iterator[tuple[int, Tensor]]:
        """Yield (first_row, rows (n, D)) in row order, never crossing a shard.

        Views of the memory map (no copy), except float16 stores: float32 rescaled copies. The
        kernel is told that each map is read sequentially, and to read the next chunk ahead.
        """
        if not isinstance(chunk_rows, int) or isinstance(chunk_rows, bool) or chunk_rows < 1:
            raise StoreError(f"chunk_rows={chunk_rows!r} must be a positive int.")
        row_bytes = self.dim * self.dtype.itemsize
        for index, shard in enumerate(self.manifest.shards):
            if not shard.rows:
                continue
            array = self._map(index)  # one map per shard, so its chunks are consecutive views
            _advise(array, "MADV_SEQUENTIAL", 0, shard.rows * row_bytes)
            for i in range(0, shard.rows, chunk_rows):
                hi = min(i + chunk_rows, shard.rows)
                _advise(array, "MADV_WILLNEED", hi * row_bytes, (min(hi + chunk_rows, shard.rows) - hi) * row_bytes)
                yield int(self._starts[index]) + i, self._decode(index, array, i, hi)

    def rows(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows [start, stop) as one (n, D) tensor (copied when they span shards)."""
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise StoreError(f"row range [{start}, {stop}) is outside the store's {len(self)} rows.")
        parts = []
        for index, shard in enumerate(self.manifest.shards):
            s = int(self._starts[index])
            lo, hi = max(start - s, 0), min(stop - s, shard.rows)
            if lo < hi:
                parts.append(self._decode(index, self._map(index), lo, hi))
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.zeros(0, self.dim, dtype=output_dtype(self.dtype))

    def take(self, rows: Sequence[int] | Tensor) -> Tensor:
        """The rows at the given row indices, in that order: (m, D), copied.

        Each distinct row is read once, in shard and offset order, with `pread` of just its bytes
        (the files are opened with POSIX_FADV_RANDOM, so the kernel reads no neighbours around
        them) from up to `gather.TAKE_THREADS` threads, which keep several reads in flight on the disk.
        """
        index = torch.as_tensor(rows, dtype=torch.long).flatten()
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < len(self)):
            raise StoreError(f"row indices must lie in [0, {len(self)}), got {int(index.min())}..{int(index.max())}.")
        unique, inverse = np.unique(index.numpy(), return_inverse=True)  # sorted: by shard, then offset
        raw = np.empty((unique.size, self.dim), dtype=NUMPY_DTYPES[self.dtype])
        shard_of = np.searchsorted(self._starts, unique, side="right") - 1
        cuts = np.searchsorted(shard_of, np.arange(len(self.manifest.shards) + 1))  # shard s: unique[cuts[s]:cuts[s+1]]
        parts = []
        with contextlib.ExitStack() as files:
            reads: list[tuple[int, np.ndarray, int]] = []
            for s in np.flatnonzero(np.diff(cuts)).tolist():
                a, b = int(cuts[s]), int(cuts[s + 1])
                local = unique[a:b] - int(self._starts[s])
                fd = files.enter_context(random_reader(self.root / self.manifest.shards[s].file))
                reads += runs(fd, local, raw[a:b], self.dim * raw.itemsize)
                scales = self._scales[s]
                parts.append((a, b, None if scales is None else scales[local]))
            read_all(reads)
        if not parts:
            return torch.empty(0, self.dim, dtype=output_dtype(self.dtype))
        if self.dtype is StorageDtype.FLOAT16:  # rescaled per row, with each shard's scales
            decoded = torch.cat([decode_rows(raw[a:b], self.dtype, scales) for a, b, scales in parts])
        else:
            decoded = decode_rows(raw, self.dtype, None)  # a view of `raw`
        return decoded[torch.from_numpy(inverse).flatten()]

    def layer_rows(self, name: str, start: int = 0, stop: int | None = None) -> Tensor:
        """One layer's columns of rows [start, stop): (n, k_out * k_in)."""
        layer = self.layer(name)
        return self.rows(start, stop)[:, layer.offset : layer.offset + layer.size]

    def statistics(self) -> dict[str, KroneckerStatistics]:
        """The Kronecker sums of the committed rows, per layer (float64 copies)."""
        if self._statistics is None:
            raise StoreError(
                f"the store at {self.root} has no statistics: it was logged with "
                "GradientLogger(..., statistics=False). "
                "Re-log it with statistics=True to use the kfac/ekfac preconditioners."
            )
        return {name: s.copy() for name, s in self._statistics.items()}

    def verify(self) -> None:
        """Check the whole store against the checksums recorded at commit (reads every byte).

        Raises StoreCorruptedError naming the first missing, truncated or altered file.
        """
        for shard in self.manifest.shards:
            _check_shard_size(self.root, shard, self.dim, self.dtype)
            named = [(shard.file, shard.sha256), (shard.ids_file, shard.ids_sha256)]
            if shard.scales_file is not None and shard.scales_sha256 is not None:
                named.append((shard.scales_file, shard.scales_sha256))
            for name, digest in named:
                _verify_file(self.root / name, digest)
        if self.manifest.statistics is not None:
            name, digest, _ = self.manifest.statistics
            if (self.root / name).exists() or not self._superseded():
                _verify_file(self.root / name, digest)
            # else: a writer committed since open and dropped this snapshot's statistics file; its
            # content was checked against the same digest when this snapshot loaded it.

    def _superseded(self) -> bool:
        """Whether the manifest on disk is no longer the one this snapshot was opened from."""
        try:
            name = self._manifest_name
            current = load_manifest(read_manifest_bytes(self.root, name), self.root / name)
        except StoreError:
            return False
        return current.statistics != self.manifest.statistics


def _advise(array: np.ndarray, advice: str, offset: int, length: int) -> None:
    """madvise(mmap.<advice>) over bytes [offset, offset + length) of a shard map (pages rounded out).

    A hint only: where the platform lacks madvise (or a zero-length range) nothing is done,
    which changes speed, never results.
    """
    region = getattr(array, "_mmap", None)  # np.memmap's mmap.mmap object
    flag = getattr(mmap, advice, None)
    if region is None or flag is None or length <= 0 or not hasattr(region, "madvise"):
        return
    start = offset - offset % mmap.PAGESIZE
    region.madvise(flag, start, min(offset + length, len(region)) - start)


def _verify_file(path: Path, digest: str) -> None:
    try:
        actual = sha256_file(path)
    except FileNotFoundError:
        raise StoreCorruptedError(f"{path}: missing; restore it or re-log the store.") from None
    except OSError as exc:
        raise StoreError(f"{path}: cannot be read ({exc.strerror or exc}).") from None
    if actual != digest:
        raise StoreCorruptedError(
            f"{path}: checksum mismatch; the file was altered after commit. Restore it or re-log the store."
        )


# --------------------------------------------------------------------------------------------
# Joining artifacts.


def check_compatible(
    store: GradientStore,
    other: GradientStore | GradientLogger | LoGraConfig | LoggedRows,
    *,
    check_model: bool = True,
) -> None:
    """Raise ConfigError unless rows logged by `other` can be scored against `store`.

    Args:
        store: the training store.
        other: a GradientLogger (the query side), another GradientStore, a `Record` or `QueryRows`
            of query rows, or a bare LoGraConfig.
        check_model: also require the same model weights (model fingerprint), when `other` has one.
            Pass False to score, on purpose, with a copy of the model in another dtype.

    The projection-relevant config (seed, init, sizes, layer patterns, bias) and the layer table
    must agree; the storage dtype, loss reduction and NaN policy may differ.
    """
    config = other if isinstance(other, LoGraConfig) else getattr(other, "config", None)
    if not isinstance(config, LoGraConfig):
        raise ConfigError(
            "check_compatible needs a GradientLogger, GradientStore, Record, QueryRows or LoGraConfig, "
            f"got {type(other).__name__}."
        )
    if config.projection_fingerprint() != store.config.projection_fingerprint():
        ours, theirs = store.config.to_dict(), config.to_dict()
        diff = {
            k: (v, theirs[k])
            for k, v in ours.items()
            if theirs[k] != v and k not in ("dtype", "loss_reduction", "nonfinite")
        }
        raise ConfigError(
            f"the query was logged with another config than the store at {store.root}: "
            f"(store, query) differ in {diff}. "
            "The projections would not match; log the queries with LoGraConfig.from_dict(store.config.to_dict())."
        )
    layers = getattr(other, "layers", None)
    if layers is not None and tuple(layers) != tuple(store.layers):
        n = max(len(layers), len(store.layers))
        padded = [list(t) + [None] * (n - len(t)) for t in (store.layers, layers)]
        mismatch = next((a, b) for a, b in zip(*padded) if a != b)
        raise ConfigError(
            f"the query's layer table differs from the store at {store.root}: "
            f"store {mismatch[0]} vs query {mismatch[1]}. "
            "Log the queries with the same model architecture."
        )
    fingerprint = getattr(other, "model_fingerprint", None)
    if check_model and isinstance(fingerprint, str) and fingerprint != store.model_fingerprint:
        raise ConfigError(
            f"the query was logged with other model weights (fingerprint {fingerprint}) than the store at {store.root} "
            f"({store.model_fingerprint}); log both with the same model, or pass check_model=False on purpose."
        )
