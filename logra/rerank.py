"""Full-size re-ranking: exact unprojected EK-FAC scores for a shortlist of training examples.

A projected store ranks the whole corpus cheaply; the examples that matter (a query's shortlist
from `InfluenceIndex.top_k` or `Scorer.top_k` with a generous k) are then scored again with their
*unprojected* per-example gradients and a full-size EK-FAC: per layer the eigenbases of the full
Kronecker factors A (n_in, n_in) and S (n_out, n_out) and the eigenvalue corrections
(n_out, n_in). Nothing full-size is stored for the corpus: the candidates' gradients are
recomputed from the model and their examples (as `TokenAttributor` does for its tokens), and the
full-size EK-FAC is fitted by a statistics-only pass over (a sample of) the training data.

    pre = fit_full_ekfac(model, store.config, batches, per_example_loss)  # once; pre.save(dir)
    rerank = FullRerank(store, model, pre, per_example_loss, examples)
    shortlist = index.top_k(query_record, k=100)                       # or scorer.top_k(...)
    best = rerank.top_k(query_batch, shortlist, k=10)                  # a TopK by full scores

`per_example_loss(model, batch) -> (B,)` is each example's own loss (what logging summed and
backpropagated); a batch is a tensor or a tuple / list / dict of tensors with the examples along
dim 0 (`logra.curvature.objective`); `examples(ids) -> batch` gives the store's training examples
of `ids`, in that order. Scores are the `Scorer`'s in the unprojected space, score(q, i) =
g_qᵀ H⁻¹ g_i with the same sign and the same normalisations (dot, cosine, relative), the norms
taken with the full H⁻¹; for a candidate set C they equal a `Scorer` over a store logged with
`full_config(config)` restricted to C, so the re-ranked top-k is the full-size ranking of C.

A wrong `examples` accessor would silently re-rank other examples, so the recomputed gradients
are projected with the store's own projections and compared with the stored rows (`check_rtol`);
a mismatch raises ConfigError naming the ids. A preconditioner from `fit_preconditioner` on a
store logged with `full_config(store.config)` is accepted too (it is the same EK-FAC).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from logra.capture.layers import projection_grams
from logra.capture.logger import GradientLogger
from logra.capture.rows import QueryRows, Record
from logra.config import LoGraConfig, LossReduction, NonFinitePolicy, StorageDtype
from logra.curvature.fisher import true_fisher_statistics
from logra.curvature.moments import FisherKind, FisherStatistics, kronecker_eigenbases
from logra.curvature.objective import Batch, batch_size, full_config
from logra.curvature.precondition import EKFACPreconditioner, Preconditioner, _resolve_damping
from logra.curvature.saved import preconditioner_fingerprint
from logra.errors import CaptureError, ConfigError
from logra.score import Normalization, TopK, _inverse_sqrt
from logra.store.reader import GradientStore
from logra.types import ExampleId, IdsLike, LayerInfo, normalize_ids, parse_enum

PerExampleLoss = Callable[[nn.Module, Batch], Tensor]
"""(model, batch) -> (B,) each example's own loss."""
Examples = Callable[[list[ExampleId]], Batch]
"""(ids) -> the batch of those training examples, in that order."""
MaskFn = Callable[[Batch], Tensor | None]
"""(batch) -> its (B, T) 0/1 mask of the logged layers' inputs, or None."""
Candidates = TopK | Sequence[Sequence[ExampleId]] | IdsLike
"""A TopK (per query: its helpful and harmful ids), one id list per query, or one list for all."""

DEFAULT_CHECK_RTOL = {StorageDtype.FLOAT64: 1e-6, StorageDtype.FLOAT32: 1e-3}
HALF_CHECK_RTOL = 2e-2  # float16 / bfloat16 stores: a row's relative rounding is ~1e-3


def rerank_config(config: LoGraConfig) -> LoGraConfig:
    """`full_config(config)` with summed losses and NaN refusal: the config of full-size rows."""
    d = full_config(config).to_dict()
    d.update(loss_reduction=LossReduction.SUM.value, nonfinite=NonFinitePolicy.RAISE.value)
    return LoGraConfig.from_dict(d)


def _layers_and_fingerprint(model: nn.Module, config: LoGraConfig) -> tuple[tuple[LayerInfo, ...], GradientLogger]:
    """The layer table of `config` on `model`, and the (closed) logger that drew it."""
    logger = GradientLogger(model, config, store=None, statistics=False)
    logger.close()  # only its layer table, fingerprint and projections are needed
    return tuple(logger.layers), logger


def fit_full_ekfac(
    model: nn.Module,
    config: LoGraConfig,
    batches: Iterable[Batch],
    loss: PerExampleLoss | None,
    *,
    damping: float | Mapping[str, float] | None = None,
    statistics: FisherStatistics | None = None,
    mask_fn: MaskFn | None = None,
    progress: bool | None = None,
) -> Preconditioner:
    """The full-size (unprojected) EK-FAC of `model`'s layers selected by `config`.

    Args:
        model, config: the model and the (projected) LoGraConfig of the training store.
        batches: (a sample of) the training batches, re-iterable (two passes: the Kronecker
            factors, then the eigenvalue corrections in their eigenbasis). Nothing is stored.
        loss: per-example losses (B,) of a batch (the empirical Fisher); None with `statistics`.
        damping: as `fit_preconditioner` (full-size units; None: 0.1 x each layer's mean eigenvalue).
        statistics: instead of the pass, the `FisherStatistics` of
            `true_fisher_statistics(model, rerank_config(config), ..., method="ekfac")`.
        mask_fn: batch -> (B, T) mask of padding, or None (every position counts).

    Returns an `EKFACPreconditioner` over the full-size layer table (rows of `rerank_config`);
    `save` / `load_preconditioner` persist it.
    """
    full = rerank_config(config)
    layers, _ = _layers_and_fingerprint(model, full)
    if statistics is None:
        if loss is None:
            raise ConfigError("fit_full_ekfac needs loss= (per-example losses) or statistics= (a true-Fisher pass).")
        # The empirical Fisher is a "true Fisher" whose labels are the data's own: the same two-pass
        # statistics-only machinery, with the user's loss in place of sampled labels.
        statistics = true_fisher_statistics(
            model, full, batches, lambda m, b, _gen: loss(m, b), method="ekfac",
            mask_fn=mask_fn or (lambda _b: None), param_grads=False, progress=progress,
        )  # fmt: skip
        fisher = FisherKind.EMPIRICAL
    else:
        if loss is not None:
            raise ConfigError("pass loss=None with statistics=: the statistics already hold the curvature.")
        fisher = FisherKind.TRUE
    _check_full_statistics(statistics, layers)
    assert statistics.eigenvalues is not None  # checked above
    grams = projection_grams(full, layers)
    factors = {
        name: {"grad_eigenvectors": q_s, "input_eigenvectors": q_a, "eigenvalues": statistics.eigenvalues[name]}
        for name, (q_s, _, q_a, _) in kronecker_eigenbases(statistics.kronecker, grams).items()
    }
    resolved = _resolve_damping(EKFACPreconditioner, layers, factors, damping, full.init)
    return EKFACPreconditioner(layers, factors, resolved, full.projection_fingerprint(), fisher)


def _check_full_statistics(statistics: FisherStatistics, layers: Sequence[LayerInfo]) -> None:
    if not isinstance(statistics, FisherStatistics) or statistics.eigenvalues is None:
        raise ConfigError(
            f"statistics must be FisherStatistics with EK-FAC eigenvalues, got {type(statistics).__name__}; compute "
            "them with true_fisher_statistics(model, rerank_config(config), batches, ..., method='ekfac')."
        )
    for layer in layers:
        kron = statistics.kronecker.get(layer.name)
        eig = statistics.eigenvalues.get(layer.name)
        shapes = (layer.n_in, layer.n_in), (layer.n_out, layer.n_out), (layer.n_out, layer.n_in)
        got = None if kron is None or eig is None else (kron.input_sum.shape, kron.grad_sum.shape, eig.shape)
        if got is None or tuple(map(tuple, got)) != shapes:
            raise ConfigError(
                f"the statistics of layer {layer.name!r} have shapes {got}, not the full-size {shapes}; compute them "
                "with true_fisher_statistics(model, rerank_config(config), ..., method='ekfac')."
            )


class FullRerank:
    """Score chosen training examples with recomputed unprojected gradients and a full-size preconditioner.

    Args:
        store: the projected training `GradientStore` (its ids, rows for the check, config, model).
        model: the model the store was logged with (its fingerprint is checked at every call).
        preconditioner: fitted on the full-size layer table (`fit_full_ekfac`).
        loss: per-example losses (B,) of a batch, as when the store was logged.
        examples: ids -> the batch of those training examples, in that order.
        normalization: dot | cosine | relative, as the `Scorer`'s (full-size norms).
        mask_fn: batch -> (B, T) padding mask of the logged layers' inputs, or None.
        batch_size: examples per recomputation batch (does not change results beyond rounding).
        check: project every recomputed gradient with the store's projections and compare it with
            its stored row (module docstring); False skips that (a non-deterministic model).
        check_rtol: the largest relative difference (row norms) the check allows; None: 1e-6 for
            float64 stores, 1e-3 for float32, 2e-2 for half precision.
    """

    def __init__(
        self,
        store: GradientStore,
        model: nn.Module,
        preconditioner: Preconditioner,
        loss: PerExampleLoss,
        examples: Examples,
        *,
        normalization: Normalization | str = Normalization.DOT,
        mask_fn: MaskFn | None = None,
        batch_size: int = 32,
        check: bool = True,
        check_rtol: float | None = None,
    ) -> None:
        if not isinstance(store, GradientStore):
            raise ConfigError(
                f"FullRerank needs a GradientStore (GradientStore.open(path)), got {type(store).__name__}."
            )
        if not isinstance(preconditioner, Preconditioner):
            raise ConfigError(
                f"FullRerank needs a Preconditioner (fit_full_ekfac), got {type(preconditioner).__name__}."
            )
        if not callable(loss) or not callable(examples):
            raise ConfigError("loss (model, batch) -> (B,) and examples (ids) -> batch must both be callable.")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive int.")
        self.store, self.model, self.loss, self.examples = store, model, loss, examples
        self.normalization = parse_enum(Normalization, normalization, "normalization")
        self.mask_fn, self.batch_size = mask_fn, batch_size
        self.config = rerank_config(store.config)
        projected_layers, projected = _layers_and_fingerprint(model, store.config)
        self._check_model(projected.model_fingerprint, projected_layers)
        self._projection = projected.projection
        self.layers, _ = _layers_and_fingerprint(model, self.config)
        self._check_preconditioner(preconditioner)
        self.preconditioner = preconditioner
        self.check_rtol = _check_rtol(check_rtol, store.dtype) if check else None
        self._row_of = {i: j for j, i in enumerate(store.ids)}

    # ------------------------------------------------------------ public surface

    def top_k(self, queries: Batch | Record | QueryRows, candidates: Candidates, k: int = 10) -> TopK:
        """The k most helpful and k most harmful of each query's candidates, by full-size scores.

        queries: a batch of Q query examples (their gradients are computed with `loss`), or a
            Record / QueryRows logged with `rerank_config(store.config)`.
        candidates: a TopK (per query: its helpful and harmful ids, e.g. `InfluenceIndex.top_k`
            with a large k), one id list per query, or one id list shared by every query.
        Returns a TopK whose scores [Q, k] are the full-size scores and whose rows index the store.
        Raises ConfigError when a query has fewer than k candidates.
        """
        query = self.query_rows(queries)
        per_query = self._candidate_lists(candidates, query.shape[0])
        union = list(dict.fromkeys(i for ids in per_query for i in ids))
        scores = self._scores(query, self.train_rows(union))  # (Q, m)
        column = {i: c for c, i in enumerate(union)}
        member = torch.zeros_like(scores, dtype=torch.bool)
        for q, ids in enumerate(per_query):
            member[q, [column[i] for i in ids]] = True
        fewest = int(member.sum(1).min())
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= fewest:
            raise ConfigError(f"k={k!r} must be an int between 1 and {fewest}, the fewest candidates of a query.")
        rows = torch.tensor([self._row_of[i] for i in union], dtype=torch.long)
        out: list[tuple[Tensor, Tensor]] = []
        for largest, fill in ((True, -torch.inf), (False, torch.inf)):
            top = scores.masked_fill(~member, fill).topk(k, dim=1, largest=largest, sorted=True)
            out.append((top.values, rows[top.indices]))
        (hv, hi), (lv, li) = out
        store_ids = self.store.ids
        helpful, harmful = ([[store_ids[j] for j in r] for r in x.tolist()] for x in (hi, li))
        return TopK(helpful, hv, harmful, lv, hi, li)

    def score(self, queries: Batch | Record | QueryRows, ids: IdsLike) -> Tensor:
        """Full-size scores [Q, m] (float64) of the queries against the training examples `ids`."""
        return self._scores(self.query_rows(queries), self.train_rows(self._known(normalize_ids(ids))))

    def train_rows(self, ids: Sequence[ExampleId]) -> Tensor:
        """Unprojected per-example gradients [m, P] (float64, CPU) of the store's examples `ids`,
        recomputed from `examples(ids)` and checked against their stored rows."""
        ids = self._known(list(ids))
        parts = [self._gradients(chunk, self.examples(chunk)) for chunk in _chunks(ids, self.batch_size)]
        rows = torch.cat(parts)
        if self.check_rtol is not None:
            self._check_rows(ids, rows)
        return rows

    def query_rows(self, queries: Batch | Record | QueryRows) -> Tensor:
        """Unprojected query gradients [Q, P] (float64, CPU) of a query batch, or the rows of a
        Record / QueryRows logged with `rerank_config(store.config)` (checked)."""
        if isinstance(queries, (Record, QueryRows)):
            return self._logged_queries(queries)
        n = batch_size(queries)
        return self._gradients(list(range(n)), queries)

    def provenance(self) -> dict[str, str]:
        """Fingerprints of what a re-ranked score comes from: the store and the full-size preconditioner."""
        return {"store": self.store.fingerprint, "preconditioner": preconditioner_fingerprint(self.preconditioner)}

    # ------------------------------------------------------------ internals

    def _scores(self, query: Tensor, train: Tensor) -> Tensor:
        """query [Q, P], train [m, P] -> normalised scores [Q, m], as the Scorer normalises."""
        pre = self.preconditioner.apply(query)  # (Q, P), H⁻¹ symmetric
        scores = pre @ train.T
        if self.normalization is not Normalization.DOT:
            scores = scores * _inverse_sqrt((self.preconditioner.apply(train) * train).sum(1))[None, :]
        if self.normalization is Normalization.COSINE:
            scores = scores * _inverse_sqrt((pre * query).sum(1))[:, None]
        return scores

    def _gradients(self, ids: list[ExampleId], batch: Batch) -> Tensor:
        """[B, P] float64 per-example gradients of `batch`, whose B examples are `ids`."""
        with GradientLogger(self.model, self.config, store=None, statistics=False) as logger:
            self._check_model(logger.model_fingerprint, None)
            mask = self.mask_fn(batch) if self.mask_fn is not None else None
            with logger.record(ids=ids, mask=mask, param_grads=False) as record:
                losses = self.loss(self.model, batch)
                if not isinstance(losses, Tensor) or losses.shape != (len(ids),):
                    got = tuple(losses.shape) if isinstance(losses, Tensor) else type(losses).__name__
                    raise CaptureError(
                        f"loss returned {got} for a batch of {len(ids)} examples; return the ({len(ids)},) "
                        "per-example losses (not their sum)."
                    )
                losses.sum().backward()
        assert record.rows is not None  # filled when the block exits
        return record.rows.detach().to("cpu", torch.float64)

    def _check_rows(self, ids: list[ExampleId], rows: Tensor) -> None:
        """Refuse recomputed gradients whose projection is not the stored row (another example)."""
        stored = self.store.take([self._row_of[i] for i in ids]).to(torch.float64)  # (m, D)
        projected = []
        for full, small in zip(self.layers, self.store.layers):
            p_in, p_out = self._projection(small.name)  # (k_in, n_in), (k_out, n_out)
            g = rows[:, full.offset : full.offset + full.size].reshape(-1, full.n_out, full.n_in)
            projected.append((p_out @ g @ p_in.T).reshape(len(ids), -1))
        error = (torch.cat(projected, 1) - stored).norm(dim=1) / stored.norm(dim=1).clamp_min(1e-300)
        bad = (error > self.check_rtol).nonzero().flatten().tolist()
        if bad:
            shown = [(ids[b], f"{float(error[b]):.2g}") for b in bad[:5]]
            raise ConfigError(
                f"the recomputed gradients of training ids {shown} (id, relative error) do not project to their stored "
                f"rows (tolerance {self.check_rtol:g}): examples(ids) returned other examples, or the model, loss or "
                "mask differ from logging. Fix the accessor, or pass check=False to skip the check."
            )

    def _logged_queries(self, queries: Record | QueryRows) -> Tensor:
        config = queries.config
        if (
            config is None
            or queries.rows is None
            or config.projection_fingerprint() != self.config.projection_fingerprint()
        ):
            raise ConfigError(
                "the query rows were not logged at full size for this store; log them with "
                "GradientLogger(model, logra.rerank.rerank_config(store.config)), or pass the query batch itself."
            )
        if tuple(queries.layers or ()) != self.layers:
            raise ConfigError(
                "the query rows' layer table is not this model's full-size one; log them with this model."
            )
        self._check_model(queries.model_fingerprint, None)
        return queries.rows.detach().to("cpu", torch.float64)

    def _check_model(self, fingerprint: str | None, layers: tuple[LayerInfo, ...] | None) -> None:
        if fingerprint != self.store.model_fingerprint or (layers is not None and layers != self.store.layers):
            raise ConfigError(
                f"the model (fingerprint {fingerprint}) is not the one the store at {self.store.root} was logged with "
                f"({self.store.model_fingerprint}), or its layers differ; pass the training model, unchanged."
            )

    def _check_preconditioner(self, preconditioner: Preconditioner) -> None:
        if preconditioner.fingerprint != self.config.projection_fingerprint() or preconditioner.layers != self.layers:
            raise ConfigError(
                f"the {preconditioner.method.value} preconditioner was fitted on {len(preconditioner.layers)} layers "
                f"with projection fingerprint {preconditioner.fingerprint}, not on this store's full-size layer table "
                f"({len(self.layers)} layers, {self.config.projection_fingerprint()}); fit it with "
                "fit_full_ekfac(model, store.config, ...)."
            )

    def _known(self, ids: list[ExampleId]) -> list[ExampleId]:
        missing = [i for i in ids if i not in self._row_of]
        if missing or not ids:
            raise ConfigError(
                f"training ids {missing[:5] or ids} are not in the store at {self.store.root}; candidates must be "
                "ids of the store (TopK.helpful_ids / harmful_ids, store.ids)."
            )
        return ids

    def _candidate_lists(self, candidates: Candidates, n_queries: int) -> list[list[ExampleId]]:
        """Each query's candidate ids, without repeats, checked to be in the store."""
        if isinstance(candidates, TopK):
            lists: list[Any] = [h + x for h, x in zip(candidates.helpful_ids, candidates.harmful_ids)]
        elif (
            isinstance(candidates, Sequence)
            and candidates
            and all(isinstance(c, Sequence) and not isinstance(c, str) for c in candidates)
        ):
            lists = list(candidates)
        else:
            lists = [normalize_ids(candidates)] * n_queries  # type: ignore[arg-type]
        if len(lists) != n_queries:
            raise ConfigError(f"candidates hold {len(lists)} lists for {n_queries} queries; give one per query.")
        return [self._known(list(dict.fromkeys(normalize_ids(ids)))) for ids in lists]


def _chunks(ids: list[ExampleId], size: int) -> list[list[ExampleId]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def _check_rtol(value: float | None, dtype: StorageDtype) -> float:
    if value is None:
        return DEFAULT_CHECK_RTOL.get(dtype, HALF_CHECK_RTOL)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ConfigError(f"check_rtol={value!r} must be a positive number, or None for the store dtype's default.")
    return float(value)
