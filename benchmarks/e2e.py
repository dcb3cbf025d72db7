"""End-to-end cost to a Q x N score matrix: logra vs Kronfluence EK-FAC vs LogIX vs Bergson, same model.

Each tool runs in its own process on the model of `bench_common.py` (N training sequences and Q query
sequences of 128 random tokens, batches of 8, one thread). The clock covers everything from
the unprepared model to the score matrix in memory: for logra the logging pass into a store
(with statistics, `param_grads=False`), fitting the preconditioner, logging the queries and the
streamed scoring; for Kronfluence `prepare_model`, `fit_all_factors` (EK-FAC) and
`compute_pairwise_scores`; for LogIX the LoRA setup, the logging pass with statistics,
`finalize`, the queries and `compute_influence_all`; for Bergson (`peers_bergson.py`) copying and
freezing the model and building its datasets, then EK-FAC (`fit_factored_hessians`: covariance
pass, eigendecomposition, eigenvalue correction; the unprojected query gradients, the inverse, a
scoring pass recomputing the training gradients) or TrackStar at k (the training autocorrelation
Hessian; then per query set its query Hessian, the mix, the query gradients and the scoring
pass). The cost is reported in units of N·bare:
one plain forward+backward over the N training sequences, measured in the same process.
Peak memory is the largest VmHWM of any phase, over the VmHWM of that bare pass.

More queries: after the Q x N matrix, each tool scores further query sets of `--more-queries`
sizes against the same training data (logra reuses its store and preconditioner, Kronfluence
its factors, LogIX its logs and statistics, Bergson its fitted Hessian) and that marginal cost is
reported too.

    .venv/bin/python benchmarks/e2e.py                  # logra only (make bench)
    .venv-peers/bin/python benchmarks/e2e.py --peers    # with the peers (make bench-peers)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import bench_common as common
import peers_bergson
import torch
from peers import (
    Workload,
    kronfluence_fit,
    kronfluence_scores,
    kronfluence_setup,
    logix_log,
    logix_scores,
    logix_setup,
    logra_config,
    logra_fit,
    logra_log,
    logra_query_rows,
    logra_score,
)

import logra

TOOLS = ("logra-kfac", "logra-ekfac", "kronfluence-ekfac", "logix-kfac", "logix-raw", "bergson-ekfac",
         "bergson-trackstar")  # fmt: skip


def workload(model: torch.nn.Module, n: int, q: int, query_seed: int = 2) -> Workload:
    train = [(b,) for b in common.token_batches(n, seed=1)]
    query = [(b,) for b in common.token_batches(q, seed=query_seed)]
    return Workload(model, common.LOGGED, "lm", train, query)


def phases(tool: str, w: Workload, k: int, root: str) -> tuple[list[tuple[str, Callable[[], Any]]], Callable]:
    """([(phase name, fn)] up to the first Q x N matrix, more(w_queries) -> scores for other queries)."""
    state: dict[str, Any] = {}
    if tool.startswith("logra"):
        method = tool.split("-")[1]
        cfg = logra_config(w, k)

        def fit() -> None:
            state["store"] = logra.GradientStore.open(root)
            state["pre"] = logra_fit(state["store"], method)

        def more(wq: Workload) -> torch.Tensor:
            return logra_score(state["store"], state["pre"], logra_query_rows(wq, cfg))

        return [("log", lambda: logra_log(w, cfg, root)), ("fit", fit), ("score", lambda: more(w))], more
    if tool == "kronfluence-ekfac":

        def setup() -> None:
            state["analyzer"], _ = kronfluence_setup(w, root)

        def more(wq: Workload) -> torch.Tensor:
            wq.model = w.model
            state["n"] = state.get("n", 0) + 1
            return kronfluence_scores(wq, state["analyzer"], name=f"scores{state['n']}")

        return [
            ("setup", setup),
            ("fit", lambda: kronfluence_fit(w, state["analyzer"])),
            ("score", lambda: more(w)),
        ], more
    if tool.startswith("logix"):
        hessian = tool.split("-")[1]

        def setup() -> None:
            state["run"] = logix_setup(w, k, hessian, root)

        def more(wq: Workload) -> torch.Tensor:
            wq.model = w.model
            return logix_scores(wq, state["run"], hessian)

        return [("setup", setup), ("log", lambda: logix_log(w, state["run"])), ("score", lambda: more(w))], more
    if tool.startswith("bergson"):
        return bergson_phases(tool, w, k, root)
    raise SystemExit(f"unknown tool {tool!r}; choose from {TOOLS}")


def bergson_phases(tool: str, w: Workload, k: int, root: str) -> tuple[list[tuple[str, Callable[[], Any]]], Callable]:
    """Bergson's phases: setup, fit (EK-FAC, or TrackStar's training Hessian), score (per query set)."""
    state: dict[str, Any] = {}

    def setup() -> None:
        state["run"] = peers_bergson.bergson_setup(w, root)

    if tool == "bergson-ekfac":

        def fit() -> None:
            state["pre"] = peers_bergson.bergson_ekfac_fit(state["run"])

        def more(wq: Workload) -> torch.Tensor:
            state["n"] = state.get("n", 0) + 1
            run = peers_bergson.with_queries(state["run"], wq)
            return peers_bergson.bergson_ekfac_queries(run, state["pre"], tag=f"q{state['n']}")

    else:

        def fit() -> None:
            state["value"] = peers_bergson.trackstar_fit(state["run"], k)

        def more(wq: Workload) -> torch.Tensor:
            state["n"] = state.get("n", 0) + 1
            run = peers_bergson.with_queries(state["run"], wq)
            return peers_bergson.trackstar_score(run, state["value"], k, tag=f"q{state['n']}")

    return [("setup", setup), ("fit", fit), ("score", lambda: more(w))], more


def child(tool: str, n: int, q: int, k: int, more_queries: list[int]) -> dict[str, Any]:
    common.set_threads()
    model = common.llama()
    w = workload(model, n, q)
    common.bare_pass(model, [w.train[0][0]])  # warm-up
    _, bare_s, bare_mib = common.measured(lambda: common.bare_pass(model, [b[0] for b in w.train]))
    out: dict[str, Any] = {"tool": tool, "n": n, "q": q, "k": k, "bare_s": bare_s, "bare_peak_mib": bare_mib}
    with tempfile.TemporaryDirectory(prefix="logra-bench-") as root:
        steps, more = phases(tool, w, k, root)
        total, peak = 0.0, 0.0
        for name, fn in steps:
            result, seconds, mib = common.measured(fn)
            out[f"{name}_s"] = seconds
            total, peak = total + seconds, max(peak, mib)
        if not (isinstance(result, torch.Tensor) and tuple(result.shape) == (q, n)):
            raise SystemExit(f"{tool} returned scores of shape {getattr(result, 'shape', None)}, not {(q, n)}")
        out.update(total_s=total, cost_n_bare=total / bare_s, peak_mib=peak, peak_ratio=peak / bare_mib)
        out["stored_bytes"] = common.dir_bytes(root)
        out["more"] = {}
        for extra in more_queries:
            wq = workload(model, n, extra, query_seed=10 + extra)
            scores, seconds, mib = common.measured(lambda wq=wq: more(wq))
            out["more"][str(extra)] = {
                "s": seconds,
                "n_bare": seconds / bare_s,
                "peak_mib": mib,
                "shape": list(scores.shape),
            }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", action="store_true", help="also Kronfluence, LogIX, Bergson (needs .venv-peers)")
    parser.add_argument("--tools", nargs="*", choices=TOOLS, help="default: logra's, plus the peers' with --peers; "
                        "a subset keeps the other rows of results/<out>.json, each with its date")  # fmt: skip
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--q", type=int, default=16)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--trackstar-k", type=int, default=16,
                        help="Bergson TrackStar: k (a dense (k²)² Hessian per layer: hours at k=64)")  # fmt: skip
    parser.add_argument("--more-queries", type=int, nargs="*", default=[16, 64])
    parser.add_argument("--out", default="e2e", help="results/<out>.json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.n, args.q, args.k, args.more_queries)))
        return
    tools = args.tools or [t for t in TOOLS if args.peers or t.startswith("logra")]
    rows = []
    for tool in tools:
        extra = ["--more-queries", *map(str, args.more_queries)]
        k = args.trackstar_k if tool == "bergson-trackstar" else args.k
        result = common.run_child("e2e.py", [tool, "--n", str(args.n), "--q", str(args.q), "--k", str(k), *extra])
        rows.append({"tool": tool, "k": k, **result})
        print(json.dumps(rows[-1]), file=sys.stderr)
    if args.tools:
        rows = common.merged_rows(args.out, rows, lambda r: r["tool"] in tools)
    common.save(args.out, {"model": common.LLAMA, "n": args.n, "q": args.q, "k": args.k, "rows": rows})


if __name__ == "__main__":
    main()
