"""Corrupted stores: every damage gives a StoreCorruptedError (or StoreError) naming the damaged file.

A pristine float16 store (so it has per-row scale files) with statistics and three shards is
copied for each case, damaged in one way, and opened: truncated, extended, bit-flipped or missing
shards, id, scale and statistics files; malformed, hand-edited or hostile manifests (including
ones whose checksum was recomputed, as a deliberate forger would); row-count mismatches. Damage
that only a full read can see (a bit flip inside a shard) must be found by `verify()`.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from models import build_model, log_rows, make_examples

import logra
from logra.errors import StoreCorruptedError, StoreError
from logra.store.manifest import FORMAT_VERSION, manifest_checksum

N, SHARD_ROWS = 10, 4  # shards of 4, 4 and 2 rows


def _config() -> logra.LoGraConfig:
    return logra.LoGraConfig(k_in=4, k_out=3, seed=2, dtype="float16", include_bias=True)


def _log(path: Path, examples: list[Any], ids: list[str]) -> tuple[logra.GradientLogger, torch.Tensor]:
    model = build_model("mlp")
    with logra.GradientLogger(model, _config(), store=path, shard_rows=SHARD_ROWS) as logger:
        _, rows = log_rows(logger, examples, ids, batch_size=2)
    return logger, rows


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("pristine") / "store"
    _log(path, make_examples("mlp", N, seed=4), [f"ex{i}" for i in range(N)])
    store = logra.GradientStore.open(path)
    store.verify()
    assert [s.rows for s in store.manifest.shards] == [4, 4, 2]
    return path


@pytest.fixture
def store(pristine: Path, tmp_path: Path) -> Path:
    path = tmp_path / "store"
    shutil.copytree(pristine, path)
    return path


def _shard(path: Path, i: int = 1, kind: str = "bin") -> Path:
    suffix = {"bin": ".bin", "ids": ".ids.json", "scales": ".scales.bin"}[kind]
    return path / f"shard-000-{i:06d}{suffix}"


def _stats_file(path: Path) -> Path:
    return path / json.loads((path / "manifest.json").read_text())["statistics"]["file"]


def _flip(file: Path, offset: int, bit: int = 3) -> None:
    data = bytearray(file.read_bytes())
    data[offset % len(data)] ^= 1 << bit
    file.write_bytes(bytes(data))


def _truncate(file: Path, n: int = 1) -> None:
    file.write_bytes(file.read_bytes()[:-n])


def _edit_manifest(path: Path, edit: Callable[[dict[str, Any]], None], recompute: bool) -> None:
    """Change the manifest; with `recompute`, also fix its checksum (a deliberate forgery)."""
    data = json.loads((path / "manifest.json").read_text())
    edit(data)
    if recompute:
        data["manifest_sha256"] = manifest_checksum(data)
    (path / "manifest.json").write_text(json.dumps(data))


def _set(*changes: tuple[tuple[Any, ...], Any]) -> Callable[[dict[str, Any]], None]:
    """An edit setting each (key path, value) of `changes` in a manifest dict."""

    def edit(data: dict[str, Any]) -> None:
        for keys, value in changes:
            target = data
            for key in keys[:-1]:
                target = target[key]
            target[keys[-1]] = value

    return edit


def _edited(edit: Callable[[dict[str, Any]], None], recompute: bool = True) -> Callable[[Path], None]:
    return lambda p: _edit_manifest(p, edit, recompute)


def _rewrite_ids(path: Path, ids: list[Any]) -> None:
    """Replace shard 1's id file and record its new checksum in a re-signed manifest."""
    raw = json.dumps(ids).encode()
    _shard(path, 1, "ids").write_bytes(raw)
    _edit_manifest(path, _set((("shards", 1, "ids_sha256"), hashlib.sha256(raw).hexdigest())), recompute=True)


def _manifest(path: Path) -> Path:
    return path / "manifest.json"


def _file(i: int, kind: str = "bin") -> Callable[[Path], Path]:
    return lambda p: _shard(p, i, kind)


def _write(named: Callable[[Path], Path], data: bytes) -> Callable[[Path], None]:
    return lambda p: named(p).write_bytes(data)


# case: (damage, the file the error must name) — found when the store is opened.
OPEN_CASES: dict[str, tuple[Callable[[Path], Any], Callable[[Path], Path]]] = {
    "shard truncated": (lambda p: _truncate(_shard(p)), _file(1)),
    "shard extended": (lambda p: _shard(p).write_bytes(_shard(p).read_bytes() + b"\0\0"), _file(1)),
    "shard missing": (lambda p: _shard(p).unlink(), _file(1)),
    "shard replaced by a directory": (lambda p: (_shard(p).unlink(), _shard(p).mkdir()), _file(1)),
    "id file missing": (lambda p: _shard(p, 1, "ids").unlink(), _file(1, "ids")),
    "id file truncated": (lambda p: _truncate(_shard(p, 1, "ids"), 3), _file(1, "ids")),
    "id file bit flip": (lambda p: _flip(_shard(p, 1, "ids"), 3, 0), _file(1, "ids")),
    "id file edited": (
        lambda p: _write(_file(1, "ids"), _shard(p, 1, "ids").read_bytes().replace(b"ex5", b"ex50"))(p),
        _file(1, "ids"),
    ),
    "scales missing": (lambda p: _shard(p, 2, "scales").unlink(), _file(2, "scales")),
    "scales bit flip": (lambda p: _flip(_shard(p, 2, "scales"), 5), _file(2, "scales")),
    "scales truncated": (lambda p: _truncate(_shard(p, 0, "scales"), 4), _file(0, "scales")),
    "statistics missing": (lambda p: _stats_file(p).unlink(), _stats_file),
    "statistics bit flip": (lambda p: _flip(_stats_file(p), 200), _stats_file),
    "manifest truncated": (lambda p: _truncate(_manifest(p), 40), _manifest),
    "manifest empty": (_write(_manifest, b""), _manifest),
    "manifest binary": (_write(_manifest, bytes(range(256))), _manifest),
    "manifest a list": (_write(_manifest, b"[1, 2]"), _manifest),
    "manifest bit flip": (lambda p: _flip(_manifest(p), 500, 1), _manifest),
    "manifest row count edited": (_edited(_set((("shards", 0, "rows"), 5)), recompute=False), _manifest),
    "manifest seed edited": (_edited(_set((("config", "seed"), 3)), recompute=False), _manifest),
    "manifest field deleted": (_edited(lambda d: d.pop("layers")), _manifest),
    "manifest unknown field": (_edited(_set((("exec",), "rm -rf /"))), _manifest),
    "manifest other version": (_edited(_set((("format_version",), FORMAT_VERSION + 1))), _manifest),
    "manifest older version": (_edited(_set((("format_version",), FORMAT_VERSION - 1))), _manifest),
    "forged: seed without fingerprint": (_edited(_set((("config", "seed"), 3))), _manifest),
    "forged: shard row count": (_edited(_set((("shards", 0, "rows"), 5), (("total_rows",), 11))), _file(0)),
    "forged: total rows": (_edited(_set((("total_rows",), 11))), _manifest),
    "forged: dim": (_edited(_set((("dim",), 13))), _manifest),
    "forged: layer offset": (_edited(_set((("layers", 1, "offset"), 3))), _manifest),
    "forged: k beyond the layer": (_edited(_set((("layers", 0, "k_in"), 99))), _manifest),
    "forged: shard listed twice": (_edited(lambda d: d["shards"].append(d["shards"][0])), _manifest),
    "forged: mismatched id file": (_edited(_set((("shards", 1, "ids"), "shard-000-000000.ids.json"))), _manifest),
    "forged: bad checksum format": (_edited(_set((("shards", 1, "sha256"), "../../etc/passwd"))), _manifest),
    "forged: id count": (lambda p: _rewrite_ids(p, ["ex4", "ex5", "ex6"]), _file(1, "ids")),
    "forged: duplicate id across shards": (lambda p: _rewrite_ids(p, ["ex4", "ex5", "ex6", "ex0"]), lambda p: p),
    "forged: id of a wrong type": (lambda p: _rewrite_ids(p, ["ex4", "ex5", 6.5, "ex7"]), _file(1, "ids")),
    "forged: skipped id also a row": (_edited(_set((("skipped",), ["ex3"]))), lambda p: p),
}
TRAVERSAL = [
    "../outside.bin", "/etc/passwd", "shard-000-000001.bin/../../x", "..", "", "shard-000-000001.bin\n",
    "shard-000-00000\u0661.bin", "SHARD-000-000001.BIN", "sub/shard-000-000001.bin", "shard-000-000001.bin\0",
]  # fmt: skip


@pytest.mark.parametrize("case", list(OPEN_CASES))
def test_damage_found_at_open_names_the_file(store: Path, case: str) -> None:
    damage, named = OPEN_CASES[case]
    damage(store)
    with pytest.raises(StoreCorruptedError) as info:
        logra.GradientStore.open(store)
    assert str(named(store)) in str(info.value), str(info.value)
    # A writer refuses to append to the damaged store too.
    with pytest.raises(StoreError):
        _log(store, make_examples("mlp", 2, seed=5), ["new0", "new1"])


@pytest.mark.parametrize("kind, shard", [("bin", 0), ("bin", 2)])
@pytest.mark.parametrize("offset", [0, 17, -1])
def test_bit_flip_inside_a_shard_is_found_by_verify(store: Path, kind: str, shard: int, offset: int) -> None:
    _flip(_shard(store, shard, kind), offset)
    opened = logra.GradientStore.open(store)  # sizes are right: only a full read can tell
    with pytest.raises(StoreCorruptedError, match="checksum mismatch") as info:
        opened.verify()
    assert str(_shard(store, shard, kind)) in str(info.value)


def test_damage_after_open_is_found_by_verify(store: Path, pristine: Path) -> None:
    opened = logra.GradientStore.open(store)
    opened.verify()
    _flip(_shard(store, 0, "scales"), 1)
    with pytest.raises(StoreCorruptedError, match="scales.bin: checksum mismatch"):
        opened.verify()
    shutil.copy(_shard(store, 1), _shard(store, 0))  # same size, other content
    _flip(_shard(store, 0, "scales"), 1)
    with pytest.raises(StoreCorruptedError, match=r"shard-000-000000\.bin: checksum mismatch"):
        opened.verify()
    shutil.copy(_shard(pristine, 0), _shard(store, 0))
    opened.verify()
    _truncate(_shard(store, 2))
    with pytest.raises(StoreCorruptedError, match=r"shard-000-000002\.bin: holds"):
        opened.verify()


@pytest.mark.parametrize("name", TRAVERSAL)
@pytest.mark.parametrize("field", ["file", "ids", "scales"])
def test_manifest_paths_cannot_leave_the_store(store: Path, tmp_path: Path, field: str, name: str) -> None:
    (tmp_path / "outside.bin").write_bytes(_shard(store).read_bytes())  # a tempting target
    _edit_manifest(store, _set((("shards", 1, field), name)), recompute=True)
    with pytest.raises(StoreCorruptedError, match="naming pattern|share its name") as info:
        logra.GradientStore.open(store)
    assert str(store / "manifest.json") in str(info.value)


@pytest.mark.parametrize("name", ["../statistics-000-000001.npz", "/tmp/statistics-000-000001.npz", "x.npz"])
def test_statistics_path_cannot_leave_the_store(store: Path, name: str) -> None:
    _edit_manifest(store, lambda d: d["statistics"].__setitem__("file", name), recompute=True)
    with pytest.raises(StoreCorruptedError, match="naming pattern"):
        logra.GradientStore.open(store)


def test_missing_manifest_is_not_a_store(store: Path) -> None:
    (store / "manifest.json").unlink()
    with pytest.raises(StoreError, match="not a gradient store"):
        logra.GradientStore.open(store)


def test_pristine_store_opens_verifies_and_ignores_leftovers(store: Path, pristine: Path) -> None:
    expected = logra.GradientStore.open(pristine).rows()
    (store / "shard-000-000003.bin.tmp").write_bytes(b"half a shard")
    (store / "shard-000-000003.bin").write_bytes(b"renamed but never committed")
    (store / "manifest.json.tmp").write_bytes(b"{half a manifest")
    (store / "statistics-000-000099.npz").write_bytes(b"old statistics")
    opened = logra.GradientStore.open(store)
    opened.verify()
    assert torch.equal(opened.rows(), expected) and len(opened) == N
    # A resuming writer deletes exactly the leftovers and appends after the committed shards.
    _log(store, make_examples("mlp", 2, seed=5), ["new0", "new1"])
    leftovers = {"shard-000-000003.bin.tmp", "manifest.json.tmp", "statistics-000-000099.npz"}
    assert not leftovers & {p.name for p in store.iterdir()}
    resumed = logra.GradientStore.open(store)
    resumed.verify()
    assert resumed.ids[:N] == opened.ids and resumed.ids[N:] == ["new0", "new1"]
    assert torch.equal(resumed.rows(0, N), expected)
