"""The on-disk format of a gradient store: file names, the manifest, and durable writes.

A manifest is JSON. Parsing is strict: every field is type- and range-checked, file names must
match the store's naming patterns (so no name can leave the store directory: no separators, no
``..``, no absolute paths), and the manifest carries a SHA-256 of its own canonical JSON, so a
damaged or hand-edited manifest is refused with a `StoreCorruptedError` naming the file. Nothing
in a manifest is ever evaluated; the only decoder is `json.loads`.

`write_manifest` writes through `logra.store.files.write_atomic` (temp, fsync, rename, fsync of
the directory), so a manifest holds either its old or its whole new content.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logra.config import LoGraConfig, StorageDtype
from logra.errors import ConfigError, StoreCorruptedError, StoreError
from logra.store.files import fsync_dir, json_checksum, read_regular, write_atomic
from logra.types import ExampleId, LayerInfo

FORMAT = "logra-gradient-store"
FORMAT_VERSION = 5  # 2: input projections shared by default; 3: a side with k = width is the identity;
# 4: sizes of id and statistics files recorded, for bounded reads; 5: the config names its optimizer correction
# (its fingerprint covers the new field). No migration.
MANIFEST = "manifest.json"
MAX_COUNT = 2**53  # no width, size or row count in a manifest may exceed this
MAX_MANIFEST_BYTES = 2**30  # a manifest is read only when it is a regular file of at most this size
SHARD_RE = re.compile(r"shard-(\d{3,4})-(\d{6})\.bin", re.ASCII)
IDS_RE = re.compile(r"shard-(\d{3,4})-(\d{6})\.ids\.json", re.ASCII)
SCALES_RE = re.compile(r"shard-(\d{3,4})-(\d{6})\.scales\.bin", re.ASCII)
STATS_RE = re.compile(r"statistics-(\d{3,4}|all)-(\d{6})\.npz", re.ASCII)
RANK_MANIFEST_RE = re.compile(r"manifest-rank-\d{3,4}\.json", re.ASCII)
_SHA_RE = re.compile(r"[0-9a-f]{64}", re.ASCII)
_TOP_KEYS = {
    "format", "format_version", "config", "config_fingerprint", "model_fingerprint", "dtype", "dim", "layers",
    "shards", "total_rows", "statistics", "skipped", "manifest_sha256",
}  # fmt: skip
_SHARD_KEYS = {"file", "ids", "rows", "sha256", "ids_sha256", "ids_bytes", "scales", "scales_sha256"}


def shard_file_names(rank: int, index: int) -> tuple[str, str, str]:
    """(rows file, ids file, float16 scales file) of shard `index` of `rank`."""
    stem = f"shard-{rank:03d}-{index:06d}"
    return stem + ".bin", stem + ".ids.json", stem + ".scales.bin"


def rank_manifest_name(rank: int) -> str:
    """The manifest file of one rank of a multi-process store."""
    return f"manifest-rank-{rank:03d}.json"


# --------------------------------------------------------------------------------------------
# The manifest.


@dataclass(frozen=True)
class ShardInfo:
    """One committed shard: its files, row count and the SHA-256 of each file at commit.

    `scales_file` holds one float32 scale per row; it exists exactly for float16 stores.
    `ids_bytes` is the size of the id file, so a reader reads no more than that.
    """

    file: str
    ids_file: str
    rows: int
    sha256: str
    ids_sha256: str
    scales_file: str | None = None
    scales_sha256: str | None = None
    ids_bytes: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "ids": self.ids_file, "rows": self.rows, "sha256": self.sha256,
                "ids_sha256": self.ids_sha256, "ids_bytes": self.ids_bytes, "scales": self.scales_file,
                "scales_sha256": self.scales_sha256}  # fmt: skip


@dataclass(frozen=True)
class Manifest:
    """The decoded, validated content of a manifest file."""

    config: LoGraConfig
    model_fingerprint: str
    dtype: StorageDtype
    layers: tuple[LayerInfo, ...]
    shards: tuple[ShardInfo, ...]
    statistics: tuple[str, str, int] | None  # (file, sha256, bytes)
    skipped: tuple[ExampleId, ...]

    @property
    def dim(self) -> int:
        return sum(layer.size for layer in self.layers)

    @property
    def total_rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, including `manifest_sha256`, the checksum of everything else."""
        body = {
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
            "statistics": None
            if self.statistics is None
            else {"file": self.statistics[0], "sha256": self.statistics[1], "bytes": self.statistics[2]},
            "skipped": list(self.skipped),
        }
        body["manifest_sha256"] = manifest_checksum(body)
        return body


def manifest_checksum(data: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of `data` without its `manifest_sha256` field."""
    return json_checksum(data, "manifest_sha256")


def _bad(path: Path, why: str) -> StoreCorruptedError:
    return StoreCorruptedError(
        f"{path}: {why}. The manifest is damaged or was edited by hand; restore it or re-log the store."
    )


def _get(d: Any, key: str, kind: type | tuple[type, ...], path: Path) -> Any:
    if not isinstance(d, dict) or key not in d:
        raise _bad(path, f"missing field {key!r}")
    value = d[key]
    if not isinstance(value, kind) or (
        isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,))
    ):
        raise _bad(path, f"field {key!r}={str(value)[:80]!r} has type {type(value).__name__}")
    return value


def _count(d: Any, key: str, path: Path) -> int:
    value = _get(d, key, int, path)
    if not 0 <= value <= MAX_COUNT:
        shown = value if abs(value) < 10**30 else "a huge number"  # str() of a giant int can itself fail
        raise _bad(path, f"field {key!r}={shown} is outside [0, 2**53]")
    return int(value)


def _sha(d: Any, key: str, path: Path) -> str:
    value = _get(d, key, str, path)
    if not _SHA_RE.fullmatch(value):
        raise _bad(path, f"field {key!r}={value[:80]!r} is not a SHA-256 hex digest")
    return str(value)


def _name(d: Any, key: str, pattern: re.Pattern[str], path: Path) -> str:
    value = _get(d, key, str, path)
    if not pattern.fullmatch(value):
        raise _bad(path, f"file name {value[:80]!r} does not match the store's naming pattern {pattern.pattern!r}")
    return str(value)


def _check_ids(ids: Any, path: Path, what: str) -> tuple[ExampleId, ...]:
    if not isinstance(ids, list) or not all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in ids):
        raise StoreCorruptedError(
            f"{path}: {what} must be a JSON list of ints or strs; restore it or re-log the store."
        )
    if len(set(ids)) != len(ids):
        raise StoreCorruptedError(f"{path}: {what} names an example id twice; restore it or re-log the store.")
    return tuple(ids)


def _parse_header(data: Any, path: Path) -> tuple[LoGraConfig, StorageDtype]:
    if not isinstance(data, dict):
        raise _bad(path, f"the top level is a {type(data).__name__}, not a JSON object")
    if _get(data, "format", str, path) != FORMAT:
        raise _bad(path, f"format {str(data['format'])[:80]!r} is not {FORMAT!r}")
    version = _get(data, "format_version", int, path)
    if version != FORMAT_VERSION:
        raise StoreCorruptedError(
            f"{path}: store format version {str(version)[:20]} is not supported (this logra reads {FORMAT_VERSION}); "
            "log the store again with this version of logra."
        )
    unknown = sorted(set(data) - _TOP_KEYS)
    if unknown:
        raise _bad(path, f"unknown fields {[str(k)[:40] for k in unknown[:5]]}")
    try:
        expected = manifest_checksum(data)
    except (ValueError, TypeError, RecursionError):
        raise _bad(path, "the manifest holds values that are not plain JSON (NaN, Infinity, too deep)") from None
    if _sha(data, "manifest_sha256", path) != expected:
        raise _bad(path, "manifest_sha256 does not match the content")
    try:
        config = LoGraConfig.from_dict(_get(data, "config", dict, path))
    except ConfigError as exc:
        raise _bad(path, f"invalid config ({str(exc)[:300]})") from None
    if _get(data, "config_fingerprint", str, path) != config.fingerprint():
        raise _bad(path, "config_fingerprint does not match the config")
    try:
        dtype = StorageDtype(_get(data, "dtype", str, path))
    except ValueError:
        raise _bad(path, f"unknown dtype {str(data['dtype'])[:40]!r}") from None
    return config, dtype


def _parse_layers(data: dict[str, Any], path: Path) -> tuple[LayerInfo, ...]:
    layers: list[LayerInfo] = []
    offset = 0
    for raw in _get(data, "layers", list, path):
        ints = {k: _count(raw, k, path) for k in ("n_in", "n_out", "k_in", "k_out", "offset")}
        layer = LayerInfo(
            _get(raw, "name", str, path), _get(raw, "kind", str, path), bias=_get(raw, "bias", bool, path), **ints
        )
        if layer.offset != offset or not (1 <= layer.k_in <= layer.n_in and 1 <= layer.k_out <= layer.n_out):
            raise _bad(path, f"layer {layer.name[:80]!r} has offset {layer.offset} and size {layer.k_out}x{layer.k_in} "
                             f"of {layer.n_out}x{layer.n_in}; expected offset {offset} and 1 <= k <= n")  # fmt: skip
        offset += layer.size
        if offset > MAX_COUNT:
            raise _bad(path, "the row width exceeds 2**53")
        layers.append(layer)
    if not layers or len({layer.name for layer in layers}) != len(layers):
        raise _bad(path, "the layer table is empty or names a layer twice")
    if _count(data, "dim", path) != offset:
        raise _bad(path, f"dim {data['dim']} is not the sum of layer sizes {offset}")
    return tuple(layers)


def _parse_shard(raw: Any, dtype: StorageDtype, path: Path) -> ShardInfo:
    if isinstance(raw, dict) and set(raw) != _SHARD_KEYS:
        raise _bad(
            path, f"a shard entry has fields {sorted(str(k)[:40] for k in raw)[:8]}, expected {sorted(_SHARD_KEYS)}"
        )
    file = _name(raw, "file", SHARD_RE, path)
    stem = file[: -len(".bin")]
    ids_file = _name(raw, "ids", IDS_RE, path)
    scales_file: str | None = None
    scales_sha: str | None = None
    if dtype is StorageDtype.FLOAT16:
        scales_file, scales_sha = _name(raw, "scales", SCALES_RE, path), _sha(raw, "scales_sha256", path)
    elif raw["scales"] is not None or raw["scales_sha256"] is not None:
        raise _bad(path, f"shard {file!r} names a scales file, which only float16 stores have")
    if ids_file != stem + ".ids.json" or (scales_file is not None and scales_file != stem + ".scales.bin"):
        raise _bad(path, f"the files of shard {file!r} ({ids_file!r}, {scales_file!r}) do not share its name")
    rows = _count(raw, "rows", path)
    return ShardInfo(file, ids_file, rows, _sha(raw, "sha256", path), _sha(raw, "ids_sha256", path), scales_file,
                     scales_sha, _count(raw, "ids_bytes", path))  # fmt: skip


def parse_manifest(data: Any, path: Path) -> Manifest:
    """Validate a decoded manifest. Raises StoreCorruptedError naming `path` on any defect."""
    config, dtype = _parse_header(data, path)
    layers = _parse_layers(data, path)
    shards = tuple(_parse_shard(raw, dtype, path) for raw in _get(data, "shards", list, path))
    if len({s.file for s in shards}) != len(shards):
        raise _bad(path, "a shard is listed twice")
    if _count(data, "total_rows", path) != sum(s.rows for s in shards):
        raise _bad(path, f"total_rows {data['total_rows']} is not the sum of shard rows")
    statistics = None
    if _get(data, "statistics", (dict, type(None)), path) is not None:
        stats_raw = data["statistics"]
        if set(stats_raw) != {"file", "sha256", "bytes"}:
            raise _bad(path, "the statistics entry must have exactly the fields 'file', 'sha256' and 'bytes'")
        statistics = (
            _name(stats_raw, "file", STATS_RE, path), _sha(stats_raw, "sha256", path), _count(stats_raw, "bytes", path)
        )
    skipped = _check_ids(_get(data, "skipped", list, path), path, "the skipped-id list")
    return Manifest(config, _get(data, "model_fingerprint", str, path), dtype, layers, shards, statistics, skipped)


def load_manifest(raw: bytes, path: Path) -> Manifest:
    """Decode and validate the bytes of a manifest file (`path` names it in errors)."""
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:  # ValueError: bad JSON, over-long ints
        raise _bad(path, f"not valid JSON ({type(exc).__name__}: {str(exc)[:200]})") from None
    return parse_manifest(data, path)


def read_manifest_bytes(root: Path, name: str = MANIFEST) -> bytes:
    """The raw bytes of `root/name`; StoreError when the store or the file does not exist."""
    path = root / name
    try:
        return read_regular(path, MAX_MANIFEST_BYTES, "the manifest")
    except StoreError:
        raise
    except (FileNotFoundError, NotADirectoryError):
        raise StoreError(
            f"{root} is not a gradient store: it has no {name}. Log one with GradientLogger(..., store={str(root)!r})."
        ) from None
    except OSError as exc:
        raise StoreError(
            f"{path}: cannot be read ({exc.strerror or exc}); check the path and its permissions."
        ) from None


def read_manifest(root: Path, name: str = MANIFEST) -> Manifest:
    """Read and validate `root/name` (the store's manifest, or one rank's)."""
    return load_manifest(read_manifest_bytes(root, name), root / name)


def write_manifest(root: Path, manifest: Manifest, name: str = MANIFEST) -> None:
    """Durably replace `root/name`: first every file it names is made durable, then the manifest."""
    fsync_dir(root)  # the renames of the shard, id, scale and statistics files it names
    write_atomic(root / name, json.dumps(manifest.to_dict(), indent=1).encode())
    fsync_dir(root)


def parse_ids_file(raw: bytes, path: Path, shard: ShardInfo) -> list[ExampleId]:
    """Validate the bytes of a shard's id file against the manifest's checksum and row count."""
    if hashlib.sha256(raw).hexdigest() != shard.ids_sha256:
        raise StoreCorruptedError(
            f"{path}: checksum mismatch; the id file of shard {shard.file} was altered after commit. "
            "Restore it or re-log the store."
        )
    try:
        ids = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StoreCorruptedError(
            f"{path}: not a valid id list ({str(exc)[:200]}); restore it or re-log the store."
        ) from None
    checked = _check_ids(ids, path, "the id list")
    if len(checked) != shard.rows:
        raise StoreCorruptedError(
            f"{path}: holds {len(checked)} ids but the manifest says shard {shard.file} has {shard.rows} rows."
        )
    return list(checked)
