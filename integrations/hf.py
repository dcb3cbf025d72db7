"""A logging pass through a user's Hugging Face `Trainer`: its model, dataset, collator and loss.

    store = log_trainer(trainer, LoGraConfig(modules=["*mlp*"]), "runs/train")            # train side
    queries = trainer_rows(trainer, config, query_dataset)                               # query side
    fisher = trainer_fisher(trainer, config)              # optional: the true Fisher, for fit_preconditioner

No optimizer step is taken and the model's parameters and `.grad` are left as they were: the
model runs in eval mode (no dropout) with its parameters frozen for the pass, so backward computes
only the activation gradients the hooks need. Each logged row is the gradient of one example's
own loss L_i, defined as the Trainer's loss on that example *alone*:

- loss="per_example" runs whole batches and computes L_i from the logits with `logra.losses`
  (causal LM: mean token cross-entropy over the example's labels != -100; sequence
  classification: cross-entropy / MSE / BCE as in the model's `problem_type`);
- loss="compute_loss" calls `trainer.compute_loss` on each example alone (exact for any custom
  loss, one forward/backward per example);
- loss="auto" picks per_example unless the Trainer's loss is customised (an overridden
  `compute_loss`, a `compute_loss_func` or label smoothing), then compute_loss.

Ids come from the dataset (`id_column`) or are its row indices, so scores join back to rows.
Under `torchrun` / `accelerate launch` every rank logs a contiguous share into its own shards and
one manifest lists them all (see `logra.distributed`); the result is the same store.
"""

from __future__ import annotations

import enum
import os
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from logra import distributed
from logra.capture import GradientLogger
from logra.capture.rows import QueryRows  # rows with their config and model fingerprint (re-exported)
from logra.config import LoGraConfig
from logra.curvature.fisher import FisherLabels, true_fisher_statistics
from logra.curvature.moments import FisherStatistics
from logra.curvature.precondition import PreconditionerMethod
from logra.errors import CaptureError, ConfigError
from logra.estimate import estimate_run
from logra.losses import Task, TokenReduction, detect_task, hf_logits_fn, per_example_losses
from logra.store import GradientStore
from logra.streaming import is_stream, stream_batches
from logra.types import ExampleId, parse_enum

from .hf_data import MODEL_INPUTS as MODEL_INPUTS  # re-exported
from .hf_data import collate, collate_features, dataset_ids, model_columns, tokenized_dataset


class LossMode(str, enum.Enum):
    """How per-example losses are obtained (see the module docstring)."""

    AUTO = "auto"
    PER_EXAMPLE = "per_example"
    COMPUTE_LOSS = "compute_loss"


def _loss_is_customised(trainer: Any) -> bool:
    from transformers import Trainer

    return (
        type(trainer).compute_loss is not Trainer.compute_loss
        or getattr(trainer, "compute_loss_func", None) is not None
        or getattr(trainer, "label_smoother", None) is not None
    )


def _is_fsdp(model: nn.Module) -> bool:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for the block (no dropout); every module's training flag restored afterwards."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# --------------------------------------------------------------------------------------------
# The pass.


@dataclass(frozen=True)
class _Pass:
    trainer: Any
    dataset: Any
    ids: list[ExampleId]
    mode: LossMode
    task: Task | None
    token_reduction: TokenReduction
    mask_key: str | None
    batch_size: int


def _prepare(
    trainer: Any, dataset: Any, id_column: str | None, loss: Any, task: Any, token_reduction: Any,
    mask_key: str | None, batch_size: int | None, text_column: str | None = None,
) -> _Pass:  # fmt: skip
    dataset = trainer.train_dataset if dataset is None else dataset
    if dataset is None:
        raise ConfigError("the Trainer has no train_dataset; pass dataset=... to log.")
    dataset = tokenized_dataset(trainer, dataset, id_column, text_column)
    mode = parse_enum(LossMode, loss, "loss")
    if mode is LossMode.AUTO:
        mode = LossMode.COMPUTE_LOSS if _loss_is_customised(trainer) else LossMode.PER_EXAMPLE
    task_ = None
    if mode is LossMode.PER_EXAMPLE:
        task_ = detect_task(trainer.model) if task is None else parse_enum(Task, task, "task")
    bs = batch_size if batch_size is not None else trainer.args.per_device_eval_batch_size
    if not isinstance(bs, int) or bs < 1:
        raise ConfigError(f"batch_size={bs!r} must be a positive int.")
    ids = [] if is_stream(dataset) else dataset_ids(dataset, id_column)  # a stream's ids are read as it goes
    return _Pass(trainer, dataset, ids, mode, task_,
                 parse_enum(TokenReduction, token_reduction, "token_reduction"), mask_key, bs)  # fmt: skip


def _plan(p: _Pass, indices: Sequence[int], n_total: int, world: int, fsdp: bool) -> list[Sequence[int]]:
    """This rank's batches: as many on every rank (see `logra.distributed.split_batches`)."""
    size = 1 if p.mode is LossMode.COMPUTE_LOSS else p.batch_size
    batches = distributed.split_batches(indices, n_total, world, size)
    expected = distributed.batches_per_rank(n_total, world, size)
    if fsdp and world > 1 and len(batches) != expected:
        raise ConfigError(
            f"under FSDP every rank must run {expected} forward/backward passes, but this rank has only "
            f"{len(indices)} examples to log; use a larger batch_size, fewer processes, or (for "
            "loss='compute_loss') a dataset size that is a multiple of the number of processes."
        )
    return batches


def _run(
    p: _Pass, logger: GradientLogger, batches: Sequence[Sequence[int]], sink: list[Any] | None = None,
    progress: bool = False, desc: str = "logra",
) -> None:  # fmt: skip
    """Log each batch of dataset indices through `logger`; the records go to `sink` when given."""
    model = logger.model
    columns = model_columns(p.trainer, model)
    total = sum(len(b) for b in batches)
    with eval_mode(model), tqdm(total=total, desc=desc, unit="ex", disable=not progress) as bar:
        for batch in batches:
            inputs = collate(p.trainer, p.dataset, batch, columns)
            mask = inputs.get(p.mask_key) if p.mask_key is not None else None
            with logger.record(ids=[p.ids[i] for i in batch], mask=mask, param_grads=False) as rec:
                _batch_loss(p, model, inputs).backward()
            if sink is not None:
                sink.append(rec)
            bar.update(len(batch))


def _run_stream(p: _Pass, logger: GradientLogger, id_column: str | None, progress: bool, desc: str) -> None:
    """Log a dataset without a length (IterableDataset, `datasets` streaming) through `stream_batches`."""
    model = logger.model
    if _is_fsdp(model) and distributed.rank_world()[1] > 1:
        raise ConfigError(
            "a streamed dataset cannot be logged under FSDP with several processes: FSDP needs the same number of "
            "batches on every rank, which a stream of unknown length cannot promise. Use a map-style dataset."
        )
    columns = model_columns(p.trainer, model)
    size = 1 if p.mode is LossMode.COMPUTE_LOSS else p.batch_size
    if progress:
        tqdm.write("[logra] estimate: " + estimate_run(logger, None).describe(), file=sys.stderr)
    with eval_mode(model), tqdm(desc=desc, unit="ex", disable=not progress) as bar:
        for ids, features in stream_batches(p.dataset, size, id_key=id_column, skip=logger.committed_ids):
            inputs = collate_features(p.trainer, features, columns)
            mask = inputs.get(p.mask_key) if p.mask_key is not None else None
            with logger.record(ids=ids, mask=mask, param_grads=False):
                _batch_loss(p, model, inputs).backward()
            bar.update(len(ids))


def _batch_loss(p: _Pass, model: nn.Module, inputs: dict[str, Any]) -> Tensor:
    """Σ_i L_i over the batch (a batch of one in compute_loss mode)."""
    if p.mode is LossMode.COMPUTE_LOSS:
        return p.trainer.compute_loss(model, inputs)
    if "labels" not in inputs:
        raise CaptureError(
            f"the collated batch has no 'labels' (keys {sorted(inputs)}); use a collator that sets labels "
            "(e.g. DataCollatorForLanguageModeling(mlm=False)) or loss='compute_loss'."
        )
    task = p.task if p.task is not None else detect_task(model)
    return per_example_losses(model, model(**inputs), inputs["labels"], task, p.token_reduction).sum()


def log_trainer(
    trainer: Any,
    config: LoGraConfig,
    store: str | os.PathLike[str],
    *,
    dataset: Any = None,
    id_column: str | None = None,
    batch_size: int | None = None,
    loss: LossMode | str = LossMode.AUTO,
    task: Task | str | None = None,
    token_reduction: TokenReduction | str = TokenReduction.MEAN,
    mask_key: str | None = "attention_mask",
    shard_rows: int | None = None,
    statistics: bool = True,
    progress: bool = True,
    desc: str = "logra: logging",
    text_column: str | None = None,
) -> GradientStore:
    """Log the projected per-example gradients of `dataset` (default: the train set) into `store`.

    Args:
        trainer: a `transformers.Trainer`; its model, data collator, `args.device` and (for
            loss='compute_loss') `compute_loss` are used. Nothing is trained.
        config: what to log.  store: the store directory; an existing one is resumed (its ids skipped).
        id_column: a dataset column of unique int/str ids; None uses row indices.
        batch_size: examples per forward (default `args.per_device_eval_batch_size`); rows do not depend on it.
        loss, task, token_reduction: how L_i is defined (module docstring).
        mask_key: the batch key of the (B, T) padding mask kept out of the statistics, or None.
        text_column: raw text to tokenise with the Trainer's tokenizer (`tokenized_dataset`); found by
            itself when the dataset has no input_ids and one text column.
        progress: on rank 0, say the row width D, bytes per example and the store's projected
            size first (`logra.estimate`), then show a tqdm bar (examples/s, time left) as `desc`.

    Returns the merged store, opened on every rank once all ranks have finished.
    """
    p = _prepare(trainer, dataset, id_column, loss, task, token_reduction, mask_key, batch_size, text_column)
    rank, world = distributed.rank_world()
    logger = distributed.open_logger(trainer.model, config, store, shard_rows=shard_rows, statistics=statistics)
    try:
        if is_stream(p.dataset):
            _run_stream(p, logger, id_column, progress and rank == 0, desc)
        else:
            _run_share(p, logger, rank, world, progress and rank == 0, desc)
    except BaseException:
        logger.close()
        raise
    result = distributed.finalize_store(logger)
    assert result is not None  # a store path was given
    return result


def _run_share(p: _Pass, logger: GradientLogger, rank: int, world: int, show: bool, desc: str) -> None:
    """Log this rank's contiguous share of a map-style dataset, less the ids the store already holds."""
    share: Sequence[int] = distributed.split_range(len(p.dataset), rank, world)
    fsdp = _is_fsdp(logger.model)
    if logger.committed_ids:  # resume: the batching of the rest differs, the rows do not
        if fsdp and world > 1:
            raise ConfigError("resuming a store under FSDP is not supported; log into a new directory.")
        share = [i for i in share if p.ids[i] not in logger.committed_ids]
    if show:
        tqdm.write("[logra] estimate: " + estimate_run(logger, len(p.dataset)).describe(), file=sys.stderr)
    _run(p, logger, _plan(p, share, len(p.dataset), world, fsdp), progress=show, desc=desc)


def trainer_rows(
    trainer: Any,
    config: LoGraConfig,
    dataset: Any,
    *,
    id_column: str | None = None,
    batch_size: int | None = None,
    loss: LossMode | str = LossMode.AUTO,
    task: Task | str | None = None,
    token_reduction: TokenReduction | str = TokenReduction.MEAN,
    mask_key: str | None = "attention_mask",
) -> QueryRows:
    """Rows of a (small) query `dataset` in memory, defined exactly like `log_trainer`'s.

    Every rank logs the whole dataset and returns the same (Q, D) float64 rows, in dataset order,
    with the config, layer table and model fingerprint they were logged with: pass the result
    itself to `Scorer` (or as `query_config=`), which checks it against the store.
    """
    if is_stream(dataset):
        raise ConfigError("trainer_rows keeps every row in memory; pass the queries as a map-style dataset.")
    p = _prepare(trainer, dataset, id_column, loss, task, token_reduction, mask_key, batch_size)
    logger = GradientLogger(distributed.unwrap_model(trainer.model), config, None, statistics=False)
    records: list[Any] = []
    try:
        distributed.check_agreement(logger)
        all_rows = range(len(p.dataset))
        _run(p, logger, _plan(p, all_rows, len(p.dataset), 1, _is_fsdp(logger.model)), records)
    finally:
        logger.close()
    ids = [i for rec in records for i in rec.ids]
    rows = [rec.rows.detach().to("cpu", torch.float64) for rec in records]
    return QueryRows(
        ids,
        torch.cat(rows) if rows else torch.zeros(0, logger.dim, dtype=torch.float64),
        config,
        logger.model_fingerprint,
        tuple(logger.layers),
    )


class _Collated:
    """The collated batches of `dataset`, re-iterable (ekfac's true Fisher takes two passes)."""

    def __init__(self, p: _Pass, model: nn.Module) -> None:
        self.p, self.columns = p, model_columns(p.trainer, model)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        n, size = len(self.p.dataset), self.p.batch_size
        for start in range(0, n, size):
            yield collate(self.p.trainer, self.p.dataset, range(start, min(start + size, n)), self.columns)


def trainer_fisher(
    trainer: Any,
    config: LoGraConfig,
    *,
    dataset: Any = None,
    method: PreconditionerMethod | str = PreconditionerMethod.KFAC,
    batch_size: int | None = None,
    loss: LossMode | str = LossMode.AUTO,
    task: Task | str | None = None,
    token_reduction: TokenReduction | str = TokenReduction.MEAN,
    mask_key: str | None = "attention_mask",
    labels: FisherLabels | str = FisherLabels.AUTO,
    num_samples: int = 1,
    seed: int = 0,
) -> FisherStatistics:
    """The true Fisher of the Trainer's model on `dataset` (default: the train set), for
    `fit_preconditioner(store, method, statistics=...)` on the store of `log_trainer(trainer, config, ...)`.

    Labels come from the model's own predictive distribution (`logra.losses.likelihood_logits`): the
    exact expectation over the classes of a single-label classifier, sampled per token for a causal
    LM (`labels`, `num_samples`: see `logra.true_fisher_statistics`). The model runs in eval mode
    with its parameters frozen, so `.grad` is left as it was. A customised Trainer loss (loss='auto'
    picks compute_loss) or a regression / multi-label head is not a softmax likelihood: ConfigError.
    """
    p = _prepare(trainer, dataset, None, loss, task, token_reduction, mask_key, batch_size)
    if p.mode is not LossMode.PER_EXAMPLE or p.task is None:
        raise ConfigError(
            "the Trainer's loss is customised (an overridden compute_loss, a compute_loss_func or label "
            "smoothing), so logra cannot tell its likelihood, and the true Fisher needs one. Pass loss='per_example' "
            "if it is the model's own cross-entropy, use the empirical Fisher (statistics=None), or compute the "
            "statistics with logra.true_fisher_statistics(loss_fn=...) sampling from your likelihood."
        )
    model = distributed.unwrap_model(trainer.model)
    mask_fn = (lambda batch: batch.get(mask_key)) if mask_key is not None else (lambda batch: None)
    with eval_mode(model):
        return true_fisher_statistics(
            model, config, _Collated(p, model), logits_fn=hf_logits_fn(p.task, p.token_reduction), method=method,
            labels=labels, num_samples=num_samples, seed=seed, batch_size_fn=lambda batch: len(batch["labels"]),
            mask_fn=mask_fn, param_grads=False,
        )  # fmt: skip
