"""The seeds' solvers (exact, CG, LiSSA, Arnoldi) against dense float64 references.

The references are computed another way than the code under test: the loss is written as a
function of one flat parameter vector in the row layout (each layer's [W | b] flattened
row-major) and differentiated by `torch.autograd.functional.hessian` / `jacobian`; per-example
gradients come from a batch-size-1 autograd loop; inverses from `torch.linalg.solve`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import logra
from logra.curvature import (
    CG,
    ConvergenceWarning,
    CurvatureOperator,
    Exact,
    LiSSA,
    OutputLoss,
    ParameterSpace,
    SolverError,
    arnoldi_preconditioner,
    fit_arnoldi,
    fit_solver,
    full_config,
    inverse_hvp,
    load_eigenbasis,
    load_preconditioner,
    log_arnoldi,
)
from logra.errors import CaptureError, ConfigError, StoreCorruptedError
from logra.store.reader import check_compatible

N, BATCH, D_IN, HIDDEN, CLASSES = 12, 4, 3, 4, 3
CONFIG = logra.LoGraConfig(include_bias=True, dtype="float64")


class TanhMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(D_IN, HIDDEN), nn.Linear(HIDDEN, CLASSES)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def setup(seed: int = 0) -> tuple[nn.Module, list[tuple[Tensor, Tensor]], tuple[Tensor, Tensor]]:
    """A float64 tanh MLP, N training examples in batches of BATCH, and 5 queries."""
    torch.manual_seed(seed)
    model = TanhMLP().double().eval()
    x = torch.randn(N + 5, D_IN, dtype=torch.float64)
    y = torch.randint(0, CLASSES, (N + 5,))
    batches = [(x[i : i + BATCH], y[i : i + BATCH]) for i in range(0, N, BATCH)]
    return model, batches, (x[N:], y[N:])


def ce(model: nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    return F.cross_entropy(model(batch[0]), batch[1], reduction="sum")


CE = OutputLoss("cross_entropy", lambda m, b: (m(b[0]), b[1]))


def flat(model: TanhMLP) -> Tensor:
    """θ in the row layout: [W1 | b1] then [W2 | b2], each flattened row-major."""
    blocks = [torch.cat([m.weight, m.bias[:, None]], 1).reshape(-1) for m in (model.fc1, model.fc2)]
    return torch.cat(blocks).detach().clone()


def logits_of(theta: Tensor, x: Tensor) -> Tensor:
    a = HIDDEN * (D_IN + 1)
    w1 = theta[:a].reshape(HIDDEN, D_IN + 1)
    w2 = theta[a:].reshape(CLASSES, HIDDEN + 1)
    h = torch.tanh(x @ w1[:, :-1].T + w1[:, -1])
    return h @ w2[:, :-1].T + w2[:, -1]


def reference_curvature(model: TanhMLP, batches: list, kind: str) -> Tensor:
    """The mean per-example Hessian or GGN of the CE loss, dense [P, P]."""
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    theta = flat(model)
    if kind == "hessian":
        total = lambda t: F.cross_entropy(logits_of(t, x), y, reduction="sum")  # noqa: E731
        return torch.autograd.functional.hessian(total, theta) / N
    J = torch.autograd.functional.jacobian(lambda t: logits_of(t, x), theta)  # (N, C, P)
    p = torch.softmax(logits_of(theta, x), dim=1)
    Hz = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    return torch.einsum("ncp,ncd,ndq->pq", J, Hz, J) / N


def per_example_reference(model: TanhMLP, x: Tensor, y: Tensor) -> Tensor:
    """[n, P] gradients of each example's own loss, one autograd call per example."""
    theta = flat(model).requires_grad_(True)
    rows = [torch.autograd.grad(F.cross_entropy(logits_of(theta, x[i : i + 1]), y[i : i + 1]), theta)[0]
            for i in range(len(x))]  # fmt: skip
    return torch.stack(rows)


def full_store(model: nn.Module, batches: list, root: Path) -> logra.GradientStore:
    with logra.GradientLogger(model, full_config(CONFIG), store=root) as logger:
        for i, batch in enumerate(batches):
            with logger.record(ids=list(range(i * BATCH, (i + 1) * BATCH))):
                ce(model, batch).backward()
    return logra.GradientStore.open(root)


def query_record(model: nn.Module, query: tuple[Tensor, Tensor]) -> logra.Record:
    with logra.GradientLogger(model, full_config(CONFIG)) as logger:
        with logger.record(ids=list(range(len(query[0])))) as rec:
            ce(model, query).backward()
    assert rec.rows is not None
    return rec


def query_rows(model: nn.Module, query: tuple[Tensor, Tensor]) -> Tensor:
    rows = query_record(model, query).rows
    assert rows is not None
    return rows


def operator(model: nn.Module, batches: list, curvature: str = "hessian", loss: object = ce) -> CurvatureOperator:
    with logra.GradientLogger(model, full_config(CONFIG), statistics=False) as logger:
        layers = logger.layers
    return CurvatureOperator(model, ParameterSpace(model, layers), loss, batches, curvature, chunk=7)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Products and layout.


@pytest.mark.parametrize("kind", ["hessian", "ggn"])
def test_curvature_products_match_autograd_reference(kind: str) -> None:
    model, batches, _ = setup()
    op = operator(model, batches, kind, CE if kind == "ggn" else ce)
    torch.testing.assert_close(op.dense(), reference_curvature(model, batches, kind), rtol=1e-10, atol=1e-12)
    v = torch.randn(3, op.dim, dtype=torch.float64)
    torch.testing.assert_close(op.matvec(v), v @ reference_curvature(model, batches, kind), rtol=1e-10, atol=1e-12)


def test_hessian_and_ggn_differ_on_a_nonlinear_model() -> None:
    """The check above could pass with one product standing in for the other; it does not."""
    model, batches, _ = setup()
    gap = reference_curvature(model, batches, "hessian") - reference_curvature(model, batches, "ggn")
    assert float(gap.abs().max()) > 1e-3


def test_mse_gauss_newton_is_twice_jtj() -> None:
    model, batches, _ = setup()
    targets = [(b[0], torch.randn(len(b[0]), CLASSES, dtype=torch.float64)) for b in batches]
    mse = OutputLoss("mse", lambda m, b: (m(b[0]), b[1]))
    op = operator(model, targets, "ggn", mse)
    x = torch.cat([b[0] for b in targets])
    J = torch.autograd.functional.jacobian(lambda t: logits_of(t, x), flat(model)).reshape(-1, op.dim)
    torch.testing.assert_close(op.dense(), 2 * J.T @ J / N, rtol=1e-10, atol=1e-12)


def test_store_rows_are_batch_size_one_gradients(tmp_path: Path) -> None:
    model, batches, _ = setup()
    store = full_store(model, batches, tmp_path / "s")
    x, y = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    torch.testing.assert_close(store.rows(), per_example_reference(model, x, y), rtol=1e-12, atol=1e-14)


# --------------------------------------------------------------------------------------------
# Solvers against a dense float64 inverse.


def dense_inverse_setup(
    curvature: str = "ggn", damping: float = 0.01
) -> tuple[CurvatureOperator, Tensor, Tensor, float]:
    model, batches, query = setup()
    op = operator(model, batches, curvature, CE)
    H = reference_curvature(model, batches, curvature)
    B = query_rows(model, query)
    exact = torch.linalg.solve(H + damping * torch.eye(op.dim, dtype=torch.float64), B.T).T
    return op, B, exact, damping


def rel_error(a: Tensor, b: Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_exact_matches_dense_inverse() -> None:
    op, B, exact, damping = dense_inverse_setup("hessian", damping=0.5)  # H's smallest eigenvalue is -0.37
    assert rel_error(inverse_hvp(op, B, "exact", damping), exact) < 1e-10


def test_cg_converges_to_exact_as_iterations_grow() -> None:
    op, B, exact, damping = dense_inverse_setup()
    errors = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        for iterations in (2, 6, 15, 60):
            errors.append(rel_error(inverse_hvp(op, B, CG(tol=1e-12, max_iter=iterations), damping), exact))
    assert errors == sorted(errors, reverse=True) and errors[0] > 1e-2, errors
    assert errors[-1] < 1e-9, errors


def test_lissa_converges_to_exact_as_depth_and_repeats_grow() -> None:
    op, B, exact, damping = dense_inverse_setup()
    top = float(torch.linalg.eigvalsh(op.dense()).max())
    full = [rel_error(inverse_hvp(op, B, LiSSA(scale=1.1 * top + damping, depth=d, batch_size=N), damping), exact)
            for d in (10, 100, 1500)]  # fmt: skip
    assert full == sorted(full, reverse=True) and full[0] > 0.1 and full[-1] < 1e-3, full
    noisy = [rel_error(inverse_hvp(op, B, LiSSA(scale=4 * top, depth=300, repeats=r, batch_size=3), damping), exact)
             for r in (1, 8)]  # fmt: skip
    assert noisy[1] < noisy[0], noisy


def test_arnoldi_with_every_eigenpair_equals_exact(tmp_path: Path) -> None:
    model, batches, query = setup()
    op, B, exact, damping = dense_inverse_setup()
    basis = fit_arnoldi(model, CE, batches, op.dim, CONFIG, curvature="ggn")
    q = log_arnoldi(basis, model, ce, [query])
    assert q is not None
    torch.testing.assert_close(q.rows, basis.project(B))
    # the top eigenvalues are H's
    reference = torch.linalg.eigvalsh(reference_curvature(model, batches, "ggn")).flip(0)
    torch.testing.assert_close(basis.eigenvalues, reference, rtol=1e-8, atol=1e-10)
    log_arnoldi(basis, model, ce, batches, store=tmp_path / "arnoldi")
    store = logra.GradientStore.open(tmp_path / "arnoldi")
    pre = arnoldi_preconditioner(store, damping=damping)
    scores = logra.Scorer(store, pre).score(q)
    train = per_example_reference(model, torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches]))
    torch.testing.assert_close(scores, exact @ train.T, rtol=1e-8, atol=1e-10)
    # fewer eigenpairs: worse, and better with more
    errors = []
    for p in (2, 8, 20):
        small = fit_arnoldi(model, CE, batches, p, CONFIG, curvature="ggn")
        projected = small.project(B)
        approx = (projected / (small.eigenvalues + damping)) @ small.project(train).T
        errors.append(rel_error(approx, exact @ train.T))
    assert errors == sorted(errors, reverse=True) and errors[0] > 0.05, errors


# --------------------------------------------------------------------------------------------
# The scorer on solver preconditioners.


@pytest.mark.parametrize("solver", [Exact(), CG(tol=1e-12), LiSSA(scale=5.0, depth=1500, batch_size=N)])
def test_scorer_outputs_with_a_solver(tmp_path: Path, solver: object) -> None:
    model, batches, query = setup()
    store = full_store(model, batches, tmp_path / "s")
    damping = 0.05
    pre = fit_solver(store, model, CE, batches, solver, damping=damping, curvature="ggn")  # type: ignore[arg-type]
    H = reference_curvature(model, batches, "ggn") + damping * torch.eye(store.dim, dtype=torch.float64)
    record = query_record(model, query)
    q = query_rows(model, query)
    expected = q @ torch.linalg.solve(H, store.rows().T)
    scorer = logra.Scorer(store, pre)
    scores = scorer.score(record)
    tol = 1e-5 if isinstance(solver, LiSSA) else 1e-9
    torch.testing.assert_close(scores, expected, rtol=tol, atol=tol * float(expected.abs().max()))
    top = scorer.top_k(record, 3)
    assert top.helpful_rows.tolist() == expected.topk(3, dim=1).indices.tolist()
    if isinstance(solver, Exact):
        own = (store.rows() @ torch.linalg.solve(H, store.rows().T)).diagonal()
        torch.testing.assert_close(scorer.self_influence(), own, rtol=1e-9, atol=1e-12)


# --------------------------------------------------------------------------------------------
# The Arnoldi store: a projection with its own identity.


def test_arnoldi_store_is_checksummed_and_refuses_other_eigenbases(tmp_path: Path) -> None:
    model, batches, query = setup()
    basis = fit_arnoldi(model, CE, batches, 6, CONFIG, curvature="ggn")
    root = tmp_path / "arnoldi"
    log_arnoldi(basis, model, ce, batches, store=root)
    store = logra.GradientStore.open(root)
    store.verify()
    assert store.dim == 6 and len(store) == N and store.layers == basis.layers
    assert load_eigenbasis(root / "eigenbasis").digest == basis.digest
    pre = logra.fit_preconditioner(store, "arnoldi", damping=0.1)
    pre.save(tmp_path / "pre")
    torch.testing.assert_close(load_preconditioner(tmp_path / "pre").apply(torch.eye(6)), pre.apply(torch.eye(6)))
    # kfac on the same rows: the empirical Fisher inside the subspace
    assert logra.fit_preconditioner(store, "kfac", damping=0.1).apply(torch.eye(6)).shape == (6, 6)
    other = fit_arnoldi(model, CE, batches[:2], 6, CONFIG, curvature="ggn")  # same p and seed, other H
    assert other.digest != basis.digest and other.config == basis.config
    with pytest.raises(ConfigError, match="layer table"):
        check_compatible(store, other)
    queries = log_arnoldi(other, model, ce, [query])
    assert queries is not None
    with pytest.raises(ConfigError, match="layer table"):
        logra.Scorer(store, pre).score(queries)
    assert logra.Scorer(store, pre).score(log_arnoldi(basis, model, ce, [query])).shape == (5, N)  # type: ignore[arg-type]
    # a tampered eigenbasis is refused
    npz = root / "eigenbasis" / "eigenbasis.npz"
    npz.write_bytes(npz.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(StoreCorruptedError, match="checksum"):
        logra.fit_preconditioner(store, "arnoldi", damping=0.1)


def test_arnoldi_on_a_projected_store_is_refused(tmp_path: Path) -> None:
    model, batches, _ = setup()
    store = full_store(model, batches, tmp_path / "s")
    with pytest.raises(ConfigError, match="no Arnoldi eigenbasis"):
        logra.fit_preconditioner(store, "arnoldi")


# --------------------------------------------------------------------------------------------
# Bad input: a clear error, and nothing written.


def test_non_scalar_loss_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    model, batches, _ = setup()
    per_example = lambda m, b: F.cross_entropy(m(b[0]), b[1], reduction="none")  # noqa: E731
    with pytest.raises(ConfigError, match="not a scalar"):
        operator(model, batches, "hessian", per_example).matvec(torch.ones(operator(model, batches).dim))
    basis = fit_arnoldi(model, CE, batches, 4, CONFIG, curvature="ggn")
    with pytest.raises(ConfigError, match="SUM of the batch"):
        log_arnoldi(basis, model, per_example, batches, store=tmp_path / "a")
    assert not (tmp_path / "a").exists()


def test_parameters_without_gradients_are_refused(tmp_path: Path) -> None:
    model, batches, _ = setup()
    store = full_store(model, batches, tmp_path / "s")
    model.fc1.weight.requires_grad_(False)
    with pytest.raises(CaptureError, match="fc1.weight does not require grad"):
        fit_solver(store, model, ce, batches, "cg", damping=0.1)
    model.fc1.weight.requires_grad_(True)
    skip_fc1 = lambda m, b: F.cross_entropy(m.fc2(b[0] @ torch.ones(D_IN, HIDDEN, dtype=torch.float64)), b[1],  # noqa: E731
                                            reduction="sum")  # fmt: skip
    pre = fit_solver(store, model, skip_fc1, batches, "cg", damping=0.1)
    with pytest.raises(CaptureError, match="does not depend on parameter fc1.weight"):
        pre.apply(store.rows(0, 2))


def test_non_finite_products_are_refused() -> None:
    model, batches, _ = setup()
    bad = lambda m, b: ce(m, b) * torch.tensor(float("nan"), dtype=torch.float64)  # noqa: E731
    with pytest.raises(SolverError, match="NaN or Inf"):
        operator(model, batches, "hessian", bad).matvec(torch.ones(operator(model, batches).dim, dtype=torch.float64))


def test_exact_refuses_a_model_too_large(tmp_path: Path) -> None:
    model, batches, _ = setup()
    store = full_store(model, batches, tmp_path / "s")
    with pytest.raises(ConfigError, match=r"P=31 parameters exceeds Exact.max_parameters=30.*cg"):
        fit_solver(store, model, ce, batches, Exact(max_parameters=30), damping=0.1)


def test_solver_refuses_a_projected_store(tmp_path: Path) -> None:
    model, batches, _ = setup()
    with logra.GradientLogger(model, logra.LoGraConfig(k_in=2, k_out=2), store=tmp_path / "p") as logger:
        with logger.record(ids=[0, 1, 2, 3]):
            ce(model, batches[0]).backward()
    with pytest.raises(ConfigError, match="projected gradients"):
        fit_solver(logra.GradientStore.open(tmp_path / "p"), model, ce, batches, "cg", damping=0.1)


def test_lissa_divergence_suggests_a_larger_scale() -> None:
    op, B, _, damping = dense_inverse_setup()
    with pytest.raises(SolverError, match="larger scale"):
        inverse_hvp(op, B, LiSSA(scale=1e-3, depth=200, batch_size=N), damping)


def test_cg_warns_with_the_residual() -> None:
    op, B, _, damping = dense_inverse_setup()
    with pytest.warns(ConvergenceWarning, match="relative residual"):
        inverse_hvp(op, B, CG(tol=1e-12, max_iter=2), damping)


def test_indefinite_hessian_needs_damping() -> None:
    op, B, _, _ = dense_inverse_setup("hessian")
    smallest = float(torch.linalg.eigvalsh(op.dense()).min())
    assert smallest < 0  # the tanh MLP's Hessian is indefinite
    with pytest.raises(ConfigError, match="not positive definite"):
        inverse_hvp(op, B, "exact", 0.0)
    with pytest.raises(SolverError, match="non-positive curvature"):
        inverse_hvp(op, B, CG(max_iter=50), 0.0)


# --------------------------------------------------------------------------------------------
# Leave-one-out on the convex test (tests/test_loo.py): the true Hessian, not a Fisher.


def loo_scores(tmp_path: Path, lam: float) -> tuple[dict[str, Tensor], Tensor]:
    """{solver: predicted LOO change [Q, N]} and the actual change, for test_loo's softmax regression."""
    import test_loo as loo

    from logra.evaluation import leave_one_out_subsets, retrain

    x, y, xq, yq = loo.load_data()
    theta = loo.fit_newton(x, y, lam)
    model = loo.as_model(theta)
    batches = [(x[s : s + 50, :-1], y[s : s + 50]) for s in range(0, loo.N_TRAIN, 50)]
    config = full_config(loo.CONFIG)
    with logra.GradientLogger(model, config, store=tmp_path / "full") as logger:
        for i, batch in enumerate(batches):
            with logger.record(ids=list(range(50 * i, 50 * i + 50))):
                ce(model, batch).backward()
    store = logra.GradientStore.open(tmp_path / "full")
    with logra.GradientLogger(model, config) as logger:
        with logger.record(ids=list(range(len(xq)))) as rec:
            ce(model, (xq[:, :-1], yq)).backward()
    damping, n = lam / loo.N_TRAIN, loo.N_TRAIN  # the L2 term per example; scores / N are LOO changes
    predicted = {}
    solvers = {"exact": Exact(), "cg": CG(tol=1e-10), "lissa": LiSSA(scale=1.0, depth=300, batch_size=n)}
    for name, solver in solvers.items():
        pre = fit_solver(store, model, ce, batches, solver, damping=damping)
        predicted[name] = logra.Scorer(store, pre).score(rec) / n  # type: ignore[operator]
    basis = fit_arnoldi(model, ce, batches, store.dim, config)
    log_arnoldi(basis, model, ce, batches, store=tmp_path / "arnoldi")
    arnoldi = logra.GradientStore.open(tmp_path / "arnoldi")
    queries = log_arnoldi(basis, model, ce, [(xq[:, :-1], yq)])
    assert queries is not None
    predicted["arnoldi"] = logra.Scorer(arnoldi, arnoldi_preconditioner(arnoldi, damping)).score(queries) / n  # type: ignore[operator]
    subsets = leave_one_out_subsets(n)
    retrained = retrain(lambda keep: loo.losses(loo.fit_newton(x[keep], y[keep], lam, theta), xq, yq), subsets)
    return predicted, (retrained.outputs - loo.losses(theta, xq, yq)).T


def test_solvers_match_leave_one_out_retraining(tmp_path: Path) -> None:
    """λ = 10: exact, CG, LiSSA and full-rank Arnoldi reach Pearson >= 0.97 with slope ≈ 1 (the scale)."""
    pytest.importorskip("sklearn.datasets")
    from logra.evaluation import leave_one_out_correlation

    predicted, actual = loo_scores(tmp_path, lam=10.0)
    for name, scores in predicted.items():
        pearson = leave_one_out_correlation(scores, actual)
        slope = float((scores * actual).sum() / (scores * scores).sum())
        assert pearson >= 0.97 and 0.8 < slope < 1.25, (name, pearson, slope)
    torch.testing.assert_close(predicted["cg"], predicted["exact"], rtol=1e-6, atol=1e-9)


def test_readme_solver_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import re

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "fit_arnoldi(" in b)
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(block, "README.md", "exec"), namespace)  # noqa: S102
    assert tuple(namespace["scores"].shape) == (2, 256)  # type: ignore[attr-defined]
    assert namespace["top"].helpful_ids[0][0] == 0  # type: ignore[attr-defined]  # q0 is training example 0


def test_hf_conv1d_layout_matches_batch_size_one_gradients(tmp_path: Path) -> None:
    """GPT-2's Conv1D weights are (n_in, n_out): the row layout transposes them, and back."""
    pytest.importorskip("transformers")
    import models

    model = models.build_model("gpt2")
    config = logra.LoGraConfig(modules=("transformer.h.0.attn.c_attn", "transformer.h.1.mlp.c_proj"), include_bias=True)
    batch, _ = models.collate(models.make_examples("gpt2", 3, min_len=5, max_len=5))
    loss = lambda m, b: models.per_example_loss(m, b).sum()  # noqa: E731
    with logra.GradientLogger(model, full_config(config)) as logger:
        with logger.record(ids=[0, 1, 2]) as rec:
            loss(model, batch).backward()
        space = ParameterSpace(model, logger.layers)
    single = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(3)]
    per_param = [torch.autograd.grad(loss(model, b), space.params) for b in single]
    reference = torch.cat([space.join([g[None] for g in grads]) for grads in per_param])
    assert rec.rows is not None
    torch.testing.assert_close(rec.rows, reference, rtol=1e-10, atol=1e-12)
    for part, grads in zip(space.split(reference), zip(*per_param)):
        torch.testing.assert_close(part, torch.stack(grads), rtol=0, atol=0)
