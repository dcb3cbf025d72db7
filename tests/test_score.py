"""The streaming scorer against dense float64 references, and its invariances."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _scoring_fixtures import Logged, TinyMLP, dense_inverse, gpt2_fixture, log_mlp, mlp_fixture  # noqa: F401  (the `gpt2` and `mlp` fixtures)

import logra
from logra.curvature import fit_preconditioner
from logra.score import Scorer

METHODS = ["identity", "kfac", "ekfac", "raw"]
NORMALIZATIONS = ["dot", "cosine", "relative"]


def reference_scores(
    logged: Logged, method: str, damping: dict[str, float], normalization: str = "dot"
) -> torch.Tensor:
    """[Q, N] from the dense inverse: g_qᵀ H⁻¹ g_i, then the normalisation's explicit formula."""
    h_inv = dense_inverse(method, logged.store, damping)
    train = logged.store.rows().to(torch.float64)
    scores = logged.queries @ h_inv @ train.T
    train_self = torch.einsum("nd,de,ne->n", train, h_inv, train)
    query_self = torch.einsum("qd,de,qe->q", logged.queries, h_inv, logged.queries)
    if normalization in ("cosine", "relative"):
        scores = scores / train_self.sqrt()
    if normalization == "cosine":
        scores = scores / query_self.sqrt()[:, None]
    return scores


@pytest.mark.parametrize("model", ["mlp", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
def test_scores_equal_the_dense_inverse(request: pytest.FixtureRequest, model: str, method: str) -> None:
    logged: Logged = request.getfixturevalue(model)
    pre = fit_preconditioner(logged.store, method)
    got = Scorer(logged.store, pre).score(logged.queries)
    assert got.dtype == torch.float64 and got.shape == (logged.queries.shape[0], len(logged.store))
    torch.testing.assert_close(got, reference_scores(logged, method, pre.damping), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("method", ["kfac", "raw"])
def test_normalisations_equal_their_formulas(mlp: Logged, method: str, normalization: str) -> None:
    pre = fit_preconditioner(mlp.store, method)
    got = Scorer(mlp.store, pre, normalization).score(mlp.queries)
    torch.testing.assert_close(got, reference_scores(mlp, method, pre.damping, normalization), rtol=1e-10, atol=1e-12)


def test_identity_is_the_plain_dot_product_and_cosine(mlp: Logged) -> None:
    pre = fit_preconditioner(mlp.store, "identity")
    train = mlp.store.rows()
    torch.testing.assert_close(Scorer(mlp.store, pre).score(mlp.queries), mlp.queries @ train.T, rtol=1e-13, atol=0)
    cosine = torch.nn.functional.cosine_similarity(mlp.queries[:, None, :], train[None, :, :], dim=-1)
    torch.testing.assert_close(Scorer(mlp.store, pre, "cosine").score(mlp.queries), cosine, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", METHODS)
def test_self_influence_is_the_diagonal_of_pairwise_scores(mlp: Logged, method: str) -> None:
    scorer = Scorer(mlp.store, fit_preconditioner(mlp.store, method))
    pairwise = scorer.score(mlp.store)  # the training store as its own query store
    torch.testing.assert_close(scorer.self_influence(), torch.diagonal(pairwise), rtol=1e-12, atol=1e-14)
    assert bool((scorer.self_influence() > 0).all())


@pytest.mark.parametrize("method", METHODS)
def test_self_influence_in_row_blocks_equals_whole_chunks(
    mlp: Logged, monkeypatch: pytest.MonkeyPatch, method: str
) -> None:
    """On the CPU self-influence runs _BLOCK_ROWS rows at a time: blocks of 7 (partial ones too),
    chunks of 10, give the dense reference's diagonal, for every preconditioner."""
    import logra.score as score_module

    pre = fit_preconditioner(mlp.store, method)
    expected = torch.diagonal(Scorer(mlp.store, pre).score(mlp.store))
    monkeypatch.setattr(score_module, "_BLOCK_ROWS", 7)
    blocked = Scorer(mlp.store, pre, chunk_rows=10)
    torch.testing.assert_close(blocked.self_influence(), expected, rtol=1e-12, atol=1e-14)
    assert len(mlp.store) > 10  # several chunks, each of several blocks


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("method", METHODS)
def test_per_layer_scores_sum_to_the_total(mlp: Logged, method: str, normalization: str) -> None:
    scorer = Scorer(mlp.store, fit_preconditioner(mlp.store, method), normalization)
    parts = scorer.score_by_layer(mlp.queries)
    assert list(parts) == [layer.name for layer in mlp.store.layers]
    torch.testing.assert_close(sum(parts.values()), scorer.score(mlp.queries), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("normalization", NORMALIZATIONS)
@pytest.mark.parametrize("chunk_rows", [1, 7, 4096])
def test_top_k_equals_sorting_the_full_matrix(mlp: Logged, normalization: str, chunk_rows: int) -> None:
    scorer = Scorer(mlp.store, fit_preconditioner(mlp.store, "ekfac"), normalization, chunk_rows=chunk_rows)
    full = scorer.score(mlp.queries)
    top = scorer.top_k(mlp.queries, k=5)
    order = torch.argsort(full, dim=1, descending=True)
    ids = mlp.store.ids
    assert top.helpful_ids == [[ids[j] for j in row[:5]] for row in order.tolist()]
    assert top.harmful_ids == [[ids[j] for j in row[::-1][:5]] for row in order.tolist()]
    torch.testing.assert_close(top.helpful_scores, full.gather(1, order[:, :5]), rtol=0, atol=0)
    torch.testing.assert_close(top.harmful_scores, full.gather(1, order.flip(1)[:, :5]), rtol=0, atol=0)
    assert torch.equal(top.helpful_rows, order[:, :5])


@pytest.mark.parametrize("method", METHODS)
def test_chunk_and_shard_sizes_do_not_change_scores(mlp: Logged, tmp_path: pytest.TempPathFactory, method: str) -> None:
    pre = fit_preconditioner(mlp.store, method)
    reference = Scorer(mlp.store, pre, "relative", chunk_rows=4096)
    expected, expected_self = reference.score(mlp.queries), reference.self_influence()
    for chunk_rows in (1, 5, 23):
        scorer = Scorer(mlp.store, pre, "relative", chunk_rows=chunk_rows)
        torch.testing.assert_close(scorer.score(mlp.queries), expected, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(scorer.self_influence(), expected_self, rtol=1e-12, atol=1e-14)
    sharded = log_mlp(tmp_path / "sharded", shard_rows=4, batch=2)
    assert len(sharded.store.manifest.shards) == 6 and sharded.store.ids == mlp.store.ids
    scorer = Scorer(sharded.store, fit_preconditioner(sharded.store, method), "relative", chunk_rows=3)
    torch.testing.assert_close(scorer.score(mlp.queries), expected, rtol=1e-9, atol=1e-12)


def test_scoring_is_pure(mlp: Logged) -> None:
    scorer = Scorer(mlp.store, fit_preconditioner(mlp.store, "kfac"), "cosine")
    queries = mlp.queries.clone()
    assert torch.equal(scorer.score(queries), scorer.score(queries)) and torch.equal(queries, mlp.queries)


def test_scores_to_a_memory_map(mlp: Logged, tmp_path: pytest.TempPathFactory) -> None:
    scorer = Scorer(mlp.store, fit_preconditioner(mlp.store, "raw"), chunk_rows=5)
    path = tmp_path / "scores.npy"
    mapped = scorer.score(mlp.queries, out=path)
    assert mapped.dtype == torch.float32 and mapped.shape == (4, 24)
    expected = scorer.score(mlp.queries)
    torch.testing.assert_close(mapped.double(), expected, rtol=1e-6, atol=1e-6 * float(expected.abs().max()))
    on_disk = np.load(path, mmap_mode="r")
    assert np.array_equal(on_disk, mapped.numpy())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_stores_score_like_float32(tmp_path: pytest.TempPathFactory, dtype: str) -> None:
    full = log_mlp(tmp_path / "f32", dtype="float32", n=60)
    half = log_mlp(tmp_path / dtype, dtype=dtype, n=60)
    assert half.store.dtype.value == dtype
    for method in ("kfac", "ekfac", "raw"):
        a = Scorer(full.store, fit_preconditioner(full.store, method)).score(full.queries)
        b = Scorer(half.store, fit_preconditioner(half.store, method)).score(full.queries)
        assert b.dtype == torch.float32
        corr = float(torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1])
        assert corr >= 0.99, (method, corr)


def test_incompatible_queries_and_preconditioners_are_refused(mlp: Logged, tmp_path: pytest.TempPathFactory) -> None:
    pre = fit_preconditioner(mlp.store, "kfac")
    scorer = Scorer(mlp.store, pre)
    with pytest.raises(logra.ConfigError, match="D=24"):
        scorer.score(mlp.queries[:, :-1])
    with pytest.raises(logra.NonFiniteGradientError, match=r"\[1\]"):
        scorer.score(torch.cat([mlp.queries[:1], torch.full_like(mlp.queries[:1], float("nan"))]))
    other_seed = logra.LoGraConfig(**{**mlp.config.to_dict(), "seed": 99})
    with pytest.raises(logra.ConfigError, match="another config"):
        Scorer(mlp.store, pre, query_config=other_seed)
    Scorer(mlp.store, pre, query_config=logra.LoGraConfig(**{**mlp.config.to_dict(), "dtype": "bfloat16"}))
    other = log_mlp(tmp_path / "other", seed=99)
    with pytest.raises(logra.ConfigError, match="another config"):
        scorer.score(other.store)
    with pytest.raises(logra.ConfigError, match="preconditioner"):
        Scorer(mlp.store, fit_preconditioner(other.store, "identity"))
    with pytest.raises(logra.ConfigError, match="normalization"):
        Scorer(mlp.store, pre, "softmax")
    for k in (0, 25):
        with pytest.raises(logra.ConfigError, match="k="):
            scorer.top_k(mlp.queries, k=k)


def test_query_logger_of_another_model_is_refused_unless_asked(mlp: Logged) -> None:
    pre = fit_preconditioner(mlp.store, "identity")
    torch.manual_seed(123)  # other weights, same architecture
    with logra.GradientLogger(TinyMLP().double(), mlp.config) as other_model:
        pass
    with pytest.raises(logra.ConfigError, match="other model weights"):
        Scorer(mlp.store, pre, query_config=other_model)
    Scorer(mlp.store, pre, query_config=other_model, check_model=False)


def test_float32_compute_on_a_float64_store(mlp: Logged) -> None:
    pre = fit_preconditioner(mlp.store, "ekfac")
    exact = Scorer(mlp.store, pre).score(mlp.queries)
    fast = Scorer(mlp.store, pre, compute_dtype=torch.float32, chunk_rows=7)
    got = fast.score(mlp.queries)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), exact, rtol=1e-4, atol=1e-5 * float(exact.abs().max()))
    with pytest.raises(logra.ConfigError, match="compute_dtype"):
        Scorer(mlp.store, pre, compute_dtype=torch.float16)


@pytest.mark.parametrize("chunk_rows", [50, 64, 333, 1000])
def test_bf16_store_upcast_in_blocks_matches_a_float64_reference(
    tmp_path: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch, chunk_rows: int
) -> None:
    """The CPU path upcasts bf16 chunks block by block into reused buffers: same scores at any chunk size."""
    import logra.score as score_module
    from logra.store.writer import StoreWriter
    from logra.types import LayerInfo

    monkeypatch.setattr(score_module, "_BLOCK_ROWS", 64)  # several blocks per chunk, and partial ones
    layer = LayerInfo("a", "linear", 8, 6, 4, 6, False, 0)
    config = logra.LoGraConfig(k_in=4, k_out=6, dtype="bfloat16")
    writer = StoreWriter(tmp_path / "bf16", config, "f" * 16, [layer], shard_rows=420)
    gen = torch.Generator().manual_seed(0)
    writer.append([f"ex{i}" for i in range(1000)], torch.randn(1000, 24, generator=gen, dtype=torch.float64))
    writer.close(None)
    store = logra.GradientStore.open(tmp_path / "bf16")
    queries = torch.randn(5, 24, generator=gen, dtype=torch.float64)
    train = store.rows().to(torch.float64)  # the stored bf16 values, exactly
    scorer = Scorer(store, fit_preconditioner(store, "identity"), chunk_rows=chunk_rows, query_config=config)
    got = scorer.score(queries)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), queries @ train.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(scorer.self_influence().double(), (train * train).sum(dim=1), rtol=1e-5, atol=1e-5)
    top = scorer.top_k(queries, k=7)
    assert torch.equal(top.helpful_scores, got.gather(1, top.helpful_rows))  # the same matmuls as `score`
    reference = Scorer(store, fit_preconditioner(store, "identity"), chunk_rows=1000, query_config=config)
    torch.testing.assert_close(got, reference.score(queries), rtol=1e-6, atol=1e-6)
