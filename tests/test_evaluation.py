"""logra.evaluation against scipy/numpy references, and the LDS of logra vs a plain dot product."""

from __future__ import annotations

import tempfile

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import logra
from logra.curvature import fit_preconditioner
from logra.evaluation import (
    leave_one_out_correlation,
    leave_one_out_subsets,
    linear_datamodeling_score,
    pearson,
    random_subsets,
    rankdata,
    retrain,
    retrain_on_random_subsets,
    spearman,
)
from logra.score import Scorer

scipy_stats = pytest.importorskip("scipy.stats")


def test_ranks_and_correlations_match_scipy() -> None:
    gen = np.random.default_rng(0)
    x = gen.integers(0, 6, size=(3, 40)).astype(np.float64)  # many ties
    y = x + gen.normal(size=(3, 40))
    for row in range(3):
        np.testing.assert_allclose(rankdata(torch.from_numpy(x[row])).numpy(), scipy_stats.rankdata(x[row]), rtol=0)
        expected_s = scipy_stats.spearmanr(x[row], y[row]).statistic
        expected_p = np.corrcoef(x[row], y[row])[0, 1]
        assert float(spearman(x, y)[row]) == pytest.approx(expected_s, rel=1e-12)
        assert float(pearson(x, y)[row]) == pytest.approx(expected_p, rel=1e-12)
    np.testing.assert_allclose(rankdata(torch.from_numpy(x)).numpy(), scipy_stats.rankdata(x, axis=1), rtol=0)
    with pytest.raises(logra.ConfigError, match="constant"):
        pearson(np.ones(5), np.arange(5.0))
    with pytest.raises(logra.ConfigError, match="NaN"):
        spearman([1.0, float("nan"), 2.0], [1.0, 2.0, 3.0])


def test_random_subsets_are_seeded_and_sized() -> None:
    a, b, c = random_subsets(50, 8, 0.3, seed=1), random_subsets(50, 8, 0.3, seed=1), random_subsets(50, 8, 0.3, seed=2)
    assert a.shape == (8, 50) and a.dtype == torch.bool and bool((a.sum(1) == 15).all())
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len({tuple(row.tolist()) for row in a}) == 8
    with pytest.raises(logra.ConfigError, match="fraction"):
        random_subsets(10, 4, 1.0)


def test_retrain_passes_each_subset_and_stacks_outputs() -> None:
    subsets = leave_one_out_subsets(5, indices=[0, 3])
    assert subsets.tolist() == [[False, True, True, True, True], [True, True, True, False, True]]
    seen: list[list[int]] = []

    def train_fn(indices: Tensor) -> dict[str, Tensor]:
        seen.append(indices.tolist())
        return {"weights": indices.double()}

    result = retrain(
        train_fn, subsets, measure=lambda model: torch.stack([model["weights"].sum(), model["weights"].max()])
    )
    assert seen == [[1, 2, 3, 4], [0, 1, 2, 4]]
    assert torch.equal(result.outputs, torch.tensor([[10.0, 4.0], [7.0, 4.0]], dtype=torch.float64))
    with pytest.raises(logra.ConfigError, match="changed shape"):
        retrain(lambda idx: torch.zeros(len(idx)), torch.tensor([[True, True, False], [True, False, False]]))


def test_lds_and_loo_correlation_on_a_known_linear_datamodel() -> None:
    gen = torch.Generator().manual_seed(0)
    true_effect = torch.randn(3, 40, generator=gen, dtype=torch.float64)  # helpfulness of example i for query q
    subsets = random_subsets(40, 30, 0.5, seed=3)
    losses = 2.0 - subsets.double() @ true_effect.T  # helpful examples lower the loss, exactly linearly
    assert linear_datamodeling_score(true_effect, subsets, losses) == pytest.approx(1.0, abs=1e-12)
    assert linear_datamodeling_score(true_effect, subsets, -losses, outputs_are_losses=False) == pytest.approx(1.0)
    noisy = true_effect + 2.0 * torch.randn(3, 40, generator=gen, dtype=torch.float64)
    predicted = (subsets.double() @ noisy.T).T.numpy()
    expected = np.mean([scipy_stats.spearmanr(predicted[q], -losses[:, q].numpy()).statistic for q in range(3)])
    assert linear_datamodeling_score(noisy, subsets, losses) == pytest.approx(expected, rel=1e-12)
    loo_change = true_effect * 0.01  # removing a helpful example raises the loss
    assert leave_one_out_correlation(noisy, loo_change) == pytest.approx(
        np.mean([np.corrcoef(noisy[q], loo_change[q])[0, 1] for q in range(3)]), rel=1e-12
    )
    assert leave_one_out_correlation(true_effect, loo_change, "spearman") == pytest.approx(1.0)
    with pytest.raises(logra.ConfigError, match="LDS needs"):
        linear_datamodeling_score(true_effect, subsets, losses.T)


# --------------------------------------------------------------------------------------------
# LDS on a small MLP: logra (EK-FAC) against a plain gradient dot product on the same rows.

N_TRAIN, N_QUERY, N_SUBSETS, STEPS = 200, 30, 30, 150


def _digits() -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float64) / 16.0
    y = torch.tensor(data.target)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    return x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN : N_TRAIN + N_QUERY], y[N_TRAIN : N_TRAIN + N_QUERY]


def _train(x: Tensor, y: Tensor) -> nn.Module:
    """Full-batch Adam from a fixed initialisation: deterministic for a given subset."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 16), nn.Tanh(), nn.Linear(16, 10)).double()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(STEPS):
        opt.zero_grad()
        l2 = sum(p.square().sum() for p in model.parameters())
        (nn.functional.cross_entropy(model(x), y) + 5e-4 * l2).backward()
        opt.step()
    return model


def lds_experiment() -> dict[str, float]:
    """{preconditioner: LDS} on the digits MLP, projected rows k=16, default damping."""
    x, y, xq, yq = _digits()
    model = _train(x, y)
    config = logra.LoGraConfig(k_in=16, k_out=16, include_bias=True, dtype="float64")
    retrained = retrain_on_random_subsets(
        lambda idx: _train(x[idx], y[idx]),
        N_TRAIN,
        N_SUBSETS,
        seed=1,
        measure=lambda m: nn.functional.cross_entropy(m(xq), yq, reduction="none").detach(),
    )
    subsets, outputs = retrained.subsets, retrained.outputs
    assert torch.equal(subsets, random_subsets(N_TRAIN, N_SUBSETS, 0.5, seed=1))
    with tempfile.TemporaryDirectory() as tmp:
        with logra.GradientLogger(model, config, store=tmp + "/train") as logger:
            for s in range(0, N_TRAIN, 50):
                with logger.record(ids=list(range(s, s + 50))):
                    nn.functional.cross_entropy(model(x[s : s + 50]), y[s : s + 50], reduction="sum").backward()
        with logra.GradientLogger(model, config) as logger:
            with logger.record(ids=list(range(N_QUERY))) as rec:
                nn.functional.cross_entropy(model(xq), yq, reduction="sum").backward()
        store = logra.GradientStore.open(tmp + "/train")
        return {
            method: linear_datamodeling_score(
                Scorer(store, fit_preconditioner(store, method)).score(rec.rows), subsets, outputs
            )
            for method in ("identity", "kfac", "ekfac", "raw")
        }


@pytest.mark.slow
def test_logra_beats_a_plain_gradient_dot_product_on_lds() -> None:
    lds = lds_experiment()
    assert lds["ekfac"] > lds["identity"] + 0.15 and lds["ekfac"] > 0.4, lds
    assert min(lds["kfac"], lds["raw"]) > lds["identity"] + 0.15, lds


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(f"LDS, digits MLP 64-16-10, N={N_TRAIN}, {N_QUERY} queries, {N_SUBSETS} half subsets, k=16, damping default")
    for method, value in lds_experiment().items():
        print(f"{method:<10} {value:.3f}")
