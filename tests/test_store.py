"""The gradient store: round trips, invariance to batch and shard size, resume, refusals, ids.

Rows are compared by id with batch-size-1 autograd references (tests/models.py) or with the
logger's own in-memory rows, in float64 unless a test is about the storage dtype.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from models import (
    assert_rows_close,
    build_model,
    log_rows,
    make_examples,
    reference_rows,
    reference_statistics,
)

import logra
from logra.errors import DuplicateIdError, StoreError

REL = 1e-10
N = 7
TORCH_DTYPE = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}
EPS = {"float32": 2.0**-24, "float64": 2.0**-53, "bfloat16": 2.0**-8, "float16": 2.0**-11}


def _cfg(**kw) -> logra.LoGraConfig:
    base = {"k_in": 5, "k_out": 4, "seed": 11, "dtype": "float64", "include_bias": True}
    return logra.LoGraConfig(**{**base, **kw})


def _ids(n: int = N) -> list[str]:
    return [f"ex{i}" for i in range(n)]


def _write(path: Path, model, cfg, examples, ids, batch_size: int, shard_rows: int | None):
    with logra.GradientLogger(model, cfg, store=path, shard_rows=shard_rows) as logger:
        got_ids, rows = log_rows(logger, examples, ids, batch_size)
    return logger, got_ids, rows


def _by_id(store: logra.GradientStore) -> dict:
    rows = store.rows()
    return {i: rows[r] for r, i in enumerate(store.ids)}


@pytest.fixture(scope="module")
def mlp_case():
    """The MLP, its examples, the layer table and the batch-size-1 reference rows and statistics."""
    model = build_model("mlp")
    examples = make_examples("mlp", N, seed=8)
    with logra.GradientLogger(model, _cfg()) as logger:
        pass
    expected = reference_rows(model, examples, logger.layers, logger.projection, include_bias=True)
    stats = reference_statistics(model, examples, logger.layers, logger.projection)
    return model, examples, logger.layers, expected, stats


# ---------------------------------------------------------------- invariance


@pytest.mark.parametrize("shard_rows", [1, 2, 1000])
@pytest.mark.parametrize("batch_size", [1, 3, N])
def test_rows_and_statistics_do_not_depend_on_batch_or_shard_size(tmp_path, mlp_case, batch_size, shard_rows) -> None:
    model, examples, layers, expected, expected_stats = mlp_case
    _write(tmp_path / "s", model, _cfg(), examples, _ids(), batch_size, shard_rows)
    store = logra.GradientStore.open(tmp_path / "s")
    store.verify()
    assert sorted(store.ids) == sorted(_ids()) and len(store) == N
    n_batches = -(-N // batch_size)
    per_shard = -(-shard_rows // batch_size) * batch_size  # commits happen at batch boundaries
    assert len(store.manifest.shards) == (n_batches if shard_rows == 1 else -(-N // per_shard))
    by_id = _by_id(store)
    got = torch.stack([by_id[i] for i in _ids()])
    assert_rows_close(got, expected, layers, REL)
    stats = store.statistics()
    for name, (a, s, n_tokens, n_examples) in expected_stats.items():
        torch.testing.assert_close(stats[name].input_sum, a, rtol=REL, atol=REL * a.abs().max().item())
        torch.testing.assert_close(stats[name].grad_sum, s, rtol=REL, atol=REL * s.abs().max().item())
        assert (stats[name].n_tokens, stats[name].n_examples) == (n_tokens, n_examples)
    assert stats[layers[0].name].n_tokens == sum(len(e["x"]) for e in examples)


# ---------------------------------------------------------------- round trip


@pytest.mark.parametrize("dtype", ["float32", "float64", "bfloat16", "float16"])
def test_round_trip_every_dtype(tmp_path, mlp_case, dtype: str) -> None:
    model, examples, layers, expected, _ = mlp_case
    logger, ids, rows = _write(tmp_path / "s", model, _cfg(dtype=dtype), examples, _ids(), 2, shard_rows=3)
    store = logra.GradientStore.open(tmp_path / "s")
    assert store.ids == ids == _ids() and len(store) == N and store.dim == logger.dim
    assert list(store.layers) == logger.layers and store.config == _cfg(dtype=dtype)
    assert store.dtype is logra.StorageDtype(dtype)
    assert [s.rows for s in store.manifest.shards] == [4, 3]
    full = store.rows()
    out = torch.float32 if dtype == "float16" else TORCH_DTYPE[dtype]  # float16 rows are read back rescaled, float32
    assert full.dtype == out and full.shape == (N, logger.dim)
    assert torch.equal(full, rows.to(TORCH_DTYPE[dtype]).to(out))  # exactly the in-memory rows, rounded once
    assert_rows_close(full, expected, layers, rel=EPS[dtype] if dtype != "float64" else REL)
    stats = store.statistics()
    for name, s in logger.statistics().items():  # statistics are float64 whatever the row dtype
        assert torch.equal(stats[name].input_sum, s.input_sum) and torch.equal(stats[name].grad_sum, s.grad_sum)
        assert (stats[name].n_tokens, stats[name].n_examples) == (s.n_tokens, s.n_examples)


def test_readers_slice_rows_layers_and_chunks(tmp_path, mlp_case) -> None:
    model, examples, layers, _, _ = mlp_case
    _, _, rows = _write(tmp_path / "s", model, _cfg(), examples, _ids(), 1, shard_rows=3)
    store = logra.GradientStore.open(tmp_path / "s")
    assert [s.rows for s in store.manifest.shards] == [3, 3, 1]
    for start in range(N + 1):
        for stop in range(start, N + 1):  # every range, including those across shard boundaries
            assert torch.equal(store.rows(start, stop), rows[start:stop])
    for layer in store.layers:
        block = rows[:, layer.offset : layer.offset + layer.size]
        assert torch.equal(store.layer_rows(layer.name), block)
        assert torch.equal(store.layer_rows(layer.name, 2, 5), block[2:5])
        assert store.layer(layer.name) == layer
    with pytest.raises(StoreError, match="nope"):
        store.layer_rows("nope")
    for bad in ((-1, 2), (3, 2), (0, N + 1)):
        with pytest.raises(StoreError, match="outside"):
            store.rows(*bad)


@pytest.mark.parametrize("chunk_rows", [1, 2, 3, 100])
def test_iter_chunks_are_zero_copy_and_never_cross_a_shard(tmp_path, mlp_case, chunk_rows: int) -> None:
    model, examples, _, _, _ = mlp_case
    _, _, rows = _write(tmp_path / "s", model, _cfg(), examples, _ids(), 1, shard_rows=3)
    store = logra.GradientStore.open(tmp_path / "s")
    shard_starts = [0, 3, 6]
    chunks = list(store.iter_chunks(chunk_rows))
    firsts = [first for first, _ in chunks]
    assert torch.equal(torch.cat([c for _, c in chunks]), rows)
    assert firsts == sorted(firsts) and firsts[0] == 0
    for (first, chunk), nxt in zip(chunks, firsts[1:] + [N]):
        assert first + len(chunk) == nxt
        shard = max(s for s in shard_starts if s <= first)
        assert first + len(chunk) <= ([s for s in shard_starts if s > first] + [N])[0], "a chunk crossed a shard"
        assert len(chunk) <= chunk_rows
        if first > shard:  # the previous chunk lies in the same memory map, right before this one
            prev_first, prev = chunks[firsts.index(first) - 1]
            assert chunk.data_ptr() == prev.data_ptr() + len(prev) * store.dim * chunk.element_size()
    # Views are copy-on-write: writing into one does not reach the file.
    chunks[0][1].fill_(123.0)
    assert torch.equal(logra.GradientStore.open(tmp_path / "s").rows(), rows)
    logra.GradientStore.open(tmp_path / "s").verify()
    with pytest.raises(StoreError, match="chunk_rows"):
        next(store.iter_chunks(0))


def test_query_rows_in_memory_equal_stored_rows(tmp_path) -> None:
    model = build_model("gpt2")
    examples = make_examples("gpt2", 5, seed=9)
    cfg = _cfg(modules=["*mlp*", "*c_attn"])
    _, _, stored_in_memory = _write(tmp_path / "s", model, cfg, examples, list(range(5)), 2, shard_rows=2)
    store = logra.GradientStore.open(tmp_path / "s")
    with logra.GradientLogger(model, cfg) as query:
        assert query.store_path is None and query.committed_ids == frozenset()
        _, same_batches = log_rows(query, examples, list(range(5)), batch_size=2)
        _, one_batch = log_rows(query, examples, list(range(5, 10)), batch_size=5)
    assert query.layers == list(store.layers)
    assert torch.equal(same_batches, store.rows()) and torch.equal(stored_in_memory, store.rows())
    assert_rows_close(one_batch, store.rows(), query.layers, 1e-12)


# ---------------------------------------------------------------- resume and refusals


def test_reopen_with_the_same_config_resumes(tmp_path, mlp_case) -> None:
    model, examples, layers, expected, _ = mlp_case
    path = tmp_path / "s"
    _write(path, model, _cfg(), examples[:4], _ids()[:4], 2, shard_rows=2)
    _, _, one_shot = _write(tmp_path / "ref", model, _cfg(), examples, _ids(), 2, shard_rows=2)
    with logra.GradientLogger(model, _cfg(), store=path, shard_rows=2) as logger:
        assert logger.committed_ids == frozenset(_ids()[:4])
        todo = [(i, e) for i, e in zip(_ids(), examples) if i not in logger.committed_ids]
        log_rows(logger, [e for _, e in todo], [i for i, _ in todo], 2)
    store, ref = logra.GradientStore.open(path), logra.GradientStore.open(tmp_path / "ref")
    assert store.ids == _ids()
    assert torch.equal(store.rows(), ref.rows())
    for name, s in ref.statistics().items():
        got = store.statistics()[name]
        torch.testing.assert_close(got.input_sum, s.input_sum, rtol=1e-13, atol=0)
        torch.testing.assert_close(got.grad_sum, s.grad_sum, rtol=1e-13, atol=1e-13 * s.grad_sum.abs().max().item())
        assert (got.n_tokens, got.n_examples) == (s.n_tokens, s.n_examples)


@pytest.mark.parametrize(
    "change",
    [{"k_in": 4}, {"seed": 12}, {"dtype": "float32"}, {"include_bias": False}, {"init": "orthogonal"},
     {"modules": ["fc*"]}, {"loss_reduction": "mean"}],
    ids=lambda c: next(iter(c)),
)  # fmt: skip
def test_reopen_with_another_config_is_refused(tmp_path, mlp_case, change) -> None:
    model, examples, _, _, _ = mlp_case
    _write(tmp_path / "s", model, _cfg(), examples[:2], _ids()[:2], 2, shard_rows=1)
    with pytest.raises(StoreError, match=f"config differs.*{next(iter(change))}"):
        logra.GradientLogger(model, _cfg(**change), store=tmp_path / "s")
    assert logra.GradientStore.open(tmp_path / "s").ids == _ids()[:2]  # untouched
    assert sum(len(m._forward_hooks) for m in model.modules()) == 0  # the refused logger released its hooks


def test_reopen_with_other_model_weights_is_refused(tmp_path, mlp_case) -> None:
    model, examples, _, _, _ = mlp_case
    _write(tmp_path / "s", model, _cfg(), examples[:2], _ids()[:2], 2, shard_rows=1)
    other = build_model("mlp", seed=1)
    with pytest.raises(StoreError, match="model differs"):
        logra.GradientLogger(other, _cfg(), store=tmp_path / "s")
    nudged = build_model("mlp")
    with torch.no_grad():
        nudged.fc2.weight[0, 0] += 1e-3
    with pytest.raises(StoreError, match="model differs"):
        logra.GradientLogger(nudged, _cfg(), store=tmp_path / "s")


@pytest.mark.parametrize("first,then", [(True, False), (False, True)])
def test_resume_with_another_statistics_flag_is_refused(tmp_path, mlp_case, first: bool, then: bool) -> None:
    model, examples, _, _, _ = mlp_case
    with logra.GradientLogger(model, _cfg(), store=tmp_path / "s", statistics=first) as logger:
        log_rows(logger, examples[:2], _ids()[:2], 2)
    with pytest.raises(StoreError, match=f"statistics={first}"):
        logra.GradientLogger(model, _cfg(), store=tmp_path / "s", statistics=then)


def test_store_path_that_is_a_file_or_not_a_store(tmp_path, mlp_case) -> None:
    model = mlp_case[0]
    (tmp_path / "file").write_text("x")
    with pytest.raises(StoreError, match="not a directory"):
        logra.GradientLogger(model, _cfg(), store=tmp_path / "file")
    with pytest.raises(StoreError, match="no manifest"):
        logra.GradientStore.open(tmp_path)


# ---------------------------------------------------------------- ids


def _record(logger, model, examples, ids, mask_too: bool = True) -> None:
    from models import collate, per_example_loss

    batch, mask = collate(examples)
    with logger.record(ids=ids, mask=mask if mask_too else None):
        per_example_loss(model, batch).sum().backward()


def test_duplicate_ids_are_refused(tmp_path, mlp_case) -> None:
    model, examples, _, _, _ = mlp_case
    path = tmp_path / "s"
    with logra.GradientLogger(model, _cfg(), store=path, shard_rows=100) as logger:
        with pytest.raises(DuplicateIdError, match="'a'"):
            _record(logger, model, examples[:2], ["a", "a"])  # within a batch
        _record(logger, model, examples[:2], ["a", "b"])
        with pytest.raises(DuplicateIdError, match="'b'"):
            _record(logger, model, examples[2:4], ["c", "b"])  # against a pending, uncommitted batch
        _record(logger, model, examples[2:4], ["c", "d"])
    assert logra.GradientStore.open(path).ids == ["a", "b", "c", "d"]
    with logra.GradientLogger(model, _cfg(), store=path) as logger:
        with pytest.raises(DuplicateIdError, match="'d'"):
            _record(logger, model, examples[4:6], ["e", "d"])  # against the committed store
        _record(logger, model, examples[4:6], ["e", 1])  # an int id is not the str "1"
    store = logra.GradientStore.open(path)
    assert store.ids == ["a", "b", "c", "d", "e", 1]
    assert issubclass(DuplicateIdError, StoreError)


@pytest.mark.parametrize(
    "ids,expected",
    [
        (torch.tensor([5, 3, 9]), [5, 3, 9]),
        (np.array([5, 3, 9], dtype=np.int32), [5, 3, 9]),
        ([np.int64(7), 2, 0], [7, 2, 0]),
        (["x/1", "ü", ""], ["x/1", "ü", ""]),
        ([1, "1", 2], [1, "1", 2]),
    ],
    ids=["tensor", "numpy", "numpy-ints", "strs", "mixed"],
)
def test_ids_as_tensors_ints_and_strs_round_trip(tmp_path, mlp_case, ids, expected) -> None:
    model, examples, _, _, _ = mlp_case
    with logra.GradientLogger(model, _cfg(), store=tmp_path / "s") as logger:
        _record(logger, model, examples[:3], ids)
    got = logra.GradientStore.open(tmp_path / "s").ids
    assert got == expected and [type(i) for i in got] == [type(i) for i in expected]


@pytest.mark.parametrize(
    "ids",
    [torch.tensor([0.0, 1.0, 2.0]), torch.zeros(3, 1, dtype=torch.long), [0, 1.5, 2], [True, 0, 1], "abc", 3],
    ids=["float-tensor", "2d-tensor", "float", "bool", "str", "int"],
)
def test_bad_ids_are_refused(tmp_path, mlp_case, ids) -> None:
    model, examples, _, _, _ = mlp_case
    with logra.GradientLogger(model, _cfg(), store=tmp_path / "s") as logger:
        with pytest.raises(StoreError, match="id"):
            _record(logger, model, examples[:3], ids)
    assert len(logra.GradientStore.open(tmp_path / "s")) == 0
