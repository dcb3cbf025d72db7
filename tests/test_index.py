"""Two-stage queries (logra.index): shortlist recall, exact stage two, staleness, corruption."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import logra
from logra.index import INDEX_DIR, InfluenceIndex
from logra.store.writer import StoreWriter
from logra.types import LayerInfo

pytest.importorskip("faiss")

D = 48


def _clustered(n: int, seed: int) -> torch.Tensor:
    """Rows around 20 centres with norms that vary, like per-example gradients of a few classes."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.randn(20, D, generator=gen, dtype=torch.float64) * 3
    which = torch.randint(0, 20, (n,), generator=gen)
    scale = torch.rand(n, 1, generator=gen, dtype=torch.float64) + 0.5
    return (centres[which] + torch.randn(n, D, generator=gen, dtype=torch.float64)) * scale


def _store(root: Path, n: int = 3000, seed: int = 0) -> logra.GradientStore:
    layers = [LayerInfo("a", "linear", 8, 6, 4, 6, False, 0), LayerInfo("b", "linear", 8, 6, 4, 6, False, 24)]
    config = logra.LoGraConfig(k_in=4, k_out=6, dtype="float32")
    writer = StoreWriter(root, config, "f" * 16, layers, shard_rows=700)
    rows = _clustered(n, seed)
    for s in range(0, n, 500):
        writer.append([f"ex{i}" for i in range(s, min(n, s + 500))], rows[s : s + 500])
        writer.commit_if_full(None)
    writer.close(None)
    return logra.GradientStore.open(root)


def _scorer(store: logra.GradientStore, normalization: str) -> logra.Scorer:
    pre = logra.fit_preconditioner(store, "raw", damping=1.0)
    return logra.Scorer(store, pre, normalization, chunk_rows=512, progress=False)


@pytest.fixture(scope="module", name="store")
def _store_fixture(tmp_path_factory: pytest.TempPathFactory) -> logra.GradientStore:
    return _store(tmp_path_factory.mktemp("index") / "s")


def _recall(found: torch.Tensor, exact: torch.Tensor) -> float:
    return sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact.tolist())) / exact.numel()


def _two_stage_against_exact(
    scorer: logra.Scorer, index: InfluenceIndex, *, shortlist: int, nprobe: int
) -> logra.TopK:
    """The index's top-10 of the clustered queries: recall >= 0.95 of the exact top-10 in both
    directions, and stage two exact (every returned score is the Scorer's score of that row)."""
    queries = _clustered(8, seed=5).to(torch.float32)
    with pytest.warns(UserWarning, match="bare query rows"):
        exact = scorer.top_k(queries, k=10)
    with pytest.warns(UserWarning, match="bare query rows"):
        two = index.top_k(queries, k=10, shortlist=shortlist, nprobe=nprobe)
    assert _recall(two.helpful_rows, exact.helpful_rows) >= 0.95
    assert _recall(two.harmful_rows, exact.harmful_rows) >= 0.95
    with pytest.warns(UserWarning):
        full = scorer.score(queries)
    torch.testing.assert_close(two.helpful_scores, full.gather(1, two.helpful_rows), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two.harmful_scores, full.gather(1, two.harmful_rows), rtol=1e-5, atol=1e-5)
    return two


@pytest.mark.parametrize("normalization", ["dot", "cosine", "relative"])
def test_two_stage_recall_and_exact_scores(store: logra.GradientStore, normalization: str) -> None:
    scorer = _scorer(store, normalization)
    two = _two_stage_against_exact(scorer, InfluenceIndex(scorer, threads=1), shortlist=100, nprobe=16)
    assert two.helpful_ids[0][0] == store.ids[int(two.helpful_rows[0, 0])]


def test_shortlist_is_not_exact_with_one_probe(store: logra.GradientStore) -> None:
    """A sanity check that the recall test can fail: one IVF list of ~70 misses most of the top-10."""
    scorer = _scorer(store, "dot")
    queries = _clustered(8, seed=5).to(torch.float32)
    index = InfluenceIndex(scorer, factory="IVF64,Flat", threads=1)
    with pytest.warns(UserWarning):
        exact = scorer.top_k(queries, k=10)
        helpful, _ = index.shortlist(queries, 10, nprobe=1)
    assert _recall(helpful, exact.helpful_rows) < 0.9


def test_index_is_reused_then_rebuilt_when_stale(tmp_path: Path) -> None:
    store = _store(tmp_path / "s", n=1200)
    first = InfluenceIndex(_scorer(store, "cosine"), threads=1)
    assert first.built and first.path == store.root / INDEX_DIR / "cosine.faiss"
    assert not InfluenceIndex(_scorer(store, "cosine"), threads=1).built
    # Another preconditioner (the index holds preconditioned rows): stale.
    other = logra.Scorer(store, logra.fit_preconditioner(store, "raw", damping=5.0), "cosine", progress=False)
    assert InfluenceIndex(other, threads=1).built
    assert not InfluenceIndex(other, threads=1).built
    # Each normalisation has its own file.
    assert InfluenceIndex(_scorer(store, "dot"), threads=1).built
    assert sorted(p.name for p in (store.root / INDEX_DIR).iterdir()) == [
        "cosine.faiss", "cosine.json", "dot.faiss", "dot.json"
    ]  # fmt: skip
    # New rows (a new store snapshot) make it stale.
    writer = StoreWriter(store.root, store.config, store.model_fingerprint, store.layers, shard_rows=700)
    writer.append(["new0", "new1"], _clustered(2, seed=9))
    writer.close(None)
    grown = logra.GradientStore.open(store.root)
    index = InfluenceIndex(_scorer(grown, "dot"), threads=1)
    assert index.built and index.index.ntotal == len(grown) == 1202
    # A different factory string than the one on disk: stale too.
    assert InfluenceIndex(_scorer(grown, "dot"), factory="IVF8,Flat", threads=1).built


@pytest.mark.parametrize("damage", ["flip", "truncate", "info", "missing"])
def test_damaged_index_raises(tmp_path: Path, damage: str) -> None:
    store = _store(tmp_path / "s", n=1200)
    index = InfluenceIndex(_scorer(store, "dot"), threads=1)
    path, info = index.path, index.path.with_suffix(".json")
    if damage == "flip":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    elif damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "info":
        body = json.loads(info.read_text())
        body["rows"] = 5
        info.write_text(json.dumps(body))
    else:
        path.unlink()
    with pytest.raises(logra.StoreCorruptedError, match="rebuild=True") as err:
        InfluenceIndex(_scorer(store, "dot"), threads=1)
    assert str(path) in str(err.value)
    assert InfluenceIndex(_scorer(store, "dot"), rebuild=True, threads=1).built


def test_bad_arguments(store: logra.GradientStore) -> None:
    with pytest.raises(logra.ConfigError, match="index_factory"):
        InfluenceIndex(_scorer(store, "dot"), factory="NotAnIndex", directory=store.root / "other", threads=1)
    index = InfluenceIndex(_scorer(store, "dot"), threads=1)
    queries = _clustered(2, seed=5).to(torch.float32)
    with pytest.raises(logra.ConfigError, match="nprobe"):
        index.top_k(queries, k=5, nprobe=0)
    with pytest.raises(logra.ConfigError, match="k="):
        index.top_k(queries, k=0)


def test_take_and_score_rows_match_the_full_pass(store: logra.GradientStore) -> None:
    rows = torch.tensor([1400, 5, 699, 700, 2999, 5])  # across shards, unsorted, repeated
    torch.testing.assert_close(store.take(rows), store.rows()[rows], rtol=0, atol=0)
    scorer = _scorer(store, "relative")
    queries = _clustered(3, seed=7).to(torch.float32)
    with pytest.warns(UserWarning):
        torch.testing.assert_close(scorer.score_rows(queries, rows), scorer.score(queries)[:, rows])
    with pytest.raises(logra.StoreError, match="row indices"):
        store.take([3000])


def test_exhaustive_index_gives_the_exact_top_k(store: logra.GradientStore, tmp_path: Path) -> None:
    """With FAISS's exhaustive "Flat" index the lift to L2 is exact: the same top-k as the Scorer."""
    scorer = _scorer(store, "relative")
    queries = _clustered(4, seed=3).to(torch.float32)
    index = InfluenceIndex(scorer, factory="Flat", directory=tmp_path, threads=1)
    with pytest.warns(UserWarning):
        exact, two = scorer.top_k(queries, k=10), index.top_k(queries, k=10)
    assert torch.equal(two.helpful_rows, exact.helpful_rows) and torch.equal(two.harmful_rows, exact.harmful_rows)
    with pytest.raises(logra.ConfigError, match="applies to IVF"):
        index.shortlist(queries, 5, nprobe=2)


def test_default_factory_compresses_large_stores() -> None:
    """8-bit codes while they fit SQ8_MAX_BYTES, 6-bit while those fit SQ6_MAX_BYTES, then PQ; lists capped."""
    from logra.index import MAX_LISTS, SQ6_MAX_BYTES, SQ8_MAX_BYTES, default_factory, default_nprobe

    assert default_factory(3000, D) == "IVF76,SQ8"  # 4·sqrt(3000) = 219 > 3000 // 39 = 76
    assert default_factory(100_000, 1024) == "IVF1024,SQ8"  # 4·sqrt(N) = 1264, capped
    assert default_factory(10_000_000, 1024) == f"IVF{MAX_LISTS},SQ6"  # 7.9 GB of 6-bit codes
    assert default_factory(20_000_000, 1024) == f"IVF{MAX_LISTS},PQ66"  # 1056 columns / 16
    edge = SQ8_MAX_BYTES // 1056
    assert default_factory(edge, 1024).endswith(",SQ8") and default_factory(edge + 1, 1024).endswith(",SQ6")
    edge = SQ6_MAX_BYTES * 4 // 3 // 1056
    assert default_factory(edge, 1024).endswith(",SQ6") and default_factory(edge + 1, 1024).endswith(",PQ66")
    assert [default_nprobe(n) for n in (1, 5, 76, 256, 1024, 4096)] == [1, 5, 8, 8, 32, 128]
    with pytest.raises(logra.ConfigError, match="rows=0"):
        default_factory(0, 1024)


def test_pq_index_recalls_with_a_larger_shortlist(store: logra.GradientStore, tmp_path: Path) -> None:
    """The large-store default (IVF + PQ, width/16 sub-quantizers) through stage two: exact scores, high recall."""
    scorer = _scorer(store, "dot")
    index = InfluenceIndex(scorer, factory="IVF16,PQ4", directory=tmp_path, threads=1)
    _two_stage_against_exact(scorer, index, shortlist=300, nprobe=8)


def test_harmful_nprobe_searches_the_harmful_direction_only(store: logra.GradientStore, tmp_path: Path) -> None:
    """harmful_nprobe changes the harmful shortlist and leaves the helpful one as nprobe gives it."""
    index = InfluenceIndex(_scorer(store, "dot"), factory="IVF64,Flat", directory=tmp_path, threads=1)
    queries = _clustered(8, seed=5).to(torch.float32)
    with pytest.warns(UserWarning):
        one_helpful, one_harmful = index.shortlist(queries, 50, nprobe=1)
        helpful, harmful = index.shortlist(queries, 50, nprobe=1, harmful_nprobe=64)
        every_helpful, every_harmful = index.shortlist(queries, 50, nprobe=64)
    assert torch.equal(helpful, one_helpful) and torch.equal(harmful, every_harmful)
    assert not torch.equal(one_harmful, every_harmful)  # one probe misses: the knob is not a no-op
    with pytest.raises(logra.ConfigError, match="harmful_nprobe"):
        index.top_k(queries, k=5, harmful_nprobe=0)
