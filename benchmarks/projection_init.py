"""Projection init: logging throughput and LDS of init=sjlt (FactGraSS-style) against gaussian.

init=sjlt (`logra.capture.projection`) keeps, per side, a random mask of k' = min(n, 4k) of the
n coordinates and hashes them to k rows with random signs (an SJLT); the hooks apply it with a
gather instead of a matmul. FactGraSS (arXiv 2505.18976) applies its SJLT after the Kronecker
product; logra keeps the factorised (k_out x k_in) rows so that KFAC / EK-FAC still apply, so both
the mask and the SJLT act on each side.

- throughput: on the Llama-shaped model of `bench_common.py` (4 x 256, MLP 688, batches of
  8 x 128 tokens, one thread, the 28 block Linears logged: the LogIX comparison's setting), one
  child process runs `--rounds` interleaved rounds of a bare forward+backward, the floor pass
  (activation gradients only) and a logging pass per (init, k) (statistics on, store written,
  `param_grads=False`); each is a ratio to the bare pass of the same round, the median reported.
  `speedup` is gaussian's logging time over sjlt's (same k), and `overhead_cut` the share of
  gaussian's cost above the floor that sjlt removes. `kernels`: the projection alone at widths
  256, 688 (this model) and 4,096 (Llama-3-8B), dense matmul against the sjlt gather.
- lds: the LDS (`tasks.py` ground truth, as in accuracy.py / bytes_curve.py) of kfac, ekfac and
  identity for both inits on digits-mlp, markov-lm and news-lm, averaged over `--seeds`
  projection seeds.

    flock /tmp/logra-timing.lock .venv/bin/python benchmarks/projection_init.py
    .venv/bin/python benchmarks/projection_init.py --skip-throughput --tasks markov-lm --seeds 1

A skipped part keeps the numbers already saved in results/<out>.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from typing import Any

import accuracy
import bench_common as common
import peers
import tasks
import torch

from logra import GradientLogger
from logra.capture.projection import SparseRows, make_projection
from logra.config import ProjectionInit
from logra.evaluation import linear_datamodeling_score

INITS = ["gaussian", "sjlt"]
METHODS = ["identity", "kfac", "ekfac"]
LDS_K = {"digits-mlp": [16, 64], "markov-lm": [16, 64], "news-lm": [32, 64]}


def throughput_child(ks: list[int], n_batches: int, rounds: int) -> dict[str, Any]:
    """Interleaved rounds in this process: bare, floor and one logging pass per (init, k)."""
    common.set_threads()
    model = common.llama()
    batches = common.token_batches(n_batches * common.BATCH)
    w = peers.Workload(model, common.LOGGED, "lm", [(b,) for b in batches])
    common.bare_pass(model, batches[:1])  # warm-up
    ratios: dict[str, list[float]] = {}
    for _ in range(rounds):
        bare = common.bare_pass(model, batches)
        ratios.setdefault("floor", []).append(common.floor_pass(model, batches) / bare)
        for k in ks:
            for init in INITS:
                with tempfile.TemporaryDirectory(prefix="logra-bench-") as root:
                    logger = GradientLogger(model, peers.logra_config(w, k, init=init), store=root)  # setup: untimed
                    start = common.CLOCK()
                    peers.logra_run(w, logger, param_grads=False)
                    ratios.setdefault(f"{init}/{k}", []).append((common.CLOCK() - start) / bare)
    rows = summary(ratios, ks)
    return {"rounds": rounds, "batches": n_batches, "ratios": ratios, "rows": rows, "kernels": kernel_rows(ks)}


def summary(ratios: dict[str, list[float]], ks: list[int]) -> list[dict[str, Any]]:
    """Per k: median ratios to the bare pass, `speedup` (median gaussian / median sjlt), the paired
    `round_speedup` (median over rounds of gaussian / sjlt in the same round: less sensitive to load
    that shifts a whole round) and `overhead_cut` (share of gaussian's cost above the floor removed)."""
    medians = {key: statistics.median(v) for key, v in ratios.items()}
    rows = []
    for k in ks:
        g, s, floor = medians[f"gaussian/{k}"], medians[f"sjlt/{k}"], medians["floor"]
        paired = statistics.median(a / b for a, b in zip(ratios[f"gaussian/{k}"], ratios[f"sjlt/{k}"]))
        cut = (g - s) / (g - floor) if g > floor else None
        rows.append({"k": k, "gaussian_ratio": g, "sjlt_ratio": s, "floor_ratio": floor, "speedup": g / s,
                     "round_speedup": paired, "overhead_cut": cut})  # fmt: skip
    return rows


def kernel_rows(ks: list[int], widths: tuple[int, ...] = (256, 688, 4096), repeats: int = 40) -> list[dict[str, Any]]:
    """CPU ms of projecting one batch's tokens (8 x 128, float32) of width n to k: the dense gaussian
    matmul against the sjlt gather (`SparseRows.apply`), the best of 4 blocks of `repeats` // 4 calls.
    Width 4096 is a Llama-3-8B hidden size: where the mask starts to drop coordinates."""

    def best_ms(fn: Any) -> float:
        fn()
        times = []
        for _ in range(4):
            start = common.CLOCK()
            for _ in range(repeats // 4):
                fn()
            times.append((common.CLOCK() - start) / (repeats // 4) * 1e3)
        return min(times)

    rows = []
    gen = torch.Generator().manual_seed(0)
    for n in widths:
        x = torch.randn(common.BATCH, common.SEQ, n, generator=gen)
        for k in ks:
            dense = make_projection(ProjectionInit.GAUSSIAN, 0, "x", "in", k, n).float()
            sparse = SparseRows.of(make_projection(ProjectionInit.SJLT, 0, "x", "in", k, n).float())
            assert sparse is not None
            d_ms, s_ms = best_ms(lambda x=x, d=dense: x @ d.T), best_ms(lambda x=x, s=sparse: s.apply(x))
            rows.append({"n": n, "k": k, "dense_ms": d_ms, "sjlt_ms": s_ms, "speedup": d_ms / s_ms})
    return rows


def lds_rows(name: str, seeds: int, log: Any) -> list[dict[str, Any]]:
    """One row per (init, k, method): the LDS over `seeds` projection seeds and its CPU seconds."""
    task = tasks.ALL_TASKS[name]()
    model, subsets, outputs = tasks.ground_truth(task)
    w = accuracy.workload(task, model)
    rows = []
    for k in LDS_K[name]:
        for init in INITS:
            start, values = time.process_time(), {}
            for seed in range(seeds):
                scores = peers.with_tmp(
                    lambda root, seed=seed, k=k, init=init: peers.logra_scores(
                        peers.fresh(w), k, METHODS, root, seed=seed, init=init
                    )
                )
                for method, s in scores.items():
                    values.setdefault(method, []).append(linear_datamodeling_score(s, subsets, outputs))
            seconds = (time.process_time() - start) / seeds
            for method, lds in values.items():
                rows.append({"task": name, "init": init, "k": k, "method": method, "lds": statistics.mean(lds),
                             "lds_std": statistics.stdev(lds) if len(lds) > 1 else None, "seeds": len(lds),
                             "cpu_s": seconds})  # fmt: skip
                log(f"{name} {init} k={k} {method}: LDS {rows[-1]['lds']:.3f} ({seconds:.1f} s per seed)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, nargs="*", default=[8, 64], help="throughput: projection sizes")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tasks", nargs="*", choices=list(tasks.ALL_TASKS), default=list(tasks.ALL_TASKS))
    parser.add_argument("--seeds", type=int, default=3, help="LDS: projection seeds per (init, k)")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--skip-lds", action="store_true")
    parser.add_argument("--out", default="projection_init", help="results/<out>.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(throughput_child(args.k, args.batches, args.rounds)))
        return
    previous = common.RESULTS / f"{args.out}.json"  # a part that is skipped keeps its saved numbers
    payload: dict[str, Any] = json.loads(previous.read_text()) if previous.exists() else {}
    payload.pop("machine", None)
    payload.update(model=common.LLAMA, batch=[common.BATCH, common.SEQ])
    if not args.skip_throughput:
        child_args = ["--k", *map(str, args.k), "--batches", str(args.batches), "--rounds", str(args.rounds)]
        payload["throughput"] = common.run_child("projection_init.py", child_args, strict_malloc=False)
        print(json.dumps(payload["throughput"].get("rows", payload["throughput"])), file=sys.stderr)
    if not args.skip_lds:
        common.set_threads()
        payload["lds"] = [row for name in args.tasks for row in lds_rows(name, args.seeds, print_err)]
    path = common.save(args.out, payload)
    print(f"wrote {path}", file=sys.stderr)


def print_err(line: str) -> None:
    print(line, file=sys.stderr)


if __name__ == "__main__":
    main()
