"""Ensembles (logra.ensemble): the weighted mean over models, aligned by id, against a direct computation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import logra
from tests.models import build_model, log_rows, make_examples

CONFIG = logra.LoGraConfig(k_in=3, k_out=3, seed=1, dtype="float64")


def _member(root: Path, seed: int, order: list[int]) -> tuple[logra.Scorer, logra.QueryRows, torch.Tensor]:
    """One model (seed): its store logged in `order`, its queries, and Q_pre @ G.T in store order."""
    model = build_model("mlp", seed=seed)
    train, queries = make_examples("mlp", 8, seed=2), make_examples("mlp", 3, seed=3)
    with logra.GradientLogger(model, CONFIG, store=root) as logger:
        log_rows(logger, [train[i] for i in order], [f"t{i}" for i in order], batch_size=3)
    with logra.GradientLogger(model, CONFIG) as qlogger:
        records = []
        for q, example in zip("abc", queries):
            ids, rows = log_rows(qlogger, [example], [q], batch_size=1)
            records.append(logra.QueryRows(ids, rows, CONFIG, qlogger.model_fingerprint, tuple(qlogger.layers)))
    store = logra.GradientStore.open(root)
    pre = logra.fit_preconditioner(store, "kfac")
    q = logra.QueryRows(["a", "b", "c"], torch.cat([r.rows for r in records]), CONFIG, records[0].model_fingerprint,
                        records[0].layers)  # fmt: skip
    direct = pre.apply(q.rows) @ store.rows().T  # (Q, N): independent of the Scorer's streaming
    return logra.Scorer(store, pre, compute_dtype=torch.float64), q, direct


def test_mean_over_models_is_aligned_by_id(tmp_path: Path) -> None:
    s0, q0, d0 = _member(tmp_path / "m0", 0, list(range(8)))
    perm = [5, 2, 7, 0, 3, 1, 6, 4]
    s1, q1, d1 = _member(tmp_path / "m1", 1, perm)
    result = logra.ensemble_scores([(s0, q0), (s1, q1)])
    assert result.train_ids == [f"t{i}" for i in range(8)] and result.query_ids == ["a", "b", "c"]
    back = [perm.index(i) for i in range(8)]  # column of t_i in the second store
    expected = (d0 + d1[:, back]) / 2
    torch.testing.assert_close(result.scores, expected, rtol=1e-10, atol=1e-12)
    assert not torch.allclose(result.scores, (d0 + d1) / 2)  # alignment matters
    weighted = logra.ensemble_scores([(s0, q0), (s1, q1)], weights=[3.0, 1.0])
    torch.testing.assert_close(weighted.scores, (3 * d0 + d1[:, back]) / 4, rtol=1e-10, atol=1e-12)


def test_mismatched_members_are_refused(tmp_path: Path) -> None:
    s0, q0, _ = _member(tmp_path / "m0", 0, list(range(8)))
    s1, q1, _ = _member(tmp_path / "m1", 1, list(range(7)))
    with pytest.raises(logra.ConfigError, match="other examples"):
        logra.ensemble_scores([(s0, q0), (s1, q1)])
    with pytest.raises(logra.ConfigError, match="carry no ids"):
        logra.ensemble_scores([(s0, q0.rows)])
    with pytest.raises(logra.ConfigError, match="non-negative"):
        logra.ensemble_scores([(s0, q0)], weights=[-1.0])
