"""Reliability, round 2 (issue 13): every byte that can change a score is checked; no crash.

One regression test per defect class of the hostile-user review, most severe first:
1. full disks (a 1 MiB tmpfs where this machine may mount one, else a simulated ENOSPC) for every
   writer: rows, statistics, the preconditioner, score matrices, the CLI settings;
2. provenance: the saved preconditioner and logra-cli.json are signed; score outputs name their
   store, preconditioner and queries;
3. a reader opening the store in a loop while a writer commits sees zero errors;
5. the statistics and preconditioner readers, fuzzed (hypothesis) and on explicit bad files;
6. bounded reads: FIFOs and /dev/zero in place of store files;
7. a model on the meta device; 8. queries checked on every path, warnings instead of silence;
9. messages that say what happened.
The command-line table of bad inputs is `test_cli_hostile.py`.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _disk import FullDisk, leftovers, tmpfs_allowed
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from models import build_model, collate, log_rows, make_examples, per_example_loss

import logra
from logra.cli.inputs import ModelSettings
from logra.errors import CaptureError, ConfigError, DuplicateIdError, LograError, StoreCorruptedError, StoreError
from logra.store.files import json_checksum
from logra.store.manifest import MANIFEST, manifest_checksum
from logra.store.statistics import parse_statistics, statistics_to_arrays, write_statistics
from logra.store.writer import StoreWriter
from logra.types import KroneckerStatistics, LayerInfo

SETTINGS = settings(deadline=None, database=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])  # fmt: skip
CFG = logra.LoGraConfig(k_in=3, k_out=2, seed=1, modules=["fc*"])


pytestmark = pytest.mark.usefixtures("watchdog")  # conftest: 60 s per test at most


def _log(path: Path, n: int = 7, cfg: logra.LoGraConfig = CFG, model: Any = None, **kw: Any) -> logra.GradientStore:
    """Log (or resume: committed examples are skipped) the first `n` MLP examples into `path`."""
    model = model if model is not None else build_model("mlp")
    with logra.GradientLogger(model, cfg, store=path, shard_rows=3, **kw) as logger:
        todo = [i for i in range(n) if f"e{i}" not in logger.committed_ids]
        examples = make_examples("mlp", n, seed=2)
        log_rows(logger, [examples[i] for i in todo], [f"e{i}" for i in todo], batch_size=3)
    return logra.GradientStore.open(path)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _log(tmp_path_factory.mktemp("hostile") / "store").root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _queries(model: Any = None, cfg: logra.LoGraConfig = CFG) -> logra.Record:
    model = model if model is not None else build_model("mlp")
    with logra.GradientLogger(model, cfg) as logger:
        batch, mask = collate(make_examples("mlp", 2, seed=9))
        with logger.record(ids=["q0", "q1"], mask=mask) as rec:
            per_example_loss(model, batch).sum().backward()
    return rec


# --------------------------------------------------------------------------------------------
# 1. Full disks: every writer raises StoreError naming the path, and leaves nothing behind.

KINDS = ["simulated", "tmpfs"]


@pytest.fixture(params=KINDS)
def full_disk(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FullDisk]:
    if request.param == "tmpfs" and not tmpfs_allowed(tmp_path / "probe"):
        pytest.skip("this machine does not allow mounting a tmpfs; the simulated disk covers the case")
    disk = FullDisk(tmp_path / "disk", request.param, monkeypatch)
    yield disk
    disk.close()


def _assert_clean_failure(info: pytest.ExceptionInfo[StoreError], path: Path, disk: FullDisk) -> None:
    assert str(path) in str(info.value) and "ENOSPC" in str(info.value), info.value
    assert not leftovers(disk.root), leftovers(disk.root)


def test_score_matrix_on_a_full_disk_raises_and_leaves_no_file(pristine: Path, full_disk: FullDisk) -> None:
    store = logra.GradientStore.open(pristine)
    scorer = logra.Scorer(store, logra.fit_preconditioner(store, "kfac"))
    out = full_disk.root / "scores.npy"
    with full_disk.full(), pytest.raises(StoreError) as info:
        scorer.score(_queries(), out=out)
    _assert_clean_failure(info, out, full_disk)
    assert "bytes" in str(info.value) and not out.exists()
    scores = scorer.score(_queries(), out=out)  # space is back: the same call works
    assert torch.equal(torch.from_numpy(np.load(out)), scores)


def test_rows_on_a_full_disk_raise_and_the_store_resumes(full_disk: FullDisk) -> None:
    path = full_disk.root / "store"
    _log(path, n=3)
    with full_disk.full(), pytest.raises(StoreError) as info:
        _log(path, n=7)
    assert str(path) in str(info.value) and "ENOSPC" in str(info.value)
    logra.GradientStore.open(path).verify()
    assert len(_log(path, n=7)) == 7


def test_statistics_on_a_full_disk_raise_naming_the_statistics_file(full_disk: FullDisk) -> None:
    stats = {"fc": KroneckerStatistics.zeros(3, 2)}
    with full_disk.full(), pytest.raises(OSError):
        write_statistics(full_disk.root, "statistics-000-000000.npz", stats)
    assert not leftovers(full_disk.root)
    layers = [LayerInfo("fc", "Linear", 4, 4, 3, 2, False, 0)]
    writer = StoreWriter(full_disk.root / "s", logra.LoGraConfig(k_in=3, k_out=2), "f" * 16, layers, shard_rows=100)
    writer.append(["a"], torch.ones(1, 6))
    stats["fc"].n_examples = 1
    with full_disk.full(), pytest.raises(StoreError) as info:
        writer.commit(stats)
    assert "statistics" in str(info.value) or "shard" in str(info.value), info.value
    assert "committing to manifest.json" not in str(info.value)
    writer.close(None, commit=False)


def test_preconditioner_save_on_a_full_or_read_only_disk(pristine: Path, full_disk: FullDisk) -> None:
    pre = logra.fit_preconditioner(logra.GradientStore.open(pristine), "ekfac")
    out = full_disk.root / "pre"
    with full_disk.full(), pytest.raises(StoreError) as info:
        pre.save(out)
    _assert_clean_failure(info, out, full_disk)
    pre.save(out)
    assert logra.load_preconditioner(out).damping == pre.damping


def test_cli_settings_on_a_full_disk(full_disk: FullDisk) -> None:
    with full_disk.full(), pytest.raises(StoreError) as info:
        ModelSettings(model="m").save(full_disk.root)
    _assert_clean_failure(info, full_disk.root / "logra-cli.json", full_disk)


def test_preconditioner_save_into_a_read_only_directory(pristine: Path, tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes into read-only directories")
    pre = logra.fit_preconditioner(logra.GradientStore.open(pristine), "kfac")
    (tmp_path / "ro").mkdir(mode=0o500)
    with pytest.raises(StoreError, match="cannot save"):
        pre.save(tmp_path / "ro" / "pre")


# --------------------------------------------------------------------------------------------
# 2. Provenance: files that decide scores are signed; outputs name what they came from.


def _edit_json(path: Path, edit: Any, resign: str | None = None) -> None:
    data = json.loads(path.read_text())
    edit(data)
    if resign is not None:
        data[resign] = json_checksum(data, resign)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["damping"].update({k: v * 1.0000001 + 1e-9 for k, v in d["damping"].items()}),
        lambda d: d["damping"].update({k: float("nan") for k in d["damping"]}),
        lambda d: d.update(method="identity"),
        lambda d: d.update(fisher="true"),
        lambda d: d["layers"][0].update(k_in=2),
    ],
    ids=["damping-digit", "nan-damping", "method-identity", "fisher", "layer-table"],
)
def test_an_edited_preconditioner_is_refused(pristine: Path, tmp_path: Path, edit: Any) -> None:
    logra.fit_preconditioner(logra.GradientStore.open(pristine), "kfac").save(tmp_path / "p")
    _edit_json(tmp_path / "p" / "preconditioner.json", edit)
    with pytest.raises(StoreCorruptedError, match="preconditioner.json"):
        logra.load_preconditioner(tmp_path / "p")


def test_forged_nan_or_negative_damping_is_refused(pristine: Path, tmp_path: Path) -> None:
    logra.fit_preconditioner(logra.GradientStore.open(pristine), "kfac").save(tmp_path / "p")
    path = tmp_path / "p" / "preconditioner.json"
    _edit_json(path, lambda d: d["damping"].update({k: -1.0 for k in d["damping"]}), resign="sha256")
    with pytest.raises(StoreCorruptedError, match="damping"):
        logra.load_preconditioner(tmp_path / "p")


def test_edited_cli_settings_are_refused(tmp_path: Path) -> None:
    ModelSettings(model="m", max_length=16).save(tmp_path)
    assert ModelSettings.load(tmp_path).max_length == 16  # type: ignore[union-attr]
    _edit_json(tmp_path / "logra-cli.json", lambda d: d.update(max_length=17))
    with pytest.raises(StoreCorruptedError, match="logra-cli.json"):
        ModelSettings.load(tmp_path)
    _edit_json(tmp_path / "logra-cli.json", lambda d: d.update(max_length="17"), resign="sha256")
    with pytest.raises(StoreCorruptedError, match="wrong type"):
        ModelSettings.load(tmp_path)


def test_provenance_names_store_preconditioner_and_queries(pristine: Path) -> None:
    store = logra.GradientStore.open(pristine)
    pre = logra.fit_preconditioner(store, "kfac")
    queries = _queries()
    prov = logra.Scorer(store, pre).provenance(queries)
    assert set(prov) == {"store", "preconditioner", "queries"} and prov["store"] == store.fingerprint
    other = logra.fit_preconditioner(store, "kfac", damping=1.0)
    assert logra.Scorer(store, other).provenance(queries)["preconditioner"] != prov["preconditioner"]
    assert logra.Scorer(store, pre).provenance(queries) == prov  # pure


# --------------------------------------------------------------------------------------------
# 3. Readers never fail on a healthy store while a writer commits.


def _writer_loop(root: str, commits: int, ready: Any) -> None:
    layers = [LayerInfo("fc", "Linear", 4, 4, 3, 2, False, 0)]
    writer = StoreWriter(root, logra.LoGraConfig(k_in=3, k_out=2), "f" * 16, layers, shard_rows=1)
    stats = {"fc": KroneckerStatistics.zeros(3, 2)}
    ready.set()
    for i in range(commits):
        writer.append([i], torch.full((1, 6), float(i)))
        stats["fc"].n_examples += 1
        stats["fc"].n_tokens += 1
        writer.commit(stats)
    writer.close(stats)


def test_concurrent_readers_see_no_error_while_a_writer_commits(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    writer = ctx.Process(target=_writer_loop, args=(str(tmp_path / "s"), 150, ready))
    writer.start()
    ready.wait(30)
    errors: list[str] = []
    opens, sizes = 0, []
    while writer.is_alive() or opens < 20:
        try:
            store = logra.GradientStore.open(tmp_path / "s")
            if len(store):  # the store is created empty, without statistics, before the first commit
                assert store.statistics()["fc"].n_examples == len(store)
            sizes.append(len(store))
        except LograError as exc:
            errors.append(str(exc))
        opens += 1
    writer.join(30)
    assert writer.exitcode == 0
    assert not errors, f"{len(errors)} of {opens} opens failed: {errors[:2]}"
    assert sizes == sorted(sizes) and sizes[-1] == 150 and len(set(sizes)) > 5, (opens, sizes[:5])


def test_a_file_missing_from_a_still_manifest_is_still_corruption(pristine: Path, tmp_path: Path) -> None:
    path = _copy(pristine, tmp_path / "s")
    (path / logra.GradientStore.open(path).manifest.statistics[0]).unlink()  # type: ignore[index]
    with pytest.raises(StoreCorruptedError, match="missing"):
        logra.GradientStore.open(path)


# --------------------------------------------------------------------------------------------
# 5. The statistics reader: explicit bad files, then fuzzing.

LAYERS = (LayerInfo("a", "Linear", 5, 4, 3, 2, False, 0), LayerInfo("b", "Linear", 3, 3, 2, 2, False, 6))


def _valid_arrays(rows: int = 30) -> dict[str, np.ndarray]:
    stats = {x.name: KroneckerStatistics.zeros(x.k_in, x.k_out) for x in LAYERS}
    for s in stats.values():
        s.n_examples, s.n_tokens = rows, 2 * rows
    return statistics_to_arrays(stats)


def _npz(arrays: dict[str, Any]) -> bytes:
    f = io.BytesIO()
    np.savez(f, **arrays)
    return f.getvalue()


def _parse(raw: bytes, rows: int = 30) -> Any:
    return parse_statistics(raw, Path("statistics-000-000001.npz"), LAYERS, rows)


def _with(key: str, value: Any) -> bytes:
    return _npz({**_valid_arrays(), key: value})


BAD_STATISTICS = {
    "wrong-shape": _with("0.input_sum", np.zeros((2, 3))),
    "structured": _with("0.input_sum", np.zeros((3, 3), dtype=[("a", "<f8")])),
    "complex": _with("1.grad_sum", np.zeros((2, 2), dtype=np.complex128)),
    "float32": _with("1.grad_sum", np.zeros((2, 2), dtype=np.float32)),
    "nan": _with("0.grad_sum", np.full((2, 2), np.nan)),
    "inf": _with("0.input_sum", np.full((3, 3), np.inf)),
    "huge-count": _with("0.counts", np.array([10**15, 10**15], dtype=np.int64)),
    "40-rows-for-30": _with("1.counts", np.array([80, 40], dtype=np.int64)),
    "negative-count": _with("0.counts", np.array([-1, 30], dtype=np.int64)),
    "float-counts": _with("0.counts", np.array([60.0, 30.0])),
    "missing-array": _npz({k: v for k, v in _valid_arrays().items() if k != "1.counts"}),
    "extra-array": _with("2.counts", np.zeros(2, dtype=np.int64)),
    "npy-bytes": (lambda f: (np.save(f, np.zeros(3)), f.getvalue())[1])(io.BytesIO()),
    "empty": b"",
    "truncated": _npz(_valid_arrays())[:100],
    "text": b"not an archive",
}


@pytest.mark.parametrize("name", sorted(BAD_STATISTICS))
def test_bad_statistics_are_refused_naming_the_file(name: str) -> None:
    with pytest.raises(StoreCorruptedError, match="statistics-000-000001.npz"):
        _parse(BAD_STATISTICS[name])


def test_valid_statistics_parse() -> None:
    stats = _parse(_npz(_valid_arrays()))
    assert stats["a"].n_examples == 30 and stats["b"].grad_sum.shape == (2, 2)


def _only_store_errors(fn: Any, *args: Any, names: str) -> None:
    try:
        fn(*args)
    except LograError as exc:
        assert names in str(exc), exc


ARRAYS = st.one_of(
    st.builds(
        np.zeros,
        st.tuples(st.integers(0, 4), st.integers(0, 4)),
        st.sampled_from(["<f8", "<f4", "<i8", "<c16", "|b1", "<U3"]),
    ),
    st.builds(lambda v: np.array(v), st.lists(st.floats(allow_nan=True) | st.integers(-(2**62), 2**62), max_size=6)),
    st.builds(
        lambda n, e: np.array([n, e], dtype=np.int64), st.integers(-(2**62), 2**62), st.integers(-(2**62), 2**62)
    ),
)


@settings(SETTINGS, max_examples=400)
@given(raw=st.binary(max_size=400))
def test_random_bytes_as_statistics(raw: bytes) -> None:
    _only_store_errors(_parse, raw, names="statistics-000-000001.npz")


@settings(SETTINGS, max_examples=400)
@given(key=st.sampled_from(sorted(_valid_arrays()) + ["x", "0.extra"]), value=ARRAYS)
def test_one_array_replaced_in_valid_statistics(key: str, value: np.ndarray) -> None:
    _only_store_errors(_parse, _with(key, value), names="statistics-000-000001.npz")


@settings(SETTINGS, max_examples=300)
@given(cut=st.integers(0, 2000), flip=st.integers(0, 2000))
def test_damaged_statistics_bytes(cut: int, flip: int) -> None:
    raw = bytearray(_npz(_valid_arrays()))
    if flip < len(raw):
        raw[flip] ^= 0xFF
    _only_store_errors(_parse, bytes(raw[: max(cut, 1) * 4]), names="statistics-000-000001.npz")


def test_forged_statistics_through_a_store_are_refused(pristine: Path, tmp_path: Path) -> None:
    """The checksum matches (recomputed in a forged manifest), the content does not."""
    path = _copy(pristine, tmp_path / "s")
    store = logra.GradientStore.open(path)
    name = store.manifest.statistics[0]  # type: ignore[index]
    arrays = dict(np.load(path / name))
    arrays["0.counts"] = np.array([10, 10**15], dtype=np.int64)
    raw = _npz(arrays)
    (path / name).write_bytes(raw)
    data = json.loads((path / MANIFEST).read_text())
    data["statistics"].update(sha256=hashlib.sha256(raw).hexdigest(), bytes=len(raw))
    data["manifest_sha256"] = manifest_checksum(data)
    (path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(StoreCorruptedError, match=name):
        logra.GradientStore.open(path)


# ---------------------------------------------------------------- the preconditioner reader, fuzzed


@pytest.fixture(scope="module")
def saved_pre(pristine: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pre") / "p"
    logra.fit_preconditioner(logra.GradientStore.open(pristine), "ekfac").save(out)
    return out


def _paths(d: Any, prefix: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
    yield prefix
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(d, list):
        for i, v in enumerate(d):
            yield from _paths(v, (*prefix, i))


JSON_VALUES = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["identity", "kfac", "raw", "factors.npz", "../x", "true"])
    | st.lists(st.integers(), max_size=3) | st.dictionaries(st.text(max_size=5), st.integers(), max_size=3)
)  # fmt: skip


@settings(SETTINGS, max_examples=300)
@given(data=st.data(), forged=st.booleans())
def test_mutated_preconditioner_json(saved_pre: Path, tmp_path: Path, data: Any, forged: bool) -> None:
    target = tmp_path / f"p{time.perf_counter_ns()}"
    shutil.copytree(saved_pre, target)
    meta = json.loads((saved_pre / "preconditioner.json").read_text())
    path = data.draw(st.sampled_from([p for p in _paths(meta) if p and p[-1] != "sha256"]))
    value = data.draw(JSON_VALUES)
    parent = meta
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1]] = value
    if forged:
        try:
            meta["sha256"] = json_checksum(meta, "sha256")
        except ValueError:  # NaN/Inf cannot be signed: the unsigned file must be refused too
            pass
    (target / "preconditioner.json").write_text(json.dumps(meta))
    _only_store_errors(logra.load_preconditioner, target, names=str(target))
    shutil.rmtree(target)


@settings(SETTINGS, max_examples=300)
@given(raw=st.binary(max_size=300), which=st.sampled_from(["preconditioner.json", "factors.npz"]))
def test_random_bytes_as_preconditioner_files(saved_pre: Path, tmp_path: Path, raw: bytes, which: str) -> None:
    target = tmp_path / f"p{time.perf_counter_ns()}"
    shutil.copytree(saved_pre, target)
    (target / which).write_bytes(raw)
    _only_store_errors(logra.load_preconditioner, target, names=str(target))
    shutil.rmtree(target)


def test_forged_factors_with_nan_are_refused(saved_pre: Path, tmp_path: Path) -> None:
    target = _copy(saved_pre, tmp_path / "p")
    arrays = dict(np.load(target / "factors.npz"))
    key = sorted(arrays)[0]
    arrays[key] = np.full_like(arrays[key], np.nan)
    raw = _npz(arrays)
    (target / "factors.npz").write_bytes(raw)
    _edit_json(target / "preconditioner.json",
               lambda d: d["factors"].update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest()),
               resign="sha256")  # fmt: skip
    with pytest.raises(StoreCorruptedError, match="factors.npz"):
        logra.load_preconditioner(target)


# --------------------------------------------------------------------------------------------
# 6. Bounded reads: only regular files are read.


@pytest.mark.parametrize("what", ["manifest", "ids", "statistics", "preconditioner"])
@pytest.mark.parametrize("kind", ["dev-zero", "fifo"])
def test_devices_and_fifos_in_place_of_files_are_refused(
    pristine: Path, saved_pre: Path, tmp_path: Path, what: str, kind: str
) -> None:
    path = _copy(pristine, tmp_path / "s")
    pre = _copy(saved_pre, tmp_path / "p")
    manifest = logra.GradientStore.open(path).manifest
    target = {
        "manifest": path / MANIFEST,
        "ids": path / manifest.shards[0].ids_file,
        "statistics": path / manifest.statistics[0],  # type: ignore[index]
        "preconditioner": pre / "preconditioner.json",
    }[what]
    target.unlink()
    if kind == "fifo":
        os.mkfifo(target)
    else:
        target.symlink_to("/dev/zero")
    with pytest.raises(LograError, match="not a regular file"):
        if what == "preconditioner":
            logra.load_preconditioner(pre)
        else:
            logra.GradientStore.open(path)


def test_an_id_file_larger_than_the_manifest_says_is_not_read(pristine: Path, tmp_path: Path) -> None:
    path = _copy(pristine, tmp_path / "s")
    ids = path / logra.GradientStore.open(path).manifest.shards[0].ids_file
    ids.write_bytes(ids.read_bytes() + b" " * 10_000)
    with pytest.raises(StoreCorruptedError, match="more than"):
        logra.GradientStore.open(path)


# --------------------------------------------------------------------------------------------
# 7. A model on the meta device.


def test_a_meta_device_model_is_refused_with_a_capture_error() -> None:
    with torch.device("meta"):
        model = build_model("mlp")
    with pytest.raises(CaptureError, match="meta device"):
        logra.GradientLogger(model, CFG)


# --------------------------------------------------------------------------------------------
# 8. Queries carry their config and model; silence becomes a warning or a refusal.


def test_records_are_checked_and_bare_rows_warn(pristine: Path) -> None:
    store = logra.GradientStore.open(pristine)
    scorer = logra.Scorer(store, logra.fit_preconditioner(store, "kfac"))
    good = _queries()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scores = scorer.score(good)  # a Record: checked, no warning
    with pytest.warns(UserWarning, match="cannot check"):
        assert torch.equal(scorer.score(good.rows), scores)  # type: ignore[arg-type]
    other_seed = _queries(cfg=logra.LoGraConfig(**{**CFG.to_dict(), "seed": 2}))
    other_model = _queries(model=build_model("mlp", seed=5))
    for bad, message in ((other_seed, "another config"), (other_model, "other model weights")):
        with pytest.raises(ConfigError, match=message):
            scorer.score(bad)
        rows = logra.QueryRows.of([bad])
        with pytest.raises(ConfigError, match=message):
            scorer.top_k(rows, 2)
        with pytest.raises(ConfigError, match=message):
            logra.Scorer(store, scorer.preconditioner, query_config=rows)


def test_duplicate_query_ids_are_refused() -> None:
    rec = _queries()
    with pytest.raises(DuplicateIdError, match="q0"):
        logra.QueryRows(["q0", "q0"], rec.rows, CFG, str(rec.model_fingerprint), tuple(rec.layers or ()))  # type: ignore[arg-type]


def test_all_zero_rows_warn() -> None:
    model = build_model("mlp")
    batch, mask = collate(make_examples("mlp", 2, seed=9))
    with logra.GradientLogger(model, CFG) as logger:
        with pytest.warns(UserWarning, match="all zero"):
            with logger.record(ids=[0, 1], mask=torch.zeros_like(mask)):
                (0 * per_example_loss(model, batch)).sum().backward()


def _scaled_log(path: Path, dtype: str, scale: float) -> None:
    model = build_model("mlp").double()
    cfg = logra.LoGraConfig(**{**CFG.to_dict(), "dtype": dtype})
    batch, mask = collate(make_examples("mlp", 3, seed=4))
    batch = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    with logra.GradientLogger(model, cfg, store=path) as logger:
        with logger.record(ids=[0, 1, 2], mask=mask):
            (scale * per_example_loss(model, batch)).sum().backward()


def test_rows_that_underflow_the_storage_dtype_warn(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="underflow to 0 in the storage dtype float32"):
        _scaled_log(tmp_path / "s", "float32", 1e-300)


def test_float32_overflow_advises_float64(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="dtype='float64'"):
        _scaled_log(tmp_path / "s", "float32", 1e300)


# --------------------------------------------------------------------------------------------
# 9. Messages that say what happened.


def test_a_duplicate_within_one_batch_says_so(tmp_path: Path) -> None:
    model = build_model("mlp")
    batch, mask = collate(make_examples("mlp", 2, seed=9))
    with logra.GradientLogger(model, CFG, store=tmp_path / "s") as logger:
        with pytest.raises(DuplicateIdError, match="twice within this batch"):
            with logger.record(ids=[7, 7], mask=mask):
                per_example_loss(model, batch).sum().backward()


def test_an_all_zero_mask_says_no_tokens_not_no_examples(tmp_path: Path) -> None:
    model = build_model("mlp")
    batch, mask = collate(make_examples("mlp", 3, seed=9))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with logra.GradientLogger(model, CFG, store=tmp_path / "s") as logger:
            with logger.record(ids=[0, 1, 2], mask=torch.zeros_like(mask)):
                per_example_loss(model, batch).sum().backward()
    with pytest.raises(ConfigError, match="3 examples but no tokens"):
        logra.fit_preconditioner(logra.GradientStore.open(tmp_path / "s"), "kfac")


def test_enospc_in_the_statistics_temp_file_names_the_statistics(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import logra.store.statistics as statistics_module

    def full(path: Any, write: Any) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path) + ".tmp")

    monkeypatch.setattr(statistics_module, "write_durable", full)
    with pytest.raises(StoreError, match="writing the statistics file statistics-000-000000.npz"):
        _log(tmp_path / "s", n=3)
