"""Hostile stores: the manifest and id readers fuzzed with hypothesis, and a scan for unsafe loaders.

Only `LograError` subclasses may escape from reading a store, whatever the bytes: random bytes,
random JSON, a valid manifest with one part replaced (with its checksum recomputed, so the damage
reaches the deep checks), deep nesting, huge numbers, NaN literals and path traversal. A SIGALRM
watchdog turns a hang into a failure. Several thousand cases in all, well under 40 s.

The security scan reads every module of `logra` and `logra.integrations` with `ast` and fails on
pickle-family imports, `torch.load`, `eval`/`exec`/`compile`/`__import__`, `np.load(...,
allow_pickle=True)` and `weights_only=False`: a store or preconditioner is never executed.
"""

from __future__ import annotations

import ast
import copy
import hashlib
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import build_model, log_rows, make_examples

import logra
from logra.errors import LograError
from logra.store.manifest import ShardInfo, load_manifest, manifest_checksum, parse_ids_file, parse_manifest

SETTINGS = settings(deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
JSON_LEAVES = (
    st.none() | st.booleans() | st.integers() | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
    | st.sampled_from(["../x", "/etc/passwd", "shard-000-000000.bin", "..", "C:\\x", "float16", "logra-gradient-store"])
)  # fmt: skip
JSON = st.recursive(
    JSON_LEAVES,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)


pytestmark = pytest.mark.usefixtures("watchdog")  # conftest: 60 s per test at most


@pytest.fixture(scope="module", params=["float16", "float32"])
def pristine(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / "store"
    cfg = logra.LoGraConfig(k_in=3, k_out=2, seed=1, dtype=request.param, nonfinite="skip", modules=["fc*"])
    model = build_model("mlp")
    with logra.GradientLogger(model, cfg, store=path, shard_rows=3) as logger:
        log_rows(logger, make_examples("mlp", 7, seed=2), [f"e{i}" for i in range(7)], batch_size=3)
    return path


def _only_library_errors(fn: Any, *args: Any, names: str) -> Any:
    """fn(*args), or None when it raised a LograError, whose message must name the file `names`."""
    try:
        return fn(*args)
    except LograError as exc:
        assert names in str(exc), f"the error does not name {names}: {exc}"
        return None


# ---------------------------------------------------------------- manifest bytes and JSON


@settings(SETTINGS, max_examples=1000)
@given(raw=st.binary(max_size=300))
def test_random_bytes_as_manifest(raw: bytes) -> None:
    _only_library_errors(load_manifest, raw, Path("manifest.json"), names="manifest.json")


@settings(SETTINGS, max_examples=600)
@given(data=JSON)
def test_random_json_as_manifest(data: Any) -> None:
    _only_library_errors(parse_manifest, data, Path("manifest.json"), names="manifest.json")
    _only_library_errors(load_manifest, json.dumps(data).encode(), Path("manifest.json"), names="manifest.json")


def _paths(d: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    """Every path to a value inside nested dicts and lists."""
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _paths(v, (*prefix, i))


def _mutate(data: dict[str, Any], path: tuple[Any, ...], how: str, value: Any) -> dict[str, Any]:
    out = copy.deepcopy(data)
    if not path:
        return {"replaced": value}
    parent = out
    for key in path[:-1]:
        parent = parent[key]
    key = path[-1]
    if how == "delete":
        del parent[key]
    elif how == "duplicate" and isinstance(parent, list):
        parent.append(copy.deepcopy(parent[key]))
    elif how == "add" and isinstance(parent, dict):
        parent[f"{key}_extra"] = value
    else:
        parent[key] = value
    return out


@pytest.mark.parametrize("recompute", [True, False], ids=["forged", "edited"])
def test_mutated_manifests_on_a_real_store(pristine: Path, tmp_path: Path, recompute: bool) -> None:
    """One part of a valid manifest replaced; the store is then opened, verified and read."""
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    original = json.loads((pristine / "manifest.json").read_text())
    paths = list(_paths(original))
    opened = [0]

    @settings(SETTINGS, max_examples=600 if recompute else 200)
    @given(index=st.integers(0, len(paths) - 1), how=st.sampled_from(["replace", "delete", "duplicate", "add"]),
           value=JSON)  # fmt: skip
    def check(index: int, how: str, value: Any) -> None:
        data = _mutate(original, paths[index], how, value)
        if recompute and isinstance(data, dict):
            try:
                data["manifest_sha256"] = manifest_checksum(data)
            except (ValueError, TypeError):  # NaN: not plain JSON, cannot be signed
                pass
        (store / "manifest.json").write_text(json.dumps(data))
        try:
            s = logra.GradientStore.open(store)
            s.verify()
            s.rows()
            list(s.iter_chunks(2))
            if s.manifest.statistics is not None:
                s.statistics()
            opened[0] += 1
        except LograError as exc:
            assert str(store) in str(exc), f"the error does not name a file of the store: {exc}"

    check()
    assert opened[0] > 0 or not recompute, "no mutation was benign: the fuzzer never reached a successful open"


# ---------------------------------------------------------------- id files


@settings(SETTINGS, max_examples=300)
@given(data=JSON, rows=st.integers(0, 5))
def test_random_id_files(data: Any, rows: int) -> None:
    raw = json.dumps(data).encode()
    shard = ShardInfo(
        "shard-000-000000.bin", "shard-000-000000.ids.json", rows, "0" * 64, hashlib.sha256(raw).hexdigest()
    )
    ids = _only_library_errors(parse_ids_file, raw, Path("ids.json"), shard, names="ids.json")
    if ids is not None:
        assert len(ids) == rows and len(set(ids)) == rows
        assert all(isinstance(i, (int, str)) and not isinstance(i, bool) for i in ids)


@settings(SETTINGS, max_examples=300)
@given(raw=st.binary(max_size=200))
def test_random_id_file_bytes(raw: bytes) -> None:
    shard = ShardInfo("shard-000-000000.bin", "shard-000-000000.ids.json", 2, "0" * 64, hashlib.sha256(raw).hexdigest())
    _only_library_errors(parse_ids_file, raw, Path("ids.json"), shard, names="ids.json")


# ---------------------------------------------------------------- pathological inputs


PATHOLOGICAL = {
    "deep list": b"[" * 200_000 + b"]" * 200_000,
    "deep object": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
    "huge int": b'{"format": 1' + b"0" * 100_000 + b"}",
    "huge float": b'{"format_version": 1e400}',
    "NaN": b'{"format": NaN}',
    "lone surrogate": b'{"format": "\\ud800"}',
    "nul bytes": b"\0" * 1000,
    "utf-16": json.dumps({"format": "logra-gradient-store"}).encode("utf-16"),
    "long string": b'"' + b"a" * 1_000_000 + b'"',
}


@pytest.mark.parametrize("name", list(PATHOLOGICAL))
def test_pathological_manifests_are_refused(tmp_path: Path, name: str) -> None:
    store = tmp_path / "store"
    store.mkdir()
    (store / "manifest.json").write_bytes(PATHOLOGICAL[name])
    with pytest.raises(logra.StoreCorruptedError, match="manifest.json"):
        logra.GradientStore.open(store)


@pytest.mark.parametrize("key", ["rows", "total_rows", "dim", "k_in", "n_in"])
@pytest.mark.parametrize("value", [2**53 + 1, 10**300, -1, True, 1.0, "3"])
def test_out_of_range_numbers_are_refused(pristine: Path, tmp_path: Path, key: str, value: Any) -> None:
    store = tmp_path / "store"
    shutil.copytree(pristine, store)
    data = json.loads((store / "manifest.json").read_text())
    target = data["shards"][0] if key == "rows" else data["layers"][0] if key in ("k_in", "n_in") else data
    target[key] = value
    data["manifest_sha256"] = manifest_checksum(data)
    (store / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(logra.StoreCorruptedError, match="manifest.json"):
        logra.GradientStore.open(store)


# ---------------------------------------------------------------- no unsafe loaders in the library


PICKLE_MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "marshal", "shelve", "jsonpickle"}
UNSAFE_CALLS = {"eval", "exec", "compile", "__import__"}


def unsafe_uses(source: str, filename: str) -> list[str]:
    """Every unsafe loader or evaluator used by `source` (docstrings and comments do not count)."""
    found = []
    tree = ast.parse(source, filename)
    # torch.load(..., weights_only=True) restricts unpickling to tensors and containers: allowed.
    safe = {
        id(node.func)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and ast.unparse(node.func) == "torch.load"
        and any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True
                for k in node.keywords)
    }  # fmt: skip
    for node in ast.walk(tree):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            found += [f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLE_MODULES:
            found.append(f"{where} from {node.module} import ...")
        elif (
            isinstance(node, ast.Attribute)
            and node.attr in {"load", "loads"}
            and id(node) not in safe
            and ast.unparse(node.value) in ("torch", "pickle", "marshal", "dill", "joblib", "torch.serialization")
        ):
            found.append(f"{where} {ast.unparse(node)}")
        elif isinstance(node, ast.Name) and node.id in UNSAFE_CALLS | PICKLE_MODULES:
            found.append(f"{where} {node.id}")
        elif isinstance(node, ast.keyword) and node.arg in ("allow_pickle", "weights_only"):
            if not (isinstance(node.value, ast.Constant) and node.value.value is (node.arg == "weights_only")):
                found.append(f"{where} {node.arg}={ast.unparse(node.value)}")
        elif isinstance(node, ast.Attribute) and node.attr in {"Unpickler", "__reduce__", "__setstate__"}:
            found.append(f"{where} .{node.attr}")
    return found


def test_the_scanner_catches_every_unsafe_form() -> None:
    planted = (
        "import pickle\nfrom dill import loads\nimport torch\nx = torch.load('a')\ny = eval('1')\nexec('pass')\n"
        "import numpy as np\nz = np.load('a', allow_pickle=True)\nw = torch.load('b', weights_only=False)\n"
        "f = __import__('os')\nimport marshal\n"
    )
    found = unsafe_uses(planted, "planted.py")
    for needle in ("import pickle", "dill", "torch.load", " eval", " exec", "allow_pickle=True", "weights_only=False",
                   "__import__", "import marshal"):  # fmt: skip
        assert any(needle in f for f in found), (needle, found)
    clean = (
        '"""Never unpickled: allow_pickle=False, no eval(, no exec(."""\n'
        'import numpy as np\nnp.load("a", allow_pickle=False)\nimport torch\ntorch.load("c", weights_only=True)\n'
    )
    assert unsafe_uses(clean, "clean.py") == []


def test_library_source_has_no_unsafe_loaders() -> None:
    root = Path(logra.__file__).parent
    files = sorted(root.glob("**/*.py")) + sorted((root.parent / "integrations").glob("**/*.py"))
    assert len(files) >= 8
    found = [f for path in files for f in unsafe_uses(path.read_text(encoding="utf-8"), str(path))]
    assert not found, "unsafe loaders or evaluators in the library:\n" + "\n".join(found)
