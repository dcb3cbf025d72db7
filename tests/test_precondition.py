"""Preconditioners against dense float64 references, purity, persistence and the true Fisher."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _scoring_fixtures import (  # noqa: F401  (the `gpt2` and `mlp` fixtures)
    Logged,
    TinyMLP,
    _mlp_data,
    _mlp_losses,
    dense_curvature,
    dense_gram,
    dense_inverse,
    gpt2_fixture,
    log_mlp,
    mlp_fixture,
)
from torch import Tensor, nn

import logra
from logra.capture import make_projection
from logra.config import ProjectionInit
from logra.curvature import fit_preconditioner, load_preconditioner, sampled_cross_entropy, true_fisher_statistics
from logra.curvature.moments import EigenbasisMoments, GradientCovariance, generalized_eigh
from logra.curvature.precondition import EKFACPreconditioner, KFACPreconditioner
from logra.types import LayerInfo

METHODS = ["kfac", "ekfac", "raw"]


@pytest.mark.parametrize("model", ["mlp", "gpt2"])
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("damping", [None, 0.05])
def test_apply_equals_dense_inverse(
    request: pytest.FixtureRequest, model: str, method: str, damping: float | None
) -> None:
    logged: Logged = request.getfixturevalue(model)
    pre = fit_preconditioner(logged.store, method, damping=damping)
    expected = logged.queries @ dense_inverse(method, logged.store, pre.damping)  # H⁻¹ is symmetric
    torch.testing.assert_close(pre.apply(logged.queries), expected, rtol=1e-10, atol=1e-12)
    if damping is not None:
        assert pre.damping == {layer.name: damping for layer in logged.store.layers}


@pytest.mark.parametrize("method", METHODS)
def test_default_damping_is_a_tenth_of_the_mean_eigenvalue(mlp: Logged, method: str) -> None:
    """Of the curvature in full-size units: the generalized eigenvalues of (H, P Pᵀ), whose mean
    estimates the full-size mean eigenvalue (gaussian rows have P Pᵀ ≈ (n/k) I)."""
    from scipy.linalg import eigh

    assert mlp.config.init.value == "gaussian"
    pre = fit_preconditioner(mlp.store, method)
    for layer in mlp.store.layers:
        H, M = dense_curvature(method, mlp.store, layer), dense_gram(mlp.store, layer)
        mean = eigh(H.numpy(), M.numpy(), eigvals_only=True).mean()
        assert pre.damping[layer.name] == pytest.approx(0.1 * float(mean), rel=1e-9)


def _spread_covariance(n: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return (basis * torch.linspace(0.05, 2.0, n, dtype=torch.float64)) @ basis.T


@pytest.mark.parametrize("init", ["gaussian", "rademacher", "orthogonal"])
@pytest.mark.parametrize("k", [16, 48])
def test_full_size_mean_eigenvalue_estimate(init: str, k: int) -> None:
    """The mean eigenvalue in full-size units (of projected Kronecker factors against their
    projections' Grams) lands near the true full-size mean for every k, where the projected mean
    itself is off by the compression n/k on each side (8x-30x here)."""
    n_in, n_out = 192, 96
    a, s = _spread_covariance(n_in, 0), _spread_covariance(n_out, 1)
    true_mean = float(torch.trace(a) * torch.trace(s)) / (n_in * n_out)
    p_in = make_projection(ProjectionInit(init), 0, "layer", "in", k, n_in)
    p_out = make_projection(ProjectionInit(init), 0, "layer", "out", k, n_out)
    lam_s, _ = generalized_eigh(p_out @ s @ p_out.T, p_out @ p_out.T)
    lam_a, _ = generalized_eigh(p_in @ a @ p_in.T, p_in @ p_in.T)
    layer = LayerInfo("layer", "Linear", n_in, n_out, k, k, False, 0)
    estimate = KFACPreconditioner.damping_reference(torch.outer(lam_s, lam_a), layer, ProjectionInit(init))
    assert estimate == pytest.approx(true_mean, rel=0.15)
    projected = torch.outer(torch.linalg.eigvalsh(p_out @ s @ p_out.T), torch.linalg.eigvalsh(p_in @ a @ p_in.T))
    if init != "orthogonal":
        assert float(projected.mean()) > 2 * true_mean


def test_default_damping_does_not_move_with_k(tmp_path: Path) -> None:
    """The default λ of a gaussian store at small k is close to that of the exact (identity, k=n) store."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 64), nn.Tanh(), nn.Linear(64, 48)).double()
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 96, generator=gen, dtype=torch.float64), torch.randint(0, 48, (256,), generator=gen)

    def damping(k: int, init: str) -> dict[str, float]:
        config = logra.LoGraConfig(k_in=k, k_out=k, init=init, dtype="float64")
        with logra.GradientLogger(model, config, store=tmp_path / f"{init}{k}") as logger:
            for s in range(0, 256, 64):
                with logger.record(ids=list(range(s, s + 64))):
                    nn.functional.cross_entropy(model(x[s : s + 64]), y[s : s + 64], reduction="sum").backward()
        return fit_preconditioner(logra.GradientStore.open(tmp_path / f"{init}{k}"), "kfac").damping

    exact = damping(128, "identity")
    for k in (8, 24):
        approx = damping(k, "gaussian")
        for name, value in exact.items():
            assert approx[name] == pytest.approx(value, rel=0.3), (k, name)


def test_identity_is_the_plain_dot_product(mlp: Logged) -> None:
    pre = fit_preconditioner(mlp.store, "identity")
    out = pre.apply(mlp.queries)
    assert torch.equal(out, mlp.queries) and out.data_ptr() != mlp.queries.data_ptr()
    with pytest.raises(logra.ConfigError, match="identity"):
        fit_preconditioner(mlp.store, "identity", damping=0.1)


def test_ekfac_is_invariant_to_eigenvector_signs(mlp: Logged) -> None:
    pre = fit_preconditioner(mlp.store, "ekfac", damping=0.01)
    flipped = {}
    for name, f in pre.factors.items():
        s_out = (-1.0) ** torch.arange(f["grad_eigenvectors"].shape[1])  # flips columns 0, 2, ...
        s_in = -((-1.0) ** torch.arange(f["input_eigenvectors"].shape[1]))  # flips columns 1, 3, ...
        flipped[name] = (f["grad_eigenvectors"] * s_out, f["input_eigenvectors"] * s_in)
    moments = EigenbasisMoments(mlp.store.layers, flipped)
    moments.add(mlp.store.rows())
    eigenvalues = moments.result()
    factors = {
        name: {"grad_eigenvectors": q_s, "input_eigenvectors": q_a, "eigenvalues": eigenvalues[name]}
        for name, (q_s, q_a) in flipped.items()
    }
    other = EKFACPreconditioner(mlp.store.layers, factors, pre.damping, pre.fingerprint)
    for name in factors:
        torch.testing.assert_close(eigenvalues[name], pre.factors[name]["eigenvalues"], rtol=1e-12, atol=0)
    torch.testing.assert_close(other.apply(mlp.queries), pre.apply(mlp.queries), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("method", ["identity", *METHODS])
def test_fitting_is_pure_and_apply_mutates_nothing(mlp: Logged, method: str) -> None:
    a, b = fit_preconditioner(mlp.store, method), fit_preconditioner(mlp.store, method)
    assert a.damping == b.damping
    for name in a.factors:
        assert a.factors[name].keys() == b.factors[name].keys()
        assert all(torch.equal(a.factors[name][k], b.factors[name][k]) for k in a.factors[name])
    before = {n: {k: v.clone() for k, v in f.items()} for n, f in a.factors.items()}
    queries = mlp.queries.clone()
    first, second = a.apply(queries), a.apply(queries)
    assert torch.equal(first, second) and torch.equal(queries, mlp.queries)
    assert all(torch.equal(before[n][k], a.factors[n][k]) for n in before for k in before[n])


@pytest.mark.parametrize("method", ["ekfac", "raw"])
def test_chunk_and_shard_sizes_do_not_change_the_fit(
    mlp: Logged, tmp_path: pytest.TempPathFactory, method: str
) -> None:
    reference = fit_preconditioner(mlp.store, method).apply(mlp.queries)
    for chunk_rows in (1, 5, 1000):
        got = fit_preconditioner(mlp.store, method, chunk_rows=chunk_rows).apply(mlp.queries)
        torch.testing.assert_close(got, reference, rtol=1e-11, atol=1e-13)
    sharded = log_mlp(tmp_path / "sharded", shard_rows=3, batch=3)
    assert len(sharded.store.manifest.shards) > 1
    torch.testing.assert_close(
        fit_preconditioner(sharded.store, method).apply(mlp.queries), reference, rtol=1e-11, atol=1e-13
    )


@pytest.mark.parametrize("method", ["identity", *METHODS])
def test_save_load_round_trip(mlp: Logged, tmp_path: pytest.TempPathFactory, method: str) -> None:
    pre = fit_preconditioner(mlp.store, method)
    loaded = load_preconditioner(pre.save(tmp_path / "pre"))
    assert (loaded.method, loaded.layers, loaded.damping, loaded.fingerprint) == (
        pre.method,
        pre.layers,
        pre.damping,
        pre.fingerprint,
    )
    for name in pre.factors:
        assert all(torch.equal(pre.factors[name][k], loaded.factors[name][k]) for k in pre.factors[name])
    assert torch.equal(loaded.apply(mlp.queries), pre.apply(mlp.queries))
    with np.load(tmp_path / "pre" / "factors.npz", allow_pickle=False) as npz:
        assert all(npz[k].dtype == np.float64 for k in npz.files)


def test_damaged_saves_are_refused(mlp: Logged, tmp_path: pytest.TempPathFactory) -> None:
    root = fit_preconditioner(mlp.store, "kfac").save(tmp_path / "pre")
    with pytest.raises(logra.StoreError, match="holds no"):
        load_preconditioner(tmp_path / "nothing")
    npz = root / "factors.npz"
    npz.write_bytes(npz.read_bytes()[:-7] + b"garbage")
    with pytest.raises(logra.StoreCorruptedError, match="checksum"):
        load_preconditioner(root)
    (root / "preconditioner.json").write_text("{not json")
    with pytest.raises(logra.StoreCorruptedError):
        load_preconditioner(root)
    meta = json.loads(json.dumps({"format": "logra-preconditioner", "format_version": 99}))
    (root / "preconditioner.json").write_text(json.dumps(meta))
    with pytest.raises(logra.StoreCorruptedError, match="version"):
        load_preconditioner(root)


def test_bad_arguments_are_refused(mlp: Logged) -> None:
    store, names = mlp.store, [layer.name for layer in mlp.store.layers]
    with pytest.raises(logra.ConfigError, match="'lissa' is not one of"):
        fit_preconditioner(store, "lissa")
    with pytest.raises(logra.ConfigError, match="finite number"):
        fit_preconditioner(store, "kfac", damping=-1.0)
    with pytest.raises(logra.ConfigError, match="misses layers"):
        fit_preconditioner(store, "kfac", damping={names[0]: 0.1})
    with pytest.raises(logra.ConfigError, match="raw"):
        fit_preconditioner(store, "raw", statistics=store.statistics())
    stats = store.statistics()
    stats[names[0]] = logra.KroneckerStatistics.zeros(2, 2)
    with pytest.raises(logra.ConfigError, match="k_in="):
        fit_preconditioner(store, "kfac", statistics=stats)
    zero = {n: logra.KroneckerStatistics(s.input_sum * 0, s.grad_sum * 0, 1, 1) for n, s in store.statistics().items()}
    with pytest.raises(logra.ConfigError, match="zero curvature"):
        fit_preconditioner(store, "kfac", statistics=zero)
    with pytest.raises(logra.ConfigError, match="singular"):
        fit_preconditioner(store, "kfac", damping=0.0, statistics=zero)


def test_raw_without_damping_on_too_few_rows_is_singular(tmp_path: pytest.TempPathFactory) -> None:
    small = log_mlp(tmp_path / "small", n=5, batch=5)  # 5 rows, blocks of side 12: rank <= 5
    with pytest.raises(logra.ConfigError, match="singular"):
        fit_preconditioner(small.store, "raw", damping=0.0)


def test_given_statistics_replace_the_store_s(mlp: Logged) -> None:
    base = fit_preconditioner(mlp.store, "kfac", damping=0.1)
    same = fit_preconditioner(mlp.store, "kfac", damping=0.1, statistics=mlp.store.statistics())
    assert same.fisher == "custom" and base.fisher == "empirical"
    torch.testing.assert_close(same.apply(mlp.queries), base.apply(mlp.queries), rtol=0, atol=0)
    scaled = {
        n: logra.KroneckerStatistics(s.input_sum * 4, s.grad_sum, s.n_tokens, s.n_examples)
        for n, s in mlp.store.statistics().items()
    }
    other = fit_preconditioner(mlp.store, "kfac", damping=0.1, statistics=scaled)
    assert not torch.allclose(other.apply(mlp.queries), base.apply(mlp.queries))


# --------------------------------------------------------------------------------------------
# The true Fisher.


def _fisher_setup() -> tuple[TinyMLP, logra.LoGraConfig, list[tuple[torch.Tensor, torch.Tensor]]]:
    torch.manual_seed(0)
    model = TinyMLP().double()
    config = logra.LoGraConfig(k_in=3, k_out=4, seed=1, dtype="float64")
    x, _, mask = _mlp_data(12, seed=2)
    return model, config, [(x[s : s + 4], mask[s : s + 4]) for s in range(0, 12, 4)]


def test_true_fisher_uses_the_sampled_labels(tmp_path: pytest.TempPathFactory) -> None:
    """Statistics, EK-FAC moments and covariance equal an empirical pass with the same labels."""
    model, config, batches = _fisher_setup()
    drawn: list[torch.Tensor] = []

    def loss_fn(m: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], gen: torch.Generator) -> torch.Tensor:
        x, mask = batch
        logits = m(x)
        replay = torch.Generator().set_state(gen.get_state())
        probs = torch.softmax(logits.detach(), -1).reshape(-1, 4)
        drawn.append(torch.multinomial(probs, 1, generator=replay).reshape(x.shape[:2]))
        return sampled_cross_entropy(logits, gen, mask)

    options = {"seed": 7, "batch_size_fn": lambda b: b[0].shape[0], "mask_fn": lambda b: b[1]}
    ekfac = true_fisher_statistics(model, config, batches, loss_fn, method="ekfac", **options)
    raw = true_fisher_statistics(model, config, batches, loss_fn, method="raw", **options)
    labels = torch.cat(drawn[:3])
    assert all(torch.equal(torch.cat(drawn[3 * p : 3 * p + 3]), labels) for p in range(3))  # every pass drew the same
    with logra.GradientLogger(model, config, store=tmp_path / "ref") as logger:
        for i, (x, mask) in enumerate(batches):
            with logger.record(ids=list(range(4 * i, 4 * i + 4)), mask=mask):
                _mlp_losses(model, x, labels[4 * i : 4 * i + 4], mask).sum().backward()
    ref = logra.GradientStore.open(tmp_path / "ref")
    for name, s in ref.statistics().items():
        got = ekfac.kronecker[name]
        torch.testing.assert_close(got.input_sum, s.input_sum, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(got.grad_sum, s.grad_sum, rtol=1e-12, atol=1e-14)
        assert (got.n_tokens, got.n_examples) == (s.n_tokens, s.n_examples)
    pre_true = fit_preconditioner(ref, "ekfac", damping=0.1, statistics=ekfac)
    pre_ref = fit_preconditioner(ref, "ekfac", damping=0.1)
    assert pre_true.fisher == "true"
    torch.testing.assert_close(pre_true.apply(ref.rows()), pre_ref.apply(ref.rows()), rtol=1e-10, atol=1e-12)
    cov = GradientCovariance(ref.layers)
    cov.add(ref.rows())
    for name, c in cov.result().items():
        torch.testing.assert_close(raw.covariance[name], c, rtol=1e-12, atol=1e-14)


def test_true_fisher_converges_to_its_expectation() -> None:
    """With many label draws, S tends to Σ_t P_out (diag p_t - p_t p_tᵀ) P_outᵀ / n_examples."""
    model, config, batches = _fisher_setup()
    fisher = true_fisher_statistics(
        model,
        config,
        batches,
        lambda m, b, g: sampled_cross_entropy(m(b[0]), g, b[1]),
        num_samples=300,
        batch_size_fn=lambda b: b[0].shape[0],
        mask_fn=lambda b: b[1],
    )
    with logra.GradientLogger(model, config) as logger:
        _, p_out = logger.projection("fc2")
    x = torch.cat([b[0] for b in batches])
    mask = torch.cat([b[1] for b in batches])
    p = torch.softmax(model(x).detach(), -1)[mask.bool()]  # (tokens, 4)
    expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).sum(0)
    expected = p_out @ expected @ p_out.T / x.shape[0]
    got = fisher.kronecker["fc2"].grad_covariance()
    assert fisher.kronecker["fc2"].n_examples == 300 * 12
    torch.testing.assert_close(got, expected, rtol=0.08, atol=0.08 * float(expected.abs().max()))


# --------------------------------------------------------------------------------------------
# Damping in full-size units.


def _log_two_layer(root: Path, config: logra.LoGraConfig) -> tuple[logra.GradientStore, Tensor, dict]:
    """A 7-6-5 MLP on 40 points (+ 3 queries) logged under `config`: (store, query rows, {layer: (P_in, P_out)})."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 5)).double()
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(43, 7, generator=gen, dtype=torch.float64), torch.randint(0, 5, (43,), generator=gen)
    with logra.GradientLogger(model, config, store=root) as logger:
        for s in range(0, 40, 8):
            with logger.record(ids=list(range(s, s + 8))):
                nn.functional.cross_entropy(model(x[s : s + 8]), y[s : s + 8], reduction="sum").backward()
    with logra.GradientLogger(model, config) as logger:
        with logger.record(ids=[0, 1, 2]) as rec:
            nn.functional.cross_entropy(model(x[40:]), y[40:], reduction="sum").backward()
        projections = {layer.name: logger.projection(layer.name) for layer in logger.layers}
    assert rec.rows is not None
    return logra.GradientStore.open(root), rec.rows, projections


@pytest.mark.parametrize("init", ["gaussian", "rademacher", "orthogonal", "pca", "identity"])
@pytest.mark.parametrize("method", ["kfac", "raw"])
def test_damping_is_added_to_the_full_size_curvature(tmp_path: Path, init: str, method: str) -> None:
    """With a projection P, H⁻¹ is (P (C + λI) Pᵀ)⁻¹ for the *full-size* curvature C (kfac: S ⊗ A;
    raw: the rows' covariance) measured on an exact full-size store, for every init and a
    {layer: λ} dict; at full size (identity, k = n) it is (C + λI)⁻¹ itself."""
    exact = logra.LoGraConfig(k_in=64, k_out=64, init="identity", dtype="float64")
    full, full_queries, _ = _log_two_layer(tmp_path / "full", exact)
    pca = str(tmp_path / "full") if init == "pca" else None
    config = logra.LoGraConfig(k_in=3, k_out=4, init=init, seed=2, dtype="float64", pca_statistics=pca)
    store, queries, projections = _log_two_layer(tmp_path / "projected", config)
    damping = {"0": 0.03, "2": 0.2}
    got = fit_preconditioner(store, method, damping=damping).apply(queries)
    at_full_size = fit_preconditioner(full, method, damping=damping).apply(full_queries)
    stats = full.statistics()
    for layer, full_layer in zip(store.layers, full.layers):
        p_in, p_out = projections[layer.name]
        P = torch.kron(p_out, p_in)  # (k_out k_in, n_out n_in), row-major vec order
        if method == "kfac":
            s = stats[layer.name]
            C = torch.kron(s.grad_sum / s.n_examples, s.input_sum / s.n_tokens)
        else:
            rows = full.layer_rows(layer.name)
            C = rows.T @ rows / rows.shape[0]
        eye = torch.eye(C.shape[0], dtype=torch.float64)
        H = P @ (C + damping[layer.name] * eye) @ P.T
        block = slice(layer.offset, layer.offset + layer.size)
        torch.testing.assert_close(
            store.layer_rows(layer.name), full.layer_rows(layer.name) @ P.T, rtol=1e-10, atol=1e-12
        )
        # pinv: two rademacher rows of a narrow layer can be equal; then P Pᵀ is singular, and logra
        # inverts on the projected gradients' span (which that null space does not meet)
        h_inv = torch.linalg.pinv(H, rtol=1e-10, hermitian=True)
        torch.testing.assert_close(got[:, block], queries[:, block] @ h_inv, rtol=1e-8, atol=1e-10)
        full_block = slice(full_layer.offset, full_layer.offset + full_layer.size)
        expected = torch.linalg.solve(C + damping[layer.name] * eye, full_queries[:, full_block].T).T
        torch.testing.assert_close(at_full_size[:, full_block], expected, rtol=1e-9, atol=1e-11)


def test_true_fisher_from_logits_samples_per_token_labels() -> None:
    """logits_fn with (B, T, C) logits: labels='auto' samples (per-token labels are not a sum over
    classes), exactly like loss_fn with sampled_cross_entropy and the same seed."""
    model, config, batches = _fisher_setup()
    options = {"batch_size_fn": lambda b: b[0].shape[0], "mask_fn": lambda b: b[1], "num_samples": 2, "seed": 3}
    by_logits = true_fisher_statistics(model, config, batches, logits_fn=lambda m, b: (m(b[0]), b[1]), **options)
    by_loss = true_fisher_statistics(
        model, config, batches, lambda m, b, g: sampled_cross_entropy(m(b[0]), g, b[1]), **options
    )
    assert not by_logits.exact and by_logits.n_samples == 2
    for name, s in by_loss.kronecker.items():
        assert torch.equal(by_logits.kronecker[name].grad_sum, s.grad_sum)


def test_true_fisher_bad_input_says_what_to_pass() -> None:
    model, config, batches = _fisher_setup()
    size = {"batch_size_fn": lambda b: b[0].shape[0], "mask_fn": lambda b: b[1]}
    with pytest.raises(logra.ConfigError, match="categorical likelihood.*loss_fn.*empirical Fisher"):
        losses = lambda m, b: _mlp_losses(m, b[0], torch.zeros(b[1].shape, dtype=torch.long), b[1])  # noqa: E731
        true_fisher_statistics(model, config, batches, logits_fn=losses, **size)
    with pytest.raises(logra.ConfigError, match="categorical likelihood"):
        true_fisher_statistics(model, config, batches, logits_fn=lambda m, b: m(b[0])[..., :1], **size)
    with pytest.raises(logra.ConfigError, match="labels='sampled'"):
        true_fisher_statistics(model, config, batches, logits_fn=lambda m, b: m(b[0]), labels="exact", **size)
    with pytest.raises(logra.ConfigError, match="exactly one of loss_fn"):
        true_fisher_statistics(model, config, batches, **size)
    with pytest.raises(logra.ConfigError, match="'bayes' is not one of"):
        true_fisher_statistics(model, config, batches, logits_fn=lambda m, b: m(b[0]), labels="bayes", **size)
