"""Adapters that run logra and each peer on one `Workload`: logging, fitting, pairwise scores.

Each adapter follows the peer's documented use (its source, read from the installed package):

- LogIX 0.1.1 (`logix-ai`): `watch(model, name_filter)`, `add_lora()` with rank k (LoGra's
  random Kronecker projection as a LoRA encoder/bottleneck/decoder), then a `setup` of the
  statistics: {"grad": [log]} plus forward/backward covariance for KFAC, or grad covariance
  for raw. Queries are logged with the same LoRA; `compute_influence_all(hessian=...)`
  preconditions the queries and streams the saved training logs. LogIX freezes every
  parameter it does not log, so its pass computes no weight gradients.
- Kronfluence 1.0.1: a `Task` (summed loss; labels sampled from the model for the true
  Fisher, its default), `prepare_model`, `fit_all_factors(strategy="ekfac")` (covariance pass,
  eigendecomposition, eigenvalue-correction pass) and `compute_pairwise_scores` with the
  damping heuristic 0.1 x mean eigenvalue (`damping_factor=None`, the same rule logra uses).
  It projects nothing: per-example gradients are full-size and recomputed at scoring time.
- TRAK 0.3.2 (`traker`): `TRAKer` with the CPU `BasicProjector` (Gaussian; the CUDA projector
  needs a GPU), float32, `grad_wrt` = the logged weights, one checkpoint (single-model TRAK),
  margin model outputs; `lambda_reg` = 0.1 x mean eigenvalue of XᵀX (without it XᵀX is
  singular when proj_dim > N).

Sign: every adapter returns scores [Q, N] where positive means the training example helps the
query (lowers its loss / raises its margin), as logra does.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import logra

Batch = tuple[Tensor, ...]


@dataclass
class Workload:
    """A model, the Linear layers to attribute through, and training and query batches.

    kind: "classifier" (batch = (x, y), logits [B, C]) or "lm" (batch = (ids,), a causal LM).
    """

    model: nn.Module
    logged: list[str]
    kind: str
    train: list[Batch]
    query: list[Batch] = field(default_factory=list)

    @property
    def n_train(self) -> int:
        return sum(len(b[0]) for b in self.train)

    def logits(self, model: nn.Module, batch: Batch) -> Tensor:
        return model(batch[0]) if self.kind == "classifier" else model(input_ids=batch[0]).logits

    def loss(self, model: nn.Module, batch: Batch, sample: bool = False) -> Tensor:
        """(B,) per-example loss; `sample` draws the labels from the model (true Fisher)."""
        logits = self.logits(model, batch)
        if self.kind == "classifier":
            labels = batch[1]
        else:
            logits, labels = logits[:, :-1], batch[0][:, 1:]
        if sample:
            with torch.no_grad():
                probs = torch.softmax(logits.detach().float(), dim=-1)
                labels = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1).reshape(labels.shape)
        if self.kind == "classifier":
            return F.cross_entropy(logits, labels, reduction="none")
        B, T, V = logits.shape  # vocabulary last, as bench_common.lm_loss (its docstring says why)
        return F.cross_entropy(logits.reshape(-1, V), labels.reshape(-1), reduction="none").view(B, T).sum(dim=1)


# ------------------------------------------------------------------------------------ logra


def logra_config(w: Workload, k: int, **kwargs: Any) -> logra.LoGraConfig:
    return logra.LoGraConfig(k_in=k, k_out=k, modules=tuple(w.logged), **kwargs)


def logra_log(
    w: Workload, config: logra.LoGraConfig, store: str | None, statistics: bool = True, param_grads: bool = False
) -> logra.GradientLogger:
    """One logging pass over w.train into `store` (closed logger returned)."""
    return logra_run(w, logra.GradientLogger(w.model, config, store=store, statistics=statistics), param_grads)


def logra_run(w: Workload, logger: logra.GradientLogger, param_grads: bool = False) -> logra.GradientLogger:
    """The logging pass itself with a logger already set up (projections drawn, store opened); closes it."""
    with logger:
        start = 0
        for batch in w.train:
            ids = list(range(start, start + len(batch[0])))
            start += len(ids)
            w.model.zero_grad(set_to_none=True)
            with logger.record(ids=ids, param_grads=param_grads):
                w.loss(w.model, batch).sum().backward()
    w.model.zero_grad(set_to_none=True)
    return logger


def logra_query_rows(w: Workload, config: logra.LoGraConfig) -> Tensor:
    """[Q, D] projected query gradients (no store)."""
    rows = []
    with logra.GradientLogger(w.model, config, statistics=False) as logger:
        for batch in w.query:
            with logger.record(ids=list(range(len(batch[0]))), param_grads=False) as rec:
                w.loss(w.model, batch).sum().backward()
            assert rec.rows is not None
            rows.append(rec.rows)
    return torch.cat(rows)


def logra_fit(
    store: logra.GradientStore, method: str, statistics: logra.FisherStatistics | None = None
) -> logra.Preconditioner:
    """The one call site of the preconditioner API (`statistics`: the true Fisher, or None: empirical)."""
    return logra.fit_preconditioner(store, method=method, statistics=statistics, progress=False)


def logra_true_fisher(w: Workload, config: logra.LoGraConfig, seed: int) -> logra.FisherStatistics:
    """The true Fisher of w.train (ekfac statistics, which kfac reads too): the exact expectation over a
    classifier's classes, one sampled label per token of an LM (its summed next-token loss)."""

    def logits_fn(model: nn.Module, batch: Batch) -> Tensor:
        logits = w.logits(model, batch)
        return logits if w.kind == "classifier" else logits[:, :-1]

    return logra.true_fisher_statistics(
        w.model, config, w.train, logits_fn=logits_fn, method="ekfac", seed=seed, param_grads=False,
        batch_size_fn=lambda batch: len(batch[0]), progress=False,
    )  # fmt: skip


def logra_score(store: logra.GradientStore, pre: logra.Preconditioner, queries: Tensor) -> Tensor:
    """The one call site of the scorer API: scores [Q, N]."""
    return logra.Scorer(store, pre, progress=False).score(queries)


def logra_scores(
    w: Workload, k: int, methods: list[str], root: str, true_fisher: bool = False, **config: Any
) -> dict[str, Tensor]:
    """{method: scores [Q, N]} of logra at projection size k (one logging pass for all methods); with
    `true_fisher`, kfac/ekfac are fitted on the true Fisher (`logra_true_fisher`, seeded by config's seed)."""
    cfg = logra_config(w, k, **config)
    logra_log(w, cfg, root)
    store = logra.GradientStore.open(root)
    queries = logra_query_rows(w, cfg)
    fisher = logra_true_fisher(w, cfg, cfg.seed) if true_fisher else None
    return {m: logra_score(store, logra_fit(store, m, fisher), queries) for m in methods}


# ------------------------------------------------------------------------------------ LogIX


def logix_setup(w: Workload, k: int, hessian: str, root: str) -> Any:
    """A LogIX run on w.model with rank-k LoRA projections and the statistics `hessian` needs."""
    import yaml
    from logix import LogIX

    config = Path(root) / "logix.yaml"
    config.write_text(
        yaml.safe_dump({"root_dir": root, "lora": {"init": "random", "rank": k}, "logging": {"num_workers": 1}})
    )
    run = LogIX(project="bench", config=str(config))
    run.watch(w.model, name_filter=list(w.logged))
    run.add_lora()
    plan: dict[str, list[str]] = {"grad": ["log"]}
    if hessian == "kfac":
        plan.update(forward=["covariance"], backward=["covariance"])
    elif hessian == "raw":
        plan["grad"].append("covariance")
    run.setup(plan)
    run.save(True)
    return run


def logix_log(w: Workload, run: Any) -> None:
    """LogIX's logging pass over w.train (ids are the row indices as strings), then finalize."""
    start = 0
    for batch in w.train:
        ids = [str(i) for i in range(start, start + len(batch[0]))]
        start += len(ids)
        with run(data_id=ids):
            w.model.zero_grad(set_to_none=True)
            w.loss(w.model, batch).sum().backward()
    run.finalize()


def logix_scores(w: Workload, run: Any, hessian: str) -> Tensor:
    """[Q, N] LogIX influence of every logged training example on each query."""
    run.eval()
    run.setup({"grad": ["log"]})
    logs = []
    for b, batch in enumerate(w.query):
        with run(data_id=[f"q{b}-{i}" for i in range(len(batch[0]))]):
            w.model.zero_grad(set_to_none=True)
            w.loss(w.model, batch).sum().backward()
        logs.append(run.get_log(copy=True))
    ids = [i for log in logs for i in log[0]]
    grads = {name: {"grad": torch.cat([log[1][name]["grad"] for log in logs])} for name in logs[0][1]}
    loader = run.build_log_dataloader(batch_size=64)
    result = run.compute_influence_all((ids, grads), loader, hessian=hessian)
    order = torch.tensor([int(i) for i in result["tgt_ids"]])
    scores = torch.empty_like(result["influence"])
    scores[:, order] = result["influence"]
    return scores


# ------------------------------------------------------------------------------------ Kronfluence


def kronfluence_task(w: Workload) -> Any:
    from kronfluence.task import Task

    class _Task(Task):
        def compute_train_loss(self, batch: Any, model: nn.Module, sample: bool = False) -> Tensor:
            return w.loss(model, tuple(batch), sample=sample).sum()

        def compute_measurement(self, batch: Any, model: nn.Module) -> Tensor:
            return w.loss(model, tuple(batch)).sum()

        def get_influence_tracked_modules(self) -> list[str]:
            return list(w.logged)

    return _Task()


def _dataset(batches: list[Batch]) -> torch.utils.data.TensorDataset:
    return torch.utils.data.TensorDataset(*(torch.cat(parts) for parts in zip(*batches)))


def kronfluence_setup(w: Workload, root: str) -> tuple[Any, Any]:
    """(analyzer, task) with w.model wrapped by Kronfluence (in place, as `prepare_model` does)."""
    from kronfluence.analyzer import Analyzer, prepare_model

    task = kronfluence_task(w)
    w.model = prepare_model(w.model, task)
    analyzer = Analyzer("bench", w.model, task, cpu=True, disable_tqdm=True, output_dir=root)
    return analyzer, task


def kronfluence_fit(w: Workload, analyzer: Any, strategy: str = "ekfac", empirical: bool = False) -> None:
    """Fit the factors; `empirical` uses the data's labels instead of labels sampled from the model."""
    from kronfluence.arguments import FactorArguments

    args = FactorArguments(strategy=strategy, use_empirical_fisher=empirical)
    batch = len(w.train[0][0])
    analyzer.fit_all_factors(
        strategy, _dataset(w.train), per_device_batch_size=batch, factor_args=args, overwrite_output_dir=True
    )


def kronfluence_scores(w: Workload, analyzer: Any, name: str = "scores", strategy: str = "ekfac") -> Tensor:
    """[Q, N] pairwise scores; all queries are preconditioned before the one training pass."""
    from kronfluence.arguments import ScoreArguments

    batch = len(w.train[0][0])
    q_batch = len(w.query[0][0])
    args = ScoreArguments(damping_factor=None, query_gradient_accumulation_steps=len(w.query))
    analyzer.compute_pairwise_scores(
        name,
        strategy,
        _dataset(w.query),
        _dataset(w.train),
        per_device_query_batch_size=q_batch,
        per_device_train_batch_size=batch,
        score_args=args,
        overwrite_output_dir=True,
    )
    return analyzer.load_pairwise_scores(name)["all_modules"].clone()


# ------------------------------------------------------------------------------------ TRAK


def trak_output(kind: str) -> Any:
    """TRAK's model output: the margin log(p / (1 - p)) of the correct class (summed over tokens)."""
    from trak.modelout_functions import AbstractModelOutput

    class _Margin(AbstractModelOutput):
        def __init__(self) -> None:
            super().__init__()

        @staticmethod
        def _logits_labels(model: nn.Module, weights: Any, buffers: Any, batch: Batch) -> tuple[Tensor, Tensor]:
            if kind == "classifier":
                return torch.func.functional_call(model, (weights, buffers), (batch[0],)), batch[1]
            ids = batch[0]
            logits = torch.func.functional_call(model, (weights, buffers), (), {"input_ids": ids}).logits
            return logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)

        def get_output(self, model: nn.Module, weights: Any, buffers: Any, *example: Tensor) -> Tensor:
            batch = tuple(t.unsqueeze(0) for t in example)
            logits, labels = self._logits_labels(model, weights, buffers, batch)
            correct = logits.gather(1, labels[:, None])[:, 0]
            mine = torch.zeros_like(logits, dtype=torch.bool).scatter(1, labels[:, None], True)
            others = logits.masked_fill(mine, float("-inf"))
            return (correct - others.logsumexp(dim=-1)).sum()

        def get_out_to_loss_grad(self, model: nn.Module, weights: Any, buffers: Any, batch: Batch) -> Tensor:
            logits, labels = self._logits_labels(model, weights, buffers, batch)
            p = torch.softmax(logits, dim=-1).gather(1, labels[:, None])[:, 0]
            return (1 - p).reshape(len(batch[0]), -1).mean(dim=1, keepdim=True).detach()

    return _Margin()


def trak_featurize(w: Workload, proj_dim: int, root: str) -> Any:
    """A TRAKer with every training example featurised (projected per-example gradients)."""
    import logging

    from trak import TRAKer

    weights = [f"{name}.weight" for name in w.logged]
    traker = TRAKer(
        model=w.model,
        task=trak_output(w.kind),
        train_set_size=w.n_train,
        save_dir=root,
        device="cpu",
        proj_dim=proj_dim,
        use_half_precision=False,
        grad_wrt=weights,
        logging_level=logging.ERROR,
    )
    traker.load_checkpoint(w.model.state_dict(), model_id=0)
    for batch in w.train:
        traker.featurize(batch=list(batch), num_samples=len(batch[0]))
    return traker


def trak_scores(w: Workload, traker: Any) -> Tensor:
    """[Q, N] single-model TRAK scores, lambda_reg = 0.1 x mean eigenvalue of XᵀX."""
    traker.saver.load_current_store(0)
    grads = torch.as_tensor(traker.saver.current_store["grads"])
    traker.score_computer.lambda_reg = 0.1 * float((grads.double() ** 2).sum()) / grads.shape[1]
    traker.finalize_features()
    n_query = sum(len(b[0]) for b in w.query)
    traker.start_scoring_checkpoint("queries", w.model.state_dict(), model_id=0, num_targets=n_query)
    for batch in w.query:
        traker.score(batch=list(batch), num_samples=len(batch[0]))
    return torch.as_tensor(traker.finalize_scores("queries")).T.clone()


# ------------------------------------------------------------------------------------ registry


def with_tmp(fn: Callable[[str], Any]) -> Any:
    with tempfile.TemporaryDirectory(prefix="logra-bench-") as root:
        return fn(root)


def fresh(w: Workload) -> Workload:
    """A copy of the workload with its own model (peers wrap or freeze the model in place)."""
    return Workload(copy.deepcopy(w.model), w.logged, w.kind, w.train, w.query)
