"""TrackStar's parts, measured alone and together: LDS on markov-lm and news-lm.

For each task the full-data model is the cached one (tasks.py); its AdamW second moments come from
retraining it once with the same recipe and seed (`tasks.train_with_optimizer`), and the script
reports how far the retrained weights are from the cached ones (0 when it reproduces exactly).
At the repo's default shape (uniform k = 64, gaussian projections, float32 rows), rows:

- `ekfac` (baseline): plain gradients, EK-FAC, dot product.
- `+correction`: gradients divided by the factorised sqrt(v̂) (logra.curvature.optimizer).
- `+unit norm`: cosine in the EK-FAC metric.
- `+mixed curvature`: EK-FAC of (1 - λ) R_train + λ R_query, λ by TrackStar's rule
  (logra.curvature.mixed); also at Bergson's fixed fallback λ = 0.99 and the paper's 0.9.
- `trackstar` (all three), and the preset with each part left out.
- `identity` (a plain gradient dot product) with and without the correction: the correction's effect
  where no curvature can absorb it (EK-FAC largely undoes a diagonal rescaling of a full-width side).
- `power 1/4`: the correction at half TrackStar's strength, v̂^-1/4 per side, so scores carry
  v̂^-1/2 (one Adam step's geometry) instead of TrackStar's v̂⁻¹.
- `budget: ...`: the main rows with bytes_curve.py's budget layer sizes (`allocate_k` from a probe
  pass, at the row width D of uniform k = 64).
- `full width, identity`: no projection and no curvature, the exact elementwise (v̂ + eps)^-power
  against logra's row x column factorisation of it: whether the factorisation or the correction
  itself decides the LDS (projection seed does not enter: one run).

LDS against the cached retraining ground truth, averaged over `--seeds` projection seeds.
Writes results/optimizer_parts.json:

    .venv/bin/python benchmarks/optimizer_parts.py                 # both tasks, 2 seeds
    .venv/bin/python benchmarks/optimizer_parts.py --tasks markov-lm --seeds 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import accuracy
import bytes_curve
import peers
import tasks
import torch
from torch import Tensor

import logra
from logra.curvature.mixed import mixed_preconditioner
from logra.curvature.optimizer import (
    ADAM_STEP_POWER,
    DEFAULT_EPS,
    OptimizerCorrection,
    SecondMoments,
    adam_second_moments,
)
from logra.evaluation import linear_datamodeling_score

RESULTS = Path(__file__).resolve().parent / "results" / "optimizer_parts.json"
K = 64
FIXED_MIX = [0.9, 0.99]


def moments_of_full_model(task: tasks.Task, cached: torch.nn.Module) -> tuple[SecondMoments, float]:
    """(v̂ of the retrained full model, max |retrained - cached| over its weights)."""
    model, opt = tasks.train_with_optimizer(task, torch.arange(task.recipe.n_train), seed=0)
    ref = cached.state_dict()
    diff = max(float((v - ref[k]).abs().max()) for k, v in model.state_dict().items() if v.is_floating_point())
    return adam_second_moments(opt, model), diff


def logged(w: peers.Workload, config: logra.LoGraConfig, root: str, correction: Any) -> tuple[Any, ...]:
    """(store, query rows, query Kronecker statistics) at `config` (with `correction` or None)."""
    peers.logra_run(w, logra.GradientLogger(w.model, config, store=root, correction=correction))
    with logra.GradientLogger(w.model, config, correction=correction) as q:
        records = []
        for batch in w.query:
            with q.record(ids=list(range(len(batch[0]))), param_grads=False) as rec:
                w.loss(w.model, batch).sum().backward()
            records.append(rec)
        stats = q.statistics()
    w.model.zero_grad(set_to_none=True)
    return logra.GradientStore.open(root), logra.QueryRows.of(records), stats


def variants(
    plain: tuple[Any, ...], corrected: tuple[Any, ...], quarter: tuple[Any, ...]
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """({row label: scores [Q, N]} of every combination measured, {row label: λ} of the mixed ones)."""
    out: dict[str, Tensor] = {}
    lams: dict[str, float] = {}

    def score(label: str, side: tuple[Any, ...], mix: str | float | None, norm: str, method: str = "ekfac") -> None:
        store, queries, stats = side
        if mix == "none":
            pre = logra.fit_preconditioner(store, method, progress=False)
        else:
            pre, lams[label] = mixed_preconditioner(store, queries, "ekfac", mix=mix, query_statistics=stats)  # type: ignore[arg-type]
        out[label] = logra.Scorer(store, pre, norm, progress=False).score(queries)

    score("ekfac (baseline)", plain, "none", "dot")
    score("+correction", corrected, "none", "dot")
    score("+unit norm", plain, "none", "cosine")
    score("+mixed curvature (auto λ)", plain, None, "dot")
    for lam in FIXED_MIX:
        score(f"+mixed curvature (λ={lam})", plain, lam, "dot")
    score("trackstar (all three)", corrected, None, "cosine")
    score("trackstar without correction", plain, None, "cosine")
    score("trackstar without unit norm", corrected, None, "dot")
    score("trackstar without mixed curvature", corrected, "none", "cosine")
    score("trackstar, λ=0.99", corrected, 0.99, "cosine")
    score("identity (no curvature)", plain, "none", "dot", "identity")
    score("identity +correction", corrected, "none", "dot", "identity")
    score("identity +correction +unit norm", corrected, "none", "cosine", "identity")
    score("+correction, power 1/4", quarter, "none", "dot")
    score("identity +correction, power 1/4", quarter, "none", "dot", "identity")
    score("trackstar, power 1/4", quarter, None, "cosine")
    score("trackstar, power 1/4, λ=0.99", quarter, 0.99, "cosine")
    score("power 1/4 + unit norm (no mix)", quarter, "none", "cosine")
    return out, lams


def budget_variants(
    plain: tuple[Any, ...], corrected: tuple[Any, ...]
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """The main rows again with bytes_curve's budget layer sizes (allocate_k at the D of uniform k = 64)."""
    out: dict[str, Tensor] = {}
    lams: dict[str, float] = {}
    for label, (store, queries, stats), mixed, norm in [
        ("budget: ekfac (baseline)", plain, False, "dot"),
        ("budget: +correction", corrected, False, "dot"),
        ("budget: +mixed curvature (auto λ)", plain, True, "dot"),
        ("budget: trackstar (all three)", corrected, True, "cosine"),
        ("budget: trackstar without correction", plain, True, "cosine"),
    ]:
        if mixed:
            pre, lams[label] = mixed_preconditioner(store, queries, "ekfac", query_statistics=stats)
        else:
            pre = logra.fit_preconditioner(store, "ekfac", progress=False)
        out[label] = logra.Scorer(store, pre, norm, progress=False).score(queries)
    return out, lams


def factorisation_check(
    w: peers.Workload, moments: SecondMoments, subsets: Tensor, outputs: Tensor
) -> dict[str, float]:
    """{label: LDS} at full width (identity projections, no curvature): the exact elementwise division
    by (v̂ + eps)^power against logra's row x column factorisation of it, dot and cosine."""
    config = peers.logra_config(w, accuracy.FULL, init="identity")
    names = {id(p): n for n, p in w.model.named_parameters()}
    exact: dict[str, Tensor] = {}
    with tempfile.TemporaryDirectory() as root:
        peers.logra_log(w, config, root, statistics=False)
        store = logra.GradientStore.open(root)
        queries = peers.logra_query_rows(w, config).double()
        for layer in store.layers:
            module = w.model.get_submodule(layer.name)
            v = moments.values[names[id(module.weight)]]
            exact[layer.name] = (v if isinstance(module, torch.nn.Linear) else v.T) + DEFAULT_EPS  # (n_out, n_in)
        fact = {p: OptimizerCorrection.from_moments(moments, w.model, config, power=p) for p in (0.5, ADAM_STEP_POWER)}

        def weights(kind: str, power: float) -> Tensor:  # [D]: what each column is multiplied by
            parts = []
            for layer in store.layers:
                a, b = fact[power].scales[layer.name]
                parts.append((exact[layer.name] ** -power if kind == "elementwise" else torch.outer(a, b)).reshape(-1))
            return torch.cat(parts)

        out: dict[str, float] = {}
        for label, scale in [("plain", torch.ones(store.dim, dtype=torch.float64)),
                             ("elementwise v^-1/2", weights("elementwise", 0.5)),
                             ("factorised v^-1/2", weights("factorised", 0.5)),
                             ("elementwise v^-1/4", weights("elementwise", ADAM_STEP_POWER)),
                             ("factorised v^-1/4", weights("factorised", ADAM_STEP_POWER))]:  # fmt: skip
            q = queries * scale
            dots, norms = [], []
            for _, chunk in store.iter_chunks(64):
                t = chunk.double() * scale
                dots.append(q @ t.T)
                norms.append(t.norm(dim=1))
            s = torch.cat(dots, 1)
            cos = s / torch.outer(q.norm(dim=1), torch.cat(norms)).clamp_min(1e-300)
            out[f"full width, identity: {label}, dot"] = linear_datamodeling_score(s, subsets, outputs)
            out[f"full width, identity: {label}, cosine"] = linear_datamodeling_score(cos, subsets, outputs)
    return out


def evaluate(name: str, seeds: int, log: Any) -> list[dict[str, Any]]:
    task = tasks.ALL_TASKS[name]()
    model, subsets, outputs = tasks.ground_truth(task)
    moments, diff = moments_of_full_model(task, model)
    log(f"{name}: retrained full model differs from the cached one by at most {diff:.3g}")
    w = accuracy.workload(task, model)
    layer_k = bytes_curve.probe_layer_k(w, accuracy.row_width(w, K))  # bytes_curve's "budget" at the D of k = 64
    values: dict[str, list[float]] = {}
    mixes: dict[str, list[float]] = {}
    start = time.perf_counter()
    for seed in range(seeds):
        config = peers.logra_config(w, K, seed=seed)
        correction = OptimizerCorrection.from_moments(moments, model, config)
        quarter = OptimizerCorrection.from_moments(moments, model, config, power=ADAM_STEP_POWER)
        with tempfile.TemporaryDirectory() as root:
            plain = logged(w, config, str(Path(root) / "plain"), None)
            corrected = logged(w, correction.configure(config), str(Path(root) / "corrected"), correction)
            quartered = logged(w, quarter.configure(config), str(Path(root) / "quarter"), quarter)
            scores, lams = variants(plain, corrected, quartered)
            budget = replace(config, layer_k=layer_k)
            b_plain = logged(w, budget, str(Path(root) / "budget-plain"), None)
            b_corr = OptimizerCorrection.from_moments(moments, model, budget)
            b_corrected = logged(w, b_corr.configure(budget), str(Path(root) / "budget-corrected"), b_corr)
            more, more_lams = budget_variants(b_plain, b_corrected)
            scores.update(more)
            lams.update(more_lams)
            for label, s in scores.items():
                values.setdefault(label, []).append(linear_datamodeling_score(s, subsets, outputs))
            for label, lam in lams.items():
                mixes.setdefault(label, []).append(lam)
        log(f"{name}: seed {seed} done ({time.perf_counter() - start:.0f} s)")
    for label, lds_value in factorisation_check(w, moments, subsets, outputs).items():
        values[label] = [lds_value]
    rows = []
    for label, lds in values.items():
        k = "full" if label.startswith("full width") else K
        row = {"task": name, "variant": label, "k": k, "dtype": "float32", "lds": statistics.mean(lds),
               "lds_std": statistics.stdev(lds) if len(lds) > 1 else None, "seeds": len(lds),
               "mix": statistics.mean(mixes[label]) if label in mixes else None,
               "retrained_max_abs_diff": diff}  # fmt: skip
        rows.append(row)
        lam = f", λ={row['mix']:.3f}" if row["mix"] is not None else ""
        log(f"{name}: {label}: LDS {row['lds']:.4f}{lam}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="*", default=["markov-lm", "news-lm"], choices=["markov-lm", "news-lm"])
    parser.add_argument("--seeds", type=int, default=2, help="projection seeds averaged")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    torch.set_num_threads(1)  # as tasks.py trains: the retrained model reproduces the cached one

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    rows = [row for name in args.tasks for row in evaluate(name, args.seeds, log)]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"k": K, "seeds": args.seeds, "rows": rows}, indent=1))
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
