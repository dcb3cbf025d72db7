"""Streaming Kronecker statistics of projected activations and output gradients.

Per layer, in float64: A_sum = Σ_t x̃_t x̃_tᵀ (k_in, k_in), S_sum = Σ_t g̃_t g̃_tᵀ (k_out, k_out),
summed over unmasked tokens t of every logged example, plus the token and example counts.
Sums, not means, so statistics of disjoint parts of a corpus (shards, ranks, resumed runs) merge
by addition. KFAC's factors are A = A_sum / n_tokens and S = S_sum / n_examples (so that
S ⊗ A approximates E_i[vec(G_i) vec(G_i)ᵀ] for per-example gradients G_i summed over tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


def outer(x: Tensor) -> Tensor:
    """xᵀx of flattened tokens x (M, k) as a float64 CPU (k, k) tensor."""
    return (x.T @ x).to(device="cpu", dtype=torch.float64)


@dataclass
class KroneckerStatistics:
    """Sums for one layer. `input_sum` (k_in, k_in), `grad_sum` (k_out, k_out), float64."""

    input_sum: Tensor
    grad_sum: Tensor
    n_tokens: int = 0
    n_examples: int = 0

    @classmethod
    def zeros(cls, k_in: int, k_out: int) -> KroneckerStatistics:
        return cls(torch.zeros(k_in, k_in, dtype=torch.float64), torch.zeros(k_out, k_out, dtype=torch.float64))

    def add_(self, x: Tensor, g: Tensor, n_tokens: int, n_examples: int, input_outer: Tensor | None = None) -> None:
        """Accumulate flattened projected tokens. x: (M, k_in), g: (M, k_out); masked rows are zero.

        input_outer: xᵀx when the caller already has it (float64 CPU), e.g. from a layer that read
        the same projected input.
        """
        self.input_sum += outer(x) if input_outer is None else input_outer
        self.grad_sum += outer(g)
        self.n_tokens += int(n_tokens)
        self.n_examples += int(n_examples)

    def __add__(self, other: KroneckerStatistics) -> KroneckerStatistics:
        return KroneckerStatistics(
            self.input_sum + other.input_sum,
            self.grad_sum + other.grad_sum,
            self.n_tokens + other.n_tokens,
            self.n_examples + other.n_examples,
        )

    def input_covariance(self) -> Tensor:
        """A = Σ x̃x̃ᵀ / n_tokens, (k_in, k_in) float64."""
        return self.input_sum / max(self.n_tokens, 1)

    def grad_covariance(self) -> Tensor:
        """S = Σ g̃g̃ᵀ / n_examples, (k_out, k_out) float64."""
        return self.grad_sum / max(self.n_examples, 1)

    def copy(self) -> KroneckerStatistics:
        return KroneckerStatistics(self.input_sum.clone(), self.grad_sum.clone(), self.n_tokens, self.n_examples)


def statistics_to_arrays(stats: dict[str, KroneckerStatistics]) -> dict[str, np.ndarray]:
    """Flatten {layer: stats} to named numpy arrays (for an .npz file; no pickle)."""
    arrays: dict[str, np.ndarray] = {}
    for i, s in enumerate(stats.values()):
        arrays[f"{i}.input_sum"] = s.input_sum.numpy()
        arrays[f"{i}.grad_sum"] = s.grad_sum.numpy()
        arrays[f"{i}.counts"] = np.array([s.n_tokens, s.n_examples], dtype=np.int64)
    return arrays


def statistics_from_arrays(names: list[str], arrays: dict[str, np.ndarray]) -> dict[str, KroneckerStatistics]:
    """Inverse of `statistics_to_arrays`, given the layer names in order."""
    out: dict[str, KroneckerStatistics] = {}
    for i, name in enumerate(names):
        counts = arrays[f"{i}.counts"]
        out[name] = KroneckerStatistics(
            torch.from_numpy(np.array(arrays[f"{i}.input_sum"], dtype=np.float64)),
            torch.from_numpy(np.array(arrays[f"{i}.grad_sum"], dtype=np.float64)),
            int(counts[0]),
            int(counts[1]),
        )
    return out
