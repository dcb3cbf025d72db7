"""Bergson 2.5.1 (EleutherAI) adapters for the side-by-side benchmarks; `peers.py` has the other peers.

Bergson is built around Hugging Face causal LMs, `datasets` and a CLI (`bergson build`, `hessian`,
`trackstar`, `score`) whose pipelines load the model and its tokenizer by name. These adapters
use its Python API one level below those pipelines, on the same model object and the same batches
as every other tool (read from the installed package; nothing of it is copied here):

- model: an HF causal LM as it is; Bergson hooks `model.base_model`, so an LM head is never
  logged (`collection.py`, `hessian_approximations.collect_hessians`: `model.base_model`). A
  classifier is shown to Bergson as a two-token LM (`ClassifierAsLM`). Frozen as Bergson's own
  loader freezes it (`utils/worker_utils.setup_model_and_peft`: every parameter but the input
  embeddings), so its backward computes no weight gradients of the logged layers.
- data: a `datasets.Dataset` of `input_ids` / `length`, batched exactly as the workload is.
- logging (`bergson build`): `collect_gradients` (GradientCollector + CollectorComputer) with
  `projection_dim = k`: per layer a two-sided Rademacher projection to k x k, written to its
  memory-mapped index with `data.hf` and the processor. No statistics in that pass: its Hessians are
  separate passes (the `kfac` row adds its covariance pass, `collect_hessians`).
- EK-FAC (`bergson hessian` pipeline): `fit_factored_hessians` (covariance pass, eigendecomposition,
  eigenvalue-correction pass; labels sampled from the model unless `empirical`), the damped inverse
  (0.1 x mean eigenvalue, its default) applied to the unprojected query gradients by
  `load_preconditioner`, and a scoring pass that recomputes the training gradients
  (`InMemoryCollector` + `Scorer`): nothing is stored per training example. Unprojected: Bergson
  refuses a projection with the eigenvalue correction.
- TrackStar (`bergson trackstar`): per-layer autocorrelation Hessians (dense k² x k²) of the projected
  training and query gradients, mixed by `mix_autocorrelation_matrices` (1,000 components
  down-weighted, its default), their damped inverse applied to the projected query gradients, the
  same scoring pass. Bergson's defaults otherwise: no unit normalisation, no optimizer-state
  normalisation (no optimizer state exists here).

Sign: Bergson's influence scores are query · H⁻¹ · train gradient, positive = helpful, as logra's.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from peers import Batch, Workload
from torch import Tensor, nn


class ClassifierAsLM(nn.Module):
    """A classifier in the shape Bergson's collectors read: `model(input_ids).logits` [B, S, V] where
    position s is scored on token s + 1, and every logged layer sees [B, S, I] activations.

    Token 0 of each two-token sequence is the example's row of a feature table (its "input
    embedding", trainable as Bergson keeps an LM's embeddings), token 1 its label. Position 0 runs
    the classifier on the features, position 1 on zeros: its output is never in the loss, and
    Bergson's collection mask drops each sequence's last position, so the loss and every
    gradient are the classifier's own.
    """

    def __init__(self, model: nn.Module, features: Tensor) -> None:
        super().__init__()
        self.inner = model
        self.embed = nn.Embedding.from_pretrained(features, freeze=False)

    @property
    def device(self) -> torch.device:
        return self.embed.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.weight.dtype

    @property
    def base_model(self) -> nn.Module:
        return self

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

    def forward(self, input_ids: Tensor) -> SimpleNamespace:
        x = self.embed(input_ids[:, :1])  # [B, 1, F]
        return SimpleNamespace(logits=self.inner(torch.cat([x, torch.zeros_like(x)], dim=1)))  # [B, 2, C]


@dataclass
class BergsonRun:
    """Everything a Bergson call needs: the frozen model, the logged layers as Bergson names them
    (relative to `model.base_model`), and the training and query sets as datasets with batches."""

    model: nn.Module
    targets: set[str]
    train: Any  # datasets.Dataset
    train_batches: list[list[int]]
    query: Any
    query_batches: list[list[int]]
    root: Path
    seed: int | None = None  # IndexConfig.projection_seed (None: Bergson's unseeded default)
    skipped: list[str] = field(default_factory=list)  # logged layers outside model.base_model, not hooked


def _dataset(rows: list[list[int]]) -> Any:
    from datasets import Dataset

    return Dataset.from_dict({"input_ids": rows, "length": [len(r) for r in rows]})


def _index_batches(batches: list[Batch]) -> list[list[int]]:
    out, start = [], 0
    for b in batches:
        out.append(list(range(start, start + len(b[0]))))
        start += len(b[0])
    return out


def bergson_setup(w: Workload, root: str, seed: int | None = None, skip_outside: bool = False) -> BergsonRun:
    """A frozen copy of w.model in Bergson's shape, its logged layers and w's data as datasets;
    `skip_outside` drops the logged layers Bergson cannot hook (recorded in `BergsonRun.skipped`)."""
    model = copy.deepcopy(w.model)
    layers = [model.get_submodule(name) for name in w.logged]
    if w.kind == "classifier":
        n_train = w.n_train
        features = torch.cat([torch.cat([b[0] for b in w.train]), *(b[0] for b in w.query)]).float()
        model = ClassifierAsLM(model, features)
        labels = [int(y) for b in w.train for y in b[1]], [int(y) for b in w.query for y in b[1]]
        train_rows = [[i, y] for i, y in enumerate(labels[0])]
        query_rows = [[n_train + i, y] for i, y in enumerate(labels[1])]
    else:
        train_rows = [row.tolist() for b in w.train for row in b[0]]
        query_rows = [row.tolist() for b in w.query for row in b[0]]
    get_embeddings: Any = getattr(model, "get_input_embeddings", None)  # HF models and ClassifierAsLM have it
    embeddings, base = (get_embeddings() if callable(get_embeddings) else None), getattr(model, "base_model", None)
    if not isinstance(embeddings, nn.Module) or not isinstance(base, nn.Module):
        raise TypeError(f"{type(model).__name__} has no input embeddings / base model for Bergson to hook")
    model.requires_grad_(False)  # as Bergson's setup_model_and_peft
    embeddings.requires_grad_(True)
    names = {id(m): n for n, m in base.named_modules()}
    outside = [name for name, layer in zip(w.logged, layers) if id(layer) not in names]
    if outside and not skip_outside:
        raise ValueError(
            f"Bergson hooks only modules under model.base_model; {outside} lie outside it (an LM head, "
            "for one): pass skip_outside=True to attribute through the others and say so in the results"
        )
    targets = {names[id(m)] for m in layers if id(m) in names}
    return BergsonRun(model, targets, _dataset(train_rows), _index_batches(w.train), _dataset(query_rows),
                      _index_batches(w.query) if w.query else [], Path(root), seed, outside)  # fmt: skip


def outside_base(w: Workload) -> list[str]:
    """The logged layers of w that Bergson cannot hook (not under model.base_model: an LM head)."""
    base = getattr(w.model, "base_model", None)
    if w.kind == "classifier" or not isinstance(base, nn.Module):
        return []  # ClassifierAsLM's base model is itself
    under = {id(m) for m in base.modules()}
    return [name for name in w.logged if id(w.model.get_submodule(name)) not in under]


def _cfg(run: BergsonRun, name: str, k: int) -> Any:
    """An IndexConfig for one step, its partial run path created (Bergson writes there)."""
    from bergson.config.config import IndexConfig

    cfg = IndexConfig(run_path=str(run.root / name), projection_dim=k, projection_seed=run.seed,
                      model="in-memory (not loaded by name)")  # fmt: skip
    cfg.partial_run_path.mkdir(parents=True, exist_ok=True)
    return cfg


def _run(run: BergsonRun, collector: Any, data: Any, batches: list[list[int]], cfg: Any) -> None:
    """Bergson's own loop (CollectorComputer: pad, forward, summed token loss, backward) with `collector`."""
    from bergson.collector.collector import CollectorComputer

    computer = CollectorComputer(model=run.model, data=data, collector=collector, batches=batches, cfg=cfg)
    computer.run_with_collector_hooks(desc="bench")


def bergson_index(run: BergsonRun, k: int) -> tuple[Any, Any]:
    """(IndexConfig, GradientProcessor) of a `bergson build` at projection k, the processor holding every
    logged layer's two projection matrices already: Bergson draws them on first use, inside its first
    batch, and caches them in the processor (`HookCollectorBase.projection`, called here as its hooks
    call it: right k x in, left k x out, the layer's device and dtype). Drawing them here makes them
    setup, as logra's are (`GradientLogger.__init__`), instead of part of the timed pass."""
    from bergson.collector.collector import HookCollectorBase
    from bergson.gradients import LayerAdapter
    from bergson.utils.worker_utils import processor_for

    cfg = _cfg(run, "index", k)
    processor = processor_for(cfg)
    processor.save(cfg.partial_run_path)
    if processor.projection_dim:
        owner = SimpleNamespace(processor=processor)  # `projection` reads nothing else of its collector
        base = run.model.base_model
        for name in sorted(run.targets):
            layer = base.get_submodule(name)
            n_in, n_out = getattr(layer, LayerAdapter.in_attr(layer)), getattr(layer, LayerAdapter.out_attr(layer))
            weight = layer.weight
            HookCollectorBase.projection(owner, name, k, n_in, "right", weight.device, weight.dtype)  # type: ignore[arg-type]
            HookCollectorBase.projection(owner, name, k, n_out, "left", weight.device, weight.dtype)  # type: ignore[arg-type]
    return cfg, processor


def bergson_build(run: BergsonRun, k: int, index: tuple[Any, Any] | None = None) -> None:
    """`bergson build`: the projected per-example gradients of the training set into an on-disk index
    (`index`: from `bergson_index`, made beforehand; else made here)."""
    from bergson import collect_gradients

    cfg, processor = index if index is not None else bergson_index(run, k)
    collect_gradients(run.model, run.train, processor, cfg, batches=run.train_batches, target_modules=run.targets)


def bergson_covariance(run: BergsonRun, empirical: bool = True) -> None:
    """The KFAC covariance pass alone (no eigendecomposition): the statistics a logging pass would add."""
    from bergson.config.config import HessianConfig
    from bergson.hessians.hessian_approximations import collect_hessians

    cfg = _cfg(run, "kfac", 0)
    collect_hessians(run.model, run.train, cfg, batches=run.train_batches, target_modules=run.targets,
                     hessian_cfg=HessianConfig(method="kfac", use_dataset_labels=empirical))  # fmt: skip


def bergson_gradients(run: BergsonRun, data: Any, batches: list[list[int]], k: int, name: str) -> dict[str, Tensor]:
    """{layer: [rows, k*k or out*in]} per-example gradients in memory (Bergson's InMemoryCollector)."""
    from bergson import InMemoryCollector
    from bergson.utils.worker_utils import processor_for

    cfg = _cfg(run, name, k)
    collector = InMemoryCollector(model=run.model.base_model, data=data, cfg=cfg, processor=processor_for(cfg),
                                  target_modules=run.targets)  # fmt: skip
    _run(run, collector, data, batches, cfg)
    return dict(collector.gradients)


def bergson_score(run: BergsonRun, queries: dict[str, Tensor], k: int, name: str) -> Tensor:
    """[Q, N]: one pass over the training set recomputing its gradients, each scored against the
    (preconditioned) query gradients by Bergson's Scorer."""
    from bergson import InMemoryCollector, Scorer
    from bergson.score.score_writer import InMemorySequenceScoreWriter
    from bergson.utils.worker_utils import processor_for

    cfg = _cfg(run, name, k)
    n_query = len(next(iter(queries.values())))
    writer = InMemorySequenceScoreWriter(len(run.train), n_query)
    scorer = Scorer(queries, sorted(queries), writer, torch.device("cpu"), torch.float32)
    collector = InMemoryCollector(model=run.model.base_model, data=run.train, cfg=cfg, processor=processor_for(cfg),
                                  target_modules=run.targets, scorer=scorer)  # fmt: skip
    _run(run, collector, run.train, run.train_batches, cfg)
    return writer.scores.T.contiguous()


def bergson_ekfac_fit(run: BergsonRun, empirical: bool = False) -> Any:
    """EK-FAC on the training set (true Fisher unless `empirical`); its damped-inverse preconditioner."""
    from bergson.config.config import HessianConfig, InversionConfig
    from bergson.hessians.hessian_approximations import fit_factored_hessians
    from bergson.hessians.preconditioner import load_preconditioner

    cfg = _cfg(run, "ekfac", 0)
    hessian = HessianConfig(method="kfac", ev_correction=True, use_dataset_labels=empirical)
    path = str(cfg.partial_run_path)
    fit_factored_hessians(run.model, run.train, cfg, hessian, target_modules=run.targets, attention_cfgs={},
                          batches=run.train_batches, path=path, do_eigendecomposition=True)  # fmt: skip
    return load_preconditioner(str(cfg.partial_run_path), inversion_cfg=InversionConfig(), power=-1.0,
                               ev_correction=True)  # fmt: skip


def bergson_ekfac_queries(run: BergsonRun, pre: Any, tag: str = "q") -> Tensor:
    """[Q, N] EK-FAC scores of run.query: query gradients, the inverse applied once, the scoring pass."""
    queries = bergson_gradients(run, run.query, run.query_batches, 0, f"{tag}-grads")
    return bergson_score(run, pre.apply(queries), 0, f"{tag}-scores")


def _autocorrelation(run: BergsonRun, data: Any, batches: list[list[int]], k: int, name: str) -> str:
    """The autocorrelation Hessian of `data`'s projected gradients, saved with the run config that
    `mix_autocorrelation_matrices` checks (as `bergson hessian --method autocorrelation` saves it)."""
    from bergson.cli.commands import Hessian
    from bergson.config.config import HessianConfig
    from bergson.config.config_io import save_run_config
    from bergson.hessians.autocorrelation import AutocorrelationCollector
    from bergson.utils.worker_utils import processor_for

    cfg = _cfg(run, name, k)
    save_run_config(Hessian(hessian_cfg=HessianConfig(method="autocorrelation"), index_cfg=cfg), cfg.partial_run_path)
    collector = AutocorrelationCollector(model=run.model.base_model, data=data, path=str(cfg.partial_run_path),
                                         processor=processor_for(cfg), target_modules=run.targets)  # fmt: skip
    _run(run, collector, data, batches, cfg)
    return str(cfg.partial_run_path)


def trackstar_fit(run: BergsonRun, k: int) -> str:
    """TrackStar's training-set ("value") autocorrelation Hessian at projection k: its path."""
    return _autocorrelation(run, run.train, run.train_batches, k, "value_hessian")


def trackstar_score(run: BergsonRun, value: str, k: int, tag: str = "q") -> Tensor:
    """[Q, N] TrackStar scores of run.query: its query Hessian, the mix with `value`, the damped
    inverse applied to the projected query gradients, the scoring pass."""
    from bergson.config.config import InversionConfig
    from bergson.hessians.preconditioner import load_preconditioner
    from bergson.process_grads import mix_autocorrelation_matrices

    query = _autocorrelation(run, run.query, run.query_batches, k, f"{tag}-query_hessian")
    mixed = mix_autocorrelation_matrices(query, value, run.root / f"{tag}-mixed_hessian")
    pre = load_preconditioner(str(mixed), inversion_cfg=InversionConfig(), power=-1.0)
    if pre is None:
        raise RuntimeError(f"Bergson loaded no preconditioner from {mixed}: the mixed Hessian is missing")
    queries = bergson_gradients(run, run.query, run.query_batches, k, f"{tag}-trackstar-grads")
    return bergson_score(run, pre.apply(queries), k, f"{tag}-trackstar-scores")


def bergson_trackstar(run: BergsonRun, k: int) -> Tensor:
    """[Q, N] TrackStar scores at projection k (`bergson trackstar` with its defaults)."""
    return trackstar_score(run, trackstar_fit(run, k), k)


def with_queries(run: BergsonRun, wq: Workload) -> BergsonRun:
    """The same run (model, training set, fitted Hessians under run.root) with wq's queries (LMs only:
    a classifier's queries live in its feature table)."""
    if isinstance(run.model, ClassifierAsLM):
        raise ValueError("with_queries takes LM workloads only; build a classifier's run with its queries")
    rows = [row.tolist() for b in wq.query for row in b[0]]
    return replace(run, query=_dataset(rows), query_batches=_index_batches(wq.query))


def bergson_modules(model: nn.Module) -> dict[str, Any]:
    """Bergson's default module set on `model` (every Linear under `model.base_model`; a model without
    one goes through `ClassifierAsLM`, whose base model is itself) and the Linear layers it leaves out."""
    base = getattr(model, "base_model", model)
    under = {id(m) for m in base.modules()}
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {"bergson_default": [n for n in linear if id(model.get_submodule(n)) in under],
            "bergson_default_skips": [n for n in linear if id(model.get_submodule(n)) not in under]}  # fmt: skip
