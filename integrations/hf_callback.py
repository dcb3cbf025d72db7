"""A `TrainerCallback` that logs projected gradients at chosen steps or epochs (TracIn checkpoints).

    callback = LoGraCallback(trainer, config, "runs/tracin", steps=[100, 200], query_dataset=queries)
    trainer.add_callback(callback)
    trainer.train()
    result = tracin_scores("runs/tracin")       # Σ_c η_c · g_q(θ_c)ᵀ g_i(θ_c), [Q, N]
    seeds = tracin_ensemble(["runs/seed0", "runs/seed1"])   # the mean over independent runs

A checkpoint whose learning rate is 0 (the last step of a linear schedule) gets TracIn weight 0:
its logging time is spent for nothing. The callback warns when it logs one and `tracin_scores`
warns when it weighs one, naming it; log an earlier step, or pass learning_rates=False.

At each chosen point the callback runs `log_trainer` on the training set (and on `query_dataset`,
if given) with the model as it is right then, into `<output_dir>/<name>/train` (and `/query`),
and appends {name, step, epoch, learning_rate, seconds} to `<output_dir>/checkpoints.json`.
The pass runs in eval mode with parameters frozen and leaves the model, its `.grad`, the optimizer
and the random state untouched, so training proceeds exactly as without the callback; its cost
is one forward+backward (activation gradients only) per logged example per checkpoint, reported
in `seconds` (see benchmarks/trainer_callback_overhead.py).
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerCallback

from logra import distributed
from logra.config import LoGraConfig
from logra.curvature import PreconditionerMethod, fit_preconditioner
from logra.ensemble import align, mean_scores
from logra.errors import ConfigError, StoreError
from logra.score import Normalization, Scorer
from logra.store import GradientStore
from logra.store.files import write_atomic
from logra.types import ExampleId, parse_enum

from .hf import log_trainer

CHECKPOINTS = "checkpoints.json"


@dataclass(frozen=True)
class Checkpoint:
    """One logged point of training.

    `learning_rate` is the lr of the optimizer's first parameter group at that point: after the
    step's scheduler update, i.e. the lr the next step will use (None without an optimizer).
    """

    name: str
    step: int
    epoch: float
    learning_rate: float | None
    train: str
    query: str | None
    seconds: float


@dataclass(frozen=True)
class TracInScores:
    """scores [Q, N] (float64) with the query ids (rows) and training ids (columns)."""

    scores: Tensor
    train_ids: list[ExampleId]
    query_ids: list[ExampleId]


class LoGraCallback(TrainerCallback):
    """Log gradients of `train_dataset` (default: the Trainer's) at the chosen steps / epochs.

    Args:
        trainer: the Trainer this callback is added to (its collator and device are used).
        config: what to log.  output_dir: one sub-directory per checkpoint.
        steps: global steps after which to log.  every_n_steps: also every n-th step.
        every_epoch: also at the end of every epoch.
        query_dataset: logged at the same points (TracIn needs query gradients at each checkpoint).
        id_column, query_id_column: id columns (None: row indices).
        log_kwargs: passed to `log_trainer` (batch_size, loss, task, token_reduction, mask_key, ...).
    """

    def __init__(
        self,
        trainer: Any,
        config: LoGraConfig,
        output_dir: str | os.PathLike[str],
        *,
        train_dataset: Any = None,
        query_dataset: Any = None,
        steps: Iterable[int] = (),
        every_n_steps: int | None = None,
        every_epoch: bool = False,
        id_column: str | None = None,
        query_id_column: str | None = None,
        **log_kwargs: Any,
    ) -> None:
        self.steps = frozenset(int(s) for s in steps)
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 1):
            raise ConfigError(f"every_n_steps={every_n_steps!r} must be a positive int or None.")
        if not self.steps and every_n_steps is None and not every_epoch:
            raise ConfigError("LoGraCallback logs nothing: pass steps=[...], every_n_steps=n or every_epoch=True.")
        self.trainer = trainer
        self.config = config
        self.output_dir = Path(output_dir)
        self.train_dataset = train_dataset
        self.query_dataset = query_dataset
        self.every_n_steps = every_n_steps
        self.every_epoch = every_epoch
        self.id_column = id_column
        self.query_id_column = query_id_column
        self.log_kwargs = log_kwargs
        self.checkpoints: list[Checkpoint] = []

    @property
    def seconds(self) -> float:
        """Wall time spent logging so far (all checkpoints)."""
        return sum(c.seconds for c in self.checkpoints)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        step = state.global_step
        if step in self.steps or (self.every_n_steps is not None and step % self.every_n_steps == 0):
            self.log_checkpoint(f"step-{step:06d}", state, kwargs.get("optimizer"))

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.every_epoch:
            self.log_checkpoint(f"epoch-{round(state.epoch or 0):04d}-step-{state.global_step:06d}", state,
                                kwargs.get("optimizer"))  # fmt: skip

    def log_checkpoint(self, name: str, state: Any, optimizer: Any = None) -> Checkpoint:
        """Log the train (and query) set now, into `<output_dir>/<name>`; returns the record."""
        if any(c.name == name for c in self.checkpoints):
            return next(c for c in self.checkpoints if c.name == name)
        if optimizer is not None and float(optimizer.param_groups[0]["lr"]) == 0.0:
            warnings.warn(
                f"checkpoint {name} (step {state.global_step}) has learning rate 0 (e.g. the end of a linear "
                "schedule), so tracin_scores gives it weight 0 and logging it is wasted; log an earlier step, "
                "or use tracin_scores(..., learning_rates=False). Logging it anyway.",
                UserWarning,
                stacklevel=2,
            )
        start = time.perf_counter()
        root = self.output_dir / name
        log_trainer(self.trainer, self.config, root / "train", dataset=self.train_dataset, id_column=self.id_column,
                    **self.log_kwargs)  # fmt: skip
        query = None
        if self.query_dataset is not None:
            log_trainer(self.trainer, self.config, root / "query", dataset=self.query_dataset,
                        id_column=self.query_id_column, statistics=False, **self.log_kwargs)  # fmt: skip
            query = str(root / "query")
        lr = float(optimizer.param_groups[0]["lr"]) if optimizer is not None else None
        record = Checkpoint(name, int(state.global_step), float(state.epoch or 0.0), lr, str(root / "train"), query,
                            time.perf_counter() - start)  # fmt: skip
        self.checkpoints.append(record)
        distributed.run_on_rank0(lambda: _write_checkpoints(self.output_dir, self.checkpoints))
        return record


def _write_checkpoints(output_dir: Path, checkpoints: list[Checkpoint]) -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(output_dir / CHECKPOINTS, json.dumps([asdict(c) for c in checkpoints], indent=1).encode())


def read_checkpoints(output_dir: str | os.PathLike[str]) -> list[Checkpoint]:
    """The checkpoints a `LoGraCallback` recorded in `output_dir`, in logging order."""
    path = Path(output_dir) / CHECKPOINTS
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return [Checkpoint(**c) for c in raw]
    except FileNotFoundError:
        raise StoreError(f"{path} does not exist; train with LoGraCallback(output_dir={str(output_dir)!r}).") from None
    except (json.JSONDecodeError, TypeError) as exc:
        raise StoreError(f"{path} is not a checkpoint list written by LoGraCallback ({exc}).") from None


def tracin_scores(
    output_dir: str | os.PathLike[str],
    *,
    method: PreconditionerMethod | str = PreconditionerMethod.IDENTITY,
    normalization: Normalization | str = Normalization.DOT,
    learning_rates: bool = True,
) -> TracInScores:
    """TracIn-CP scores Σ_c η_c · g_q(θ_c)ᵀ H_c⁻¹ g_i(θ_c) over the logged checkpoints.

    Args:
        output_dir: a `LoGraCallback` output directory whose checkpoints include query stores.
        method: preconditioner per checkpoint (a `PreconditionerMethod` or its value); identity gives
            TracIn's plain dot products.
        normalization: dot | cosine | relative, per checkpoint (as `Scorer`).
        learning_rates: weight each checkpoint by its recorded learning rate η_c (else 1).

    Columns follow the first checkpoint's training ids (later ones are aligned by id).
    """
    method = parse_enum(PreconditionerMethod, method, "method")
    normalization = parse_enum(Normalization, normalization, "normalization")
    checkpoints = read_checkpoints(output_dir)
    total: Tensor | None = None
    train_ids: list[ExampleId] = []
    query_ids: list[ExampleId] = []
    for c in checkpoints:
        if c.query is None:
            raise ConfigError(f"checkpoint {c.name} has no query store; pass query_dataset= to LoGraCallback.")
        train, query = GradientStore.open(c.train), GradientStore.open(c.query)
        scorer = Scorer(train, fit_preconditioner(train, method), normalization, compute_dtype=torch.float64)
        part = scorer.score(query)  # a query store: its config and model are checked against the train store
        weight = (c.learning_rate if c.learning_rate is not None else 1.0) if learning_rates else 1.0
        if learning_rates and weight == 0.0:
            warnings.warn(
                f"checkpoint {c.name} (step {c.step}) of {output_dir} has learning rate 0, so it adds nothing to the "
                f"TracIn sum (its logging took {c.seconds:.0f} s); log an earlier step instead, or pass "
                "learning_rates=False to weigh every checkpoint equally.",
                UserWarning,
                stacklevel=2,
            )
        if total is None:
            total, train_ids, query_ids = weight * part.to(torch.float64), list(train.ids), list(query.ids)
            continue
        part = align(part, list(query.ids), list(train.ids), query_ids, train_ids, f"checkpoint {c.name}")
        total = total + weight * part.to(torch.float64)
    if total is None:
        raise ConfigError(f"{output_dir} lists no checkpoints.")
    return TracInScores(total, train_ids, query_ids)


def tracin_ensemble(
    output_dirs: Iterable[str | os.PathLike[str]],
    weights: Iterable[float] | None = None,
    **tracin: Any,
) -> TracInScores:
    """The mean (or weighted mean) of `tracin_scores` over several runs, e.g. seeds, as TRAK ensembles.

    Each directory is one `LoGraCallback` run on the same training and query examples; rows and
    columns are aligned by id to the first run. `tracin` is passed to `tracin_scores`.
    """
    dirs = [Path(d) for d in output_dirs]
    runs = [tracin_scores(d, **tracin) for d in dirs]
    members = [(r.scores, r.query_ids, r.train_ids) for r in runs]
    result = mean_scores(members, None if weights is None else list(weights), [f"the run in {d}" for d in dirs])
    return TracInScores(result.scores, result.train_ids, result.query_ids)
