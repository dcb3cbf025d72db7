"""The vocabulary every stage shares: example ids, the layer table, Kronecker sums, enum parsing.

Capture produces these, the store persists them, curvature and scoring consume them; this module
knows nothing about any of those stages (it imports only torch, numpy and `logra.errors`).

- `ExampleId`: an int or a str; `normalize_ids` turns a list, a 1-D tensor or an array into them.
- `LayerInfo`: one row of a store's layer table (widths, k, the columns of a row it owns).
- `KroneckerStatistics`: per layer, in float64, A_sum = Σ_t x̃_t x̃_tᵀ (k_in, k_in) and
  S_sum = Σ_t g̃_t g̃_tᵀ (k_out, k_out) over unmasked tokens t of every logged example, with token
  and example counts. Sums, not means, so statistics of disjoint parts of a corpus (shards,
  ranks, resumed runs) merge by addition. KFAC's factors are A = A_sum / n_tokens and
  S = S_sum / n_examples (so that S ⊗ A approximates E_i[vec(G_i) vec(G_i)ᵀ]).
- `parse_enum`: the one parser of every enum-valued option, with an error naming the choices.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from logra.errors import ConfigError, StoreError

ExampleId = int | str
IdsLike = Sequence[ExampleId] | Tensor | np.ndarray  # what `normalize_ids` accepts
_E = TypeVar("_E", bound=enum.Enum)


def parse_enum(kind: type[_E], value: object, name: str) -> _E:
    """`kind(value)` for a member or its value, or a ConfigError naming `name`, the value and the choices."""
    try:
        return kind(value)
    except ValueError:
        choices = ", ".join(repr(m.value) for m in kind)
        raise ConfigError(f"{name}={value!r} is not one of {choices}.") from None


def enum_values(kind: type[enum.Enum]) -> list[str]:
    """The values of an enum's members, in order: the `choices=` of a command-line option."""
    return [str(m.value) for m in kind]


def normalize_ids(ids: IdsLike) -> list[ExampleId]:
    """Ids as a list of Python ints or strs. Accepts a list, a 1-D tensor or a numpy array."""
    if isinstance(ids, Tensor):
        if ids.dim() != 1 or ids.is_floating_point() or ids.is_complex() or ids.dtype is torch.bool:
            raise StoreError(f"ids tensor of shape {tuple(ids.shape)} and dtype {ids.dtype} must be 1-D integer.")
        return [int(i) for i in ids.tolist()]
    if isinstance(ids, np.ndarray):
        ids = ids.tolist()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
        raise StoreError(f"ids={ids!r} must be a sequence of ints or strs, one per example of the batch.")
    out: list[ExampleId] = []
    for i in ids:
        if isinstance(i, (bool, np.bool_)):
            raise StoreError(f"example id {i!r} is a bool; use ints or strs.")
        if isinstance(i, (int, np.integer)):
            out.append(int(i))
        elif isinstance(i, str):
            out.append(i)
        else:
            raise StoreError(f"example id {i!r} of type {type(i).__name__} must be an int or a str.")
    return out


@dataclass(frozen=True)
class LayerInfo:
    """One logged layer: its widths, projection sizes and its columns in a store row."""

    name: str
    kind: str
    n_in: int  # input width, plus one when the bias column is logged
    n_out: int
    k_in: int
    k_out: int
    bias: bool  # whether the last input column is the bias' constant 1
    offset: int  # first column of this layer in a row

    @property
    def size(self) -> int:
        return self.k_out * self.k_in

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "kind": self.kind, "n_in": self.n_in, "n_out": self.n_out,
            "k_in": self.k_in, "k_out": self.k_out, "bias": self.bias, "offset": self.offset,
        }  # fmt: skip


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
