"""Shared pieces of the tabular examples: data, a small MLP, training, logging and scoring.

Each example script stays about its question (misclassification, mislabelled data, privacy,
groups); the mechanics live here once. Everything is float64 and seeded, so runs are repeatable.
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import logra
from logra.curvature import fit_preconditioner
from logra.score import Scorer

REPO = Path(__file__).resolve().parent.parent


@dataclass
class Split:
    """Standardised features and integer labels: x_train (N, d), y_train (N,), x_test, y_test."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    feature_names: list[str]
    classes: list[str]


def load_split(name: str, seed: int = 0, test_fraction: float = 0.2, limit: int | None = None) -> Split:
    """scikit-learn's `breast_cancer` or `digits` (both ship with scikit-learn), split and standardised."""
    from sklearn import datasets
    from sklearn.model_selection import train_test_split

    loader = {"breast_cancer": datasets.load_breast_cancer, "digits": datasets.load_digits}[name]
    bunch = loader()
    x, y = bunch.data, bunch.target
    if limit is not None:
        x, y = x[:limit], y[:limit]
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_fraction, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-8
    as_t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    names = [str(n) for n in getattr(bunch, "feature_names", [f"x{i}" for i in range(x.shape[1])])]
    return Split(
        as_t((x_tr - mean) / std),
        torch.tensor(y_tr),
        as_t((x_te - mean) / std),
        torch.tensor(y_te),
        names,
        [str(c) for c in bunch.target_names],
    )


def make_mlp(d_in: int, n_classes: int, hidden: int = 32, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, n_classes)).double()


def train(
    model: nn.Module, x: Tensor, y: Tensor, epochs: int = 300, lr: float = 0.01, weight_decay: float = 1e-3
) -> nn.Module:
    """Full-batch Adam on the mean cross-entropy (deterministic)."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
    for _ in range(epochs):
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        optimizer.step()
    return model.eval()


def per_example_loss(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """(B,) cross-entropy of each example."""
    return F.cross_entropy(model(x), y, reduction="none")


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


def config(k: int = 16) -> logra.LoGraConfig:
    return logra.LoGraConfig(k_in=k, k_out=k, dtype="float64")


def log_store(
    model: nn.Module, x: Tensor, y: Tensor, path: Path, cfg: logra.LoGraConfig, batch: int = 128
) -> logra.GradientStore:
    """Log every training example (id = row index) into a fresh store at `path`."""
    shutil.rmtree(path, ignore_errors=True)
    with logra.GradientLogger(model, cfg, store=path) as logger:
        for idx in torch.arange(len(x)).split(batch):
            with logger.record(ids=idx):
                per_example_loss(model, x[idx], y[idx]).sum().backward()
    model.zero_grad(set_to_none=True)
    return logra.GradientStore.open(path)


def query_rows(model: nn.Module, x: Tensor, y: Tensor, cfg: logra.LoGraConfig) -> Tensor:
    """(Q, D) projected gradients of each query's own loss (nothing written to disk)."""
    with logra.GradientLogger(model, cfg) as logger, logger.record(ids=range(len(x))) as rec:
        per_example_loss(model, x, y).sum().backward()
    model.zero_grad(set_to_none=True)
    assert rec.rows is not None
    return rec.rows


def scorer(store: logra.GradientStore, method: str = "kfac", normalization: str = "dot") -> Scorer:
    return Scorer(store, fit_preconditioner(store, method=method), normalization=normalization, progress=False)


def parser(doc: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="a reduced run (seconds), as the smoke test does")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "examples", help="where stores are written")
    p.add_argument("--seed", type=int, default=0)
    return p


def table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> str:
    """A plain fixed-width text table."""
    cells = [[str(h) for h in header]] + [[f"{c:.4g}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def rank_fraction(order: np.ndarray, targets: set[int], fraction: float) -> float:
    """The share of `targets` found among the first `fraction` of `order`."""
    top = order[: max(1, int(round(fraction * len(order))))]
    return len(targets.intersection(top.tolist())) / max(len(targets), 1)
