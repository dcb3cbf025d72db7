"""What a logging pass hands back: a `Record` per `record()` block, and `QueryRows` for scoring.

Both carry the config, layer table and model fingerprint their rows were logged with, so the
`Scorer` can check them against a store before it scores anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from logra.config import LoGraConfig
from logra.errors import ConfigError, DuplicateIdError
from logra.types import ExampleId, LayerInfo


@dataclass
class Record:
    """The result of one `record()` block, filled when the block exits.

    ids: the ids whose rows were kept.  rows: (len(ids), D) projected per-example gradients in
    the compute dtype (float32 for half-precision models), on the model's device.
    skipped: ids dropped for NaN/Inf under `nonfinite="skip"`.
    config, model_fingerprint, layers: what the rows were logged with (the Scorer checks them).
    """

    ids: list[ExampleId]
    rows: Tensor | None = None
    skipped: list[ExampleId] = field(default_factory=list)
    config: LoGraConfig | None = None
    model_fingerprint: str | None = None
    layers: tuple[LayerInfo, ...] | None = None


@dataclass(frozen=True)
class QueryRows:
    """Query rows with their provenance: ids (Q), rows (Q, D), and the config, model fingerprint
    and layer table they were logged with. Ids must be unique. Build one from records with
    `QueryRows.of(records)`; `integrations.hf.trainer_rows` returns one."""

    ids: list[ExampleId]
    rows: Tensor
    config: LoGraConfig
    model_fingerprint: str
    layers: tuple[LayerInfo, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.rows, Tensor) or self.rows.dim() != 2 or self.rows.shape[0] != len(self.ids):
            shape = tuple(self.rows.shape) if isinstance(self.rows, Tensor) else type(self.rows).__name__
            raise ConfigError(f"QueryRows needs (Q={len(self.ids)}, D) rows, one per id; got {shape}.")
        seen: set[ExampleId] = set()
        twice = [i for i in self.ids if i in seen or seen.add(i)]  # type: ignore[func-returns-value]
        if twice:
            raise DuplicateIdError(f"query ids {twice[:10]} appear more than once; give every query its own id.")

    @classmethod
    def of(cls, records: list[Record]) -> QueryRows:
        """The rows of several `Record`s of one logger, in order (float64 on the CPU)."""
        first = records[0] if records else Record([])
        if first.config is None or first.model_fingerprint is None:
            raise ConfigError("QueryRows.of needs at least one Record filled by GradientLogger.record.")
        rows = [r.rows.detach().to("cpu", torch.float64) for r in records if r.rows is not None]
        dim = sum(x.size for x in first.layers or ())
        return cls(
            [i for r in records for i in r.ids],
            torch.cat(rows) if rows else torch.zeros(0, dim, dtype=torch.float64),
            first.config,
            first.model_fingerprint,  # checked above
            tuple(first.layers or ()),
        )
