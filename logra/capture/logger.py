"""`GradientLogger`: one logging pass that glues capture, statistics and the store.

    with logra.GradientLogger(model, config, store="runs/train") as logger:
        for batch in loader:
            with logger.record(ids=batch["idx"], mask=batch["attention_mask"]):
                per_example_loss(model, batch).sum().backward()

Inside `record()` the user runs their own forward and backward. The loss to backpropagate is the
*sum* of per-example losses (or their mean over the batch with `loss_reduction="mean"`); each
logged row is then the projected gradient of that example's own loss. Without a store the logger
computes rows in memory (queries): `with logger.record(ids) as rec: ...`. The `Record` carries the
config, layer table and model fingerprint its rows were logged with, so pass the record itself (or
a `QueryRows` of several) to the `Scorer`, which checks them against the store.
"""

from __future__ import annotations

import functools
import hashlib
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from logra.capture.adapters import LayerAdapter, layer_weight, select_layers
from logra.capture.hooks import LayerCapture, per_example_gradients
from logra.capture.layers import layer_table, scaled_projections, shares_input_projection
from logra.capture.rows import Record
from logra.config import LoGraConfig, LossReduction, NonFinitePolicy
from logra.errors import CaptureError, ConfigError, NonFiniteGradientError, StoreError
from logra.store.reader import GradientStore
from logra.store.writer import StoreWriter
from logra.types import ExampleId, IdsLike, KroneckerStatistics, normalize_ids, outer

if TYPE_CHECKING:
    from logra.curvature.optimizer import OptimizerCorrection

DEFAULT_SHARD_BYTES = 256 * 2**20


class _Batch:
    """The open record block: its ids and mask, as the hooks see them."""

    def __init__(self, ids: list[ExampleId], mask: Tensor | None) -> None:
        self.ids = ids
        self.size = len(ids)
        self.mask = mask
        self._mask_cache: dict[tuple[torch.device, torch.dtype], Tensor] = {}
        # id(P_in) -> (weak reference to the last input x, its version, x̃), for the capture hooks.
        self.projected_inputs: dict[int, tuple[Any, int, Tensor]] = {}

    def mask_for(self, m: int, layer: str, device: torch.device, dtype: torch.dtype) -> Tensor | None:
        """The (B, M) mask for a layer whose input has M positions per example, or None.

        A layer with plain (B, d) inputs (M == 1) under a longer mask sees whole examples: no mask.
        """
        if self.mask is None or (m == 1 and self.mask.shape[1] != 1):
            return None
        if self.mask.shape[1] != m:
            raise CaptureError(
                f"layer {layer!r} sees {m} positions per example but the mask has shape {tuple(self.mask.shape)}; "
                "pass a (batch, sequence) mask matching the inputs of the logged layers."
            )
        key = (device, dtype)
        if key not in self._mask_cache:
            self._mask_cache[key] = self.mask.to(device=device, dtype=dtype)
        return self._mask_cache[key]


def model_fingerprint(model: nn.Module, layers: list[tuple[str, nn.Module, type[LayerAdapter]]]) -> str:
    """A hash of the selected layers' names, shapes, dtypes and a strided sample of their weights."""
    h = hashlib.sha256()
    for name, module, _ in layers:
        w = layer_weight(module).detach()
        full_tensor: Any = getattr(w, "full_tensor", None)
        if callable(full_tensor):  # an FSDP2/tensor-parallel DTensor: hash the whole weight (a collective)
            w = full_tensor()
        h.update(f"{name}|{type(module).__name__}|{tuple(w.shape)}|{w.dtype}".encode())
        flat = w.reshape(-1)
        step = max(1, flat.numel() // 4096)
        h.update(flat[::step].to("cpu", torch.float32).numpy().tobytes())
    return h.hexdigest()[:16]


class GradientLogger:
    """Attach LoGra capture to `model`, optionally writing rows to a store.

    Args:
        model: any nn.Module; it is not modified (hooks are removed by `close()`).
        config: what to log. Default: every Linear/Conv1D layer at 64x64, gaussian, seed 0.
        store: a directory to write rows to (created or resumed), or None for in-memory rows.
        shard_rows: rows per shard; default: as many as fit in 256 MiB. Does not change results.
        statistics: accumulate Kronecker statistics (needed by kfac/ekfac preconditioners).
        rank: writer rank for distributed logging (shard files are per rank). Default: the
            rank of the initialised process group (torchrun, accelerate), else 0.
        world_size: number of logging processes; with more than one, each rank keeps its own
            manifest until `logra.distributed.finalize_store` merges them (see `logra.distributed`).
            Default: the process group's size, else 1. Taken from the group (both left None,
            a store given, more than one process), the ranks are checked to agree before
            anything is logged and the store is merged when the `with` block ends without an
            error (or by `logra.distributed.finalize_store(logger)` on every rank).
        correction: the `OptimizerCorrection` (Adam's factorised second moments) the config names in
            `optimizer_correction`, folded into the projections; required exactly when it names one.
            Saved into the store, so the query side can take it back with `from_store(store)`.
    """

    def __init__(
        self,
        model: nn.Module,
        config: LoGraConfig | None = None,
        store: str | os.PathLike[str] | None = None,
        *,
        shard_rows: int | None = None,
        statistics: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        correction: OptimizerCorrection | None = None,
    ) -> None:
        self.model = model
        self._merge_on_exit = False
        self.config = config if config is not None else LoGraConfig()
        if not isinstance(self.config, LoGraConfig):
            raise ConfigError(f"config must be a LoGraConfig, got {type(config).__name__}.")
        self._batch: _Batch | None = None
        self._captures: list[LayerCapture] = []
        self._writer: StoreWriter | None = None
        self._writing = False  # True while a batch updates statistics and store; stays True if that fails
        self._track_statistics = statistics
        selected = select_layers(model, self.config.modules, self.config.exclude)
        on_meta = [name for name, module, _ in selected if layer_weight(module).device.type == "meta"]
        if on_meta:
            raise CaptureError(
                f"layers {on_meta[:5]} have weights on the meta device (not materialised), so they cannot be "
                "logged; load the weights first (e.g. from_pretrained without device_map='meta', or "
                "model.to_empty(device='cpu') followed by load_state_dict)."
            )
        try:
            # Projections are redrawn from their seed when needed: no float64 copy is held (they can be
            # hundreds of MB for a large model); kept after close() for `projection()`.
            self.layers, self._projections = layer_table(self.config, selected)
            self.correction = self._fold_correction(correction)
            self._attach_hooks(selected)
            self.dim = sum(layer.size for layer in self.layers)
            self.model_fingerprint = model_fingerprint(model, selected)
            self._stats: dict[str, KroneckerStatistics] = {
                layer.name: KroneckerStatistics.zeros(layer.k_in, layer.k_out) for layer in self.layers
            }
            if store is not None:
                self._open_store(store, shard_rows, *self._rank_world(rank, world_size))
        except BaseException:
            self.close()
            raise

    def _rank_world(self, rank: int | None, world_size: int | None) -> tuple[int, int]:
        """(rank, world_size) as given, or from the process group (then ranks must agree, checked here)."""
        if rank is not None and world_size is not None:
            return rank, world_size
        if rank is not None or world_size is not None:
            raise ConfigError(
                f"rank={rank!r}, world_size={world_size!r}: pass both, or neither to take them from the "
                "initialised process group."
            )
        from logra import distributed  # imports this module: only at call time

        rank, world_size = distributed.rank_world()
        if world_size > 1:
            distributed.check_agreement(self)
            self._merge_on_exit = True
        return rank, world_size

    def _attach_hooks(self, selected: list[tuple[str, nn.Module, type[LayerAdapter]]]) -> None:
        """One `LayerCapture` per logged layer; layers of one input width share P_in when configured."""
        shared = shares_input_projection(self.config) and self.correction is None  # corrected P_in are per layer
        shared_inputs: dict[tuple[Any, ...], Tensor] | None = {} if shared else None
        scaled = self.correction is not None
        for info, (_, module, _) in zip(self.layers, selected):
            source = self._projections[info.name]
            self._captures.append(LayerCapture(info, module, source, lambda: self._batch, shared_inputs, scaled))

    def _fold_correction(self, correction: OptimizerCorrection | None) -> OptimizerCorrection | None:
        """Check `correction` against the config and fold its scalings into every layer's projections."""
        from logra.curvature.optimizer import OptimizerCorrection  # curvature imports capture: at call time

        if correction is None:
            if self.config.optimizer_correction is not None:
                raise ConfigError(
                    f"the config names optimizer_correction={self.config.optimizer_correction!r} but no correction "
                    "was given; pass GradientLogger(..., correction=OptimizerCorrection.from_store(store)) (or the "
                    "correction the store was logged with)."
                )
            return None
        if not isinstance(correction, OptimizerCorrection):
            raise ConfigError(f"correction must be an OptimizerCorrection, got {type(correction).__name__}.")
        correction.check(self.config, self.layers)
        for info in self.layers:
            scale_out, scale_in = correction.scales[info.name]
            self._projections[info.name] = functools.partial(
                scaled_projections, self._projections[info.name], scale_in, scale_out
            )
        return correction

    def _open_store(self, store: str | os.PathLike[str], shard_rows: int | None, rank: int, world_size: int) -> None:
        """Create or resume the store; a resumed store's statistics become this logger's running sums."""
        itemsize = self.config.dtype.itemsize
        rows = shard_rows if shard_rows is not None else max(1, DEFAULT_SHARD_BYTES // (self.dim * itemsize))
        self._writer = StoreWriter(store, self.config, self.model_fingerprint, self.layers, rows, rank, world_size)
        if self.correction is not None and rank == 0:  # the scorer's query side reads it back from the store
            from logra.curvature.optimizer import CORRECTION_FILE

            self.correction.save(self._writer.root / CORRECTION_FILE)
        manifest = self._writer.manifest
        statistics = self._track_statistics
        if (manifest.shards or manifest.skipped) and (manifest.statistics is not None) != statistics:
            raise StoreError(
                f"the store at {self._writer.root} was logged with statistics={not statistics}; resume it with "
                f"GradientLogger(..., statistics={not statistics}) so that its statistics cover every row."
            )
        if manifest.statistics is not None and statistics:
            self._stats = GradientStore(self._writer.root, manifest).statistics()

    # ---------------------------------------------------------------- public surface

    @property
    def committed_ids(self) -> frozenset[ExampleId]:
        """Ids already durable in the store: skip them when resuming. Empty without a store."""
        return self._writer.committed_ids if self._writer is not None else frozenset()

    @property
    def store_path(self) -> Path | None:
        return self._writer.root if self._writer is not None else None

    def projection(self, name: str) -> tuple[Tensor, Tensor]:
        """(P_in (k_in, n_in), P_out (k_out, n_out)) of layer `name`, float64 CPU copies (also after close)."""
        if name not in self._projections:
            raise ConfigError(f"layer {name!r} is not logged; logged layers are {list(self._projections)}.")
        return self._projections[name]()  # freshly drawn: the caller owns them

    def statistics(self) -> dict[str, KroneckerStatistics]:
        """Kronecker sums over every row logged so far (copies)."""
        return {name: s.copy() for name, s in self._stats.items()}

    @contextmanager
    def record(self, ids: IdsLike, mask: Tensor | None = None, *, param_grads: bool = True) -> Iterator[Record]:
        """Capture the per-example gradients of the forward and backward run inside the block.

        Args:
            ids: B example ids (ints or strs, a list or 1-D tensor), one per batch row.
            mask: optional (B, T) mask; positions where it is 0 are excluded (padding).
            param_grads: when False, every parameter of the model is frozen for the duration of the
                block (flags restored on exit), so backward computes only the activation gradients
                the hooks need and skips the weight gradients: a pure logging pass is then cheaper
                than a plain forward+backward. Rows are the same either way. Keep True inside a
                training loop that needs `.grad`.

        Yields a `Record` whose `rows` (B, D) are set when the block exits.
        """
        if self._batch is not None:
            raise CaptureError("record() blocks cannot be nested; close the open one first.")
        if not self._captures:
            raise CaptureError("this GradientLogger is closed; create a new one.")
        if self._writing:
            raise CaptureError(
                "an earlier batch failed while its statistics and rows were being recorded, so this logger's state "
                "is inconsistent; create a new GradientLogger (it resumes from the store's committed shards)."
            )
        id_list = normalize_ids(ids)
        if not id_list:
            raise CaptureError("record() got no ids: every batch needs at least one example.")
        if self._writer is not None:
            self._writer.check_new(id_list)
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != len(id_list):
                shape = tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__
                raise CaptureError(f"mask of shape {shape} must be a (batch={len(id_list)}, sequence) tensor.")
            if mask.dtype != torch.bool and not ((mask == 0) | (mask == 1)).all():
                raise CaptureError(
                    f"mask has values other than 0 and 1 (dtype {mask.dtype}); it selects tokens, it does not weight "
                    "them. Pass a 0/1 or bool mask (e.g. the attention mask) and weight the loss instead."
                )
        record = Record(
            id_list, config=self.config, model_fingerprint=self.model_fingerprint, layers=tuple(self.layers)
        )
        frozen = [] if param_grads else [p for p in self.model.parameters() if p.requires_grad]
        self._batch = _Batch(id_list, mask)
        try:
            for p in frozen:
                p.requires_grad_(False)
            yield record
        except BaseException:
            for capture in self._captures:
                capture.take()
            raise
        finally:
            self._batch = None
            for p in frozen:
                p.requires_grad_(True)
        self._finish(record)

    def close(self) -> None:
        """Commit every complete batch and remove all hooks. Idempotent."""
        for capture in self._captures:
            capture.close()
        self._captures = []
        writer = self._writer
        if writer is not None:
            try:  # after a batch failed half-way its statistics may be partly added: commit nothing then
                writer.close(self._stats if self._track_statistics else None, commit=not self._writing)
            finally:
                self._writer = None

    def __enter__(self) -> GradientLogger:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if self._merge_on_exit and exc_type is None:
            from logra.distributed import finalize_store

            finalize_store(self)  # closes, all-reduces the statistics, rank 0 writes manifest.json
        else:
            self.close()

    # ---------------------------------------------------------------- assembly

    def _finish(self, record: Record) -> None:
        B = len(record.ids)
        calls = [capture.take() for capture in self._captures]
        if not any(calls):
            raise CaptureError(
                "no logged layer ran a forward pass inside record(); run the model's forward inside the block."
            )
        if all(c.g is None for layer_calls in calls for c in layer_calls):
            raise CaptureError(
                "no gradient reached the logged layers inside record(); call loss.backward() inside the block "
                "(on the sum of per-example losses)."
            )
        scale = float(B) if self.config.loss_reduction is LossReduction.MEAN else 1.0
        parts = []
        for info, layer_calls in zip(self.layers, calls):
            for c in layer_calls:
                if c.g is not None and scale != 1.0:
                    c.g = c.g * scale
            grad = per_example_gradients(layer_calls, B, info.k_out, info.k_in)
            if grad is None:  # the layer was not on the loss' path: its gradient is zero
                grad = torch.zeros(B, info.k_out, info.k_in, dtype=_dtype_of(calls), device=_device_of(calls))
            parts.append(grad.reshape(B, -1))
        rows = torch.cat([p.to(parts[0].dtype) for p in parts], dim=1)  # (B, D)
        # One pass over the rows for both checks: a row's largest |entry| is NaN when it holds a NaN
        # (amax propagates NaN), inf when it holds an inf, and 0 exactly when every entry is zero.
        # About 20x cheaper than isfinite(rows).all() followed by (rows == 0).all() at D ~ 10^5.
        peak = rows.abs().amax(dim=1)  # (B,)
        bad = ~torch.isfinite(peak)
        keep = ~bad
        skipped = [i for i, b in zip(record.ids, bad.tolist()) if b]
        if skipped and self.config.nonfinite is NonFinitePolicy.RAISE:
            raise NonFiniteGradientError(
                f"the gradients of examples {skipped[:10]}{' ...' if len(skipped) > 10 else ''} contain NaN or Inf; "
                "nothing of this batch was written. Fix the loss (e.g. a log of 0), or pass "
                "LoGraConfig(nonfinite='skip') to drop and record such examples."
            )
        kept_ids = [i for i, b in zip(record.ids, bad.tolist()) if not b]
        zero = peak == 0
        if skipped:
            rows, zero = rows[keep], zero[keep]
        if bool(zero.any()):
            ids = [i for i, z in zip(kept_ids, zero.tolist()) if z]
            warnings.warn(
                f"the rows of examples {ids[:10]}{' ...' if len(ids) > 10 else ''} are all zero: no gradient reached "
                "the logged layers (e.g. a one-token text, a prompt that fills max_length, or a mask of zeros), so "
                "they get score 0 against everything. Check their targets and masks.",
                UserWarning,
                stacklevel=4,
            )
        self._writing = True  # statistics and pending rows change together, or the logger refuses to go on
        if self._track_statistics and kept_ids:
            outers: dict[int, Tensor] = {}  # id(x̃) -> x̃ᵀx̃, for layers that read one projected input
            for info, layer_calls in zip(self.layers, calls):
                _accumulate(self._stats[info.name], layer_calls, keep if skipped else None, len(kept_ids), outers)
        record.ids, record.rows, record.skipped = kept_ids, rows, skipped
        if self._writer is not None:
            self._writer.append(kept_ids, rows, skipped)
            self._writer.commit_if_full(self._stats if self._track_statistics else None)
        self._writing = False


def _dtype_of(calls: list[list[Any]]) -> torch.dtype:
    return next(c.x.dtype for layer_calls in calls for c in layer_calls)


def _device_of(calls: list[list[Any]]) -> torch.device:
    return next(c.x.device for layer_calls in calls for c in layer_calls)


def _accumulate(
    stats: KroneckerStatistics, calls: list[Any], keep: Tensor | None, n_examples: int, outers: dict[int, Tensor]
) -> None:
    """Add one batch's tokens of one layer to its statistics (only the kept examples).

    Every kept example counts in n_examples, also when no gradient reached this layer in this batch
    (its gradient is then zero, which is part of the expectation S estimates). A forward call that
    got no gradient adds no tokens: it is either off the loss' path or the discarded first pass of
    activation checkpointing, whose recomputation is the call that counts.
    """
    for c in calls:
        x, g, mask = c.x, c.g, c.mask
        if g is None:
            continue
        if keep is not None:
            x, g = x[keep], g[keep]
            mask = mask[keep] if mask is not None else None
        n_tokens = int(mask.sum().item()) if mask is not None else x.shape[0] * x.shape[1]
        flat = x.reshape(-1, x.shape[-1])
        if id(c.x) not in outers:  # c.x outlives this loop (the calls hold it), so its id is not reused
            outers[id(c.x)] = outer(flat)
        stats.add_(flat, g.reshape(-1, g.shape[-1]), n_tokens, 0, input_outer=outers[id(c.x)])
    stats.n_examples += n_examples
