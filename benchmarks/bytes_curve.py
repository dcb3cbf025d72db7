"""Accuracy per byte on the language-model tasks: LDS against bytes stored per training example.

For `markov-lm` (synthetic) and `news-lm` (real text, GPT-2 fine-tuned from a shared base; see
news_lm.py), every candidate logs the training set, fits EK-FAC (and KFAC) and scores the
queries on the model trained on everything; the LDS is measured against the cached retraining
ground truth (tasks.py). Candidates, each at several sizes:

- `uniform k, float32`: today's default shape, one k for every side of every layer.
- `uniform k, bfloat16`: the same rows in half the bytes, so twice the floats for the bytes.
- `pca k`: curvature-aligned projections (the top eigenvectors of each Kronecker factor from a
  first full-size statistics pass; two passes, and the first one is full size).
- `budget`: one budget of D floats shared across layers by `logra.capture.budget.allocate_k`
  from a probe pass (statistics only, on the training set, k0 = 2,048 per side: every side of
  these models in full), at the D of uniform k = 16, 32, 64.
- `budget, bfloat16`: twice those budgets in bfloat16 (the same bytes).
- `low-rank factors, rank c` (LoRIF-style, arXiv 2601.21929): full-size per-example matrices
  stored as a rank-c truncated SVD per layer, c·(k_in + k_out) float32 numbers per layer; here the
  truncated rows are reconstructed and scored with logra's EK-FAC (see `lowrank_scores`).

Horizontal references: logra EK-FAC without projection (identity projections, full size), and
Kronfluence EK-FAC from results/accuracy_peers.json where `make bench-peers` measured it.
Random projections are averaged over `--seeds` projection seeds. Writes results/bytes_curve.json
and results/bytes_curve.svg (the plot in the README):

    .venv/bin/python benchmarks/bytes_curve.py              # both tasks (make bench)
    .venv/bin/python benchmarks/bytes_curve.py --tasks news-lm --seeds 1
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import accuracy
import bench_common as common
import peers
import tasks
import torch
from torch import Tensor

import logra
from logra.capture.budget import allocate_k
from logra.evaluation import linear_datamodeling_score
from logra.store import StoreWriter

UNIFORM_K = [16, 32, 64, 128]
BF16_K = [32, 64, 90]
PCA_K = [32, 64]
BUDGET_K = [16, 32, 64]  # budgets: the D of uniform k at these k
PROBE_K = 2048  # every side of both LM tasks in full: a side never grows past what the probe saw
METHODS = ["kfac", "ekfac"]
LM_TASKS = ["markov-lm", "news-lm"]


def probe_layer_k(w: peers.Workload, budget: int) -> dict[str, tuple[int, int]]:
    """allocate_k from a statistics-only probe pass over the training set at k0 = PROBE_K."""
    probe = peers.logra_log(peers.fresh(w), peers.logra_config(w, PROBE_K), store=None)
    return allocate_k(probe.statistics(), probe.layers, budget)


Candidate = tuple[str, int, bool, Callable[[str, int], dict[str, Tensor]], dict[str, Any]]
LOWRANK_C = [1, 2, 4, 8]


def truncated(rows: Tensor, layers: Any, c: int) -> Tensor:
    """Rows [n, D] with each layer's (k_out, k_in) block replaced by its best rank-c approximation
    U_c S_c V_cᵀ: what a store of c·(k_in + k_out) numbers per layer and example can hold."""
    out = rows.clone()
    for layer in layers:
        cols = slice(layer.offset, layer.offset + layer.size)
        g = rows[:, cols].reshape(-1, layer.k_out, layer.k_in).double()
        u, sv, vh = torch.linalg.svd(g, full_matrices=False)
        r = min(c, sv.shape[1])
        out[:, cols] = ((u[:, :, :r] * sv[:, None, :r]) @ vh[:, :r]).reshape(len(rows), -1).to(rows.dtype)
    return out


def lowrank_scores(w: peers.Workload, c: int, root: str) -> dict[str, Tensor]:
    """LoRIF-style storage, measured: full-size rows (identity projections) truncated to rank c per
    layer and example, written as a store with the full pass's statistics; queries stay full size.
    Scored with logra's KFAC / EK-FAC on the truncated rows (LoRIF itself fits its curvature by a
    truncated SVD and the Woodbury identity; this measures what the rank-c rows keep)."""
    cfg = peers.logra_config(w, accuracy.FULL, init="identity")
    full_root = str(Path(root) / "full")
    peers.logra_log(peers.fresh(w), cfg, full_root)
    full = logra.GradientStore.open(full_root)
    writer = StoreWriter(Path(root) / "rank", full.config, full.model_fingerprint, full.layers, len(full))
    writer.append(list(full.ids), truncated(full.rows(), full.layers, c))
    writer.close(full.statistics())
    store = logra.GradientStore.open(Path(root) / "rank")
    queries = peers.logra_query_rows(w, cfg)
    return {m: peers.logra_score(store, peers.logra_fit(store, m), queries) for m in METHODS}


def candidates(w: peers.Workload) -> list[Candidate]:
    """[(label, size, seeded, fn(root, seed) -> {method: scores}, config)] per candidate and size."""

    def run(k: int, **cfg: Any) -> Callable[[str, int], dict[str, Tensor]]:
        return lambda root, seed: peers.logra_scores(peers.fresh(w), k, METHODS, root, seed=seed, **cfg)

    out: list[Candidate] = [("uniform k, float32", k, True, run(k), {"k": k}) for k in UNIFORM_K]
    out += [("uniform k, bfloat16", k, True, run(k, dtype="bfloat16"), {"k": k, "dtype": "bfloat16"}) for k in BF16_K]
    for k in BUDGET_K:
        budget = accuracy.row_width(w, k)
        layer_k = probe_layer_k(w, budget)
        out.append(("budget, float32", k, True, run(k, layer_k=layer_k), {"k": k, "layer_k": layer_k}))
        layer_k2 = probe_layer_k(w, 2 * budget)
        out.append(("budget, bfloat16", k, True, run(k, layer_k=layer_k2, dtype="bfloat16"),
                    {"k": k, "layer_k": layer_k2, "dtype": "bfloat16"}))  # fmt: skip

    def pca(k: int) -> Callable[[str, int], dict[str, Tensor]]:
        def go(root: str, seed: int) -> dict[str, Tensor]:
            full_root = str(Path(root) / "full")
            peers.logra_log(peers.fresh(w), peers.logra_config(w, accuracy.FULL, init="identity"), full_root)
            return peers.logra_scores(peers.fresh(w), k, METHODS, str(Path(root) / "pca"), init="pca",
                                      pca_statistics=full_root)  # fmt: skip

        return go

    out += [("pca", k, False, pca(k), {"k": k, "init": "pca"}) for k in PCA_K]
    out += [("low-rank factors, rank c", c, False, lambda root, seed, c=c: lowrank_scores(peers.fresh(w), c, root),
             {"rank": c, "init": "identity"}) for c in LOWRANK_C]  # fmt: skip
    full = lambda root, seed: peers.logra_scores(peers.fresh(w), accuracy.FULL, ["ekfac"], root, init="identity")  # noqa: E731
    out.append(("logra, no projection", 0, False, full, {"init": "identity"}))
    if "lm_head" in w.logged:  # which layers are logged matters as much as how they are projected
        head = peers.Workload(w.model, ["lm_head"], w.kind, w.train, w.query)
        only = lambda root, seed: peers.logra_scores(peers.fresh(head), accuracy.FULL, ["ekfac"], root, init="identity")  # noqa: E731
        out.append(("LM head only, no projection", 0, False, only, {"init": "identity", "modules": ["lm_head"]}))
    return out


def bytes_per_example(w: peers.Workload, config: dict[str, Any]) -> int:
    if "rank" in config:  # float32 factors U (k_out x c) and V (k_in x c) per layer, at full size
        with logra.GradientLogger(w.model, peers.logra_config(w, accuracy.FULL), statistics=False) as logger:
            return sum(min(config["rank"], la.k_in, la.k_out) * (la.k_in + la.k_out) for la in logger.layers) * 4
    cfg = {k: v for k, v in config.items() if k != "k"}
    k = config.get("k", accuracy.FULL)
    dtype = logra.StorageDtype(cfg.get("dtype", "float32"))
    cfg.pop("init", None)
    logged = cfg.pop("modules", w.logged)
    only = peers.Workload(w.model, list(logged), w.kind, w.train, w.query)
    with logra.GradientLogger(w.model, peers.logra_config(only, k, **cfg), statistics=False) as logger:
        return logger.dim * dtype.itemsize


def evaluate(name: str, seeds: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    task = tasks.ALL_TASKS[name]()
    model, subsets, outputs = tasks.ground_truth(task)
    w = accuracy.workload(task, model)
    rows = []
    for label, k, seeded, fn, config in candidates(w):
        start, values = time.process_time(), {}
        for seed in range(seeds if seeded else 1):
            for method, s in peers.with_tmp(lambda root, seed=seed, fn=fn: fn(root, seed)).items():
                values.setdefault(method, []).append(linear_datamodeling_score(s, subsets, outputs))
        seconds = (time.process_time() - start) / len(next(iter(values.values())))
        size = bytes_per_example(w, config)
        for method, lds in values.items():
            rows.append({"task": name, "candidate": label, "k": k, "method": method, "bytes": size,
                         "lds": statistics.mean(lds), "lds_std": statistics.stdev(lds) if len(lds) > 1 else None,
                         "seeds": len(lds), "cpu_s": seconds,
                         "layer_k": {n: list(v) for n, v in config.get("layer_k", {}).items()}})  # fmt: skip
            log(f"{name}: {label} k={k} {method}: {size} B, LDS {rows[-1]['lds']:.3f} ({seconds:.0f} s)")
    return rows


def _cpu(fn: Callable[[], Any], rounds: int = 3) -> float:
    """Median process CPU seconds of fn() over `rounds` runs."""
    times = []
    for _ in range(rounds):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def logging_cost(name: str) -> dict[str, float]:
    """CPU time of a logging pass (rows kept in memory, statistics on, weight gradients off) over the
    training set, as a ratio to a bare forward+backward of the same batches: uniform k = 64, the
    budget of k = 64's D, and the budget's probe pass (k0 = PROBE_K, statistics only)."""
    task = tasks.ALL_TASKS[name]()
    model, _, _ = tasks.ground_truth(task)
    w = accuracy.workload(task, model)

    def bare() -> None:
        for batch in w.train:
            w.model.zero_grad(set_to_none=True)
            w.loss(w.model, batch).sum().backward()
        w.model.zero_grad(set_to_none=True)

    layer_k = probe_layer_k(w, accuracy.row_width(w, 64))
    base = _cpu(bare)
    return {
        "uniform_k64": _cpu(lambda: peers.logra_log(w, peers.logra_config(w, 64), None)) / base,
        "budget_k64": _cpu(lambda: peers.logra_log(w, peers.logra_config(w, 64, layer_k=layer_k), None)) / base,
        "probe": _cpu(lambda: peers.logra_log(w, peers.logra_config(w, PROBE_K), None)) / base,
    }


def kronfluence_lines() -> dict[str, float]:
    """{task: Kronfluence EK-FAC LDS} from results/accuracy_peers.json, where it was measured."""
    path = common.RESULTS / "accuracy_peers.json"
    if not path.exists():
        return {}
    rows = json.loads(path.read_text())["rows"]
    return {r["task"]: r["lds"] for r in rows if r["tool"] == "Kronfluence" and r.get("method") == "ekfac"}


COLORS = {"uniform k, float32": "#1f77b4", "uniform k, bfloat16": "#17becf", "pca": "#9467bd",
          "budget, float32": "#d62728", "budget, bfloat16": "#ff7f0e",
          "low-rank factors, rank c": "#2ca02c"}  # fmt: skip


def plot_svg(payload: dict[str, Any], method: str = "ekfac") -> str:
    """One panel per task: LDS against KiB per example (log scale) for each candidate, with the
    unprojected references as horizontal lines. Plain SVG, no plotting library."""
    rows = [r for r in payload["rows"] if r["method"] == method]
    names = list(dict.fromkeys(r["task"] for r in rows))
    W, H, L, R, T, B = 420, 300, 52, 12, 28, 40
    parts = []
    for i, name in enumerate(names):
        mine = [r for r in rows if r["task"] == name]
        full = next(r["lds"] for r in mine if r["candidate"] == "logra, no projection")
        lines = {"logra EK-FAC, no projection": full}
        if name in payload.get("kronfluence", {}):
            lines["Kronfluence EK-FAC"] = payload["kronfluence"][name]
        head = [r["lds"] for r in mine if r["candidate"] == "LM head only, no projection"]
        if head:
            lines["LM head alone, no projection"] = head[0]
        pts = [r for r in mine if r["candidate"] in COLORS]
        xs = [math.log2(r["bytes"] / 1024) for r in pts]
        ys = [r["lds"] for r in pts] + list(lines.values())
        x0, x1 = min(xs) - 0.3, max(xs) + 0.3
        y0, y1 = math.floor(min(ys) * 20) / 20, math.ceil(max(ys) * 20) / 20 + 0.01

        def X(v: float, x0: float = x0, x1: float = x1) -> float:
            return L + (v - x0) / (x1 - x0) * (W - L - R)

        def Y(v: float, y0: float = y0, y1: float = y1) -> float:
            return T + (1 - (v - y0) / (y1 - y0)) * (H - T - B)

        g = [f'<g transform="translate({i * W},0)"><text x="{W / 2}" y="16" text-anchor="middle" '
             f'font-weight="bold">{name} ({method})</text>',
             f'<rect x="{L}" y="{T}" width="{W - L - R}" height="{H - T - B}" fill="none" stroke="#999"/>']
        for tick in range(math.ceil(x0), math.floor(x1) + 1):
            g.append(f'<text x="{X(tick):.1f}" y="{H - B + 14}" text-anchor="middle" font-size="10">'
                     f"{2 ** tick:g}</text>")
        g.append(f'<text x="{(L + W - R) / 2}" y="{H - 6}" text-anchor="middle" font-size="11">'
                 "KiB stored per training example (log scale)</text>")
        steps = int(round((y1 - y0) / 0.05))
        for j in range(steps + 1):
            v = y0 + j * 0.05
            g.append(f'<text x="{L - 4}" y="{Y(v) + 3:.1f}" text-anchor="end" font-size="10">{v:.2f}</text>')
        g.append(f'<text x="12" y="{(T + H - B) / 2}" font-size="11" transform="rotate(-90 12 {(T + H - B) / 2})" '
                 'text-anchor="middle">LDS</text>')
        for j, (label, v) in enumerate(lines.items()):
            dash = "6,3" if j == 0 else "2,2"
            g.append(f'<line x1="{L}" x2="{W - R}" y1="{Y(v):.1f}" y2="{Y(v):.1f}" stroke="#333" '
                     f'stroke-dasharray="{dash}"/>')
            x, anchor = (W - R - 4, "end") if j % 2 == 0 else (L + 4, "start")  # alternate sides: no overlap
            g.append(f'<text x="{x}" y="{Y(v) - 3:.1f}" text-anchor="{anchor}" font-size="9">{label} {v:.3f}</text>')
        k64 = [r["bytes"] for r in pts if r["candidate"] == "uniform k, float32" and r["k"] == 64]
        if k64:  # the storage line: no more than k = 64 float32 LoGra
            xv = X(math.log2(k64[0] / 1024))
            g.append(f'<line x1="{xv:.1f}" x2="{xv:.1f}" y1="{T}" y2="{H - B}" stroke="#bbb" stroke-dasharray="1,3"/>')
            g.append(f'<text x="{xv + 3:.1f}" y="{H - B - 4}" font-size="9" fill="#777">k=64, float32</text>')
        for label, color in COLORS.items():
            series = sorted((r["bytes"], r["lds"]) for r in pts if r["candidate"] == label)
            if not series:
                continue
            path = " ".join(f"{X(math.log2(b / 1024)):.1f},{Y(v):.1f}" for b, v in series)
            g.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
            g += [f'<circle cx="{X(math.log2(b / 1024)):.1f}" cy="{Y(v):.1f}" r="2.5" fill="{color}"/>'
                  for b, v in series]
        parts.append("\n".join(g) + "</g>")
    legend = [f'<g transform="translate({L},{H + 4})">']
    for j, (label, color) in enumerate(COLORS.items()):
        x, y = (j % 3) * 200, (j // 3) * 16
        legend.append(f'<rect x="{x}" y="{y}" width="10" height="10" fill="{color}"/>'
                      f'<text x="{x + 14}" y="{y + 9}" font-size="11">{label}</text>')
    legend.append("</g>")
    width, height = W * max(1, len(names)), H + 38
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif">'
            f'<rect width="100%" height="100%" fill="white"/>' + "\n".join(parts) + "".join(legend) + "</svg>\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", choices=LM_TASKS, default=LM_TASKS)
    parser.add_argument("--seeds", type=int, default=2, help="projection seeds per random candidate")
    parser.add_argument("--replot", action="store_true", help="only redraw the SVG from the saved results")
    parser.add_argument("--cost-only", action="store_true", help="only re-measure the logging cost (into the results)")
    args = parser.parse_args()
    if args.replot:
        replot()
        return
    if args.cost_only:
        common.set_threads()
        path = common.RESULTS / "bytes_curve.json"
        payload = json.loads(path.read_text())
        payload["logging_cost"] = {name: logging_cost(name) for name in args.tasks}
        payload.pop("machine", None)
        common.save("bytes_curve", payload)
        return
    common.set_threads()
    torch.manual_seed(0)
    rows = []
    for name in args.tasks:
        rows += evaluate(name, args.seeds, lambda line: print(line, file=sys.stderr))
    ceilings = {}
    for name in args.tasks:
        seed_outputs = tasks.seed_outputs(tasks.ALL_TASKS[name]())
        if seed_outputs is not None:
            ceilings[name] = tasks.seed_ceiling(seed_outputs)
    costs = {name: logging_cost(name) for name in args.tasks}
    payload = {"rows": rows, "kronfluence": kronfluence_lines(), "ceilings": ceilings, "logging_cost": costs}
    path = common.save("bytes_curve", payload)
    path.with_suffix(".svg").write_text(plot_svg(json.loads(path.read_text())))


def replot() -> None:
    """Rewrite results/bytes_curve.svg from results/bytes_curve.json (no measurement)."""
    path = common.RESULTS / "bytes_curve.json"
    path.with_suffix(".svg").write_text(plot_svg(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
