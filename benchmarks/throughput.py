"""Logging throughput and storage: logra vs LogIX's LoGra logging vs TRAK's featurisation vs Bergson's build.

On the Llama-shaped model of `bench_common.py` (4 x 256, batches of 8 x 128 tokens, one thread), each
configuration runs in its own process: `--rounds` interleaved rounds of a bare forward+backward
over `--batches` batches and the tool's logging pass over the same batches; the reported time
ratio is the median of (tool CPU time / bare CPU time). Time is measured with glibc's default
allocator, peak memory in a second process with the strict one (`bench_common.run_child`).
The `floor` row is a forward+backward that computes activation gradients only: the least any
per-example logging pass must do. Setup that happens once per run (logra drawing its
projections and opening the store, LogIX wrapping the layers in LoRA modules, TRAK building its
projector, Bergson copying and freezing the model, turning the batches into a `datasets.Dataset` and
drawing its projections) is not timed; writing the rows to disk is. Every pass, the bare one too,
takes the loss as `bench_common.lm_loss` does (vocabulary last), the form Bergson's own loop uses.
Bergson's `build` pass collects no statistics: its `kfac` rows add its KFAC covariance pass over
the same batches (the statistics logra collects in its one pass). Peak memory is the process's
VmHWM during each loop (absolute, MiB), and storage is the bytes the tool left on disk divided by
the number of examples.

    .venv/bin/python benchmarks/throughput.py                   # logra only (make bench)
    .venv-peers/bin/python benchmarks/throughput.py --peers     # with LogIX, TRAK, Bergson (make bench-peers)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from typing import Any

import bench_common as common
from bench_common import floor_pass
from peers import Workload, fresh, logix_log, logix_setup, logra_config, logra_run, trak_featurize
from peers_bergson import bergson_build, bergson_covariance, bergson_index, bergson_setup

from logra import GradientLogger


def configs(k_values: list[int], peers: bool, trak_k: int) -> list[dict[str, Any]]:
    """The configurations to measure: logra's four modes per k, then LogIX per k, TRAK, Bergson per k."""
    out = [{"tool": "floor", "k": None}] + [
        {"tool": "logra", "k": k, "statistics": s, "param_grads": p}
        for k in k_values
        for s in (True, False)
        for p in (False, True)
    ]
    if peers:
        out += [{"tool": "logix", "k": k, "hessian": h} for k in k_values for h in ("kfac", "none")]
        out += [{"tool": "trak", "k": trak_k}]
        out += [{"tool": "bergson", "k": k, "hessian": h} for k in k_values for h in ("kfac", "none")]
    return out


def tool_pass(spec: dict[str, Any], w: Workload, root: str) -> tuple[Any, Any]:
    """(setup(): state, run(state)) of one configuration; only `run` is timed."""
    if spec["tool"] == "logra":
        cfg = logra_config(w, spec["k"])

        def setup_logra() -> GradientLogger:  # draws the projections and opens the store, once per run
            return GradientLogger(w.model, cfg, store=root, statistics=spec["statistics"])

        return setup_logra, (lambda logger: logra_run(w, logger, spec["param_grads"]))
    if spec["tool"] == "floor":  # forward + activation-gradient backward, no weight gradients, no hooks

        def setup_floor() -> None:
            return None

        return setup_floor, (lambda _: floor_pass(w.model, [b[0] for b in w.train]))
    if spec["tool"] == "logix":

        def setup_logix() -> tuple[Workload, Any]:
            copy = fresh(w)
            return copy, logix_setup(copy, spec["k"], spec["hessian"], tempfile.mkdtemp(dir=root))

        return setup_logix, (lambda state: logix_log(*state))
    if spec["tool"] == "trak":
        dim = spec["proj_dim"]

        def setup_trak() -> Workload:
            return fresh(w)

        return setup_trak, (lambda copy: trak_featurize(copy, dim, tempfile.mkdtemp(dir=root)))
    if spec["tool"] == "bergson":

        def setup_bergson() -> tuple[Any, Any]:  # its run and its index config, projections drawn
            run = bergson_setup(w, tempfile.mkdtemp(dir=root))
            return run, bergson_index(run, spec["k"])

        def run_bergson(state: tuple[Any, Any]) -> None:
            run, index = state
            bergson_build(run, spec["k"], index)
            if spec["hessian"] == "kfac":
                bergson_covariance(run)

        return setup_bergson, run_bergson
    raise SystemExit(f"unknown tool {spec['tool']!r}")


def child(spec: dict[str, Any], n_batches: int, rounds: int) -> dict[str, Any]:
    common.set_threads()
    model = common.llama()
    batches = common.token_batches(n_batches * common.BATCH)
    w = Workload(model, common.LOGGED, "lm", [(b,) for b in batches])
    if spec["tool"] == "trak":  # TRAK projects to the width of a logra row at the same k: equal storage
        spec["proj_dim"] = len(common.LOGGED) * spec["k"] ** 2
    common.bare_pass(model, batches[:1])  # warm-up
    ratios, bare_s, tool_s, bare_mem, tool_mem, stored = [], [], [], [], [], 0
    for _ in range(rounds):
        _, tb, mb = common.measured(lambda: common.bare_pass(model, batches))
        with tempfile.TemporaryDirectory(prefix="logra-bench-") as root:
            setup, run = tool_pass(spec, w, root)
            state = setup()
            _, tt, mt = common.measured(lambda run=run, state=state: run(state))
            stored = common.dir_bytes(root)
        ratios.append(tt / tb)
        bare_s.append(tb)
        tool_s.append(tt)
        bare_mem.append(mb)
        tool_mem.append(mt)
    tokens = n_batches * common.BATCH * common.SEQ
    return {
        **spec,
        "time_ratio": statistics.median(ratios),
        "bare_s": statistics.median(bare_s),
        "tool_s": statistics.median(tool_s),
        "tokens_per_s": tokens / statistics.median(tool_s),
        "examples_per_s": n_batches * common.BATCH / statistics.median(tool_s),
        "bare_peak_mib": max(bare_mem),
        "tool_peak_mib": max(tool_mem),
        "bytes_per_example": stored / (n_batches * common.BATCH),
        "rounds": rounds,
        "batches": n_batches,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", action="store_true", help="also LogIX, TRAK and Bergson (needs .venv-peers)")
    parser.add_argument("--k", type=int, nargs="*", default=[8, 64])
    parser.add_argument("--trak-k", type=int, default=8, help="TRAK's proj_dim = the logra row width at this k")
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--trak-rounds", type=int, default=1)
    parser.add_argument("--out", default="throughput", help="results/<out>.json")
    parser.add_argument("--tools", nargs="*", help="measure only these tools (floor, logra, logix, trak, bergson); "
                        "the other rows of results/<out>.json are kept, each with its date")  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        print(json.dumps(child(spec, args.batches, args.rounds)))
        return
    rows = []
    for spec in configs(args.k, args.peers, args.trak_k):
        if args.tools and spec["tool"] not in args.tools:
            continue
        rounds = args.trak_rounds if spec["tool"] == "trak" else args.rounds
        batches = 1 if spec["tool"] == "trak" else args.batches
        args_ = [json.dumps(spec), "--batches", str(batches)]
        timed = common.run_child("throughput.py", [*args_, "--rounds", str(rounds)], strict_malloc=False)
        memory = common.run_child("throughput.py", [*args_, "--rounds", "1"], strict_malloc=True)
        result = dict(timed)
        if "error" not in timed:
            if "error" in memory:
                result["error"] = "memory run: " + memory["error"]
            else:
                result.update({key: memory[key] for key in ("bare_peak_mib", "tool_peak_mib")})
        rows.append({**spec, **result})
        print(json.dumps(rows[-1]), file=sys.stderr)
    if args.tools:
        keys = ("tool", "k", "statistics", "param_grads", "hessian")
        done = {tuple(r.get(key) for key in keys) for r in rows}
        rows = common.merged_rows(args.out, rows, lambda r: tuple(r.get(key) for key in keys) in done)
        order = ["floor", "logra", "logix", "trak", "bergson"]
        rows.sort(key=lambda r: order.index(r["tool"]) if r["tool"] in order else len(order))  # stable
    path = common.save(args.out, {"model": common.LLAMA, "batch": [common.BATCH, common.SEQ], "rows": rows})
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
