"""Smoke tests of the logra side of benchmarks/ (no peers): adapters, cached ground truth, report.

- the benchmark's logra adapter (log a store, log queries, fit, score) gives exactly the
  dot products of per-example gradients from a batch-size-1 autograd loop (identity
  projections, float64);
- the cached ground truth loads into a model that reproduces the cached query losses, and the
  generated corpus follows its Markov chains;
- the end-to-end child runs the whole logra path and reports consistent costs; the throughput
  child runs the floor and logra's pass and leaves rows on disk only for logra;
- the report states targets as met / not met and names a peer that wins, from given numbers.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import e2e  # noqa: E402
import peers  # noqa: E402
import report  # noqa: E402
import tasks  # noqa: E402
import throughput  # noqa: E402


def _per_example_grads(model: torch.nn.Module, w: peers.Workload, batch: peers.Batch) -> torch.Tensor:
    """[B, P] flattened weight gradients of each example's own loss, one example at a time."""
    weights = [dict(model.named_modules())[name].weight for name in w.logged]
    rows = []
    for i in range(len(batch[0])):
        single = tuple(t[i : i + 1] for t in batch)
        grads = torch.autograd.grad(w.loss(model, single).sum(), weights)
        rows.append(torch.cat([g.reshape(-1) for g in grads]))
    return torch.stack(rows)


def test_logra_adapter_scores_equal_per_example_gradient_dot_products(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = tasks.MLP().double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 64, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (10,), generator=gen)
    w = peers.Workload(model, ["fc1", "fc2", "fc3"], "classifier", [(x[:4], y[:4]), (x[4:7], y[4:7])], [(x[7:], y[7:])])
    scores = peers.logra_scores(w, 1 << 20, ["identity"], str(tmp_path / "store"), init="identity", dtype="float64")
    train = _per_example_grads(model, w, (x[:7], y[:7]))
    query = _per_example_grads(model, w, (x[7:], y[7:]))
    assert scores["identity"].shape == (3, 7)
    torch.testing.assert_close(scores["identity"], query @ train.T, rtol=1e-10, atol=1e-12)


def test_cached_ground_truth_reproduces_its_query_losses() -> None:
    for name, factory in tasks.ALL_TASKS.items():
        npz, meta = tasks.cache_paths(name)
        assert npz.exists() and meta.exists(), f"benchmarks/cache/{name} is missing; run benchmarks/tasks.py"
        task = factory()
        model, subsets, outputs = tasks.ground_truth(task)
        r = task.recipe
        assert subsets.shape == (r.n_subsets, r.n_train) and outputs.shape == (r.n_subsets, r.n_query)
        assert bool((subsets.sum(1) == round(r.fraction * r.n_train)).all())
        assert torch.equal(subsets, tasks.subsets(task))  # the masks are the seeded ones, not stored noise
        with np.load(npz) as data:
            cached = torch.from_numpy(data["full_query_losses"])
        torch.testing.assert_close(tasks.query_losses(task, model), cached, rtol=1e-5, atol=1e-5)


def test_news_lm_is_fine_tuned_from_its_base_and_its_seeds_agree() -> None:
    task = tasks.ALL_TASKS["news-lm"]()
    assert task.train_x.shape == (256, 64) and task.query_x.shape == (32, 64)
    train = {tuple(r) for r in task.train_x.tolist()}
    assert not train & {tuple(r) for r in task.query_x.tolist()}  # queries are held out
    base = task.build()
    model, _, _ = tasks.ground_truth(task)
    assert not torch.equal(base.lm_head.weight, model.lm_head.weight)  # the attributed model is fine-tuned
    seed_outputs = tasks.seed_outputs(task)
    assert seed_outputs is not None and seed_outputs.shape == (2, 100, 32)
    assert tasks.seed_ceiling(seed_outputs) > 0.6  # the bar for a usable LDS ground truth


def test_markov_corpus_is_seeded_and_follows_sparse_chains() -> None:
    a, b = (
        tasks.markov_corpus(40, 20, seed=3, topics=2, vocab=16, fanout=3),
        tasks.markov_corpus(40, 20, seed=3, topics=2, vocab=16, fanout=3),
    )
    assert torch.equal(a, b) and not torch.equal(a, tasks.markov_corpus(40, 20, seed=4, topics=2, vocab=16, fanout=3))
    successors: dict[int, set[int]] = {}
    for row in a.tolist():
        for u, v in zip(row, row[1:]):
            successors.setdefault(u, set()).add(v)
    # two topics with 3 successors each: no token is ever followed by more than 6 distinct tokens
    assert max(len(s) for s in successors.values()) <= 6


@pytest.mark.slow
def test_e2e_child_runs_the_logra_path_and_reports_consistent_costs() -> None:
    out = e2e.child("logra-ekfac", n=8, q=8, k=8, more_queries=[8])
    phases = out["log_s"] + out["fit_s"] + out["score_s"]
    assert out["total_s"] == pytest.approx(phases)
    assert out["cost_n_bare"] == pytest.approx(out["total_s"] / out["bare_s"])
    assert out["more"]["8"]["shape"] == [8, 8] and out["stored_bytes"] > 8 * 28 * 8 * 8 * 4


def test_throughput_child_times_the_floor_and_logra() -> None:
    floor = throughput.child({"tool": "floor", "k": None}, n_batches=1, rounds=1)
    ours = throughput.child({"tool": "logra", "k": 8, "statistics": True, "param_grads": False}, 1, 1)
    assert floor["time_ratio"] > 0 and floor["bytes_per_example"] == 0
    assert ours["time_ratio"] > 0 and ours["bytes_per_example"] > 28 * 8 * 8 * 4  # float32 rows and more


def _results(tmp: Path, logra_lds: float, kron_lds: float, logix_ratio: float) -> None:
    machine = {
        "date": "2026-01-01",
        "cpu": "test cpu",
        "cores": 2,
        "memory_gib": 1.0,
        "python": "3",
        "threads": 1,
        "versions": {
            "torch": "t",
            "transformers": "x",
            "logra": "0",
            "logix-ai": "1",
            "kronfluence": "2",
            "traker": "3",
        },
    }
    row = {
        "examples_per_s": 0.5,
        "tokens_per_s": 1.0,
        "tool_peak_mib": 2.0,
        "bare_peak_mib": 1.0,
        "bytes_per_example": 4,
    }
    throughput = {
        "machine": machine,
        "model": {"num_hidden_layers": 4, "hidden_size": 256, "vocab_size": 8},
        "batch": [8, 128],
        "rows": [
            {"tool": "logra", "k": 64, "statistics": True, "param_grads": False, "time_ratio": 1.0, **row},
            {"tool": "logix", "k": 64, "hessian": "kfac", "time_ratio": logix_ratio, **row},
        ],
    }
    e2e_rows = [
        {
            "tool": "logra-ekfac",
            "stored_bytes": 256_000,
            "cost_n_bare": 1.2,
            "peak_ratio": 1.3,
            "peak_mib": 13,
            "bare_peak_mib": 10,
            "log_s": 1.0,
            "more": {"16": {"n_bare": 0.1}},
        },
        {
            "tool": "kronfluence-ekfac",
            "stored_bytes": 2**20,
            "cost_n_bare": 7.0,
            "peak_ratio": 1.1,
            "peak_mib": 11,
            "bare_peak_mib": 10,
            "fit_s": 1.0,
            "more": {"16": {"n_bare": 3.0}},
        },
    ]
    acc = {
        "machine": machine,
        "recipes": {"t": {"n_train": 4, "n_query": 2, "n_subsets": 3, "fraction": 0.5, "seeds": 1}},
        "rows": [
            {"task": "t", "tool": "logra", "k": 64, "method": "ekfac", "lds": logra_lds, "row_floats": 9},
            {"task": "t", "tool": "Kronfluence", "k": None, "method": "ekfac", "lds": kron_lds, "row_floats": 0},
            {"task": "t", "tool": "LogIX", "k": 16, "method": "kfac", "error": "ValueError: boom"},
        ],
    }
    for name, payload in (
        ("throughput", throughput),
        ("e2e", {"machine": machine, "n": 256, "q": 16, "k": 64, "rows": e2e_rows}),
        ("accuracy", acc),
    ):
        (tmp / f"{name}.json").write_text(json.dumps(payload))


def _rows(text: str) -> list[list[str]]:
    """The cells of every markdown table row in `text`."""
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in lines]


def _row(text: str, first: str) -> list[str]:
    """The one table row whose first cell starts with `first`."""
    found = [r for r in _rows(text) if r[0].startswith(first)]
    assert len(found) == 1, f"{len(found)} rows start with {first!r}"
    return found[0]


def _verdict(row: list[str]) -> str:
    return row[-1].replace("*", "").strip()


def _numbers(cell: str) -> list[float]:
    return [float(x.replace(",", "")) for x in re.findall(r"\d[\d,]*(?:\.\d+)?", cell)]


TARGET_LOGIX = "logging with statistics ≥ 1.5× LogIX KFAC throughput"


def test_report_states_targets_and_where_a_peer_wins(tmp_path: Path) -> None:
    _results(tmp_path, logra_lds=0.50, kron_lds=0.51, logix_ratio=2.0)
    text = report.section(tmp_path)
    assert "test cpu" in text and "kronfluence 2" in text
    logix = _row(text, TARGET_LOGIX)
    assert _verdict(logix) == "met" and 2.0 in _numbers(logix[-2])
    assert _verdict(_row(text, "logra-ekfac: peak memory ≤ 1.2× bare")) == "not met"  # 1.3x measured
    assert _verdict(_row(text, "t: logra ekfac LDS at k=64 within 0.02 of Kronfluence")) == "met"
    assert "t: Kronfluence ekfac (LDS 0.510) beats the best logra method at k=64 (0.500)." in text
    assert "did not run: ValueError: boom" in text
    storage = {r[0]: r for r in _rows(text) if "end to end" in " ".join(r[1:2])}
    assert _numbers(storage["logra-ekfac"][2])[0] == 1000  # 256,000 bytes over N = 256 examples
    assert _numbers(storage["kronfluence-ekfac"][2])[0] == 0  # factors only, no per-example rows
    # 16-query sets: Kronfluence 7 + 3 (m-1), logra 1.2 + 0.1 (m-1): at m = 4 the ratio is 16 / 1.5
    logra_cost, kron_cost, ratio = (_numbers(c)[0] for c in _row(text, "4 (64 queries)")[1:4])
    assert (logra_cost, kron_cost) == (1.5, 16.0) and ratio == pytest.approx(16 / 1.5, abs=0.05)

    _results(tmp_path, logra_lds=0.50, kron_lds=0.53, logix_ratio=1.2)
    text = report.section(tmp_path)
    assert _verdict(_row(text, "t: logra ekfac LDS at k=64 within 0.02 of Kronfluence")) == "not met"
    logix = _row(text, TARGET_LOGIX)
    assert _verdict(logix) == "not met" and 1.2 in _numbers(logix[-2])

    # A floor row bounds what any logging pass can reach: LogIX at 1.2, floor at 0.9 -> 1.33x at best.
    data = json.loads((tmp_path / "throughput.json").read_text())
    data["rows"].insert(0, {"tool": "floor", "k": None, "time_ratio": 0.9, "examples_per_s": 0.5, "tokens_per_s": 1.0,
                            "tool_peak_mib": 1.0, "bare_peak_mib": 1.0, "bytes_per_example": 0})  # fmt: skip
    (tmp_path / "throughput.json").write_text(json.dumps(data))
    text = report.section(tmp_path)
    assert 0.9 in _numbers(" ".join(_row(text, "floor")[1:]))
    logix = _row(text, TARGET_LOGIX)
    assert _verdict(logix) == "not met" and "floor" in logix[-2] and 1.33 in _numbers(logix[-2])


def test_report_takes_logras_rows_from_a_newer_make_bench_run(tmp_path: Path) -> None:
    _results(tmp_path, logra_lds=0.50, kron_lds=0.51, logix_ratio=2.0)
    peers_file = tmp_path / "accuracy_peers.json"
    (tmp_path / "accuracy.json").rename(peers_file)
    ours = json.loads(peers_file.read_text())
    ours["machine"] = {**ours["machine"], "date": "2026-02-02"}
    ours["rows"] = [{**ours["rows"][0], "lds": 0.60}]
    (tmp_path / "accuracy.json").write_text(json.dumps(ours))
    os.utime(peers_file, (1, 1))  # the peers' file is the older one
    merged = report.load("accuracy", tmp_path)
    assert merged is not None and merged["machine"]["logra_rows"] == "2026-02-02"
    assert sorted((r["tool"], r.get("lds")) for r in merged["rows"]) == [
        ("Kronfluence", 0.51),
        ("LogIX", None),
        ("logra", 0.60),
    ]
    os.utime(peers_file)  # now the peers' file is newer: it is taken whole
    assert [r.get("lds") for r in report.load("accuracy", tmp_path)["rows"]][:2] == [0.50, 0.51]


def test_report_rewrites_only_the_marked_section(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold table\n{report.END}\nafter\n")
    assert report.write(readme, "new table")
    assert readme.read_text() == f"intro\n{report.START}\nnew table\n{report.END}\nafter\n"
    plain = tmp_path / "plain.md"
    plain.write_text("no markers\n")
    assert not report.write(plain, "x") and plain.read_text() == "no markers\n"
