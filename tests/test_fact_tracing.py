"""Smoke test of benchmarks/fact_tracing.py at a tiny size: corpus properties and the results' structure.

- every eval fact's subject (an invented word) occurs in exactly one document, its source, and the
  source states the fact; the paraphrased query does not copy the source's sentence;
- BM25 ranks the source first for a query that copies the source's own statement;
- a tiny end-to-end run reports every method with recall@1 <= recall@10 and ranks in [1, N].
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import fact_tracing as ft  # noqa: E402

TINY = ft.Recipe(n_docs=40, n_eval=10, n_demo=20, qa_per_doc=5, length=48, vocab_words=300,
                 n_embd=32, n_layer=1, n_head=2, epochs=2)  # fmt: skip


def test_each_fact_is_in_exactly_one_document_and_queries_paraphrase_it() -> None:
    c = ft.build_corpus(TINY)
    assert len(c.facts) == TINY.n_eval and len({f.subject for f in c.facts}) == TINY.n_eval
    for fact, (prompt, answer) in zip(c.facts, c.queries):
        holders = [i for i, d in enumerate(c.docs) if fact.subject in d]
        assert holders == [fact.doc]
        said = ft.statement((fact.relation, fact.subject, fact.object, fact.template))
        doc = " ".join(c.docs[fact.doc])
        assert " ".join(said) in doc and answer == [fact.object]
        assert " ".join(prompt) not in doc  # the question is not the document's wording
    assert ft.build_corpus(TINY).docs == c.docs  # seeded


def test_bm25_finds_the_source_of_an_exact_copy_query_first() -> None:
    c = ft.build_corpus(TINY)
    c.queries = [(ft.statement((f.relation, f.subject, f.object, f.template)), []) for f in c.facts]
    rank = ft.ranks(ft.bm25_scores(c), torch.tensor([f.doc for f in c.facts]))
    assert rank.tolist() == [1] * len(c.facts)


def test_tiny_run_reports_every_method() -> None:
    result = ft.run(TINY, cache=None, log=lambda _: None, confirm=(3, (1, 2), 2e-3))
    methods = {"identity", "identity, cosine", "kfac", "ekfac", "ekfac, cosine", "budget, ekfac", "trackstar", "bm25"}
    confirmed = {f"{m} + confirm@3, {n}" for m in ft.CONFIRMED for n in ("1 step", "2 steps")}
    assert set(result["methods"]) == methods | confirmed
    for name in ft.CONFIRMED:  # re-ranking the top 3 moves ranks inside it only
        before = torch.tensor(result["methods"][name]["ranks"])
        after = torch.tensor(result["methods"][f"{name} + confirm@3, 1 step"]["ranks"])
        assert torch.equal(before > 3, after > 3) and torch.equal(before[before > 3], after[after > 3])
    n = result["corpus"]["documents"]
    for m in result["methods"].values():
        assert len(m["ranks"]) == TINY.n_eval and all(1 <= r <= n for r in m["ranks"])
        a = m["all"]
        assert 0 <= a["recall@1"] <= a["recall@10"] <= 1 and 1 / n <= a["mrr"] <= 1
    assert 0.0 <= result["recall"] <= 1.0 and len(result["recalled"]) == TINY.n_eval
    assert "ekfac" in ft.table(result)
