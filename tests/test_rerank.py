"""Full-size re-ranking (logra.rerank) against a dense float64 EK-FAC built from autograd references."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from models import build_model, collate, log_rows, make_examples, per_example_loss, reference_rows, reference_statistics
from torch import Tensor

import logra
from logra.curvature import true_fisher_statistics
from logra.rerank import FullRerank, fit_full_ekfac, rerank_config
from logra.types import LayerInfo

N, Q, DAMPING = 20, 3, 0.05
CONFIG = logra.LoGraConfig(k_in=3, k_out=3, include_bias=True, dtype="float64")


@dataclass
class Setup:
    model: torch.nn.Module
    train: list[dict[str, Tensor]]
    queries: list[dict[str, Tensor]]
    store: logra.GradientStore
    root: Path


def _mask(batch: dict[str, Tensor]) -> Tensor:
    return (batch["y"] != -100).long()  # collate pads labels with -100


def _batch(examples: Sequence[dict[str, Tensor]]) -> dict[str, Tensor]:
    return collate(examples)[0]


def _accessor(train: list[dict[str, Tensor]], shift: int = 0):  # type: ignore[no-untyped-def]
    return lambda ids: _batch([train[(int(str(i)[2:]) + shift) % len(train)] for i in ids])


def _ids(n: int) -> list[str]:
    return [f"ex{i}" for i in range(n)]


@pytest.fixture(scope="module", name="setup")
def _setup(tmp_path_factory: pytest.TempPathFactory) -> Setup:
    model = build_model("mlp", seed=0)
    train, queries = make_examples("mlp", N, seed=1), make_examples("mlp", Q, seed=7)
    root = tmp_path_factory.mktemp("rerank")
    with logra.GradientLogger(model, CONFIG, store=root / "projected") as logger:
        log_rows(logger, train, _ids(N), batch_size=6)
    model.zero_grad(set_to_none=True)
    return Setup(model, train, queries, logra.GradientStore.open(root / "projected"), root)


def _fit(s: Setup, damping: float | None = DAMPING) -> logra.Preconditioner:
    batches = [_batch(s.train[i : i + 6]) for i in range(0, N, 6)]
    return fit_full_ekfac(s.model, CONFIG, batches, per_example_loss, damping=damping, mask_fn=_mask)


def _rerank(s: Setup, pre: logra.Preconditioner, normalization: str = "dot", **kw: object) -> FullRerank:
    return FullRerank(s.store, s.model, pre, per_example_loss, _accessor(s.train), normalization=normalization,
                      mask_fn=_mask, **kw)  # type: ignore[arg-type]  # fmt: skip


def _full_layers(s: Setup) -> list[LayerInfo]:
    with logra.GradientLogger(s.model, rerank_config(CONFIG), statistics=False) as logger:
        return list(logger.layers)


def _dense_reference(s: Setup, normalization: str) -> Tensor:
    """Scores [Q, N] of a dense block-diagonal EK-FAC H + λI, from batch-size-1 autograd gradients and
    statistics, inverted with a dense solve (no logra code beyond the layer table)."""
    layers = _full_layers(s)
    eye = {x.name: (torch.eye(x.n_in, dtype=torch.float64), torch.eye(x.n_out, dtype=torch.float64)) for x in layers}
    stats = reference_statistics(s.model, s.train, layers, lambda name: eye[name])
    g_train = reference_rows(s.model, s.train, layers, None, include_bias=True)  # (N, P)
    g_query = reference_rows(s.model, s.queries, layers, None, include_bias=True)  # (Q, P)
    pre_q, pre_t = torch.zeros_like(g_query), torch.zeros_like(g_train)
    for x in layers:
        a_sum, s_sum, n_tokens, n_examples = stats[x.name]
        _, q_a = torch.linalg.eigh(a_sum / n_tokens)
        _, q_s = torch.linalg.eigh(s_sum / n_examples)
        cols = slice(x.offset, x.offset + x.size)
        basis = torch.kron(q_s, q_a)  # vec(Q_Sᵀ G Q_A) = basisᵀ vec(G), row-major vec
        lam = ((g_train[:, cols] @ basis) ** 2).mean(0)
        h = basis @ torch.diag(lam) @ basis.T + DAMPING * torch.eye(x.size, dtype=torch.float64)
        pre_q[:, cols] = torch.linalg.solve(h, g_query[:, cols].T).T
        pre_t[:, cols] = torch.linalg.solve(h, g_train[:, cols].T).T
    scores = pre_q @ g_train.T
    if normalization != "dot":
        scores = scores / (pre_t * g_train).sum(1).sqrt()[None, :]
    if normalization == "cosine":
        scores = scores / (pre_q * g_query).sum(1).sqrt()[:, None]
    return scores


@pytest.mark.parametrize("normalization", ["dot", "cosine", "relative"])
def test_scores_equal_a_dense_full_ekfac(setup: Setup, normalization: str) -> None:
    expected = _dense_reference(setup, normalization)
    rerank = _rerank(setup, _fit(setup), normalization)
    got = rerank.score(_batch(setup.queries), _ids(N))
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-12)
    # Re-ranking per-query candidate lists orders them by those scores.
    gen = torch.Generator().manual_seed(3)
    lists = [[f"ex{int(j)}" for j in torch.randperm(N, generator=gen)[:9]] for _ in range(Q)]
    top = rerank.top_k(_batch(setup.queries), lists, k=4)
    for q, ids in enumerate(lists):
        cols = torch.tensor([int(i[2:]) for i in ids])
        best = expected[q, cols].topk(4).indices
        worst = expected[q, cols].topk(4, largest=False).indices
        assert top.helpful_ids[q] == [ids[int(j)] for j in best]
        assert top.harmful_ids[q] == [ids[int(j)] for j in worst]
        torch.testing.assert_close(top.helpful_scores[q], expected[q, cols][best], rtol=1e-8, atol=1e-12)
        assert top.helpful_rows[q].tolist() == [setup.store.ids.index(i) for i in top.helpful_ids[q]]


@pytest.mark.parametrize("normalization", ["dot", "cosine", "relative"])
def test_rerank_is_the_full_store_ranking_restricted_to_the_candidates(setup: Setup, normalization: str) -> None:
    """A store logged at full size, its EK-FAC and the Scorer: the re-ranked top-k of a projected
    shortlist equals the full-corpus full-size ranking restricted to that shortlist."""
    full = rerank_config(CONFIG)
    with logra.GradientLogger(setup.model, full, store=setup.root / f"full-{normalization}") as logger:
        log_rows(logger, setup.train, _ids(N), batch_size=7)
    with logra.GradientLogger(setup.model, full, statistics=False) as logger:
        _, query_rows = log_rows(logger, setup.queries, list(range(Q)), batch_size=Q)
    store = logra.GradientStore.open(setup.root / f"full-{normalization}")
    store_pre = logra.fit_preconditioner(store, "ekfac", damping=DAMPING)
    fitted = _fit(setup)
    torch.testing.assert_close(fitted.apply(query_rows), store_pre.apply(query_rows), rtol=1e-9, atol=1e-12)
    with pytest.warns(UserWarning, match="bare query rows"):
        everything = logra.Scorer(store, store_pre, normalization).score(query_rows)  # (Q, N)
    projected = logra.Scorer(setup.store, logra.fit_preconditioner(setup.store, "ekfac"), normalization)
    with pytest.warns(UserWarning, match="bare query rows"):
        shortlist = projected.top_k(_projected_queries(setup), k=5)
    for pre in (fitted, store_pre):
        top = _rerank(setup, pre, normalization).top_k(_batch(setup.queries), shortlist, k=3)
        for q in range(Q):
            cols = torch.tensor(sorted({setup.store.ids.index(i) for i in shortlist.helpful_ids[q]
                                        + shortlist.harmful_ids[q]}))  # fmt: skip
            restricted = everything[q, cols]
            assert top.helpful_rows[q].tolist() == cols[restricted.topk(3).indices].tolist()
            assert top.harmful_rows[q].tolist() == cols[restricted.topk(3, largest=False).indices].tolist()
            torch.testing.assert_close(top.helpful_scores[q], restricted.topk(3).values, rtol=1e-8, atol=1e-12)


def _projected_queries(s: Setup) -> Tensor:
    with logra.GradientLogger(s.model, CONFIG, statistics=False) as logger:
        return log_rows(logger, s.queries, list(range(Q)), batch_size=Q)[1]


def test_batch_size_saved_preconditioner_and_logged_queries_change_nothing(setup: Setup, tmp_path: Path) -> None:
    pre = _fit(setup, damping=None)  # the default damping: 0.1 x the mean eigenvalue
    ids = _ids(N)[::2]
    base = _rerank(setup, pre, "cosine", batch_size=32).score(_batch(setup.queries), ids)
    one = _rerank(setup, pre, "cosine", batch_size=1).score(_batch(setup.queries), ids)
    torch.testing.assert_close(one, base, rtol=1e-10, atol=1e-13)
    loaded = logra.load_preconditioner(pre.save(tmp_path / "full-ekfac"))
    with logra.GradientLogger(setup.model, rerank_config(CONFIG), statistics=False) as logger:
        with logger.record(ids=list(range(Q)), mask=_mask(_batch(setup.queries))) as record:
            per_example_loss(setup.model, _batch(setup.queries)).sum().backward()
    again = _rerank(setup, loaded, "cosine").score(record, ids)
    torch.testing.assert_close(again, base, rtol=1e-10, atol=1e-13)


def test_true_fisher_statistics_are_accepted(setup: Setup) -> None:
    batches = [_batch(setup.train[i : i + 6]) for i in range(0, N, 6)]
    stats = true_fisher_statistics(setup.model, rerank_config(CONFIG), batches, logits_fn=lambda m, b: m(b["x"]),
                                   labels="sampled", method="ekfac", mask_fn=_mask)  # fmt: skip
    pre = fit_full_ekfac(setup.model, CONFIG, batches, None, statistics=stats, damping=DAMPING)
    assert pre.fisher is logra.FisherKind.TRUE
    empirical = _fit(setup)
    query = _rerank(setup, pre).query_rows(_batch(setup.queries))
    assert not torch.allclose(pre.apply(query), empirical.apply(query))  # another curvature, really used


def test_bad_input_is_refused_with_the_fix(setup: Setup) -> None:
    pre = _fit(setup)
    rerank = _rerank(setup, pre)
    queries = _batch(setup.queries)
    with pytest.raises(logra.ConfigError, match=r"training ids \['nope'\] are not in the store"):
        rerank.top_k(queries, ["ex1", "nope", "ex2"], k=1)
    with pytest.raises(logra.ConfigError, match="fewest candidates"):
        rerank.top_k(queries, ["ex1", "ex2"], k=3)
    with pytest.raises(logra.ConfigError, match="3 lists for 2 queries"):
        rerank.top_k(_batch(setup.queries[:2]), [["ex1"], ["ex2"], ["ex3"]], k=1)
    with pytest.raises(logra.ConfigError, match="do not project to their stored rows"):
        FullRerank(setup.store, setup.model, pre, per_example_loss, _accessor(setup.train, shift=1),
                   mask_fn=_mask).score(queries, ["ex0", "ex5"])  # fmt: skip
    shifted = FullRerank(setup.store, setup.model, pre, per_example_loss, _accessor(setup.train, shift=1),
                         mask_fn=_mask, check=False)  # fmt: skip
    assert shifted.score(queries, ["ex0"]).shape == (Q, 1)  # the check, not something else, refused it
    with pytest.raises(logra.ConfigError, match="is not the one the store"):
        _rerank(Setup(build_model("mlp", seed=5), setup.train, setup.queries, setup.store, setup.root), pre)
    with pytest.raises(logra.ConfigError, match="fit_full_ekfac"):
        _rerank(setup, logra.fit_preconditioner(setup.store, "ekfac"))
    with pytest.raises(logra.CaptureError, match="per-example losses"):
        FullRerank(setup.store, setup.model, pre, lambda m, b: per_example_loss(m, b).sum(), _accessor(setup.train),
                   mask_fn=_mask).score(queries, ["ex0"])  # fmt: skip
    with logra.GradientLogger(setup.model, CONFIG, statistics=False) as logger:
        with logger.record(ids=list(range(Q)), mask=_mask(queries)) as record:
            per_example_loss(setup.model, queries).sum().backward()
    with pytest.raises(logra.ConfigError, match="not logged at full size"):
        rerank.score(record, ["ex0"])
    with pytest.raises(logra.ConfigError, match="loss= .* or statistics="):
        fit_full_ekfac(setup.model, CONFIG, [queries], None)


def test_an_index_shortlist_is_re_ranked(setup: Setup) -> None:
    """The TopK of a two-stage InfluenceIndex query is a shortlist as good as the Scorer's."""
    pytest.importorskip("faiss")
    scorer = logra.Scorer(setup.store, logra.fit_preconditioner(setup.store, "ekfac"))
    queries = _projected_queries(setup)
    with pytest.warns(UserWarning, match="bare query rows"):
        from_index = logra.InfluenceIndex(scorer, factory="Flat", rebuild=True).top_k(queries, k=6, shortlist=6)
    with pytest.warns(UserWarning, match="bare query rows"):
        from_scorer = scorer.top_k(queries, k=6)
    rerank = _rerank(setup, _fit(setup))
    a = rerank.top_k(_batch(setup.queries), from_index, k=4)
    b = rerank.top_k(_batch(setup.queries), from_scorer, k=4)
    assert a.helpful_ids == b.helpful_ids and a.harmful_ids == b.harmful_ids
    torch.testing.assert_close(a.helpful_scores, b.helpful_scores)
