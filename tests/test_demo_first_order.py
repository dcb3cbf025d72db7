"""benchmarks/demo_first_order.py: its two train-side maps against direct computations, float64.

- The per-article Newton score computed from T x T token Grams (Woodbury) equals the explicit
  <Q, (GᵀG + λ_B)⁻¹ GᵀX (XᵀX + λ_A)⁻¹> with the full (n_out, n_in) matrices, for one side or both.
- The Adafactor map of a rank-one gradient (whose square is rank one, so the factorisation is
  exact) is sign(G); for a general gradient it is G divided by the factorised root second moment.
- On a tiny Llama (the ground truth's test fixture), the whole-model scores are the autograd
  gradients' dot product, sign map and per-layer unit map over every Linear weight and the untied
  head (passage: summed token loss; article: mean token loss over its first max_length tokens).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import demo_first_order as fo  # noqa: E402
from test_demo_ground_truth import ARTICLES, MAX_LENGTH, PASSAGES, demo  # noqa: E402, F401  (the fixture)


@pytest.mark.parametrize("sides", ["both", "inputs", "outputs"])
def test_newton_scores_match_the_explicit_solve(sides: str) -> None:
    gen = torch.Generator().manual_seed(0)
    P, N, T, n_in, n_out = 3, 4, 5, 7, 6
    X = torch.randn(N, T, n_in, generator=gen, dtype=torch.float64)
    G = torch.randn(N, T, n_out, generator=gen, dtype=torch.float64)
    X[1, 3:] = 0.0  # a shorter article: padded tokens are zero rows
    G[1, 3:] = 0.0
    Q = torch.randn(P, n_out, n_in, generator=gen, dtype=torch.float64)
    lam_k = torch.rand(N, generator=gen, dtype=torch.float64) + 0.1 if sides != "outputs" else None
    lam_l = torch.rand(N, generator=gen, dtype=torch.float64) + 0.1 if sides != "inputs" else None
    C = torch.einsum("nto,poi,nsi->pnts", G, Q, X)
    got = fo.newton_scores(C, X @ X.transpose(1, 2), G @ G.transpose(1, 2), lam_k, lam_l)
    want = torch.zeros(P, N, dtype=torch.float64)
    for n in range(N):
        step = G[n].T @ X[n]  # (n_out, n_in)
        if lam_l is not None:
            step = torch.linalg.solve(G[n].T @ G[n] + lam_l[n] * torch.eye(n_out, dtype=torch.float64), step)
        if lam_k is not None:
            step = torch.linalg.solve(X[n].T @ X[n] + lam_k[n] * torch.eye(n_in, dtype=torch.float64), step.T).T
        want[:, n] = (Q * step).sum((1, 2))
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)
    plain = fo.newton_scores(C, X @ X.transpose(1, 2), G @ G.transpose(1, 2), None, None)
    torch.testing.assert_close(plain, torch.einsum("poi,nto,nti->pn", Q, G, X))  # no λ: the dot product


def test_adafactor_map_is_the_sign_of_a_rank_one_gradient() -> None:
    gen = torch.Generator().manual_seed(1)
    u, v = torch.randn(6, generator=gen, dtype=torch.float64), torch.randn(9, generator=gen, dtype=torch.float64)
    G = torch.outer(u, v) * 1e-3
    torch.testing.assert_close(fo.adafactor_map(G), torch.sign(G))
    H = torch.randn(6, 9, generator=gen, dtype=torch.float64)
    sq = H * H
    V = sq.sum(1, keepdim=True) * sq.sum(0, keepdim=True) / sq.sum()
    torch.testing.assert_close(fo.adafactor_map(H), H / V.sqrt())
    torch.testing.assert_close(fo.adafactor_map(5.0 * H), fo.adafactor_map(H))  # scale-free, like Adam's step


def _layer_gradients(model_dir: Path, text: str, max_length: int | None, mean: bool) -> list[torch.Tensor]:
    """Autograd gradients of one text's loss for every block Linear weight and an untied head copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    weights = [m.weight for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers.")]
    head = model.lm_head.weight.detach().clone().requires_grad_(True)
    enc = tokenizer(text, truncation=max_length is not None, max_length=max_length, add_special_tokens=False)
    ids = torch.tensor([enc["input_ids"]])
    logits = model.model(input_ids=ids).last_hidden_state @ head.T
    losses = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    return list(torch.autograd.grad(losses.mean() if mean else losses.sum(), [*weights, head]))


def test_whole_model_scores_are_autograd_dot_products(demo: Path) -> None:  # noqa: F811  (the fixture)
    tok, model = fo.load(demo / "model")
    passages = [{"id": k, "prompt": "", "text": v} for k, v in PASSAGES.items()]
    docs = [{"id": f"lee-{i:03d}", "text": t} for i, t in enumerate(ARTICLES)]
    args = argparse.Namespace(max_length=MAX_LENGTH, prior=2)
    scores = fo.whole_model(args, tok, model, passages, docs)
    g_q = [_layer_gradients(demo / "model", p["text"], None, mean=False) for p in passages]
    g_d = [_layer_gradients(demo / "model", d["text"], MAX_LENGTH, mean=True) for d in docs]
    maps = {"dot": lambda g: g, "sign": torch.sign, "unit_layer": lambda g: g / g.norm()}
    for name, f in maps.items():
        want = np.array([[sum(float((q * f(d)).sum()) for q, d in zip(gq, gd)) for gd in g_d] for gq in g_q])
        np.testing.assert_allclose(scores[name], want, rtol=1e-4, atol=1e-6 * np.abs(want).max(), err_msg=name)
    assert len(g_q[0]) == 2 * 7 + 1  # two blocks of seven Linear layers and the head: the maps summed them all
