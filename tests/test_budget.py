"""`allocate_k`: a storage budget shared across layers from a probe pass's curvature.

The greedy allocation is checked against an exhaustive search over every (k_in, k_out) grid on
small problems, for the budget it must respect, for where it puts the rows (the high-rank side),
and end to end: a probe `GradientLogger`, the allocation, and a store logged with it.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch
from models import build_model, log_rows, make_examples

import logra
from logra.capture.budget import allocate_k
from logra.errors import ConfigError
from logra.types import KroneckerStatistics, LayerInfo


def _stats(mu_in: list[float], mu_out: list[float], n: int = 1) -> KroneckerStatistics:
    """Statistics whose A and S have the given spectra (diagonal, one token and example per n)."""
    return KroneckerStatistics(
        torch.diag(torch.tensor(mu_in, dtype=torch.float64)) * n,
        torch.diag(torch.tensor(mu_out, dtype=torch.float64)) * n,
        n,
        n,
    )


def _layer(name: str, n_in: int, n_out: int, offset: int = 0) -> LayerInfo:
    return LayerInfo(name, "Linear", n_in, n_out, n_in, n_out, False, offset)


def _total_gain(
    stats: dict[str, KroneckerStatistics], layers: list[LayerInfo], sizes: dict[str, tuple[int, int]]
) -> float:
    total = 0.0
    for layer in layers:
        s = stats[layer.name]
        mu_in = torch.linalg.eigvalsh(s.input_covariance()).flip(0).clamp_min(0)
        mu_out = torch.linalg.eigvalsh(s.grad_covariance()).flip(0).clamp_min(0)
        damping = 0.1 * float(mu_in.sum() * mu_out.sum()) / (layer.n_in * layer.n_out)
        k_in, k_out = sizes[layer.name]
        m = torch.outer(mu_out[:k_out], mu_in[:k_in])
        total += float((m / (m + damping)).sum())  # the effective parameters the kept grid holds
    return total


def test_rows_go_to_the_high_rank_side_within_the_budget() -> None:
    flat = [1.0] * 32  # 32 equal directions: every one carries signal
    steep = [10.0 * 0.3**i for i in range(32)]  # effectively rank 2-3
    stats = {"wide": _stats(steep, flat), "narrow": _stats(steep, steep)}
    layers = [_layer("wide", 32, 32), _layer("narrow", 32, 32, 1024)]
    sizes = allocate_k(stats, layers, budget=384, k_min=4, step=4)
    assert sum(a * b for a, b in sizes.values()) <= 384
    assert sizes["wide"][1] > sizes["narrow"][1] and sizes["wide"][1] > sizes["wide"][0]
    assert all(4 <= k <= 32 for pair in sizes.values() for k in pair)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_allocation_is_near_the_exhaustive_optimum(seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    widths = [(16, 12), (8, 16), (12, 8)]
    stats, layers = {}, []
    for i, (n_in, n_out) in enumerate(widths):
        decay_in, decay_out = (0.3 + 0.65 * torch.rand(2, generator=gen, dtype=torch.float64)).tolist()
        stats[f"l{i}"] = _stats([decay_in**j for j in range(n_in)], [decay_out**j for j in range(n_out)])
        layers.append(_layer(f"l{i}", n_in, n_out))
    budget = 160
    greedy = allocate_k(stats, layers, budget, k_min=4, step=4)
    options = [[(a, b) for a in range(4, n_in + 1, 4) for b in range(4, n_out + 1, 4)] for n_in, n_out in widths]
    best = 0.0
    for combo in itertools.product(*options):
        if sum(a * b for a, b in combo) <= budget:
            best = max(best, _total_gain(stats, layers, {f"l{i}": c for i, c in enumerate(combo)}))
    assert sum(a * b for a, b in greedy.values()) <= budget
    assert _total_gain(stats, layers, greedy) >= 0.95 * best


def test_a_probe_pass_allocates_and_the_store_logs_with_the_allocation(tmp_path: Path) -> None:
    model = build_model("gpt2")
    examples = make_examples("gpt2", 12, seed=3)
    with logra.GradientLogger(model, logra.LoGraConfig(k_in=512, k_out=512), statistics=True) as probe:
        log_rows(probe, examples, list(range(12)), batch_size=4)
    budget = 6 * 8 * 8
    layer_k = allocate_k(probe.statistics(), probe.layers, budget, k_min=2, step=2)
    config = logra.LoGraConfig(layer_k=layer_k)
    with logra.GradientLogger(model, config, store=tmp_path / "s") as logger:
        log_rows(logger, examples, list(range(12)), batch_size=4)
        assert logger.dim <= budget
        assert {layer.name: (layer.k_in, layer.k_out) for layer in logger.layers} == layer_k
    assert logra.GradientStore.open(tmp_path / "s").rows().shape == (12, logger.dim)


def test_bad_budgets_and_probes_are_refused() -> None:
    stats = {"a": _stats([1.0] * 8, [1.0] * 8)}
    layers = [_layer("a", 8, 8)]
    with pytest.raises(ConfigError, match="budget=10 .* k_min=8"):
        allocate_k(stats, layers, 10)
    with pytest.raises(ConfigError, match="missing \\['b'\\]"):
        allocate_k(stats, [*layers, _layer("b", 8, 8)], 1000)
    with pytest.raises(ConfigError, match="budget=0"):
        allocate_k(stats, layers, 0)
    with pytest.raises(ConfigError, match="count no examples"):
        allocate_k({"a": KroneckerStatistics.zeros(8, 8)}, layers, 1000)


def test_cli_log_with_a_budget_stores_the_allocation_and_stays_within_uniform_k(tmp_path: Path) -> None:
    from test_cli import _log, make_env

    from logra.cli import main

    env = make_env(tmp_path / "env")
    assert _log(env, tmp_path / "uniform") == 0
    assert _log(env, tmp_path / "budget", "--budget", "--probe-examples", "6") == 0
    uniform, shared = (logra.GradientStore.open(tmp_path / d) for d in ("uniform", "budget"))
    assert shared.dim <= uniform.dim
    assert shared.config.layer_k and {layer.name for layer in shared.layers} == {layer.name for layer in uniform.layers}
    assert {layer.name: (layer.k_in, layer.k_out) for layer in shared.layers} == shared.config.layer_k
    assert main(["fit", str(tmp_path / "budget"), "--method", "ekfac"]) == 0
    # resuming re-runs the same probe, so the config matches and nothing is logged twice
    assert _log(env, tmp_path / "budget", "--budget", "--probe-examples", "6", "--resume") == 0
    assert len(logra.GradientStore.open(tmp_path / "budget")) == len(uniform)
    with pytest.raises(SystemExit):
        main(["log", "--budget", "--k-in", "4"])  # argparse: the required options are missing


def test_the_readme_budget_example_runs_as_written() -> None:
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "allocate_k(probe.statistics()" in b)
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    layer_k = namespace["layer_k"]
    assert isinstance(layer_k, dict) and sum(a * b for a, b in layer_k.values()) <= 128
    assert layer_k["2"][1] > layer_k["0"][1]  # the wide head's output side gets more rows than the first layer's
