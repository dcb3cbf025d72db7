"""Attribution accuracy: the LDS of logra and of each peer against retraining ground truth.

For each task of `tasks.py` (ground truth cached in benchmarks/cache/), every method scores the
task's queries against its training set on the model trained on all of it, and the LDS is the
mean over queries of the Spearman correlation, over the cached random 50 % subsets, between the
summed scores of a subset and the measured (seed-averaged) query loss after retraining on it
(`logra.evaluation.linear_datamodeling_score`).

Methods: logra identity / kfac / ekfac / raw at several k (raw only for k <= 32: its matrix per
layer is (k_out k_in)^2), logra kfac / ekfac at k = 64 on the true Fisher (the exact expectation
over the digits' 10 classes; one label drawn per token of the LM), logra kfac / ekfac at k = 64
with pca projections (the top eigenvectors of the Kronecker factors of a first, full-size pass:
the best k-dimensional subspace per side, which shows what any k = 64 Kronecker projection can
keep), logra ekfac without projection
(k = the layer sizes, identity projections), a plain gradient dot product (full gradients, no
preconditioner); with --peers also Kronfluence EK-FAC (no projection; its default true Fisher,
and the empirical Fisher that logra and LogIX use), LogIX (LoGra through LoRA, kfac and raw),
single-model TRAK with proj_dim equal to a logra row at k (equal storage in float32), and Bergson
(`peers_bergson.py`): its EK-FAC (no projection; true Fisher, its default, and empirical) and its
TrackStar at projection k (k x k per layer, projection seeded).

Random choices are seeded and averaged: logra's projections (LoGraConfig.seed), LogIX's LoRA
initialisation and Kronfluence's sampled labels (torch seed) over `--seeds` seeds (default 3);
the LDS is their mean (and standard deviation). TRAK (projector seed 0, it takes longest) and
the unprojected methods run once.

    .venv/bin/python benchmarks/accuracy.py                  # logra only (make bench)
    .venv-peers/bin/python benchmarks/accuracy.py --peers    # with the peers (make bench-peers)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import bench_common as common
import peers
import peers_bergson
import tasks
import torch
from torch import Tensor

from logra.evaluation import linear_datamodeling_score

K_VALUES = {"digits-mlp": [8, 16, 32, 64], "markov-lm": [8, 16, 32, 64]}
# TRAK's CPU projector draws a fresh (gradient size x 100) Gaussian block for every 100 output columns of
# every batch: the LM at k=64 (proj_dim 57,344) would take it several minutes, so it runs at k=16 there.
TRAK_K = {"digits-mlp": [16, 64], "markov-lm": [16]}
LOGIX_K = [16, 64]
BERGSON_K = [16, 32]  # TrackStar: k x k per layer, a dense (k²)² Hessian per layer (as logra raw: k <= 32)
PEER_BATCH = {"digits-mlp": 100, "markov-lm": 32, "news-lm": 32}
FULL = 1 << 20  # a k larger than every layer: no projection
KRON_EMPIRICAL = "Kronfluence, empirical Fisher"
BERGSON, BERGSON_EMPIRICAL, BERGSON_TRACKSTAR = "Bergson", "Bergson, empirical Fisher", "Bergson TrackStar"
PCA = "logra, pca projection (2 passes)"
TRUE_FISHER = "logra, true Fisher"


def workload(task: tasks.Task, model: torch.nn.Module) -> peers.Workload:
    b = PEER_BATCH[task.name]
    train = [
        task.batch(task.train_x[i : i + b], None if task.train_y is None else task.train_y[i : i + b])
        for i in range(0, len(task.train_x), b)
    ]
    query = [task.batch(task.query_x, task.query_y)]
    return peers.Workload(model, task.logged, "lm" if task.train_y is None else "classifier", train, query)


def row_width(w: peers.Workload, k: int) -> int:
    """D of a logra row at projection size k on this workload's logged layers."""
    with peers.logra.GradientLogger(w.model, peers.logra_config(w, k), statistics=False) as logger:
        return logger.dim


def stored_floats(w: peers.Workload, label: str, k: int | None) -> int:
    """Floats stored per training example: a logra row, LogIX's r x r per layer, TRAK's proj_dim, 0."""
    if label.startswith(("Kronfluence", "Bergson")):
        return 0  # nothing per example: training gradients are recomputed for every query batch
    if label == "LogIX":
        assert k is not None
        modules = dict(w.model.named_modules())
        return sum(min(k, modules[n].in_features, modules[n].out_features) ** 2 for n in w.logged)
    return row_width(w, k if k is not None else FULL)


Method = tuple[str, int | None, bool, Callable[[str, int], dict[str, Tensor]]]


def logra_methods(w: peers.Workload, task: str) -> list[Method]:
    """[(label, k, seeded, fn(root, seed) -> {method: scores})] of logra: each k is one logging pass."""

    def projected(k: int, methods: list[str]) -> Callable[[str, int], dict[str, Tensor]]:
        return lambda root, seed: peers.logra_scores(peers.fresh(w), k, methods, root, seed=seed)

    def full(method: str) -> Callable[[str, int], dict[str, Tensor]]:
        return lambda root, seed: peers.logra_scores(peers.fresh(w), FULL, [method], root, init="identity")

    out: list[Method] = [
        ("logra", k, True, projected(k, ["identity", "kfac", "ekfac"] + (["raw"] if k <= 32 else [])))
        for k in K_VALUES[task]
    ]

    def pca(k: int) -> Callable[[str, int], dict[str, Tensor]]:
        def run(root: str, seed: int) -> dict[str, Tensor]:
            full_root = str(Path(root) / "full")  # the full-size pass whose factors give the projections
            peers.logra_log(peers.fresh(w), peers.logra_config(w, FULL, init="identity"), full_root)
            return peers.logra_scores(peers.fresh(w), k, ["kfac", "ekfac"], str(Path(root) / "pca"), init="pca",
                                      pca_statistics=full_root)  # fmt: skip

        return run

    def true_fisher(k: int) -> Callable[[str, int], dict[str, Tensor]]:
        return lambda root, seed: peers.logra_scores(peers.fresh(w), k, ["kfac", "ekfac"], root, True, seed=seed)

    return out + [
        (TRUE_FISHER, 64, True, true_fisher(64)),
        (PCA, 64, False, pca(64)),
        ("logra, no projection", None, False, full("ekfac")),
        ("gradient dot product", None, False, full("identity")),
    ]


def peer_methods(w: peers.Workload, task: str) -> list[Method]:
    """Kronfluence (its true Fisher samples labels: seeded) and LogIX (random LoRA: seeded) per seed; TRAK once."""

    def kron(empirical: bool) -> Callable[[str, int], dict[str, Tensor]]:
        def run(root: str, seed: int) -> dict[str, Tensor]:
            copy = peers.fresh(w)
            analyzer, _ = peers.kronfluence_setup(copy, root)
            torch.manual_seed(seed)
            peers.kronfluence_fit(copy, analyzer, empirical=empirical)
            return {"ekfac": peers.kronfluence_scores(copy, analyzer)}

        return run

    def logix(k: int, hessian: str) -> Callable[[str, int], dict[str, Tensor]]:
        def run(root: str, seed: int) -> dict[str, Tensor]:
            copy = peers.fresh(w)
            torch.manual_seed(seed)
            state = peers.logix_setup(copy, k, hessian, root)
            peers.logix_log(copy, state)
            return {hessian: peers.logix_scores(copy, state, hessian)}

        return run

    def trak(k: int) -> Callable[[str, int], dict[str, Tensor]]:
        def run(root: str, seed: int) -> dict[str, Tensor]:
            copy = peers.fresh(w)
            return {"trak": peers.trak_scores(copy, peers.trak_featurize(copy, row_width(w, k), root))}

        return run

    out: list[Method] = [("Kronfluence", None, True, kron(False)), (KRON_EMPIRICAL, None, False, kron(True))]
    out += [("LogIX", k, True, logix(k, "kfac")) for k in LOGIX_K] + [("LogIX", 16, True, logix(16, "raw"))]
    out += [("TRAK (1 model)", k, False, trak(k)) for k in TRAK_K[task]]
    return out + bergson_methods(w)


def news_methods(w: peers.Workload, task: str) -> list[Method]:
    """news-lm: only Bergson here (logra's rows on it come from bytes_curve.py; Kronfluence, LogIX and
    TRAK have no adapter for its GPT-2 Conv1D layers in this benchmark)."""
    return bergson_methods(w)


def bergson_methods(w: peers.Workload) -> list[Method]:
    """Bergson's EK-FAC (its true Fisher samples labels: seeded; and the empirical Fisher) and TrackStar
    (seeded projections) at each of BERGSON_K; through the logged layers it can hook (not an LM head:
    the label then says which were left out)."""
    skipped = peers_bergson.outside_base(w)
    suffix = f" (without {', '.join(skipped)})" if skipped else ""

    def ekfac(empirical: bool) -> Callable[[str, int], dict[str, Tensor]]:
        def run(root: str, seed: int) -> dict[str, Tensor]:
            state = peers_bergson.bergson_setup(w, root, skip_outside=True)
            torch.manual_seed(seed)
            pre = peers_bergson.bergson_ekfac_fit(state, empirical)
            return {"ekfac": peers_bergson.bergson_ekfac_queries(state, pre)}

        return run

    def trackstar(k: int) -> Callable[[str, int], dict[str, Tensor]]:
        def run(root: str, seed: int) -> dict[str, Tensor]:
            state = peers_bergson.bergson_setup(w, root, seed=seed, skip_outside=True)
            return {"trackstar": peers_bergson.bergson_trackstar(state, k)}

        return run

    out: list[Method] = [(BERGSON + suffix, None, True, ekfac(False)), (BERGSON_EMPIRICAL + suffix, None, False,
                                                                        ekfac(True))]  # fmt: skip
    return out + [(BERGSON_TRACKSTAR + suffix, k, True, trackstar(k)) for k in BERGSON_K]


def evaluate(
    name: str, with_peers: bool, seeds: int, log: Callable[[str], None], only: tuple[str, ...] = ()
) -> list[dict[str, Any]]:
    """One row per (method, k): the LDS averaged over `seeds` projection / sampling seeds where seeded;
    `only`: just the methods whose label starts with one of these."""
    task = tasks.ALL_TASKS[name]()
    model, subsets, outputs = tasks.ground_truth(task)
    w = workload(task, model)
    rows = []
    if name in K_VALUES:
        methods = logra_methods(w, name) + (peer_methods(w, name) if with_peers else [])
    else:
        methods = news_methods(w, name) if with_peers else []
    for label, k, seeded, fn in methods:
        if only and not label.startswith(only):
            continue
        start, values = time.process_time(), {}
        try:
            for seed in range(seeds if seeded else 1):
                for method, s in peers.with_tmp(lambda root, seed=seed, fn=fn: fn(root, seed)).items():
                    values.setdefault(method, []).append(linear_datamodeling_score(s, subsets, outputs))
        except Exception as exc:  # a peer that cannot run is reported as such, never as a number
            rows.append({"task": name, "tool": label, "k": k, "error": f"{type(exc).__name__}: {exc}"[:300]})
            log(f"{name}: {label} k={k} failed: {rows[-1]['error']}")
            continue
        seconds = (time.process_time() - start) / len(next(iter(values.values())))
        for method, lds in values.items():
            row = {"task": name, "tool": label, "k": k, "method": method, "lds": statistics.mean(lds),
                   "lds_std": statistics.stdev(lds) if len(lds) > 1 else None, "seeds": len(lds), "cpu_s": seconds,
                   "row_floats": stored_floats(w, label, k)}  # fmt: skip
            rows.append(row)
            log(f"{name}: {label} {method} k={k}: LDS {row['lds']:.3f} over {len(lds)} seed(s) ({seconds:.1f} s each)")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--peers", action="store_true", help="also the peers (needs .venv-peers)")
    parser.add_argument("--tasks", nargs="*", choices=list(tasks.ALL_TASKS), default=list(tasks.TASKS),
                        help="news-lm: Bergson's rows only (with --peers); logra's: bytes_curve.py")  # fmt: skip
    parser.add_argument("--seeds", type=int, default=3, help="projection / sampling seeds per seeded method")
    parser.add_argument("--out", default="accuracy", help="results/<out>.json")
    parser.add_argument("--only", nargs="*", default=[], help="just the methods whose label starts with one of "
                        "these (e.g. Bergson); the other rows of results/<out>.json stay, with their date")  # fmt: skip
    args = parser.parse_args()
    common.set_threads()
    rows = []
    only = tuple(args.only)
    for name in args.tasks:
        rows += evaluate(name, args.peers, args.seeds, lambda line: print(line, file=sys.stderr), only)
    if only:
        rows = common.merged_rows(args.out, rows, lambda r: r["tool"].startswith(only) and r["task"] in args.tasks)
    recipes = {name: tasks.ALL_TASKS[name]().recipe.__dict__ for name in args.tasks}
    modules = {name: module_sets(name) for name in args.tasks}
    kept = common.RESULTS / f"{args.out}.json"
    if only and kept.exists():  # the kept rows' tasks keep their recipes and module lists
        old = json.loads(kept.read_text())
        recipes, modules = {**old.get("recipes", {}), **recipes}, {**old.get("modules", {}), **modules}
    common.save(args.out, {"recipes": recipes, "modules": modules, "rows": rows})


def module_sets(name: str) -> dict[str, Any]:
    """The layers every tool attributes through on task `name` (each is handed the same list), and
    what Bergson's default module set (every Linear under model.base_model) would leave out."""
    task = tasks.ALL_TASKS[name]()
    return {"logged": list(task.logged), **peers_bergson.bergson_modules(task.build())}


if __name__ == "__main__":
    main()
