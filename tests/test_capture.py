"""Capture: logged rows and statistics against batch-size-1 autograd references; the model is untouched.

Every reference runs each example alone and unpadded through plain autograd (tests/models.py),
so padding, masks, batching and the hooks are all checked against something computed another way.
"""

from __future__ import annotations

import pytest
import torch
from models import (
    assert_rows_close,
    build_model,
    collate,
    forward_logits,
    log_rows,
    losses_from_logits,
    make_examples,
    make_plain_examples,
    per_example_loss,
    reference_rows,
    reference_statistics,
)
from torch import nn

import logra
from logra.errors import CaptureError, LograError

REL = 1e-10


def _examples(arch: str, padded: bool, n: int = 5) -> list[dict[str, torch.Tensor]]:
    """Varied lengths (right padding in a batch) or all of one length (no padding, mask None)."""
    return make_examples(arch, n, seed=3) if padded else make_examples(arch, n, seed=3, min_len=5, max_len=5)


def _log(model: nn.Module, cfg: logra.LoGraConfig, examples, batch_size: int, padded: bool = True):
    """Log `examples` in memory; the mask is passed only for padded batches."""
    with logra.GradientLogger(model, cfg) as logger:
        ids, rows = log_rows(logger, examples, list(range(len(examples))), batch_size, use_mask=padded)
    return logger, ids, rows


# ---------------------------------------------------------------- rows against the reference


@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
@pytest.mark.parametrize("arch", ["mlp", "gpt2", "llama"])
def test_rows_equal_batch_size_one_reference(arch: str, padded: bool) -> None:
    model = build_model(arch)
    examples = _examples(arch, padded)
    cfg = logra.LoGraConfig(k_in=5, k_out=4, seed=7, dtype="float64")
    logger, ids, rows = _log(model, cfg, examples, batch_size=len(examples), padded=padded)
    assert ids == list(range(len(examples)))
    assert rows.dtype == torch.float64 and rows.shape == (len(examples), logger.dim)
    if arch == "gpt2":
        assert {layer.kind for layer in logger.layers} == {"Conv1D", "Linear"}  # lm_head is the only Linear
    expected = reference_rows(model, examples, logger.layers, logger.projection)
    assert_rows_close(rows, expected, logger.layers, REL)


@pytest.mark.parametrize("arch", ["mlp", "gpt2"])
def test_include_bias_appends_the_bias_gradient_column(arch: str) -> None:
    model = build_model(arch)
    examples = _examples(arch, padded=True)
    cfg = logra.LoGraConfig(k_in=5, k_out=4, seed=1, dtype="float64", include_bias=True)
    logger, _, rows = _log(model, cfg, examples, batch_size=3)
    modules = dict(model.named_modules())
    for layer in logger.layers:
        module = modules[layer.name]
        n_in = module.in_features if isinstance(module, nn.Linear) else module.weight.shape[0]  # Conv1D: (n_in, n_out)
        has_bias = module.bias is not None
        assert layer.bias == has_bias and layer.n_in == n_in + int(has_bias)
    assert any(layer.bias for layer in logger.layers)
    expected = reference_rows(model, examples, logger.layers, logger.projection, include_bias=True)
    assert_rows_close(rows, expected, logger.layers, REL)


def test_plain_two_dimensional_inputs() -> None:
    model = build_model("mlp")
    examples = make_plain_examples(6, seed=2)
    cfg = logra.LoGraConfig(k_in=4, k_out=3, seed=0, dtype="float64", init="rademacher")
    logger, _, rows = _log(model, cfg, examples, batch_size=4)
    assert_rows_close(rows, reference_rows(model, examples, logger.layers, logger.projection), logger.layers, REL)


def test_a_model_that_is_one_layer_is_logged_as_root() -> None:
    """A bare nn.Linear (the model itself is the layer) is logged under "root", rows exact."""
    torch.manual_seed(0)
    model = nn.Linear(5, 3).double()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    cfg = logra.LoGraConfig(k_in=64, k_out=2, dtype="float64", include_bias=True, init="rademacher")
    with logra.GradientLogger(model, cfg) as logger:
        with logger.record(ids=list(range(6))) as rec:
            nn.functional.cross_entropy(model(x), y, reduction="sum").backward()
        p_in, p_out = logger.projection("root")
    assert [(layer.name, layer.k_in, layer.k_out) for layer in logger.layers] == [("root", 6, 2)]
    for i in range(6):
        w, b = (t.detach().requires_grad_(True) for t in (model.weight, model.bias))
        loss = nn.functional.cross_entropy(x[i : i + 1] @ w.T + b, y[i : i + 1], reduction="sum")
        gw, gb = torch.autograd.grad(loss, (w, b))
        expected = p_out @ torch.cat([gw, gb[:, None]], dim=1) @ p_in.T  # (k_out, k_in)
        torch.testing.assert_close(rec.rows[i].reshape(2, 6), expected, rtol=REL, atol=1e-14)
    assert logra.capture.adapters.layer_module(model, "root") is model
    with logra.GradientLogger(nn.Sequential(nn.Linear(5, 3)), cfg) as container:
        assert [layer.name for layer in container.layers] == ["0"]


@pytest.mark.parametrize("arch,include_bias", [("mlp", True), ("gpt2", True), ("llama", False)])
def test_identity_at_full_size_gives_exact_per_example_gradients(arch: str, include_bias: bool) -> None:
    model = build_model(arch)
    examples = _examples(arch, padded=True, n=4)
    cfg = logra.LoGraConfig(k_in=4096, k_out=4096, init="identity", dtype="float64", include_bias=include_bias)
    logger, _, rows = _log(model, cfg, examples, batch_size=4)
    for layer in logger.layers:
        assert (layer.k_in, layer.k_out) == (layer.n_in, layer.n_out)
    expected = reference_rows(model, examples, logger.layers, None, include_bias=include_bias)
    assert_rows_close(rows, expected, logger.layers, REL)


def test_layer_called_twice_in_one_forward_accumulates() -> None:
    model = build_model("twice")
    examples = _examples("twice", padded=True)
    cfg = logra.LoGraConfig(k_in=6, k_out=5, seed=2, dtype="float64", include_bias=True)
    logger, _, rows = _log(model, cfg, examples, batch_size=3)
    shared = next(layer for layer in logger.layers if layer.name == "shared")
    expected = reference_rows(model, examples, logger.layers, logger.projection, include_bias=True)
    assert_rows_close(rows, expected, logger.layers, REL)
    stats = logger.statistics()["shared"]
    n_tokens = sum(len(e["x"]) for e in examples)
    assert stats.n_tokens == 2 * n_tokens and shared.size == 30


def test_mean_reduction_flag_matches_summed_loss() -> None:
    model = build_model("gpt2")
    examples = _examples("gpt2", padded=True, n=6)
    sums = logra.LoGraConfig(k_in=5, k_out=4, dtype="float64")
    means = logra.LoGraConfig(k_in=5, k_out=4, dtype="float64", loss_reduction="mean")
    with logra.GradientLogger(model, sums) as a:
        _, rows_sum = log_rows(a, examples, list(range(6)), batch_size=4)
    with logra.GradientLogger(model, means) as b:
        _, rows_mean = log_rows(b, examples, list(range(6)), batch_size=4, reduction="mean")
    assert_rows_close(rows_mean, rows_sum, a.layers, 1e-12)
    for name, s in a.statistics().items():
        m = b.statistics()[name]
        torch.testing.assert_close(m.input_sum, s.input_sum, rtol=1e-12, atol=0)
        torch.testing.assert_close(m.grad_sum, s.grad_sum, rtol=1e-12, atol=1e-12 * s.grad_sum.abs().max().item())
        assert (m.n_tokens, m.n_examples) == (s.n_tokens, s.n_examples)
    # Without the flag a mean-reduced loss is off by the batch size: the flag is what fixes it.
    with logra.GradientLogger(model, sums) as c:
        _, rows_wrong = log_rows(c, examples[:4], list(range(4)), batch_size=4, reduction="mean")
    torch.testing.assert_close(rows_wrong * 4, rows_sum[:4], rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------- statistics against the reference


@pytest.mark.parametrize("arch,include_bias", [("mlp", False), ("gpt2", True), ("twice", False)])
def test_statistics_equal_independent_sums_without_masked_tokens(arch: str, include_bias: bool) -> None:
    model = build_model(arch)
    examples = _examples(arch, padded=True, n=5)
    cfg = logra.LoGraConfig(k_in=5, k_out=4, seed=4, dtype="float64", include_bias=include_bias)
    logger, _, _ = _log(model, cfg, examples, batch_size=3)
    expected = reference_statistics(model, examples, logger.layers, logger.projection)
    got = logger.statistics()
    assert list(got) == [layer.name for layer in logger.layers]
    for name, (a, s, n_tokens, n_examples) in expected.items():
        torch.testing.assert_close(got[name].input_sum, a, rtol=REL, atol=REL * a.abs().max().item())
        torch.testing.assert_close(got[name].grad_sum, s, rtol=REL, atol=REL * s.abs().max().item())
        assert (got[name].n_tokens, got[name].n_examples) == (n_tokens, n_examples), name
    lengths = sum(len(next(iter(e.values()))) for e in examples)
    assert got[logger.layers[0].name].n_tokens == lengths  # padding excluded from the count


# ---------------------------------------------------------------- the model is left as it was


def _run(model: nn.Module, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = forward_logits(model, batch)
    losses_from_logits(logits, batch).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().clone(), grads


def _hooks(model: nn.Module) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) + len(m._backward_pre_hooks)
        for m in model.modules()
    )


@pytest.mark.parametrize("arch", ["mlp", "gpt2"])
def test_attach_then_detach_leaves_the_model_bit_identical(arch: str) -> None:
    model = build_model(arch)
    batch, mask = collate(_examples(arch, padded=True, n=4))
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    structure = [(n, type(m)) for n, m in model.named_modules()]
    assert _hooks(model) == 0
    out0, grads0 = _run(model, batch)
    logger = logra.GradientLogger(model, logra.LoGraConfig(k_in=4, k_out=4, include_bias=True))
    assert _hooks(model) == len(logger.layers) > 0
    with logger.record(ids=[0, 1, 2, 3], mask=mask) as rec:
        out1, grads1 = _run(model, batch)
    assert rec.rows is not None and rec.rows.abs().sum() > 0
    out2, grads2 = _run(model, batch)  # attached, outside a record block
    logger.close()
    out3, grads3 = _run(model, batch)
    for out, grads in ((out1, grads1), (out2, grads2), (out3, grads3)):
        assert torch.equal(out, out0)
        assert grads.keys() == grads0.keys()
        assert all(torch.equal(grads[n], grads0[n]) for n in grads0)
    assert _hooks(model) == 0
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert [(n, type(m)) for n, m in model.named_modules()] == structure
    assert not model.training


@pytest.mark.parametrize("arch", ["mlp", "gpt2"])
def test_frozen_model_still_logs_and_stays_frozen(arch: str) -> None:
    model = build_model(arch)
    model.requires_grad_(False)
    examples = _examples(arch, padded=True, n=4)
    cfg = logra.LoGraConfig(k_in=5, k_out=4, seed=3, dtype="float64")
    logger, _, rows = _log(model, cfg, examples, batch_size=4)
    assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert _hooks(model) == 0
    batch, _ = collate(examples)
    assert not forward_logits(model, batch).requires_grad  # nothing of the logger outlives it
    reference_model = build_model(arch)  # same seed, trainable: the reference needs weight gradients
    expected = reference_rows(reference_model, examples, logger.layers, logger.projection)
    assert_rows_close(rows, expected, logger.layers, REL)


# ---------------------------------------------------------------- errors


@pytest.fixture
def mlp_logger():
    model = build_model("mlp")
    logger = logra.GradientLogger(model, logra.LoGraConfig(k_in=3, k_out=3))
    yield model, logger
    logger.close()


def _batch(n: int = 3):
    return collate(make_examples("mlp", n, seed=5))


def _still_works(model: nn.Module, logger: logra.GradientLogger) -> None:
    batch, mask = _batch()
    with logger.record(ids=[10, 11, 12], mask=mask) as rec:
        per_example_loss(model, batch).sum().backward()
    assert rec.rows.shape == (3, logger.dim)


def test_record_without_backward_is_an_error(mlp_logger) -> None:
    model, logger = mlp_logger
    batch, mask = _batch()
    with pytest.raises(CaptureError, match="backward"):
        with logger.record(ids=[0, 1, 2], mask=mask):
            per_example_loss(model, batch).sum()
    _still_works(model, logger)


def test_record_without_forward_is_an_error(mlp_logger) -> None:
    model, logger = mlp_logger
    with pytest.raises(CaptureError, match="forward"):
        with logger.record(ids=[0, 1, 2]):
            pass
    _still_works(model, logger)


def test_nested_record_is_an_error(mlp_logger) -> None:
    model, logger = mlp_logger
    with pytest.raises(CaptureError, match="nested"):
        with logger.record(ids=[0]):
            with logger.record(ids=[1]):
                pass
    _still_works(model, logger)


@pytest.mark.parametrize(
    "make_mask,match",
    [
        (lambda m: m[0], "mask of shape"),  # 1-D
        (lambda m: m[:2], "mask of shape"),  # batch 2 for 3 ids
        (lambda m: m.tolist(), "mask of shape"),  # not a tensor
        (lambda m: torch.ones(3, m.shape[1] + 2), "positions per example"),  # sequence length differs
    ],
    ids=["1d", "batch", "list", "length"],
)
def test_mask_of_wrong_shape_is_an_error(mlp_logger, make_mask, match: str) -> None:
    model, logger = mlp_logger
    batch, mask = _batch()
    with pytest.raises(CaptureError, match=match):
        with logger.record(ids=[0, 1, 2], mask=make_mask(mask)):
            per_example_loss(model, batch).sum().backward()
    _still_works(model, logger)


def test_mask_must_select_not_weight(mlp_logger) -> None:
    model, logger = mlp_logger
    batch, mask = _batch()
    with pytest.raises(CaptureError, match="other than 0 and 1"):
        with logger.record(ids=[0, 1, 2], mask=mask * 0.5):
            per_example_loss(model, batch).sum().backward()
    with logger.record(ids=[0, 1, 2], mask=mask.bool()) as as_bool:
        per_example_loss(model, batch).sum().backward()
    with logger.record(ids=[3, 4, 5], mask=mask.double()) as as_float:
        per_example_loss(model, batch).sum().backward()
    assert torch.equal(as_bool.rows, as_float.rows)


def test_length_one_mask_is_applied() -> None:
    model = build_model("mlp")
    batch, _ = collate(make_examples("mlp", 3, seed=5, min_len=1, max_len=1))
    batch["y"][1] = -100  # example 1 is all padding: no loss, no tokens
    mask = torch.tensor([[1], [0], [1]])
    with logra.GradientLogger(model, logra.LoGraConfig(k_in=3, k_out=3)) as logger:
        with logger.record(ids=[0, 1, 2], mask=mask) as rec:
            per_example_loss(model, batch).sum().backward()
    assert all(s.n_tokens == 2 and s.n_examples == 3 for s in logger.statistics().values())
    assert rec.rows[1].abs().max() == 0 and rec.rows[0].abs().max() > 0


def test_activation_checkpointing_recomputation_is_not_counted_twice() -> None:
    model = build_model("gpt2")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model.train()  # HF checkpoints only in training mode; dropout is 0 in the tiny config
    examples = _examples("gpt2", padded=True, n=4)
    cfg = logra.LoGraConfig(k_in=5, k_out=4, seed=2, dtype="float64")
    logger, _, rows = _log(model, cfg, examples, batch_size=4)
    model.eval()
    assert_rows_close(rows, reference_rows(model, examples, logger.layers, logger.projection), logger.layers, REL)
    expected = reference_statistics(model, examples, logger.layers, logger.projection)
    for name, (a, _, n_tokens, n_examples) in expected.items():
        got = logger.statistics()[name]
        assert (got.n_tokens, got.n_examples) == (n_tokens, n_examples)
        torch.testing.assert_close(got.input_sum, a, rtol=REL, atol=REL * a.abs().max().item())


def test_input_batch_not_matching_ids_is_an_error(mlp_logger) -> None:
    model, logger = mlp_logger
    batch, mask = _batch(3)
    with pytest.raises(CaptureError, match=r"\(3, .*2 ids"):
        with logger.record(ids=[0, 1]):
            per_example_loss(model, batch).sum().backward()
    _still_works(model, logger)


def test_record_after_close_and_empty_ids_are_errors(mlp_logger) -> None:
    model, logger = mlp_logger
    with pytest.raises(CaptureError, match="no ids"):
        with logger.record(ids=[]):
            pass
    logger.close()
    with pytest.raises(CaptureError, match="closed"):
        with logger.record(ids=[0]):
            pass


def test_nonfinite_gradient_raises_or_skips() -> None:
    model = build_model("mlp")
    batch, mask = _batch(3)
    batch["x"][1, 0, 0] = float("nan")
    with logra.GradientLogger(model, logra.LoGraConfig(k_in=3, k_out=3)) as logger:
        with pytest.raises(logra.NonFiniteGradientError, match=r"\[1\]"):
            with logger.record(ids=[0, 1, 2], mask=mask):
                per_example_loss(model, batch).sum().backward()
    with logra.GradientLogger(model, logra.LoGraConfig(k_in=3, k_out=3, nonfinite="skip")) as logger:
        with logger.record(ids=[0, 1, 2], mask=mask) as rec:
            per_example_loss(model, batch).sum().backward()
    assert rec.ids == [0, 2] and rec.skipped == [1] and torch.isfinite(rec.rows).all()
    assert issubclass(logra.NonFiniteGradientError, LograError)


def test_nonfinite_and_zero_rows_are_told_apart() -> None:
    """One batch with a NaN example, an Inf example and an example masked out entirely: the first two
    are skipped, only the third is warned about as all zero, and the kept rows are the others'."""
    model = build_model("mlp")
    batch, mask = _batch(5)
    batch["x"][1, 0, 0] = float("nan")
    batch["x"][3, 0, 0] = float("inf")
    mask[2] = 0
    clean = {k: torch.cat([v[:1], v[4:]]) for k, v in batch.items()}
    with logra.GradientLogger(model, logra.LoGraConfig(k_in=3, k_out=3, nonfinite="skip")) as logger:
        with pytest.warns(UserWarning, match=r"examples \[2\] are all zero"):
            with logger.record(ids=[0, 1, 2, 3, 4], mask=mask) as rec:
                per_example_loss(model, batch).sum().backward()
        with logger.record(ids=[5, 6], mask=torch.cat([mask[:1], mask[4:]])) as ref:
            per_example_loss(model, clean).sum().backward()
    assert rec.ids == [0, 2, 4] and rec.skipped == [1, 3]
    assert torch.equal(rec.rows[1], torch.zeros_like(rec.rows[1]))
    torch.testing.assert_close(rec.rows[[0, 2]], ref.rows, rtol=1e-5, atol=1e-6)
