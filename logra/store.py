"""The on-disk gradient store: a manifest, row shards, id lists and Kronecker statistics.

Layout of a store directory::

    manifest.json                  format version, config, fingerprints, layer table, shards, stats
    shard-RRR-NNNNNN.bin           rows [n, D] in the storage dtype, C order, no header (np.memmap)
    shard-RRR-NNNNNN.ids.json      the n example ids of that shard, in row order
    statistics-RRR-NNNNNN.npz      float64 Kronecker sums matching exactly the committed rows

Commit protocol (crash safety): rows are appended to `shard-….bin.tmp`; at commit the shard, its
ids and the statistics are written to temp files, fsynced and renamed, and only then is the
manifest replaced (temp, fsync, rename, fsync of the directory). A reader therefore sees whole
committed shards or nothing; files the manifest does not name are leftovers, which readers ignore
and a resuming writer deletes. Nothing is ever unpickled: ids are JSON, statistics are loaded with
`allow_pickle=False`, shards are raw memory maps. File names in a manifest must match the naming
pattern above, so a hand-edited manifest cannot point outside the store directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from logra.capture import LayerInfo
from logra.config import LoGraConfig, StorageDtype
from logra.errors import ConfigError, DuplicateIdError, StoreCorruptedError, StoreError
from logra.statistics import KroneckerStatistics, statistics_from_arrays, statistics_to_arrays

FORMAT = "logra-gradient-store"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
_SHARD_RE = re.compile(r"^shard-\d{3}-\d{6}\.bin$")
_IDS_RE = re.compile(r"^shard-\d{3}-\d{6}\.ids\.json$")
_STATS_RE = re.compile(r"^statistics-\d{3}-\d{6}\.npz$")
_NUMPY_DTYPES = {
    StorageDtype.FLOAT32: np.float32,
    StorageDtype.FLOAT64: np.float64,
    StorageDtype.FLOAT16: np.float16,
    StorageDtype.BFLOAT16: np.uint16,  # raw bfloat16 bits; viewed as torch.bfloat16 on read
}
_TORCH_DTYPES = {
    StorageDtype.FLOAT32: torch.float32,
    StorageDtype.FLOAT64: torch.float64,
    StorageDtype.FLOAT16: torch.float16,
    StorageDtype.BFLOAT16: torch.bfloat16,
}

ExampleId = int | str


# --------------------------------------------------------------------------------------------
# Small durable-file helpers.


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that `path` holds either the old or the whole new content."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def normalize_ids(ids: Any) -> list[ExampleId]:
    """Ids as a list of Python ints or strs. Accepts a list, a 1-D tensor or a numpy array."""
    if isinstance(ids, Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex():
            raise StoreError(f"ids tensor of shape {tuple(ids.shape)} and dtype {ids.dtype} must be 1-D integer.")
        return [int(i) for i in ids.tolist()]
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise StoreError(f"ids={ids!r} must be a sequence of ints or strs, one per example of the batch.")
    out: list[ExampleId] = []
    for i in ids:
        if isinstance(i, (bool, np.bool_)):
            raise StoreError(f"example id {i!r} is a bool; use ints or strs.")
        if isinstance(i, (int, np.integer)):
            out.append(int(i))
        elif isinstance(i, str):
            out.append(i)
        else:
            raise StoreError(f"example id {i!r} of type {type(i).__name__} must be an int or a str.")
    return out


def _check_unique(ids: list[ExampleId], known: set[ExampleId] | frozenset[ExampleId], where: str) -> None:
    seen: set[ExampleId] = set()
    dup = [i for i in ids if i in known or i in seen or seen.add(i)]  # type: ignore[func-returns-value]
    if dup:
        raise DuplicateIdError(
            f"example ids {dup[:10]}{' ...' if len(dup) > 10 else ''} are already in {where}; every example "
            "must be logged once. On resume, skip the ids in logger.committed_ids."
        )


# --------------------------------------------------------------------------------------------
# The manifest: parsing is strict, so a damaged or hostile manifest gives a StoreCorruptedError.


@dataclass(frozen=True)
class ShardInfo:
    file: str
    ids_file: str
    rows: int
    sha256: str
    ids_sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "ids": self.ids_file, "rows": self.rows,
                "sha256": self.sha256, "ids_sha256": self.ids_sha256}  # fmt: skip


@dataclass(frozen=True)
class Manifest:
    config: LoGraConfig
    model_fingerprint: str
    dtype: StorageDtype
    layers: tuple[LayerInfo, ...]
    shards: tuple[ShardInfo, ...]
    statistics: tuple[str, str] | None  # (file, sha256)
    skipped: tuple[ExampleId, ...]

    @property
    def dim(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "config_fingerprint": self.config.fingerprint(),
            "model_fingerprint": self.model_fingerprint,
            "dtype": self.dtype.value,
            "dim": self.dim,
            "layers": [layer.to_dict() for layer in self.layers],
            "shards": [s.to_dict() for s in self.shards],
            "total_rows": self.total_rows,
            "statistics": None if self.statistics is None else {"file": self.statistics[0], "sha256": self.statistics[1]},
            "skipped": list(self.skipped),
        }


def _bad(path: Path, why: str) -> StoreCorruptedError:
    return StoreCorruptedError(
        f"{path}: {why}. The manifest is damaged or was edited by hand; restore it or re-log the store."
    )


def _get(d: Any, key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise _bad(path, f"missing field {key!r}")
    value = d[key]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise _bad(path, f"field {key!r}={value!r:.80} has type {type(value).__name__}")
    return value


def _nonneg(value: int, key: str, path: Path) -> int:
    if value < 0:
        raise _bad(path, f"field {key!r}={value} is negative")
    return value


def parse_manifest(data: Any, path: Path) -> Manifest:
    """Validate a decoded manifest. Raises StoreCorruptedError naming `path` on any defect."""
    if _get(data, "format", str, path) != FORMAT:
        raise _bad(path, f"format {data['format']!r} is not {FORMAT!r}")
    version = _get(data, "format_version", int, path)
    if version != FORMAT_VERSION:
        raise StoreCorruptedError(f"{path}: store format version {version} is not supported (this logra reads {FORMAT_VERSION}).")
    try:
        config = LoGraConfig.from_dict(_get(data, "config", dict, path))
    except ConfigError as exc:
        raise _bad(path, f"invalid config ({exc})") from None
    if _get(data, "config_fingerprint", str, path) != config.fingerprint():
        raise _bad(path, "config_fingerprint does not match the config")
    try:
        dtype = StorageDtype(_get(data, "dtype", str, path))
    except ValueError:
        raise _bad(path, f"unknown dtype {data['dtype']!r}") from None
    layers: list[LayerInfo] = []
    offset = 0
    for raw in _get(data, "layers", list, path):
        ints = {k: _nonneg(_get(raw, k, int, path), k, path) for k in ("n_in", "n_out", "k_in", "k_out", "offset")}
        layer = LayerInfo(_get(raw, "name", str, path), _get(raw, "kind", str, path), bias=_get(raw, "bias", bool, path), **ints)
        if layer.offset != offset or layer.k_in < 1 or layer.k_out < 1:
            raise _bad(path, f"layer {layer.name!r} has offset {layer.offset} and size {layer.k_out}x{layer.k_in}; expected offset {offset}")
        offset += layer.size
        layers.append(layer)
    if not layers or len({layer.name for layer in layers}) != len(layers):
        raise _bad(path, "the layer table is empty or names a layer twice")
    if _get(data, "dim", int, path) != offset:
        raise _bad(path, f"dim {data['dim']} is not the sum of layer sizes {offset}")
    shards = []
    for raw in _get(data, "shards", list, path):
        shard = ShardInfo(
            _get(raw, "file", str, path), _get(raw, "ids", str, path),
            _nonneg(_get(raw, "rows", int, path), "rows", path),
            _get(raw, "sha256", str, path), _get(raw, "ids_sha256", str, path),
        )  # fmt: skip
        if not _SHARD_RE.match(shard.file) or not _IDS_RE.match(shard.ids_file):
            raise _bad(path, f"shard file names {shard.file!r}/{shard.ids_file!r} do not match the store's naming pattern")
        shards.append(shard)
    if len({s.file for s in shards}) != len(shards):
        raise _bad(path, "a shard is listed twice")
    if _get(data, "total_rows", int, path) != sum(s.rows for s in shards):
        raise _bad(path, f"total_rows {data['total_rows']} is not the sum of shard rows")
    stats_raw = data.get("statistics")
    statistics = None
    if stats_raw is not None:
        statistics = (_get(stats_raw, "file", str, path), _get(stats_raw, "sha256", str, path))
        if not _STATS_RE.match(statistics[0]):
            raise _bad(path, f"statistics file name {statistics[0]!r} does not match the store's naming pattern")
    skipped = _get(data, "skipped", list, path)
    if not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in skipped):
        raise _bad(path, "skipped ids must be ints or strs")
    return Manifest(
        config, _get(data, "model_fingerprint", str, path), dtype, tuple(layers), tuple(shards), statistics, tuple(skipped)
    )


def read_manifest(root: Path) -> Manifest:
    path = root / MANIFEST
    if not path.is_file():
        raise StoreError(f"{root} is not a gradient store: it has no {MANIFEST}. Log one with GradientLogger(..., store={str(root)!r}).")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise _bad(path, f"not valid JSON ({type(exc).__name__}: {exc})") from None
    return parse_manifest(data, path)


def _write_manifest(root: Path, manifest: Manifest) -> None:
    _write_atomic(root / MANIFEST, json.dumps(manifest.to_dict(), indent=1).encode())
    _fsync_dir(root)


def _to_storage(rows: Tensor, dtype: StorageDtype) -> np.ndarray:
    """(n, D) tensor -> contiguous numpy array in the storage dtype."""
    rows = rows.detach().to("cpu")
    if dtype is StorageDtype.BFLOAT16:
        return rows.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return np.ascontiguousarray(rows.to(_TORCH_DTYPES[dtype]).numpy())


def _from_storage(array: np.ndarray, dtype: StorageDtype) -> Tensor:
    if dtype is StorageDtype.BFLOAT16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


# --------------------------------------------------------------------------------------------
# Writer.


class StoreWriter:
    """Appends rows to a store, committing whole shards atomically; resumes a partial store.

    Args:
        root: the store directory (created when missing).
        config, model_fingerprint, layers: the header; a store that exists must have the same.
        shard_rows: a shard is committed at the first batch boundary where it holds this many rows.
        rank: the writer's rank; ranks write disjoint shard files.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        config: LoGraConfig,
        model_fingerprint: str,
        layers: Sequence[LayerInfo],
        shard_rows: int,
        rank: int = 0,
    ) -> None:
        if not isinstance(shard_rows, int) or shard_rows < 1:
            raise StoreError(f"shard_rows={shard_rows!r} must be a positive int.")
        self.root = Path(root)
        self.shard_rows = shard_rows
        self.rank = rank
        self.dtype = config.dtype
        self._np_dtype = _NUMPY_DTYPES[config.dtype]
        fresh = Manifest(config, model_fingerprint, config.dtype, tuple(layers), (), None, ())
        if (self.root / MANIFEST).exists():
            self.manifest = read_manifest(self.root)
            self._check_same_header(fresh)
        else:
            if self.root.exists() and not self.root.is_dir():
                raise StoreError(f"store path {self.root} exists and is not a directory; choose another path.")
            self.root.mkdir(parents=True, exist_ok=True)
            self.manifest = fresh
            _write_manifest(self.root, fresh)
        self._committed_ids: set[ExampleId] = set(self.manifest.skipped)
        for shard in self.manifest.shards:
            self._committed_ids.update(_read_ids(self.root, shard))
        self._remove_leftovers()
        self._pending_ids: list[ExampleId] = []
        self._pending_skipped: list[ExampleId] = []
        self._file: Any = None
        self._hash = hashlib.sha256()
        self._index = sum(1 for s in self.manifest.shards if s.file.startswith(f"shard-{rank:03d}-"))

    def _check_same_header(self, fresh: Manifest) -> None:
        old = self.manifest
        problems = []
        if old.config.fingerprint() != fresh.config.fingerprint():
            diff = {k: (v, fresh.config.to_dict()[k]) for k, v in old.config.to_dict().items() if fresh.config.to_dict()[k] != v}
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
        named = {MANIFEST} | {s.file for s in self.manifest.shards} | {s.ids_file for s in self.manifest.shards}
        if self.manifest.statistics is not None:
            named.add(self.manifest.statistics[0])
        mine = f"-{self.rank:03d}-"
        for p in self.root.iterdir():
            ours = p.name.endswith(".tmp") or _SHARD_RE.match(p.name) or _IDS_RE.match(p.name) or _STATS_RE.match(p.name)
            if ours and p.name not in named and (mine in p.name or p.name == MANIFEST + ".tmp"):
                p.unlink()

    @property
    def committed_ids(self) -> frozenset[ExampleId]:
        """Ids already durable in the store (and ids recorded as skipped)."""
        return frozenset(self._committed_ids)

    def check_new(self, ids: list[ExampleId]) -> None:
        """Raise DuplicateIdError if any id is committed, pending or repeated."""
        _check_unique(ids, self._committed_ids.union(self._pending_ids, self._pending_skipped), f"the store at {self.root}")

    def append(self, ids: list[ExampleId], rows: Tensor, skipped: Sequence[ExampleId] = ()) -> None:
        """Append (n, D) rows for `ids`; `skipped` ids are recorded as logged-but-dropped."""
        if rows.shape != (len(ids), self.manifest.dim):
            raise StoreError(f"rows of shape {tuple(rows.shape)} do not match {len(ids)} ids x D={self.manifest.dim}.")
        self.check_new(list(ids) + list(skipped))
        if self._file is None:
            self._file = open(self.root / (self._shard_name() + ".tmp"), "wb")
            self._hash = hashlib.sha256()
        data = _to_storage(rows, self.dtype).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._pending_ids.extend(ids)
        self._pending_skipped.extend(skipped)

    def _shard_name(self) -> str:
        return f"shard-{self.rank:03d}-{self._index:06d}.bin"

    def commit_if_full(self, statistics: dict[str, KroneckerStatistics] | None) -> None:
        if len(self._pending_ids) >= self.shard_rows:
            self.commit(statistics)

    def commit(self, statistics: dict[str, KroneckerStatistics] | None) -> None:
        """Make every appended row durable. `statistics` must cover exactly the committed rows."""
        if not self._pending_ids and not self._pending_skipped:
            return
        shards = list(self.manifest.shards)
        if self._pending_ids:
            name = self._shard_name()
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
            os.replace(self.root / (name + ".tmp"), self.root / name)
            ids_name = name[: -len(".bin")] + ".ids.json"
            ids_bytes = json.dumps(self._pending_ids).encode()
            _write_atomic(self.root / ids_name, ids_bytes)
            shards.append(ShardInfo(name, ids_name, len(self._pending_ids), self._hash.hexdigest(),
                                    hashlib.sha256(ids_bytes).hexdigest()))  # fmt: skip
            self._index += 1
        stats_entry = self.manifest.statistics
        if statistics is not None:
            stats_name = f"statistics-{self.rank:03d}-{self._index:06d}.npz"
            tmp = self.root / (stats_name + ".tmp")
            with open(tmp, "wb") as f:
                np.savez(f, **statistics_to_arrays(statistics))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.root / stats_name)
            stats_entry = (stats_name, _sha256_file(self.root / stats_name))
        old_stats = self.manifest.statistics
        self.manifest = Manifest(
            self.manifest.config, self.manifest.model_fingerprint, self.manifest.dtype, self.manifest.layers,
            tuple(shards), stats_entry, self.manifest.skipped + tuple(self._pending_skipped),
        )  # fmt: skip
        _write_manifest(self.root, self.manifest)
        self._committed_ids.update(self._pending_ids)
        self._committed_ids.update(self._pending_skipped)
        self._pending_ids, self._pending_skipped = [], []
        if old_stats is not None and stats_entry is not None and old_stats[0] != stats_entry[0]:
            (self.root / old_stats[0]).unlink(missing_ok=True)

    def discard_pending(self) -> None:
        """Forget uncommitted rows (their temp file is removed)."""
        if self._file is not None:
            self._file.close()
            self._file = None
            (self.root / (self._shard_name() + ".tmp")).unlink(missing_ok=True)
        self._pending_ids, self._pending_skipped = [], []


def _read_ids(root: Path, shard: ShardInfo) -> list[ExampleId]:
    path = root / shard.ids_file
    try:
        ids = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StoreCorruptedError(f"{path}: the id file of shard {shard.file} is missing; restore it or re-log the store.") from None
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise StoreCorruptedError(f"{path}: not a valid id list ({exc}); restore it or re-log the store.") from None
    if not isinstance(ids, list) or len(ids) != shard.rows:
        n = len(ids) if isinstance(ids, list) else type(ids).__name__
        raise StoreCorruptedError(f"{path}: holds {n} ids but the manifest says shard {shard.file} has {shard.rows} rows.")
    if not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in ids):
        raise StoreCorruptedError(f"{path}: ids must be ints or strs.")
    return ids


# --------------------------------------------------------------------------------------------
# Reader.


class GradientStore:
    """Read-only view of a committed store. Shards are memory-mapped, never loaded whole.

    Attributes:
        ids: the N example ids in row order.  layers: the layer table.  dim: D.
        config: the LoGraConfig the rows were logged with.
    """

    def __init__(self, root: Path, manifest: Manifest) -> None:
        self.root = root
        self.manifest = manifest
        self.config = manifest.config
        self.layers = manifest.layers
        self.dim = manifest.dim
        self.dtype = manifest.dtype
        self._maps: list[np.ndarray] = []
        self.ids: list[ExampleId] = []
        itemsize = manifest.dtype.itemsize
        for shard in manifest.shards:
            path = root / shard.file
            if not path.is_file():
                raise StoreCorruptedError(f"{path}: shard listed in the manifest is missing; restore it or re-log the store.")
            expected = shard.rows * self.dim * itemsize
            if path.stat().st_size != expected:
                raise StoreCorruptedError(
                    f"{path}: holds {path.stat().st_size} bytes but the manifest says {shard.rows} rows x D={self.dim} "
                    f"x {itemsize} bytes = {expected}; the shard is truncated or altered. Restore it or re-log the store."
                )
            self.ids.extend(_read_ids(root, shard))
            if shard.rows:
                self._maps.append(np.memmap(path, dtype=_NUMPY_DTYPES[self.dtype], mode="c", shape=(shard.rows, self.dim)))
            else:
                self._maps.append(np.zeros((0, self.dim), dtype=_NUMPY_DTYPES[self.dtype]))
        if len(set(self.ids)) != len(self.ids):
            raise StoreCorruptedError(f"{root}: the same example id appears in two rows; the store was assembled wrongly.")
        self._starts = np.cumsum([0] + [m.shape[0] for m in self._maps])

    @classmethod
    def open(cls, root: str | os.PathLike[str]) -> GradientStore:
        """Open a store for reading (what is committed at this instant)."""
        path = Path(root)
        return cls(path, read_manifest(path))

    def __len__(self) -> int:
        return int(self._starts[-1])

    @property
    def num_rows(self) -> int:
        return len(self)

    def layer(self, name: str) -> LayerInfo:
        for layer in self.layers:
            if layer.name == name:
                return layer
        raise StoreError(f"layer {name!r} is not in the store at {self.root}; it holds {[l.name for l in self.layers]}.")

    def iter_chunks(self, chunk_rows: int = 4096) -> Iterator[tuple[int, Tensor]]:
        """Yield (first_row, rows (n, D)) in row order; zero-copy views, never crossing a shard."""
        if not isinstance(chunk_rows, int) or chunk_rows < 1:
            raise StoreError(f"chunk_rows={chunk_rows!r} must be a positive int.")
        for start, array in zip(self._starts[:-1], self._maps):
            for i in range(0, array.shape[0], chunk_rows):
                yield int(start) + i, _from_storage(array[i : i + chunk_rows], self.dtype)

    def rows(self, start: int = 0, stop: int | None = None) -> Tensor:
        """Rows [start, stop) as one (n, D) tensor (copied when they span shards)."""
        stop = len(self) if stop is None else stop
        if not 0 <= start <= stop <= len(self):
            raise StoreError(f"row range [{start}, {stop}) is outside the store's {len(self)} rows.")
        parts = []
        for s, array in zip(self._starts[:-1], self._maps):
            lo, hi = max(start - s, 0), min(stop - s, array.shape[0])
            if lo < hi:
                parts.append(_from_storage(array[lo:hi], self.dtype))
        if len(parts) == 1:
            return parts[0]
        return torch.cat(parts) if parts else torch.zeros(0, self.dim, dtype=_TORCH_DTYPES[self.dtype])

    def layer_rows(self, name: str, start: int = 0, stop: int | None = None) -> Tensor:
        """One layer's columns of rows [start, stop): (n, k_out * k_in)."""
        layer = self.layer(name)
        return self.rows(start, stop)[:, layer.offset : layer.offset + layer.size]

    def statistics(self) -> dict[str, KroneckerStatistics]:
        """The Kronecker sums of the committed rows, per layer (float64)."""
        if self.manifest.statistics is None:
            raise StoreError(f"the store at {self.root} has no statistics; log it with LoGraConfig(statistics=True).")
        path = self.root / self.manifest.statistics[0]
        try:
            with np.load(path, allow_pickle=False) as npz:
                arrays = {k: npz[k] for k in npz.files}
            return statistics_from_arrays([layer.name for layer in self.layers], arrays)
        except (OSError, ValueError, KeyError) as exc:
            raise StoreCorruptedError(f"{path}: unreadable statistics ({exc}); re-log the store.") from None

    def verify(self) -> None:
        """Check every checksum recorded at commit; raise StoreCorruptedError naming the first bad file."""
        for shard in self.manifest.shards:
            for name, digest in ((shard.file, shard.sha256), (shard.ids_file, shard.ids_sha256)):
                if not (self.root / name).is_file():
                    raise StoreCorruptedError(f"{self.root / name}: missing; restore it or re-log the store.")
                if _sha256_file(self.root / name) != digest:
                    raise StoreCorruptedError(
                        f"{self.root / name}: checksum mismatch; the file was altered after commit. Restore it or re-log the store."
                    )
        if self.manifest.statistics is not None:
            name, digest = self.manifest.statistics
            if not (self.root / name).is_file() or _sha256_file(self.root / name) != digest:
                raise StoreCorruptedError(f"{self.root / name}: missing or checksum mismatch; re-log the store.")
