"""Projection matrices: a pure function of (seed, layer name, side, shape, init), with the right law."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import subprocess
import sys

import pytest
import torch
from models import VOCAB, TokenMLP, assert_rows_close, build_model, log_rows, make_examples, reference_rows
from torch import nn

import logra
from logra.capture import make_projection
from logra.capture import projection as projection_module
from logra.capture.hooks import LayerCapture
from logra.capture.projection import SHARED_INPUT, SparseRows
from logra.config import ProjectionInit
from logra.errors import ConfigError

DRAWN = [ProjectionInit.GAUSSIAN, ProjectionInit.RADEMACHER, ProjectionInit.ORTHOGONAL, ProjectionInit.SJLT]
CASES = [(init, seed, name, side, k, n) for init in DRAWN for seed in (0, 3) for name in ("fc1", "h.0.mlp.c_fc")
         for side in ("in", "out") for k, n in ((4, 9), (12, 16))]  # fmt: skip


def _digest(p: torch.Tensor) -> str:
    return hashlib.sha256(p.numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("init", [*list(ProjectionInit)[:4], ProjectionInit.SJLT])
@pytest.mark.parametrize("k,n", [(1, 1), (3, 7), (7, 7), (5, 40)])
def test_shape_dtype_and_repeatability(init: ProjectionInit, k: int, n: int) -> None:
    p = make_projection(init, 0, "layer", "in", k, n)
    assert p.shape == (k, n) and p.dtype == torch.float64 and p.device.type == "cpu" and p.is_contiguous()
    assert torch.equal(p, make_projection(init, 0, "layer", "in", k, n))
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("init", [*list(ProjectionInit)[:4], ProjectionInit.SJLT])
def test_a_side_with_k_equal_to_its_width_is_the_identity(init: ProjectionInit) -> None:
    """k clipped to the width: exact, whatever the init (a square gaussian would distort damping)."""
    for n in (1, 7, 16):
        assert torch.equal(make_projection(init, 3, "fc1", "in", n, n), torch.eye(n, dtype=torch.float64))
    factor = torch.diag(torch.arange(1.0, 6.0, dtype=torch.float64))
    assert torch.equal(
        make_projection(ProjectionInit.PCA, 0, "x", "in", 5, 5, factor), torch.eye(5, dtype=torch.float64)
    )


def test_every_identity_part_changes_the_matrix() -> None:
    digests = {_digest(make_projection(*case)) for case in CASES}
    assert len(digests) == len(CASES)  # seed, name, side, shape and init all matter


@pytest.mark.subprocess
def test_identical_in_another_process() -> None:
    code = (
        "import hashlib, json, sys\n"
        "from logra.config import ProjectionInit\n"
        "from logra.capture.projection import make_projection\n"
        "out = []\n"
        "for init, seed, name, side, k, n in json.loads(sys.stdin.read()):\n"
        "    p = make_projection(ProjectionInit(init), seed, name, side, k, n)\n"
        "    out.append(hashlib.sha256(p.numpy().tobytes()).hexdigest())\n"
        "print(json.dumps(out))\n"
    )
    payload = json.dumps([[c[0].value, *c[1:]] for c in CASES])
    proc = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == [_digest(make_projection(*c)) for c in CASES]


def test_orthogonal_rows_are_orthonormal() -> None:
    for k, n in ((1, 5), (4, 9), (9, 9), (20, 64)):
        p = make_projection(ProjectionInit.ORTHOGONAL, 1, "x", "out", k, n)
        torch.testing.assert_close(p @ p.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-13)


def test_rademacher_and_gaussian_scale() -> None:
    k, n = 32, 512
    r = make_projection(ProjectionInit.RADEMACHER, 0, "x", "in", k, n)
    torch.testing.assert_close(r.abs(), torch.full((k, n), k**-0.5, dtype=torch.float64), rtol=1e-15, atol=0)
    assert abs((r > 0).double().mean().item() - 0.5) < 0.05
    g = make_projection(ProjectionInit.GAUSSIAN, 0, "x", "in", k, n)
    # E[g²] = 1/k; with 16384 entries the estimate is within a few percent, and E[g] = 0.
    assert abs((g**2).mean().item() * k - 1) < 0.05 and abs(g.mean().item()) * k**0.5 < 0.05


def test_identity_is_the_leading_rows_of_the_identity() -> None:
    assert torch.equal(
        make_projection(ProjectionInit.IDENTITY, 9, "x", "in", 3, 5), torch.eye(5, dtype=torch.float64)[:3]
    )


@pytest.mark.parametrize("k,n", [(0, 4), (5, 4), (-1, 3)])
def test_k_outside_one_to_n_is_refused(k: int, n: int) -> None:
    with pytest.raises(ConfigError, match=f"k={k}.*n={n}"):
        make_projection(ProjectionInit.GAUSSIAN, 0, "x", "in", k, n)


# ---------------------------------------------------------------- the logger's projections


def test_two_loggers_share_projections_and_they_come_from_make_projection() -> None:
    cfg = logra.LoGraConfig(k_in=5, k_out=4, seed=3, include_bias=True)
    a = logra.GradientLogger(build_model("gpt2"), cfg)
    b = logra.GradientLogger(build_model("gpt2", seed=5), cfg)  # other weights, same shapes
    a.close(), b.close()
    assert a.layers == b.layers
    for layer in a.layers:
        pa, pb = a.projection(layer.name), b.projection(layer.name)
        assert all(torch.equal(x, y) for x, y in zip(pa, pb))
        assert torch.equal(pa[0], make_projection(cfg.init, 3, SHARED_INPUT, "in", layer.k_in, layer.n_in))
        assert torch.equal(pa[1], make_projection(cfg.init, 3, layer.name, "out", layer.k_out, layer.n_out))
    with pytest.raises(ConfigError, match="'nope' is not logged"):
        a.projection("nope")
    per_layer = logra.GradientLogger(build_model("gpt2"), dataclasses.replace(cfg, share_input_projection=False))
    per_layer.close()
    for layer in per_layer.layers:
        p_in = make_projection(cfg.init, 3, layer.name, "in", layer.k_in, layer.n_in)
        assert torch.equal(per_layer.projection(layer.name)[0], p_in)


def test_shared_input_projection_is_one_matrix_and_one_product_per_input() -> None:
    """q, k and v (and gate and up) read one tensor: with a shared P_in they hold one matrix and one
    x̃; rows still equal the per-example autograd reference (checked by the capture tests)."""
    model = build_model("llama").double()
    cfg = logra.LoGraConfig(k_in=4, k_out=3, dtype="float64")
    ids = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(0))
    with logra.GradientLogger(model, cfg) as logger:
        captures = {c.info.name: c for c in logger._captures}
        q, k, v, o = (captures[f"model.layers.0.self_attn.{m}_proj"] for m in "qkvo")
        dev, dt = torch.device("cpu"), torch.float64
        assert q.projections(dev, dt)[0] is k.projections(dev, dt)[0] is o.projections(dev, dt)[0]
        seen = []
        original = LayerCapture.take

        def spy(self: LayerCapture) -> list:
            calls = original(self)
            seen.append((self.info.name, [c.x for c in calls]))
            return calls

        LayerCapture.take = spy  # type: ignore[method-assign]
        try:
            with logger.record(ids=[0, 1]):
                model(input_ids=ids).logits.sum().backward()
        finally:
            LayerCapture.take = original  # type: ignore[method-assign]
    x = dict(seen)
    assert x["model.layers.0.self_attn.q_proj"][0] is x["model.layers.0.self_attn.k_proj"][0]
    assert x["model.layers.0.self_attn.k_proj"][0] is x["model.layers.0.self_attn.v_proj"][0]
    assert x["model.layers.0.self_attn.o_proj"][0] is not x["model.layers.0.self_attn.q_proj"][0]
    assert x["model.layers.0.mlp.gate_proj"][0] is x["model.layers.0.mlp.up_proj"][0]


def test_an_input_changed_in_place_is_projected_again() -> None:
    """Two layers reading one tensor reuse x̃ only while the tensor is unchanged (its version)."""

    class TwoReads(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = x.clone()
            ya = self.a(h)
            h.mul_(2.0)  # same tensor object, new contents
            return ya + self.b(h)

    torch.manual_seed(0)
    model = TwoReads().double()
    x = torch.randn(3, 4, dtype=torch.float64)
    cfg = logra.LoGraConfig(k_in=2, k_out=2, dtype="float64")
    with logra.GradientLogger(model, cfg) as logger:
        # Frozen weights: autograd saves no input of a, so the in-place edit is legal.
        with logger.record(ids=[0, 1, 2], param_grads=False) as rec:
            model(x).sum().backward()
    p_in, p_out = logger.projection("b")
    assert torch.equal(p_in, logger.projection("a")[0])  # one shared P_in: only the version tells them apart
    for i in range(3):
        grad_b = torch.ones(3, 1, dtype=torch.float64) @ (2.0 * x[i : i + 1])  # d sum(b(h)) / d W_b, h = 2x
        expected = (p_out @ grad_b @ p_in.T).reshape(-1)
        torch.testing.assert_close(rec.rows[i, 4:], expected, rtol=1e-10, atol=1e-12)


def test_projection_returns_copies() -> None:
    logger = logra.GradientLogger(build_model("mlp"), logra.LoGraConfig(k_in=3, k_out=3))
    p_in, _ = logger.projection("fc1")
    p_in.zero_()
    assert logger.projection("fc1")[0].abs().sum() > 0
    logger.close()


def test_k_is_clipped_to_the_layer_and_layer_k_overrides() -> None:
    model = build_model("mlp")  # fc1 6 -> 10, fc2 10 -> 10, head 10 -> 5
    cfg = logra.LoGraConfig(k_in=8, k_out=8, layer_k={"fc2": (3, 2), "f*": (100, 1)}, include_bias=True)
    with logra.GradientLogger(model, cfg) as logger:
        pass
    table = {layer.name: (layer.n_in, layer.n_out, layer.k_in, layer.k_out) for layer in logger.layers}
    assert table == {"fc1": (7, 10, 7, 1), "fc2": (11, 10, 3, 2), "head": (11, 5, 8, 5)}
    offsets = list(itertools.accumulate([0] + [layer.size for layer in logger.layers]))
    assert [layer.offset for layer in logger.layers] == offsets[:-1] and logger.dim == offsets[-1]
    for layer in logger.layers:
        p_in, p_out = logger.projection(layer.name)
        assert p_in.shape == (layer.k_in, layer.n_in) and p_out.shape == (layer.k_out, layer.n_out)


def test_pca_projections_are_the_top_eigenvectors_of_an_identity_pass(tmp_path) -> None:
    model = build_model("mlp")
    examples = make_examples("mlp", 8, seed=4)
    full = logra.LoGraConfig(k_in=100, k_out=100, init="identity", dtype="float64", modules=["fc*"])
    with logra.GradientLogger(model, full, store=tmp_path / "full") as logger:
        log_rows(logger, examples, list(range(8)), batch_size=4)
    stats = logra.GradientStore.open(tmp_path / "full").statistics()
    pca = logra.LoGraConfig(k_in=3, k_out=2, init="pca", pca_statistics=str(tmp_path / "full"), modules=["fc*"])
    with logra.GradientLogger(model, pca) as logger:
        pass
    for layer in logger.layers:
        p_in, p_out = logger.projection(layer.name)
        for p, cov in ((p_in, stats[layer.name].input_covariance()), (p_out, stats[layer.name].grad_covariance())):
            k = p.shape[0]
            top = torch.linalg.eigvalsh(cov).flip(0)[:k]
            torch.testing.assert_close(p @ p.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-12)
            torch.testing.assert_close(p @ cov @ p.T, torch.diag(top), rtol=1e-9, atol=1e-12 * top[0].item())
    not_identity = logra.LoGraConfig(k_in=3, k_out=3, modules=["fc*"])
    with logra.GradientLogger(model, not_identity, store=tmp_path / "gauss") as logger:
        log_rows(logger, examples[:2], [0, 1], batch_size=2)
    with pytest.raises(ConfigError, match="init='identity'"):
        logra.GradientLogger(model, logra.LoGraConfig(init="pca", pca_statistics=str(tmp_path / "gauss")))


# ---------------------------------------------------------------- init=sjlt (FactGraSS-style, per side)


@pytest.mark.parametrize("nonzeros", [1, 3])
@pytest.mark.parametrize("k,n", [(4, 9), (8, 100), (5, 300), (64, 200)])
def test_sjlt_is_a_random_mask_then_a_block_sjlt(k: int, n: int, nonzeros: int, monkeypatch) -> None:
    """k' = min(n, 4k) columns kept; each has one ±sqrt(n/(k' s)) in each of s row blocks; loads balanced."""
    monkeypatch.setattr(projection_module, "SJLT_NONZEROS", nonzeros)
    p = make_projection(ProjectionInit.SJLT, 2, "fc1", "out", k, n)
    kept, s = min(n, projection_module.SJLT_MASK_FACTOR * k), min(nonzeros, k)
    per_column = (p != 0).sum(dim=0)
    assert int((per_column > 0).sum()) == kept and set(per_column.tolist()) <= {0, s}
    scale = (n / (kept * s)) ** 0.5
    torch.testing.assert_close(p[p != 0].abs(), torch.full((kept * s,), scale, dtype=torch.float64), rtol=1e-15, atol=0)
    bounds = [(r * k) // s for r in range(s + 1)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        block = p[lo:hi] != 0
        assert (block.sum(dim=0) == (per_column > 0).long()).all()  # one entry per kept column per block
        loads = block.sum(dim=1)
        assert int(loads.max() - loads.min()) <= 1
    if s == 1:  # disjoint rows: P Pᵀ is diagonal, each entry its row's load times n/k'
        gram = p @ p.T
        torch.testing.assert_close(gram, torch.diag(torch.diagonal(gram)), rtol=0, atol=1e-14)
    assert torch.equal(p, make_projection(ProjectionInit.SJLT, 2, "fc1", "out", k, n))
    for other in ((3, "fc1", "out"), (2, "fc2", "out"), (2, "fc1", "in")):
        assert not torch.equal(p, make_projection(ProjectionInit.SJLT, other[0], other[1], other[2], k, n))


@pytest.mark.parametrize("nonzeros", [1, 2])
def test_sjlt_preserves_norms_and_inner_products_in_expectation(nonzeros: int, monkeypatch) -> None:
    """E‖Px‖² = ‖x‖² and E⟨Px, Py⟩ = ⟨x, y⟩ over draws (names), within 4 standard errors.

    With n = 256 and k = 8 the mask keeps 32 of 256 columns: forgetting its sqrt(n/k') factor would
    give 1/8 of the norm, forgetting 1/sqrt(s) s times it, both far outside the tolerance."""
    monkeypatch.setattr(projection_module, "SJLT_NONZEROS", nonzeros)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(256, generator=gen, dtype=torch.float64)
    y = 0.6 * x + torch.randn(256, generator=gen, dtype=torch.float64)
    draws = [make_projection(ProjectionInit.SJLT, 0, f"layer{i}", "in", 8, 256) for i in range(600)]
    norms = torch.stack([(p @ x).square().sum() for p in draws]) / x.square().sum()
    inner = torch.stack([(p @ x) @ (p @ y) for p in draws]) / (x @ y)
    for ratio in (norms, inner):
        stderr = ratio.std().item() / len(draws) ** 0.5
        assert abs(ratio.mean().item() - 1) < 4 * stderr and stderr < 0.05, (ratio.mean().item(), stderr)


def test_sparse_rows_of_any_matrix_equal_the_matmul_and_refuse_dense_ones() -> None:
    """SparseRows come from the matrix itself: a scaled SJLT (P diag(a), diag(b) P) is still exact."""
    gen = torch.Generator().manual_seed(1)
    p = make_projection(ProjectionInit.SJLT, 0, "x", "out", 16, 512)
    a, b = torch.rand(512, generator=gen, dtype=torch.float64), torch.rand(16, generator=gen, dtype=torch.float64)
    x = torch.randn(3, 7, 512, generator=gen, dtype=torch.float64)
    for m in (p, p * a, b[:, None] * p, torch.diag(a)[:16]):
        rows = SparseRows.of(m)
        assert rows is not None and rows.index.shape[1] == 16
        torch.testing.assert_close(rows.apply(x), x @ m.T, rtol=1e-13, atol=1e-13)
    assert SparseRows.of(make_projection(ProjectionInit.GAUSSIAN, 0, "x", "out", 16, 512)) is None
    assert SparseRows.of(torch.zeros(4, 64, dtype=torch.float64)) is not None  # all-zero rows: one zero slot


def _wide_mlp() -> nn.Module:
    """Widths (128 -> 96 -> 96 -> 64) where every side of k = 4 SJLT rows is sparse enough for the gather."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return TokenMLP(d_in=128, hidden=96, classes=64).double().eval()


def _wide_examples(n: int) -> list[dict[str, torch.Tensor]]:
    gen = torch.Generator().manual_seed(5)
    lengths = [2, 5, 3, 4, 1][:n]
    return [{"x": torch.randn(t, 128, generator=gen, dtype=torch.float64),
             "y": torch.randint(0, 64, (t,), generator=gen)} for t in lengths]  # fmt: skip


@pytest.mark.parametrize("include_bias", [False, True])
def test_sjlt_gather_path_equals_the_dense_path_and_the_autograd_reference(include_bias: bool, monkeypatch) -> None:
    """Through the logger in float64: rows by the gather equal rows by the dense matmul (forced by making
    SparseRows.of refuse every matrix), and both equal the batch-size-1 autograd reference."""
    model, examples = _wide_mlp(), _wide_examples(5)
    cfg = logra.LoGraConfig(k_in=4, k_out=4, init="sjlt", dtype="float64", include_bias=include_bias, seed=4)
    with logra.GradientLogger(model, cfg) as logger:
        dev, dt = torch.device("cpu"), torch.float64
        assert all(None not in c.sparse_projections(dev, dt) for c in logger._captures)  # the gather runs
        _, fast = log_rows(logger, examples, list(range(5)), batch_size=3)
    monkeypatch.setattr(SparseRows, "of", classmethod(lambda cls, p, max_fill=0.0: None))
    with logra.GradientLogger(model, cfg) as dense_logger:
        assert all(c.sparse_projections(dev, dt) == (None, None) for c in dense_logger._captures)
        _, dense = log_rows(dense_logger, examples, list(range(5)), batch_size=3)
    torch.testing.assert_close(fast, dense, rtol=1e-12, atol=1e-14)
    expected = reference_rows(model, examples, logger.layers, logger.projection, include_bias=include_bias)
    assert_rows_close(fast, expected, logger.layers, 1e-10)


def test_sjlt_curvature_uses_its_gram() -> None:
    """SJLT rows are not orthonormal (squared norms about n/k): full-size damping needs P Pᵀ."""
    from logra.capture.layers import projection_grams

    cfg = logra.LoGraConfig(k_in=4, k_out=4, init="sjlt")
    with logra.GradientLogger(_wide_mlp(), cfg) as logger:
        grams = projection_grams(cfg, logger.layers)
    for layer in logger.layers:
        p_in, p_out = logger.projection(layer.name)
        g_out, g_in = grams[layer.name]
        assert g_out is not None and g_in is not None
        torch.testing.assert_close(g_in, p_in @ p_in.T)
        torch.testing.assert_close(g_out, p_out @ p_out.T)


def test_sjlt_gather_path_follows_scalings_folded_into_the_projections(monkeypatch) -> None:
    """P_in diag(b) and P_out diag(a) (an optimizer correction folded in) keep the gather exact: its
    rows come from the scaled matrices, not from the seed."""
    from logra.capture import layers as layers_module

    drawn = layers_module.draw_projections

    def scaled(*args: object) -> tuple[torch.Tensor, torch.Tensor]:
        p_in, p_out = drawn(*args)  # type: ignore[arg-type]
        b = torch.linspace(0.5, 2.0, p_in.shape[1], dtype=torch.float64)
        a = torch.linspace(2.0, 0.25, p_out.shape[1], dtype=torch.float64)
        return p_in * b, p_out * a

    monkeypatch.setattr(layers_module, "draw_projections", scaled)
    model, examples = _wide_mlp(), _wide_examples(4)
    cfg = logra.LoGraConfig(k_in=4, k_out=4, init="sjlt", dtype="float64", seed=1)
    with logra.GradientLogger(model, cfg) as logger:
        rows = logger._captures[0].sparse_projections(torch.device("cpu"), torch.float64)
        p_in, p_out = logger.projection(logger.layers[0].name)
        assert rows[0] is not None and rows[1] is not None
        assert not torch.equal(p_out, make_projection(cfg.init, 1, logger.layers[0].name, "out", 4, p_out.shape[1]))
        _, fast = log_rows(logger, examples, list(range(4)), batch_size=4)
    expected = reference_rows(model, examples, logger.layers, logger.projection)
    assert_rows_close(fast, expected, logger.layers, 1e-10)
