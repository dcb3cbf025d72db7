"""scripts/demo_setup.py --check: source recovery, and agreement with the fine-tuning ground truth.

The ground truth is compared only when it was computed for exactly the scored passages (same
text), the store's articles (same ids, same order) and the logged layers; otherwise the check
says why it does not compare.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import logra

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

import demo_setup  # noqa: E402

ARTICLES = ["lee-000", "lee-001", "lee-002"]
PASSAGES = [
    {"id": "passage-from-lee-000", "prompt": "", "text": "fire near the town"},
    {"id": "passage-from-lee-001", "prompt": "", "text": "the union strike"},
]


def _store(root: Path, ids: list[str]) -> Path:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 2))
    with logra.GradientLogger(model, logra.LoGraConfig(k_in=2, k_out=2), store=root) as logger:
        with logger.record(ids=ids):
            model(torch.randn(len(ids), 3)).pow(2).sum().backward()
    return root


def _files(tmp: Path, top1: dict[str, str]) -> tuple[Path, Path]:
    queries = tmp / "queries.jsonl"
    queries.write_text("".join(json.dumps(q) + "\n" for q in PASSAGES))
    table = tmp / "topk.csv"
    with open(table, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["query_id", "direction", "rank", "train_id", "score"])
        w.writeheader()
        for q, first in top1.items():
            rest = [a for a in ARTICLES if a != first]
            for rank, train in enumerate([first, *rest], start=1):
                w.writerow(
                    {"query_id": q, "direction": "helpful", "rank": rank, "train_id": train, "score": 1.0 / rank}
                )
    return table, queries


def _truth(tmp: Path, top5: dict[str, list[str]], modules: list[str] | None = None) -> Path:
    path = tmp / "truth.json"
    truth = {
        "recipe": {"optimizer": "adam", "steps": 5, "modules": modules or ["0"]},
        "articles": ARTICLES,
        "passage_sha256": {q["id"]: demo_setup.passage_sha256(q) for q in PASSAGES},
        "first": {q: top[:1] for q, top in top5.items()},
        "top5": top5,
    }
    path.write_text(json.dumps(truth))
    return path


def test_check_counts_sources_and_agreement_with_the_ground_truth(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    store = _store(tmp_path / "store", ARTICLES)
    # logra: lee-000 first for its own passage (a source hit); lee-002 first for lee-001's passage.
    table, queries = _files(tmp_path, {"passage-from-lee-000": "lee-000", "passage-from-lee-001": "lee-002"})
    # training: lee-001's passage helped most by lee-002 (not its source), lee-000's by lee-001.
    truth = _truth(
        tmp_path, {"passage-from-lee-000": ["lee-001", "lee-000"], "passage-from-lee-001": ["lee-002", "lee-001"]}
    )
    demo_setup.check(table, queries_file=queries, store=store, ground_truth=truth)
    out = capsys.readouterr().out
    assert "most helpful document for 1/2 passages and in the top 5 for 2/2" in out
    assert "lowers its passage's loss the most for 0/2" in out
    assert "the one that lowers it most for 1/2, and one of the five that lower it most for 2/2" in out


def test_check_refuses_a_ground_truth_of_other_passages_articles_or_layers(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    table, queries = _files(tmp_path, {"passage-from-lee-000": "lee-000", "passage-from-lee-001": "lee-001"})
    top5 = {q["id"]: ARTICLES for q in PASSAGES}
    store = _store(tmp_path / "store", ARTICLES)

    demo_setup.check(table, queries_file=queries, store=store, ground_truth=_truth(tmp_path, top5, modules=["lm_head"]))
    assert "not compared (the store logs other layers" in capsys.readouterr().out

    other = _store(tmp_path / "other", ["lee-002", "lee-001", "lee-000"])
    demo_setup.check(table, queries_file=queries, store=other, ground_truth=_truth(tmp_path, top5))
    assert "not compared (the store's articles are not the 3" in capsys.readouterr().out

    edited = [dict(PASSAGES[0], text="fire near the city"), PASSAGES[1]]
    queries.write_text("".join(json.dumps(q) + "\n" for q in edited))
    demo_setup.check(table, queries_file=queries, store=store, ground_truth=_truth(tmp_path, top5))
    assert "not compared (passages ['passage-from-lee-000'] differ" in capsys.readouterr().out

    demo_setup.check(table, ground_truth=_truth(tmp_path, top5))
    assert "not compared (pass --queries and --store" in capsys.readouterr().out
    demo_setup.check(table, queries_file=queries, store=store, ground_truth=tmp_path / "missing.json")
    assert "missing.json is missing" in capsys.readouterr().out


def test_check_counts_ties_at_the_top_of_the_ground_truth(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Duplicate articles tie: a source tied at the top counts, and so does logra's first if it is either."""
    store = _store(tmp_path / "store", ARTICLES)
    table, queries = _files(tmp_path, {"passage-from-lee-000": "lee-002", "passage-from-lee-001": "lee-000"})
    path = _truth(tmp_path, {"passage-from-lee-000": ["lee-000", "lee-002"], "passage-from-lee-001": ["lee-002"]})
    truth = json.loads(path.read_text())
    truth["first"]["passage-from-lee-000"] = ["lee-000", "lee-002"]  # bit-identical gains
    path.write_text(json.dumps(truth))
    demo_setup.check(table, queries_file=queries, store=store, ground_truth=path)
    out = capsys.readouterr().out
    assert "lowers its passage's loss the most for 1/2" in out
    assert "the one that lowers it most for 1/2" in out


def test_check_counts_a_verbatim_copy_of_the_source_as_the_source(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """lee-002 is lee-000's text again (the Lee corpus has 7 such copies): first for lee-000's
    passage it is a hit when the corpus is given, a miss without it; a different text never counts."""
    store = _store(tmp_path / "store", ARTICLES)
    table, queries = _files(tmp_path, {"passage-from-lee-000": "lee-002", "passage-from-lee-001": "lee-002"})
    corpus = tmp_path / "corpus.jsonl"
    texts = {"lee-000": "a fire near the town", "lee-001": "the union strike", "lee-002": "a fire near the town"}
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in texts.items()))
    truth = tmp_path / "missing.json"
    demo_setup.check(table, k=1, queries_file=queries, store=store, ground_truth=truth, corpus=corpus)
    out = capsys.readouterr().out
    assert "most helpful document for 1/2 passages and in the top 1 for 1/2" in out
    assert "a verbatim copy of the source counts as it (passages with one: 1)" in out
    demo_setup.check(table, k=1, queries_file=queries, store=store, ground_truth=truth)
    out = capsys.readouterr().out
    assert "most helpful document for 0/2 passages and in the top 1 for 0/2" in out
    assert "a verbatim copy" not in out
