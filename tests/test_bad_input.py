"""Bad input: each case gets a clear error naming the problem, or correct behaviour.

NaN/Inf gradients (raise naming the ids, or skip and record them with statistics that exclude
them), non-finite padding, empty datasets, models with no loggable layer, unsupported layer types,
a query logged with another config, seed or model than the store, duplicate ids, resuming with
statistics switched, overflow of the storage dtype, a bf16 model. Rows and statistics are compared
with the batch-size-1 autograd references of tests/models.py.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from models import (
    assert_rows_close,
    build_model,
    collate,
    log_rows,
    make_examples,
    per_example_loss,
    reference_rows,
    reference_statistics,
)
from torch import nn

import logra
from logra.errors import CaptureError, ConfigError, DuplicateIdError, NonFiniteGradientError, StoreError
from logra.store import check_compatible
from logra.store.encoding import TORCH_DTYPES

REL = 1e-10


def _cfg(**kw) -> logra.LoGraConfig:
    return logra.LoGraConfig(**{"k_in": 4, "k_out": 3, "seed": 7, "dtype": "float64", "include_bias": True, **kw})


def _log_weighted(logger, model, examples, ids, weights, batch_size: int = 3) -> None:
    """Log batches whose per-example losses are multiplied by `weights` (NaN/Inf poison an example)."""
    for start in range(0, len(examples), batch_size):
        batch, mask = collate(examples[start : start + batch_size])
        with logger.record(ids=ids[start : start + batch_size], mask=mask):
            (per_example_loss(model, batch) * weights[start : start + batch_size]).sum().backward()


# ---------------------------------------------------------------- NaN and Inf


@pytest.mark.parametrize("poison", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradients_raise_naming_the_ids_and_write_nothing(tmp_path: Path, poison: float) -> None:
    model, examples = build_model("mlp"), make_examples("mlp", 6, seed=1)
    ids = [f"ex{i}" for i in range(6)]
    weights = torch.ones(6, dtype=torch.float64)
    weights[4] = poison
    with logra.GradientLogger(model, _cfg(), store=tmp_path / "s", shard_rows=1) as logger:
        _log_weighted(logger, model, examples[:3], ids[:3], weights[:3])
        with pytest.raises(NonFiniteGradientError, match=r"\['ex4'\].*nonfinite='skip'"):
            _log_weighted(logger, model, examples[3:], ids[3:], weights[3:])
        assert logger.committed_ids == frozenset(ids[:3])
        # The failed batch left nothing behind: it can be logged again without the bad example.
        _log_weighted(logger, model, [examples[3], examples[5]], ["ex3", "ex5"], torch.ones(2))
    store = logra.GradientStore.open(tmp_path / "s")
    assert store.ids == ["ex0", "ex1", "ex2", "ex3", "ex5"] and store.skipped == ()
    kept = [examples[i] for i in (0, 1, 2, 3, 5)]
    assert_rows_close(
        store.rows(), reference_rows(model, kept, store.layers, logger.projection, True), store.layers, REL
    )


def test_skip_policy_records_ids_and_statistics_exclude_them(tmp_path: Path) -> None:
    model, examples = build_model("mlp"), make_examples("mlp", 9, seed=2)
    ids = [f"ex{i}" for i in range(9)]
    weights = torch.ones(9, dtype=torch.float64)
    weights[[1, 5, 6]] = torch.tensor([float("nan"), float("inf"), float("nan")], dtype=torch.float64)
    with logra.GradientLogger(model, _cfg(nonfinite="skip"), store=tmp_path / "s", shard_rows=2) as logger:
        _log_weighted(logger, model, examples, ids, weights)
    store = logra.GradientStore.open(tmp_path / "s")
    store.verify()
    kept_index = [0, 2, 3, 4, 7, 8]
    assert store.ids == [ids[i] for i in kept_index] and sorted(store.skipped) == ["ex1", "ex5", "ex6"]
    kept = [examples[i] for i in kept_index]
    assert_rows_close(
        store.rows(), reference_rows(model, kept, store.layers, logger.projection, True), store.layers, REL
    )
    expected = reference_statistics(model, kept, store.layers, logger.projection)
    for name, s in store.statistics().items():
        a, g, n_tokens, n_examples = expected[name]
        assert (s.n_tokens, s.n_examples) == (n_tokens, n_examples)
        assert torch.allclose(s.input_sum, a, rtol=REL, atol=REL * a.abs().max().item())
        assert torch.allclose(s.grad_sum, g, rtol=REL, atol=REL * g.abs().max().item())
    # Skipped ids count as logged: resuming refuses them like any other committed id.
    with logra.GradientLogger(model, _cfg(nonfinite="skip"), store=tmp_path / "s") as logger:
        assert {"ex1", "ex5", "ex6"} <= logger.committed_ids
        with pytest.raises(DuplicateIdError, match="ex5"):
            _log_weighted(logger, model, examples[5:6], ["ex5"], torch.ones(1))


def test_non_finite_values_in_padding_do_not_leak_into_rows() -> None:
    """Padding positions may hold NaN activations and gradients; masked, they must count as zero."""
    model, examples = build_model("mlp"), make_examples("mlp", 4, seed=3, min_len=2, max_len=6)
    batch, mask = collate(examples)
    batch["x"] = batch["x"].masked_fill(mask.unsqueeze(-1) == 0, float("nan"))
    with logra.GradientLogger(model, _cfg()) as logger:
        with logger.record(ids=[0, 1, 2, 3], mask=mask) as rec:
            per_example_loss(model, batch).sum().backward()
    assert torch.isfinite(rec.rows).all() and rec.skipped == []
    assert_rows_close(
        rec.rows, reference_rows(model, examples, logger.layers, logger.projection, True), logger.layers, REL
    )


# ---------------------------------------------------------------- empty stores


@pytest.mark.parametrize("statistics", [True, False])
def test_a_logger_closed_with_nothing_logged_leaves_a_valid_empty_store(tmp_path: Path, statistics: bool) -> None:
    model = build_model("mlp")
    with logra.GradientLogger(model, _cfg(), store=tmp_path / "s", statistics=statistics) as logger:
        pass
    store = logra.GradientStore.open(tmp_path / "s")
    store.verify()
    assert len(store) == 0 and store.ids == [] and store.dim == logger.dim
    assert store.rows().shape == (0, logger.dim) and store.rows().dtype == torch.float64
    assert store.layer_rows(logger.layers[0].name).shape == (0, logger.layers[0].size)
    assert list(store.iter_chunks(4)) == []
    if statistics:
        assert all(s.n_examples == 0 and s.n_tokens == 0 and not s.input_sum.any() for s in store.statistics().values())
    else:
        with pytest.raises(StoreError, match="statistics=False"):
            store.statistics()
    # Resuming the empty store works and then holds exactly what was logged.
    examples = make_examples("mlp", 3, seed=4)
    with logra.GradientLogger(model, _cfg(), store=tmp_path / "s", statistics=statistics) as logger:
        log_rows(logger, examples, ["a", "b", "c"], batch_size=2)
    store = logra.GradientStore.open(tmp_path / "s")
    assert store.ids == ["a", "b", "c"]
    assert_rows_close(
        store.rows(), reference_rows(model, examples, store.layers, logger.projection, True), store.layers, REL
    )


def test_a_store_of_only_skipped_examples_has_no_rows(tmp_path: Path) -> None:
    model, examples = build_model("mlp"), make_examples("mlp", 3, seed=5)
    with logra.GradientLogger(model, _cfg(nonfinite="skip"), store=tmp_path / "s") as logger:
        _log_weighted(logger, model, examples, ["a", "b", "c"], torch.full((3,), float("nan"), dtype=torch.float64))
    store = logra.GradientStore.open(tmp_path / "s")
    store.verify()
    assert len(store) == 0 and sorted(store.skipped) == ["a", "b", "c"]
    assert all(s.n_examples == 0 for s in store.statistics().values())


# ---------------------------------------------------------------- layers


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.conv(x).mean(dim=(2,)).reshape(x.shape[0], -1)[:, :4]))


def test_patterns_that_match_no_layer_are_refused() -> None:
    with pytest.raises(CaptureError, match=r"'\*attn\*' matches no supported layer.*fc1, fc2, head"):
        logra.GradientLogger(build_model("mlp"), _cfg(modules=["*attn*"]))
    with pytest.raises(CaptureError, match="leave none"):
        logra.GradientLogger(build_model("mlp"), _cfg(exclude=["*"]))
    with pytest.raises(CaptureError, match="no layer to log in Sequential"):
        logra.GradientLogger(nn.Sequential(nn.ReLU(), nn.Tanh()), _cfg())


def test_patterns_that_match_only_unsupported_layers_are_refused() -> None:
    with pytest.raises(
        CaptureError, match=r"'conv' matches only layers logra cannot log: conv \(Conv2d\).*LayerAdapter"
    ):
        logra.GradientLogger(ConvNet(), _cfg(modules=["conv"]))
    with pytest.raises(CaptureError, match=r"norm \(LayerNorm\)"):
        logra.GradientLogger(ConvNet(), _cfg(modules=["norm"]))
    with logra.GradientLogger(ConvNet(), _cfg(modules=None)) as logger:  # all supported layers: only the head
        assert [layer.name for layer in logger.layers] == ["head"]


def test_batch_shape_mismatches_are_refused() -> None:
    model, examples = build_model("mlp"), make_examples("mlp", 3, seed=6)
    batch, mask = collate(examples)
    with logra.GradientLogger(model, _cfg()) as logger:
        with pytest.raises(CaptureError, match="record\\(\\) was given 2 ids"):
            with logger.record(ids=[0, 1]):
                per_example_loss(model, batch).sum().backward()
        with pytest.raises(CaptureError, match="mask of shape"):
            with logger.record(ids=[0, 1, 2], mask=mask[:2]):
                pass
        with pytest.raises(CaptureError, match="positions per example"):
            with logger.record(ids=[0, 1, 2], mask=mask[:, :-1]):
                per_example_loss(model, batch).sum().backward()
        with pytest.raises(CaptureError, match="no ids"):
            with logger.record(ids=[]):
                pass
        with logger.record(ids=[0, 1, 2], mask=mask) as rec:  # the logger still works after the refusals
            per_example_loss(model, batch).sum().backward()
    assert rec.rows is not None and rec.rows.shape == (3, logger.dim)


# ---------------------------------------------------------------- ids


def test_duplicate_ids_are_refused_within_and_across_batches_and_runs(tmp_path: Path) -> None:
    model, examples = build_model("mlp"), make_examples("mlp", 6, seed=7)
    with logra.GradientLogger(model, _cfg(), store=tmp_path / "s", shard_rows=2) as logger:
        with pytest.raises(DuplicateIdError, match=r"\[7\]"):
            log_rows(logger, examples[:2], [7, 7], batch_size=2)
        log_rows(logger, examples[:2], [1, 2], batch_size=2)
        with pytest.raises(DuplicateIdError, match=r"\[2\]"):
            log_rows(logger, examples[2:4], [3, 2], batch_size=2)
        log_rows(logger, examples[2:3], [3], batch_size=1)  # pending, not yet committed
        with pytest.raises(DuplicateIdError, match=r"\[3\]"):
            log_rows(logger, examples[3:4], [3], batch_size=1)
    with logra.GradientLogger(model, _cfg(), store=tmp_path / "s") as logger:
        with pytest.raises(DuplicateIdError, match="committed_ids"):
            log_rows(logger, examples[4:6], [4, 1], batch_size=2)
    store = logra.GradientStore.open(tmp_path / "s")
    assert store.ids == [1, 2, 3]


def test_resuming_with_statistics_switched_is_refused(tmp_path: Path) -> None:
    model, examples = build_model("mlp"), make_examples("mlp", 2, seed=8)
    for statistics in (True, False):
        path = tmp_path / f"s{statistics}"
        with logra.GradientLogger(model, _cfg(), store=path, statistics=statistics) as logger:
            log_rows(logger, examples[:1], ["a"], batch_size=1)
        with pytest.raises(StoreError, match=f"resume it with GradientLogger\\(..., statistics={statistics}\\)"):
            logra.GradientLogger(model, _cfg(), store=path, statistics=not statistics)


# ---------------------------------------------------------------- joining a query to a store


@pytest.fixture(scope="module")
def train_store(tmp_path_factory: pytest.TempPathFactory) -> logra.GradientStore:
    path = tmp_path_factory.mktemp("train") / "s"
    model = build_model("mlp")
    with logra.GradientLogger(model, _cfg(), store=path) as logger:
        log_rows(logger, make_examples("mlp", 3, seed=9), ["a", "b", "c"], batch_size=3)
    return logra.GradientStore.open(path)


@pytest.mark.parametrize(
    "change, field",
    [({"seed": 8}, "seed"), ({"k_in": 5}, "k_in"), ({"init": "rademacher"}, "init"),
     ({"include_bias": False}, "include_bias"),
     ({"modules": ["fc*"]}, "modules")],
)  # fmt: skip
def test_a_query_logged_with_another_config_is_refused(train_store, change, field: str) -> None:
    with logra.GradientLogger(build_model("mlp"), _cfg(**change)) as query:
        with pytest.raises(ConfigError, match=f"'{field}'.*LoGraConfig.from_dict"):
            check_compatible(train_store, query)
    with pytest.raises(ConfigError, match=field):
        check_compatible(train_store, _cfg(**change))


def test_compatible_queries_pass_and_other_models_are_refused(train_store) -> None:
    # Storage dtype, loss reduction and NaN policy may differ between the two sides.
    same = _cfg(dtype="bfloat16", loss_reduction="mean", nonfinite="skip")
    with logra.GradientLogger(build_model("mlp"), same) as query:
        check_compatible(train_store, query)
    check_compatible(train_store, same)
    check_compatible(train_store, train_store)
    with logra.GradientLogger(build_model("mlp", seed=1), _cfg()) as query:  # other weights
        with pytest.raises(ConfigError, match="other model weights.*check_model=False"):
            check_compatible(train_store, query)
        check_compatible(train_store, query, check_model=False)
    with logra.GradientLogger(build_model("twice"), _cfg()) as query:  # another architecture
        with pytest.raises(ConfigError, match="layer table differs"):
            check_compatible(train_store, query, check_model=False)
    with pytest.raises(ConfigError, match="needs a GradientLogger"):
        check_compatible(train_store, {"seed": 7})


# ---------------------------------------------------------------- dtypes


def test_rows_that_overflow_the_storage_dtype_are_refused(tmp_path: Path) -> None:
    model, examples = build_model("mlp"), make_examples("mlp", 2, seed=10)
    for dtype in ("float32", "float16", "bfloat16"):
        with pytest.raises(StoreError, match=f"examples \\['b'\\] overflow the storage dtype {dtype}"):
            with logra.GradientLogger(model, _cfg(dtype=dtype), store=tmp_path / dtype) as logger:
                _log_weighted(logger, model, examples, ["a", "b"], torch.tensor([1.0, 1e300], dtype=torch.float64), 2)
        store = logra.GradientStore.open(tmp_path / dtype)
        assert len(store) == 0


@pytest.mark.parametrize("arch", ["gpt2", "mlp"])
@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_a_bf16_model_logs_float32_rows_close_to_the_float32_model(tmp_path: Path, arch: str, storage: str) -> None:
    base = build_model(arch)
    examples = make_examples(arch, 6, seed=11)
    cfg = _cfg(k_in=8, k_out=8, dtype=storage)
    rows = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = copy.deepcopy(base).to(dtype)
        cast = [{k: v.to(dtype) if v.is_floating_point() else v for k, v in e.items()} for e in examples]
        with logra.GradientLogger(model, cfg, store=tmp_path / str(dtype)) as logger:
            _, computed = log_rows(logger, cast, list(range(6)), batch_size=3)
        assert computed.dtype == torch.float32  # half models are projected in float32
        stored = logra.GradientStore.open(tmp_path / str(dtype)).rows()
        assert stored.dtype == TORCH_DTYPES[logra.StorageDtype(storage)]
        assert torch.equal(stored, computed.to(stored.dtype))
        rows[dtype] = stored.double()
    cosine = torch.nn.functional.cosine_similarity(rows[torch.float32], rows[torch.bfloat16], dim=1)
    assert cosine.min() >= 0.999, cosine
