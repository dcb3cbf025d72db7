"""Tiny seeded models logged through GradientLogger, shared by the scoring tests.

Each builder returns a committed training store and query rows logged with the same config, in
float64. Sequences have padding (a mask), so token and example counts differ.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import logra


@dataclass
class Logged:
    store: logra.GradientStore
    queries: Tensor  # (Q, D) float64
    config: logra.LoGraConfig


class TinyMLP(nn.Module):
    """Token-wise MLP over (B, T, 6) inputs with 4 classes per token."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 5)
        self.fc2 = nn.Linear(5, 4)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def _mlp_data(n: int, seed: int) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (n, 3), generator=gen)
    lengths = torch.randint(1, 4, (n,), generator=gen)
    mask = (torch.arange(3)[None, :] < lengths[:, None]).to(torch.float64)
    return x, y, mask


def _mlp_losses(model: nn.Module, x: Tensor, y: Tensor, mask: Tensor) -> Tensor:
    logits = model(x)
    ce = nn.functional.cross_entropy(logits.reshape(-1, 4), y.reshape(-1), reduction="none").reshape(y.shape)
    return (ce * mask).sum(1)


def log_mlp(
    root: Path,
    *,
    dtype: str = "float64",
    shard_rows: int | None = None,
    batch: int = 5,
    n: int = 24,
    n_query: int = 4,
    seed: int = 1,
) -> Logged:
    torch.manual_seed(0)
    model = TinyMLP().double()
    config = logra.LoGraConfig(k_in=3, k_out=4, init="gaussian", seed=seed, dtype=dtype)
    x, y, mask = _mlp_data(n, seed=2)
    with logra.GradientLogger(model, config, store=root, shard_rows=shard_rows) as logger:
        for s in range(0, n, batch):
            sl = slice(s, s + batch)
            with logger.record(ids=[f"ex{i}" for i in range(s, min(s + batch, n))], mask=mask[sl]):
                _mlp_losses(model, x[sl], y[sl], mask[sl]).sum().backward()
    qx, qy, qmask = _mlp_data(n_query, seed=3)
    with logra.GradientLogger(model, config) as logger:
        with logger.record(ids=list(range(n_query)), mask=qmask) as rec:
            _mlp_losses(model, qx, qy, qmask).sum().backward()
    assert rec.rows is not None
    return Logged(logra.GradientStore.open(root), rec.rows.to(torch.float64), config)


@pytest.fixture(scope="module", name="mlp")
def mlp_fixture(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    """The tiny MLP store (float64, 24 rows) and 4 query rows, shared by a test module."""
    return log_mlp(tmp_path_factory.mktemp("mlp") / "store")


@pytest.fixture(scope="module", name="gpt2")
def gpt2_fixture(tmp_path_factory: pytest.TempPathFactory) -> Logged:
    """A one-block GPT-2 store (float64, MLP layers, 20 rows) and 3 query rows."""
    return log_gpt2(tmp_path_factory.mktemp("gpt2") / "store")


def log_gpt2(root: Path, *, n: int = 20, batch: int = 4, n_query: int = 3) -> Logged:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        n_layer=1,
        n_embd=8,
        n_head=2,
        vocab_size=11,
        n_positions=6,
        bos_token_id=0,
        eos_token_id=0,
        tie_word_embeddings=False,
    )
    model = GPT2LMHeadModel(cfg).double().eval()
    config = logra.LoGraConfig(k_in=3, k_out=3, seed=4, modules=["*mlp*"], dtype="float64")
    gen = torch.Generator().manual_seed(5)

    def data(m: int) -> tuple[Tensor, Tensor]:
        ids = torch.randint(0, 11, (m, 6), generator=gen)
        lengths = torch.randint(3, 7, (m,), generator=gen)
        return ids, (torch.arange(6)[None, :] < lengths[:, None]).long()

    def losses(ids: Tensor, mask: Tensor) -> Tensor:
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        ce = nn.functional.cross_entropy(logits.reshape(-1, 11), ids[:, 1:].reshape(-1), reduction="none")
        return (ce.reshape(ids.shape[0], -1) * mask[:, 1:]).sum(1)

    ids, mask = data(n)
    with logra.GradientLogger(model, config, store=root) as logger:
        for s in range(0, n, batch):
            with logger.record(ids=list(range(s, s + batch)), mask=mask[s : s + batch]):
                losses(ids[s : s + batch], mask[s : s + batch]).sum().backward()
    qids, qmask = data(n_query)
    with logra.GradientLogger(model, config) as logger:
        with logger.record(ids=list(range(n_query)), mask=qmask) as rec:
            losses(qids, qmask).sum().backward()
    assert rec.rows is not None
    return Logged(logra.GradientStore.open(root), rec.rows.to(torch.float64), config)


# --------------------------------------------------------------------------------------------
# Dense references: the curvature of each method built explicitly and inverted with linalg.inv.
# Damping is in full-size units: λ is added to the full-size curvature before the projection
# P = P_out ⊗ P_in sees it, so the damped projected curvature is H + λ P Pᵀ.


def projection_gram(store: logra.GradientStore, layer: logra.LayerInfo) -> tuple[Tensor, Tensor]:
    """(P_out P_outᵀ, P_in P_inᵀ) of one layer, from projections drawn here with `make_projection`."""
    from logra.capture import make_projection
    from logra.capture.projection import SHARED_INPUT

    config = store.config
    in_name = SHARED_INPUT if config.share_input_projection and config.init.value != "pca" else layer.name
    p_in = make_projection(config.init, config.seed, in_name, "in", layer.k_in, layer.n_in)
    p_out = make_projection(config.init, config.seed, layer.name, "out", layer.k_out, layer.n_out)
    return p_out @ p_out.T, p_in @ p_in.T


def dense_gram(store: logra.GradientStore, layer: logra.LayerInfo) -> Tensor:
    """P Pᵀ = kron(P_out P_outᵀ, P_in P_inᵀ), (k_out*k_in)^2: what λ becomes in the projected space."""
    return torch.kron(*projection_gram(store, layer))


def dense_curvature(method: str, store: logra.GradientStore, layer: logra.LayerInfo) -> Tensor:
    """The undamped (k_out*k_in)^2 curvature of one layer, built by hand (float64).

    kfac: kron(S, A).  ekfac: the kfac basis with eigenvalues the mean squared coordinates of the
    stored rows; the basis is scipy's generalized eigenvectors B of (S, P_out P_outᵀ) and (A,
    P_in P_inᵀ) (Bᵀ M B = I; the ordinary eigenbasis where M = I), and the curvature M B diag(m) Bᵀ M.
    raw: the mean outer product of the stored rows.
    """
    rows = store.layer_rows(layer.name).to(torch.float64)  # (N, s)
    stats = store.statistics()[layer.name]
    S = stats.grad_sum / stats.n_examples
    A = stats.input_sum / stats.n_tokens
    if method == "kfac":
        return torch.kron(S, A)
    if method == "ekfac":
        from scipy.linalg import eigh

        m_out, m_in = projection_gram(store, layer)
        b_s = torch.from_numpy(eigh(S.numpy(), m_out.numpy())[1])
        b_a = torch.from_numpy(eigh(A.numpy(), m_in.numpy())[1])
        basis = torch.kron(b_s, b_a)  # columns: generalized eigenvectors in row-major vec order
        lam = (rows @ basis).square().mean(0)
        t = dense_gram(store, layer) @ basis
        return t @ torch.diag(lam) @ t.T
    if method == "raw":
        return rows.T @ rows / rows.shape[0]
    raise ValueError(method)


def dense_inverse(method: str, store: logra.GradientStore, damping: dict[str, float]) -> Tensor:
    """The block-diagonal (D, D) inverse of H + λ P Pᵀ per layer, by torch.linalg.inv."""
    blocks = []
    for layer in store.layers:
        if method == "identity":
            blocks.append(torch.eye(layer.size, dtype=torch.float64))
            continue
        H = dense_curvature(method, store, layer) + damping[layer.name] * dense_gram(store, layer)
        blocks.append(torch.linalg.inv(H))
    return torch.block_diag(*blocks)
