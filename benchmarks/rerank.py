"""Full-size EK-FAC re-ranking of a projected shortlist: what it buys and what it costs.

For each task of `tasks.py` (cached retraining ground truth) and projection size k:

- projected: logra EK-FAC on a store at k x k per layer (logra's default damping), the whole
  corpus scored exactly by the `Scorer` (an ideal stage one: no index misses).
- shortlist: each query's `--shortlist` (25, 100) most helpful and most harmful rows by those scores.
- reranked: `logra.rerank.FullRerank` over that shortlist: the candidates' gradients recomputed
  unprojected, scored with the full-size EK-FAC of `fit_full_ekfac` (one statistics pass over the
  whole training set, logra's default damping), top `--k` kept.
- full: the same full-size EK-FAC over the whole corpus (every gradient recomputed): the answer
  re-ranking approximates, and the ceiling of its agreement.

Metrics (means over queries): overlap@k of the helpful (and harmful) top-k with the full ranking's;
recall of the full top-k inside the shortlist (the most re-ranking can recover); the LDS of the
whole corpus (projected, full); the LDS restricted to the shortlist (scores outside a query's
candidates set to 0: do the candidates' scores predict retraining better?); the LDS of the top-k
only (helpful and harmful, each method's own picks and scores). Cost: process CPU seconds per
query to re-rank its 2 x shortlist candidates (recompute, check against the store, score), against
the projected exact score of the same candidates, one torch thread; and the CPU seconds of one
`top_k` call for all queries at once (candidates shared between queries are recomputed once).

    .venv/bin/python benchmarks/rerank.py                       # both tasks, k 8-64 (~3 CPU minutes)
    .venv/bin/python benchmarks/rerank.py --task digits-mlp --k-proj 16 --out rerank-quick

Writes results/<out>.json (default rerank).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import bench_common as common
import tasks
import torch
from torch import Tensor, nn

import logra
from logra.evaluation import linear_datamodeling_score
from logra.rerank import FullRerank, fit_full_ekfac

BATCH = {"digits-mlp": 100, "markov-lm": 32}


def _batches(task: tasks.Task) -> list[tuple[Tensor, ...]]:
    b, x, y = BATCH[task.name], task.train_x, task.train_y
    return [task.batch(x[i : i + b], None if y is None else y[i : i + b]) for i in range(0, len(x), b)]


def _loss(task: tasks.Task) -> Callable[[nn.Module, tuple[Tensor, ...]], Tensor]:
    return lambda model, batch: task.per_example_loss(model, *batch)


def _examples(task: tasks.Task) -> Callable[[list[Any]], tuple[Tensor, ...]]:
    def get(ids: list[Any]) -> tuple[Tensor, ...]:
        index = torch.tensor([int(i) for i in ids])
        return task.batch(task.train_x[index], None if task.train_y is None else task.train_y[index])

    return get


def _log_projected(task: tasks.Task, model: nn.Module, k: int, root: Path) -> tuple[logra.GradientStore, Any]:
    """The projected store of the training set and the query Record, at k x k."""
    config = logra.LoGraConfig(k_in=k, k_out=k, modules=tuple(task.logged))
    loss = _loss(task)
    with logra.GradientLogger(model, config, store=root) as logger:
        start = 0
        for batch in _batches(task):
            with logger.record(ids=list(range(start, start + len(batch[0]))), param_grads=False):
                loss(model, batch).sum().backward()
            start += len(batch[0])
    with logra.GradientLogger(model, config, statistics=False) as logger:
        with logger.record(ids=list(range(len(task.query_x))), param_grads=False) as record:
            loss(model, task.batch(task.query_x, task.query_y)).sum().backward()
    return logra.GradientStore.open(root), record


def _overlap(a: Tensor, b: Tensor) -> float:
    """Mean over rows of |a_q ∩ b_q| / k for row-index tensors [Q, k]."""
    return sum(len(set(x) & set(y)) for x, y in zip(a.tolist(), b.tolist())) / a.numel()


def _restricted(scores: Tensor, rows: list[Tensor]) -> Tensor:
    """scores [Q, N] with every entry outside query q's rows[q] set to 0."""
    out = torch.zeros_like(scores)
    for q, r in enumerate(rows):
        out[q, r] = scores[q, r]
    return out


def _top_rows(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    return scores.topk(k, dim=1).indices, scores.topk(k, dim=1, largest=False).indices


def _timed_rerank(rerank: FullRerank, projected: logra.Scorer, task: tasks.Task, record: Any,
                  shortlist: logra.TopK, k: int, queries: int) -> dict[str, float]:  # fmt: skip
    """CPU seconds per query: full re-rank of its shortlist vs the projected exact score of it."""
    full_s = proj_s = 0.0
    for q in range(queries):
        one = task.batch(task.query_x[q : q + 1], None if task.query_y is None else task.query_y[q : q + 1])
        cands = [shortlist.helpful_ids[q] + shortlist.harmful_ids[q]]
        start = common.CLOCK()
        rerank.top_k(one, cands, k=k)
        full_s += common.CLOCK() - start
        rows = torch.cat([shortlist.helpful_rows[q], shortlist.harmful_rows[q]])
        query = logra.QueryRows([q], record.rows[q : q + 1].double(), record.config, record.model_fingerprint,
                                record.layers)  # fmt: skip
        start = common.CLOCK()
        projected.score_rows(query, rows)
        proj_s += common.CLOCK() - start
    return {"rerank_cpu_s_per_query": full_s / queries, "projected_cpu_s_per_query": proj_s / queries}


def run_task(name: str, ks: list[int], sizes: list[int], k: int, timed: int, log: Callable[[str], None]) -> list[dict]:
    task = tasks.TASKS[name]()
    model, subsets, outputs = tasks.ground_truth(task)
    loss, batches = _loss(task), _batches(task)
    query_batch = task.batch(task.query_x, task.query_y)
    lds = lambda s: linear_datamodeling_score(s, subsets, outputs)  # noqa: E731
    rows: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for kp in ks:
            store, record = _log_projected(task, model, kp, Path(tmp) / f"k{kp}")
            full_pre, fit_s, _ = common.measured(partial(fit_full_ekfac, model, store.config, batches, loss))
            rerank = FullRerank(store, model, full_pre, loss, _examples(task), batch_size=BATCH[name])
            projected = logra.Scorer(store, logra.fit_preconditioner(store, "ekfac"), progress=False)
            proj = projected.score(record).double()  # (Q, N)
            full, all_s, _ = common.measured(partial(rerank.score, query_batch, store.ids))
            for size in sizes:
                shortlist = projected.top_k(record, k=size)
                reranked, batch_s, _ = common.measured(partial(rerank.top_k, query_batch, shortlist, k=k))
                row: dict[str, Any] = {
                    "task": name, "k_proj": kp, "shortlist": size, "k": k, "N": len(store), "Q": proj.shape[0],
                    "D_projected": store.dim, "P_full": full_pre.dim, "fit_full_ekfac_cpu_s": fit_s,
                    "full_corpus_rescore_cpu_s": all_s, "rerank_all_queries_cpu_s": batch_s,
                }  # fmt: skip
                row.update(_metrics(proj, full, shortlist, reranked, k, lds))
                row.update(_timed_rerank(rerank, projected, task, record, shortlist, k, timed))
                log(f"{name} k={kp} shortlist={size}: {row}")
                rows.append(row)
    return rows


def _metrics(proj: Tensor, full: Tensor, shortlist: logra.TopK, reranked: logra.TopK, k: int,
             lds: Callable[[Tensor], float]) -> dict[str, Any]:  # fmt: skip
    """Agreement with the full-size ranking and with retraining (module docstring)."""
    Q = proj.shape[0]
    cands = [torch.cat([shortlist.helpful_rows[q], shortlist.harmful_rows[q]]).unique() for q in range(Q)]
    (fh, fl), (ph, pl) = _top_rows(full, k), _top_rows(proj, k)
    top = {"projected": (proj, ph, pl), "reranked": (full, reranked.helpful_rows, reranked.harmful_rows),
           "full": (full, fh, fl)}  # fmt: skip
    recall = sum(len(set(f.tolist()) & set(c.tolist())) for f, c in zip(fh, cands)) / fh.numel()
    return {
        "overlap_helpful": {m: _overlap(h, fh) for m, (_, h, _) in top.items()},
        "overlap_harmful": {m: _overlap(lo, fl) for m, (_, _, lo) in top.items()},
        "shortlist_recall_of_full_top_k_helpful": recall,
        "lds_corpus": {"projected": lds(proj), "full": lds(full)},
        "lds_shortlist": {"projected": lds(_restricted(proj, cands)), "reranked": lds(_restricted(full, cands))},
        "lds_top_k": {m: lds(_restricted(s, [torch.cat([h[q], lo[q]]) for q in range(Q)]))
                      for m, (s, h, lo) in top.items()},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(BATCH), nargs="*", default=list(BATCH))
    parser.add_argument("--k-proj", type=int, nargs="*", default=[8, 16, 32, 64], help="projection sizes of the store")
    parser.add_argument("--shortlist", type=int, nargs="*", default=[25, 100], help="candidates per query and sign")
    parser.add_argument("--k", type=int, default=10, help="top-k returned")
    parser.add_argument("--timed-queries", type=int, default=5, help="queries re-ranked one by one for the clock")
    parser.add_argument("--out", default="rerank", help="results/<out>.json")
    args = parser.parse_args()
    common.set_threads()
    rows: list[dict] = []
    for name in args.task:
        rows += run_task(name, args.k_proj, args.shortlist, args.k, args.timed_queries,
                         lambda line: print(line, file=sys.stderr, flush=True))  # fmt: skip
    command = " ".join(["python benchmarks/rerank.py", *sys.argv[1:]])
    print(f"-> {common.save(args.out, {'rows': rows, 'command': command})}", file=sys.stderr)


if __name__ == "__main__":
    main()
