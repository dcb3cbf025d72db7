"""Per-token shares (logra.tokens): they sum to the Scorer's score, and match a per-position autograd reference.

The reference runs each example alone and unpadded, with a zero per-position weight perturbation
E (T, n_out, n_in) added to every logged layer's output (y_t += E_t x_t, plus a bias column): then
∂L/∂E_t = g_t x_tᵀ is position t's full-size weight gradient, from plain autograd and none of
logra's hooks, and position t's share is Σ_layers ⟨P_outᵀ W P_in, ∂L/∂E_t⟩ (float64).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import logra
from logra.capture.adapters import layer_module
from logra.tokens import TokenAttributor
from tests.models import build_model, collate, log_rows, make_examples, per_example_loss

REL = 1e-5


def position_gradients(model: nn.Module, example: dict[str, Tensor], layers: Any) -> dict[str, Tensor]:
    """{layer: (T, n_out, n_in [+1])}: ∂L/∂E_t of the example alone, unpadded, by plain autograd."""
    batch, _ = collate([example])
    batch.pop("attention_mask", None)
    T = next(iter(example.values())).shape[0]
    perturb, handles = {}, []
    for info in layers:
        module = layer_module(model, info.name)
        n_in = info.n_in - int(info.bias)
        E = torch.zeros(T, info.n_out, info.n_in, dtype=torch.float64, requires_grad=True)
        perturb[info.name] = E

        def hook(
            mod: nn.Module, inputs: Any, out: Tensor, E: Tensor = E, n_in: int = n_in, bias: bool = info.bias
        ) -> Tensor:
            x = inputs[0].reshape(1, T, n_in)
            if bias:  # the layer's bias gradient is logged as an input column of ones
                x = torch.cat([x, torch.ones(1, T, 1, dtype=x.dtype)], dim=-1)
            return out + torch.einsum("toi,bti->bto", E, x).reshape(out.shape)

        handles.append(module.register_forward_hook(hook))
    try:
        loss = per_example_loss(model, batch).sum()
        grads = torch.autograd.grad(loss, list(perturb.values()), allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return {name: torch.zeros_like(E) if g is None else g for (name, E), g in zip(perturb.items(), grads)}


def reference_shares(
    model: nn.Module, example: dict[str, Tensor], logger: logra.GradientLogger, blocks: Tensor
) -> Tensor:
    """[R, T]: Σ_layers ⟨P_outᵀ W_r P_in, ∂L/∂E_t⟩ for each row W_r of blocks [R, D]."""
    grads = position_gradients(model, example, logger.layers)
    out = torch.zeros(blocks.shape[0], next(iter(grads.values())).shape[0], dtype=torch.float64)
    for info in logger.layers:
        p_in, p_out = logger.projection(info.name)
        W = blocks[:, info.offset : info.offset + info.size].reshape(-1, info.k_out, info.k_in)
        full = p_out.T @ W @ p_in  # (R, n_out, n_in)
        out += torch.einsum("roi,toi->rt", full, grads[info.name])
    return out


def _setup(tmp_path: Path, arch: str, method: str, normalization: str, bias: bool) -> dict[str, Any]:
    model = build_model(arch)
    config = logra.LoGraConfig(k_in=3, k_out=4, seed=2, dtype="float64", include_bias=bias)
    train = make_examples(arch, 12, seed=3)
    queries = make_examples(arch, 3, seed=4)
    with logra.GradientLogger(model, config, store=tmp_path / "s") as logger:
        log_rows(logger, train, list(range(12)), batch_size=4)
    with logra.GradientLogger(model, config) as qlogger:
        _, qrows = log_rows(qlogger, queries, ["a", "b", "c"], batch_size=3)
    store = logra.GradientStore.open(tmp_path / "s")
    pre = logra.fit_preconditioner(store, method)
    scorer = logra.Scorer(store, pre, normalization, chunk_rows=5, query_config=config)
    return {"model": model, "train": train, "queries": queries, "qrows": qrows, "scorer": scorer, "logger": qlogger}


CASES = [
    ("mlp", "kfac", "dot", False),
    ("mlp", "ekfac", "relative", True),
    ("gpt2", "kfac", "dot", True),
    ("gpt2", "identity", "cosine", False),
    ("llama", "ekfac", "dot", False),
]


@pytest.mark.parametrize(("arch", "method", "normalization", "bias"), CASES)
def test_training_token_shares_sum_to_the_score_and_match_autograd(
    tmp_path: Path, arch: str, method: str, normalization: str, bias: bool
) -> None:
    s = _setup(tmp_path, arch, method, normalization, bias)
    model, scorer = s["model"], s["scorer"]
    full = scorer.score(s["qrows"])  # (Q, N)
    picked = [7, 2, 10]  # a top-k-like subset, out of store order, recomputed in one padded batch
    batch, mask = collate([s["train"][i] for i in picked])
    with TokenAttributor(scorer, model) as tokens, tokens.record(ids=picked, mask=mask) as rec:
        per_example_loss(model, batch).sum().backward()
    shares = rec.train_shares(s["qrows"])  # (Q, B, T)
    assert shares.shape == (3, 3, batch[next(iter(batch))].shape[1])
    expected = full[:, picked]
    torch.testing.assert_close(shares.sum(-1), expected, rtol=REL, atol=REL * expected.abs().max().item())
    if mask is not None:
        assert (shares[:, mask == 0] == 0).all()  # padding carries nothing
    pre = scorer.preconditioner.apply(s["qrows"])
    for b, i in enumerate(picked):
        ref = reference_shares(model, s["train"][i], s["logger"], pre)  # (Q, T_i) dot shares
        if normalization != "dot":
            ref = ref * tokens.row_scale(rec.rows[b : b + 1])
        if normalization == "cosine":
            ref = ref * tokens.row_scale(s["qrows"])[:, None]
        T_i = ref.shape[1]
        torch.testing.assert_close(shares[:, b, :T_i], ref, rtol=1e-9, atol=1e-12 * ref.abs().max().item())


@pytest.mark.parametrize(("arch", "method", "normalization", "bias"), CASES[:4])
def test_query_token_shares_sum_to_the_score_and_match_autograd(
    tmp_path: Path, arch: str, method: str, normalization: str, bias: bool
) -> None:
    s = _setup(tmp_path, arch, method, normalization, bias)
    model, scorer = s["model"], s["scorer"]
    full = scorer.score(s["qrows"])
    train_ids = [5, 0, 11, 3]
    batch, mask = collate(s["queries"])
    with TokenAttributor(scorer, model) as tokens, tokens.record(ids=["a", "b", "c"], mask=mask) as rec:
        per_example_loss(model, batch).sum().backward()
    torch.testing.assert_close(rec.rows, s["qrows"], rtol=1e-10, atol=1e-12)  # the same rows as the logger's
    shares = rec.query_shares(train_ids)  # (Q, R, T)
    expected = full[:, train_ids]
    torch.testing.assert_close(shares.sum(-1), expected, rtol=REL, atol=REL * expected.abs().max().item())
    stored = scorer.store.rows().to(torch.float64)[train_ids]
    pre_train = scorer.preconditioner.apply(stored)
    for b, example in enumerate(s["queries"]):
        ref = reference_shares(model, example, s["logger"], pre_train)  # (R, T_b)
        if normalization != "dot":
            ref = ref * tokens.row_scale(stored)[:, None]
        if normalization == "cosine":
            ref = ref * tokens.row_scale(s["qrows"][b : b + 1])
        T_b = ref.shape[1]
        torch.testing.assert_close(shares[b, :, :T_b], ref, rtol=1e-9, atol=1e-12 * ref.abs().max().item())


def test_shares_change_when_the_query_changes(tmp_path: Path) -> None:
    """The invariant can fail: shares against one query do not sum to another query's score."""
    s = _setup(tmp_path, "mlp", "kfac", "dot", False)
    model, scorer = s["model"], s["scorer"]
    batch, mask = collate([s["train"][4]])
    with TokenAttributor(scorer, model) as tokens, tokens.record(ids=[4], mask=mask) as rec:
        per_example_loss(model, batch).sum().backward()
    sums = rec.train_shares(s["qrows"]).sum(-1)[:, 0]
    full = scorer.score(s["qrows"])[:, 4]
    assert not torch.allclose(sums, full.flip(0))


def test_wrong_model_and_bad_ids_are_refused(tmp_path: Path) -> None:
    s = _setup(tmp_path, "mlp", "kfac", "dot", False)
    with pytest.raises(logra.ConfigError, match="not the one the store"):
        TokenAttributor(s["scorer"], build_model("mlp", seed=9))
    model = s["model"]
    batch, mask = collate(s["queries"])
    with TokenAttributor(s["scorer"], model) as tokens:
        with tokens.record(ids=["a", "b", "c"], mask=mask) as rec:
            per_example_loss(model, batch).sum().backward()
        with pytest.raises(logra.ConfigError, match="not in the store"):
            rec.query_shares([99])
        with pytest.raises(logra.CaptureError, match="no gradient"), tokens.record(ids=["a", "b", "c"], mask=mask):
            per_example_loss(model, batch)
