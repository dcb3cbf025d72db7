"""logra.evaluation.validate: the LDS and its bootstrap interval on known cases, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

import logra
from logra.evaluation import ValidationResult, linear_datamodeling_score, validate

N, D, Q, LAM = 60, 5, 30, 1.0


def _ridge_task() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N + Q, D, generator=gen, dtype=torch.float64)
    y = x @ torch.randn(D, generator=gen, dtype=torch.float64) + 0.5 * torch.randn(
        N + Q, generator=gen, dtype=torch.float64
    )
    return x[:N], y[:N], x[N:], y[N:]


def _fit(x: Tensor, y: Tensor) -> Tensor:
    return torch.linalg.solve(x.T @ x + LAM * torch.eye(D, dtype=torch.float64), x.T @ y)


def _setup() -> tuple:
    x, y, xq, yq = _ridge_task()

    def train_fn(idx: Tensor) -> Tensor:  # [Q] squared query losses of ridge fitted on the subset
        return (xq @ _fit(x[idx], y[idx]) - yq) ** 2

    w = _fit(x, y)
    g_train = 2 * (x @ w - y)[:, None] * x  # [N, D] per-example gradients at the full-data optimum
    g_query = 2 * (xq @ w - yq)[:, None] * xq  # [Q, D]

    def score_fn(damping: float | None = None, k: int | None = None) -> Tensor:
        h = 2 * (x.T @ x) + (2 * LAM if damping is None else damping) * torch.eye(D, dtype=torch.float64)
        g = g_train if k is None else g_train[:, :k]  # "k": a crude projection onto the first k coordinates
        gq = g_query if k is None else g_query[:, :k]
        return gq @ torch.linalg.solve(h if k is None else h[:k, :k], g.T)  # [Q, N], positive = helpful

    return train_fn, score_fn


def test_validate_on_a_convex_model_is_high_with_a_tight_interval_and_picks_the_exact_hessian() -> None:
    train_fn, score_fn = _setup()
    result = validate(train_fn, score_fn, N, n_subsets=30, seed=1, dampings=(None, 1e3), ks=(None, 1))
    assert isinstance(result, ValidationResult) and len(result.settings) == 4 and result.n_queries == Q
    exact = result.settings[0]
    assert exact.damping is None and exact.k is None
    assert exact.lds > 0.8 and exact.ci_low > 0.7 and exact.ci_low <= exact.lds <= exact.ci_high, exact
    assert result.best.lds == max(s.lds for s in result.settings) and result.best.k is None
    assert result.settings[3].lds < exact.lds  # damping 1e3 with k=1 throws information away
    assert exact.lds == pytest.approx(
        linear_datamodeling_score(score_fn(), result.retraining.subsets, result.retraining.outputs), rel=1e-12
    )
    assert exact.per_query.shape == (Q,)
    text = str(result)
    assert "<- best" in text and "over queries" in text and "default" in text and f"{exact.lds:+.3f}" in text


def test_validate_on_random_scores_gives_lds_near_zero_with_an_interval_covering_zero() -> None:
    train_fn, _ = _setup()
    noise = torch.randn(Q, N, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    result = validate(train_fn, noise, N, n_subsets=30, seed=1)
    (only,) = result.settings
    assert abs(only.lds) < 0.15 and only.ci_low < 0.0 < only.ci_high, only
    assert only.ci_high - only.ci_low < 0.4  # the interval is informative, not [-1, 1]


def test_validate_bad_input_names_the_value_and_the_fix() -> None:
    train_fn, score_fn = _setup()
    with pytest.raises(logra.ConfigError, match="several dampings"):
        validate(train_fn, torch.zeros(Q, N), N, dampings=(1e-3, 1e-2))
    with pytest.raises(logra.ConfigError, match=r"shape \(30, 59\)"):
        validate(train_fn, torch.zeros(Q, N - 1), N, n_subsets=3)
    with pytest.raises(logra.ConfigError, match="damping -1"):
        validate(train_fn, score_fn, N, dampings=(-1,))
    with pytest.raises(logra.ConfigError, match="damping inf"):
        validate(train_fn, score_fn, N, dampings=(1e-3, float("inf")))
    with pytest.raises(logra.ConfigError, match="k 0 in ks"):
        validate(train_fn, score_fn, N, ks=(0,))
    with pytest.raises(logra.ConfigError, match="confidence"):
        validate(train_fn, score_fn, N, confidence=95)
    with pytest.raises(logra.ConfigError, match="not callable"):
        validate("mod:fn", score_fn, N)  # type: ignore[arg-type]
    with pytest.raises(logra.ConfigError, match="n_subsets"):
        validate(train_fn, score_fn, N, n_subsets=1)
    with pytest.raises(logra.ConfigError, match=">= 2"):
        validate(lambda idx: torch.ones(1) * len(idx), torch.zeros(1, N), N, n_subsets=3)
    with pytest.raises(logra.ConfigError, match="NaN"):
        validate(train_fn, torch.full((Q, N), float("nan")), N, n_subsets=3)


TASK_MODULE = """
import sys
sys.path.insert(0, {tests!r})
from test_validate import _setup
train_fn, score_fn = _setup()
not_a_function = 3
"""


def test_cli_validate_imports_the_recipe_prints_the_table_and_writes_json(
    tmp_path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import json
    from pathlib import Path

    from logra.cli.main import main

    (tmp_path / "ridge_task_cli.py").write_text(TASK_MODULE.format(tests=str(Path(__file__).parent)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    base = ["validate", "--train-fn", "ridge_task_cli:train_fn", "--n-train", str(N), "--subsets", "30", "--seed", "1"]
    status = main([*base, "--score-fn", "ridge_task_cli:score_fn", "--dampings", "default,1000", "--ks", "default,1",
                   "--out", str(tmp_path / "v.json")])  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0 and "<- best" in out and "best: damping=default, k=default" in out, out
    saved = json.loads((tmp_path / "v.json").read_text())
    assert saved["interval_over"] == "queries" and len(saved["settings"]) == 4 and saved["settings"][0]["lds"] > 0.8
    for args, message in [
        (["--score-fn", "ridge_task_cli"], "must be module:function"),
        (["--score-fn", "no_such_module_xyz:f"], "could not be imported"),
        (["--score-fn", "ridge_task_cli:missing"], "no attribute 'missing'"),
        (["--score-fn", "ridge_task_cli:not_a_function"], "not a function"),
        (["--score-fn", "ridge_task_cli:score_fn", "--ks", "8,x"], "'x' is not an integer"),
    ]:
        assert main([*base, *args]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
