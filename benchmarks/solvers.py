"""The seeds' influence solvers beside logra's KFAC / EK-FAC: accuracy, time and memory.

Problems (all float32 except the convex one, one torch thread):

- convex: tests/test_loo.py's L2-regularised softmax regression (breast cancer, N = 200, 40
  queries, λ = 10, damping λ/N), the true Hessian; metric: leave-one-out Pearson against
  retraining by Newton's method.
- digits-mlp and markov-lm (`tasks.py`, cached ground truth): metric: LDS. Each on two parameter
  selections: one layer, where the dense exact solver fits (P ≤ 10,000), and every layer the
  accuracy benchmark attributes through, where exact refuses and the others run on a budget.
  Curvature: the Gauss-Newton matrix (the networks' Hessians are indefinite); damping 0.1 x its
  mean eigenvalue (a Hutchinson estimate of trace / P, 16 probes), the same for every solver.

Methods: exact, cg, lissa (scale 2 x (top eigenvalue + damping), from 8 Arnoldi steps) and
arnoldi (top p of 2p steps) on an unprojected store; logra kfac / ekfac on the same
unprojected store (no projection, the empirical Fisher; the convex problem's damping λ/N,
logra's default damping on the LDS problems). Times are
process CPU seconds of fitting plus scoring (the unprojected store is logged once per problem
and timed on its own row); memory is the process' peak resident set during the method
(VmHWM), which includes the model and data.

    .venv/bin/python benchmarks/solvers.py            # everything (make bench), ~12 CPU minutes
    .venv/bin/python benchmarks/solvers.py --quick    # convex + one-layer digits only

Writes results/solvers.json and the table between <!-- SOLVERS:START --> and
<!-- SOLVERS:END --> in README.md.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import bench_common as common
import tasks
import torch
from torch import Tensor, nn

import logra
from logra.curvature import (
    CG,
    ConvergenceWarning,
    Exact,
    LiSSA,
    OutputLoss,
    arnoldi_preconditioner,
    fit_arnoldi,
    fit_solver,
    full_config,
    log_arnoldi,
)
from logra.evaluation import leave_one_out_correlation, linear_datamodeling_score

ROOT = common.HERE.parent
START, END = "<!-- SOLVERS:START -->", "<!-- SOLVERS:END -->"


@dataclass
class Problem:
    """A model, its training loss and batches, the queries and how scores [Q, N] are judged."""

    name: str
    model: nn.Module
    loss: Any
    batches: list[Any]
    queries: Any
    config: logra.LoGraConfig
    judge: Callable[[Tensor], float]
    metric: str
    curvature: str = "ggn"
    damping: float | None = None
    solvers: dict[str, Any] = field(default_factory=dict)
    rank: int = 64


def convex_problem() -> Problem:
    sys.path.insert(0, str(ROOT / "tests"))
    import test_loo as loo

    from logra.evaluation import leave_one_out_subsets, retrain

    lam = 10.0
    x, y, xq, yq = loo.load_data()
    theta = loo.fit_newton(x, y, lam)
    retrained = retrain(lambda keep: loo.losses(loo.fit_newton(x[keep], y[keep], lam, theta), xq, yq),
                        leave_one_out_subsets(loo.N_TRAIN))  # fmt: skip
    actual = (retrained.outputs - loo.losses(theta, xq, yq)).T
    n = loo.N_TRAIN
    batches = [(x[s : s + 50, :-1], y[s : s + 50]) for s in range(0, n, 50)]
    return Problem(
        "convex (LOO, N=200, P=62)", loo.as_model(theta), _classifier_loss(), batches, (xq[:, :-1], yq),
        logra.LoGraConfig(include_bias=True, dtype="float64"),
        lambda s: leave_one_out_correlation(s / n, actual), "LOO Pearson", "hessian", lam / n,
        {"exact": Exact(), "cg": CG(tol=1e-8), "lissa": LiSSA(scale=1.0, depth=1000, batch_size=50)}, rank=62,
    )  # fmt: skip


def _classifier_loss() -> OutputLoss:
    return OutputLoss("cross_entropy", lambda m, b: (m(b[0]), b[1]))


def _lm_loss() -> OutputLoss:
    return OutputLoss("cross_entropy", lambda m, b: (m(input_ids=b[0]).logits[:, :-1], b[0][:, 1:]))


def lds_problem(name: str, modules: list[str] | None, budget: dict[str, Any], rank: int) -> Problem:
    task = tasks.TASKS[name]()
    model, subsets, outputs = tasks.ground_truth(task)
    chosen = modules or task.logged
    if task.train_y is not None:
        loss, b = _classifier_loss(), 100
        batches = [(task.train_x[i : i + b], task.train_y[i : i + b]) for i in range(0, len(task.train_x), b)]
        queries: Any = (task.query_x, task.query_y)
    else:
        loss, b = _lm_loss(), 32
        batches = [(task.train_x[i : i + b],) for i in range(0, len(task.train_x), b)]
        queries = (task.query_x,)
    config = logra.LoGraConfig(modules=tuple(chosen), include_bias=True)
    label = f"{name} ({'every layer' if modules is None else ', '.join(modules)})"
    judge = lambda s: linear_datamodeling_score(s, subsets, outputs)  # noqa: E731
    return Problem(label, model, loss, batches, queries, config, judge, "LDS", solvers=budget, rank=rank)


def problems(quick: bool) -> list[Problem]:
    out = [convex_problem(), lds_problem("digits-mlp", ["fc3"], _budget(100, 500, 100), 100)]
    if quick:
        return out
    return out + [
        lds_problem("digits-mlp", None, _budget(30, 100, 100), 100),
        lds_problem("markov-lm", ["model.layers.1.self_attn.o_proj"], _budget(100, 100, 32), 64),
        lds_problem("markov-lm", None, _budget(10, 20, 32), 64),
    ]


def _budget(cg_iter: int, depth: int, batch: int) -> dict[str, Any]:
    """Solver specs; lissa's scale is set per problem (`run_problem`)."""
    return {"exact": Exact(), "cg": CG(tol=1e-6, max_iter=cg_iter), "lissa": LiSSA(depth=depth, batch_size=batch)}


# --------------------------------------------------------------------------------------------
# Running one problem.


def log_full(p: Problem, root: Path) -> tuple[logra.GradientStore, logra.Record]:
    """The unprojected store of the training set and the query Record."""
    config = full_config(p.config)
    with logra.GradientLogger(p.model, config, store=root) as logger:
        start = 0
        for batch in p.batches:
            n = len(batch[0])
            with logger.record(ids=list(range(start, start + n))):
                p.loss(p.model, batch).backward()
            start += n
    p.model.zero_grad(set_to_none=True)
    with logra.GradientLogger(p.model, config, statistics=False) as logger:
        with logger.record(ids=list(range(len(p.queries[0])))) as record:
            p.loss(p.model, p.queries).backward()
    p.model.zero_grad(set_to_none=True)
    return logra.GradientStore.open(root), record


def resolve_damping(p: Problem) -> tuple[float, float]:
    """(damping, top eigenvalue): 0.1 x a Hutchinson mean eigenvalue, unless the problem fixes it."""
    from logra.curvature import CurvatureOperator, ParameterSpace

    with logra.GradientLogger(p.model, full_config(p.config), statistics=False) as logger:
        space = ParameterSpace(p.model, logger.layers)
    op = CurvatureOperator(p.model, space, p.loss, p.batches, p.curvature)
    gen = torch.Generator().manual_seed(0)
    probes = torch.randint(0, 2, (16, space.dim), generator=gen).to(torch.float64) * 2 - 1
    mean = float((probes * op.matvec(probes)).sum(1).mean()) / space.dim
    top = float(fit_arnoldi(p.model, p.loss, p.batches, 1, p.config, curvature=p.curvature, iterations=8)
                .eigenvalues[0])  # fmt: skip
    return (p.damping if p.damping is not None else 0.1 * mean), top


def run_problem(p: Problem, log: Callable[[str], None]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        (store, record), secs, mib = common.measured(lambda: log_full(p, Path(tmp) / "full"))
        rows.append({"problem": p.name, "method": "(log unprojected store)", "cpu_s": secs, "peak_mib": mib,
                     "P": store.dim})  # fmt: skip
        (damping, top), secs, _ = common.measured(lambda: resolve_damping(p))
        log(f"{p.name}: P={store.dim}, damping {damping:.3g}, top eigenvalue {top:.3g} ({secs:.1f} s)")
        methods: dict[str, Callable[[], Tensor]] = {}
        for name, spec in p.solvers.items():
            if isinstance(spec, LiSSA):
                spec = LiSSA(2 * (top + damping), spec.depth, spec.repeats, spec.batch_size, spec.seed)
            methods[name] = _solver_scores(p, store, record, spec, damping)
        methods[f"arnoldi (p={min(p.rank, store.dim)})"] = lambda: arnoldi_scores(p, Path(tmp), damping)
        for method in ("kfac", "ekfac"):
            methods[f"logra {method}"] = _logra_scores(store, record, method, p.damping)
        for name, fn in methods.items():
            rows.append(_measure(p, name, fn, store.dim, damping, log))
    return rows


def _solver_scores(p: Problem, store: Any, record: Any, spec: Any, damping: float) -> Callable[[], Tensor]:
    def run() -> Tensor:
        pre = fit_solver(store, p.model, p.loss, p.batches, spec, damping=damping, curvature=p.curvature)
        return logra.Scorer(store, pre).score(record)  # type: ignore[return-value]

    return run


def _logra_scores(store: Any, record: Any, method: str, damping: float | None) -> Callable[[], Tensor]:
    """logra's preconditioner on the unprojected store: the problem's damping, or logra's default."""
    return lambda: logra.Scorer(store, logra.fit_preconditioner(store, method, damping=damping)).score(record)  # type: ignore[return-value]  # noqa: E501


def arnoldi_scores(p: Problem, tmp: Path, damping: float) -> Tensor:
    basis = fit_arnoldi(p.model, p.loss, p.batches, p.rank if p.rank else 64, p.config, curvature=p.curvature)
    log_arnoldi(basis, p.model, p.loss, p.batches, store=tmp / "arnoldi")
    store = logra.GradientStore.open(tmp / "arnoldi")
    queries = log_arnoldi(basis, p.model, p.loss, [p.queries])
    return logra.Scorer(store, arnoldi_preconditioner(store, damping)).score(queries)  # type: ignore[arg-type,return-value]


def _measure(
    p: Problem, name: str, fn: Callable[[], Tensor], dim: int, damping: float, log: Callable[[str], None]
) -> dict[str, Any]:
    """One table row: the metric, CPU seconds and peak memory of `fn`, or the error it raised."""
    row: dict[str, Any] = {"problem": p.name, "method": name, "P": dim, "metric": p.metric, "damping": damping}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            scores, secs, mib = common.measured(fn)
        row.update(value=p.judge(scores.double()), cpu_s=secs, peak_mib=mib)
        residuals = [str(w.message).split("relative residual ")[1].split(" ")[0] for w in caught
                     if issubclass(w.category, ConvergenceWarning)]  # fmt: skip
        if residuals:
            row["note"] = f"cg stopped at max_iter (relative residual {residuals[-1]})"
    except logra.LograError as exc:
        row["error"] = str(exc).split(". ")[0]
    log(f"{p.name}: {name}: {row.get('value', row.get('error'))} ({row.get('cpu_s', 0):.1f} s)")
    return row


# --------------------------------------------------------------------------------------------
# The README table.


def table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| problem | method | P | score | CPU s | peak RSS MiB | note |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- |"]  # fmt: skip
    for r in rows:
        score = f"{r['metric']} {r['value']:.3f}" if "value" in r else ("–" if "error" not in r else "refused")
        note = r.get("note", r.get("error", ""))
        cpu = f"{r['cpu_s']:.2f}" if "cpu_s" in r else "–"
        mib = f"{r['peak_mib']:.0f}" if "peak_mib" in r else "–"
        lines.append(f"| {r['problem']} | {r['method']} | {r['P']:,} | {score} | {cpu} | {mib} | {note} |")
    return lines


def write_readme(rows: list[dict[str, Any]], machine: dict[str, Any], command: str) -> bool:
    path = ROOT / "README.md"
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        return False
    head = (f"Measured {machine['date']} on {machine['cpu']}, torch {machine['versions']['torch']} (CPU, "
            f"{machine['threads']} thread), by `{command}`.")  # fmt: skip
    body = "\n".join([START, "", head, "", *table(rows), "", END])
    before, rest = text.split(START, 1)
    path.write_text(before + body + rest.split(END, 1)[1], encoding="utf-8")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="convex and one-layer digits-mlp only")
    parser.add_argument("--out", default="solvers", help="results/<out>.json")
    args = parser.parse_args()
    common.set_threads()
    rows: list[dict[str, Any]] = []
    for p in problems(args.quick):
        rows += run_problem(p, lambda line: print(line, file=sys.stderr, flush=True))
    path = common.save(args.out, {"rows": rows, "quick": args.quick})
    command = "python benchmarks/solvers.py" + (" --quick" if args.quick else "")
    written = write_readme(rows, common.machine(), command)
    print("\n".join(table(rows)))
    print(f"-> {path}" + (" and README.md" if written else ""), file=sys.stderr)


if __name__ == "__main__":
    main()
