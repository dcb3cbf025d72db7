"""Streaming corpora (logra.streaming): generators and IterableDatasets give the map-style store,
resume without recomputing committed examples, and split across ranks into the one-process store."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import logra
from logra.errors import ConfigError
from logra.store import merge_rank_manifests

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))
import common  # noqa: E402
from test_distributed import assert_same_contents  # noqa: E402

N = 23
CONFIG = logra.LoGraConfig(k_in=3, k_out=2, dtype="float64")


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def corpus() -> Iterator[dict]:
    """A generator: examples with a string id, made on the fly."""
    g = torch.Generator().manual_seed(1)
    for i in range(N):
        yield {"id": f"ex{i:03d}", "x": torch.randn(4, generator=g, dtype=torch.float64), "y": i % 3}


def _log_batch(logger: logra.GradientLogger, model: nn.Module, ids: list, examples: list, calls: list) -> None:
    calls.append(len(ids))
    x = torch.stack([e["x"] for e in examples])
    y = torch.tensor([e["y"] for e in examples])
    with logger.record(ids=ids):
        F.cross_entropy(model(x), y, reduction="sum").backward()


def _reference(path: Path) -> logra.GradientStore:
    """The same examples as one list, batches of 5."""
    model, examples = _model(), list(corpus())
    with logra.GradientLogger(model, CONFIG, path) as logger:
        for s in range(0, N, 5):
            _log_batch(logger, model, [e["id"] for e in examples[s : s + 5]], examples[s : s + 5], [])
    return logra.GradientStore.open(path)


def test_a_generator_gives_the_list_store_with_ids_from_a_key_or_a_counter(tmp_path: Path) -> None:
    ref = _reference(tmp_path / "ref")
    model = _model()
    with logra.GradientLogger(model, CONFIG, tmp_path / "s") as logger:
        for ids, examples in logra.stream_batches(corpus(), 4, id_key="id"):
            _log_batch(logger, model, ids, examples, [])
    store = logra.GradientStore.open(tmp_path / "s")
    assert store.ids == ref.ids
    assert_same_contents(store, ref)
    counted = [ids for ids, _ in logra.stream_batches(corpus(), 10)]
    assert counted == [list(range(10)), list(range(10, 20)), [20, 21, 22]]
    by_fn = [ids for ids, _ in logra.stream_batches(corpus(), 30, id_key=lambda e: e["id"].upper())]
    assert by_fn[0][:2] == ["EX000", "EX001"]
    with pytest.raises(ConfigError, match="has no id 'uid'"):
        next(logra.stream_batches(corpus(), 4, id_key="uid"))


def test_resume_skips_committed_examples_without_computing_them(tmp_path: Path) -> None:
    ref = _reference(tmp_path / "ref")
    model, calls = _model(), []
    with pytest.raises(RuntimeError, match="killed"):
        with logra.GradientLogger(model, CONFIG, tmp_path / "s") as logger:
            for b, (ids, examples) in enumerate(logra.stream_batches(corpus(), 4, id_key="id")):
                if b == 3:
                    raise RuntimeError("killed")  # after 3 committed batches: 12 examples
                _log_batch(logger, model, ids, examples, calls)
    calls.clear()
    with logra.GradientLogger(model, CONFIG, tmp_path / "s") as logger:
        assert len(logger.committed_ids) == 12
        for ids, examples in logra.stream_batches(corpus(), 4, id_key="id", skip=logger.committed_ids):
            _log_batch(logger, model, ids, examples, calls)
    assert sum(calls) == N - 12  # only the rest was run through the model
    assert_same_contents(logra.GradientStore.open(tmp_path / "s"), ref)


def test_ranks_split_a_stream_into_the_one_process_store(tmp_path: Path) -> None:
    ref = _reference(tmp_path / "ref")
    total, seen = None, []
    for rank in range(3):
        model = _model()
        with logra.GradientLogger(model, CONFIG, tmp_path / "s", rank=rank, world_size=3) as logger:
            for ids, examples in logra.stream_batches(corpus(), 4, id_key="id", rank=rank, world=3):
                seen += ids
                _log_batch(logger, model, ids, examples, [])
        stats = logger.statistics()
        total = stats if total is None else {k: total[k] + stats[k] for k in stats}
    assert sorted(seen) == sorted(ref.ids) and len(seen) == N  # every example once
    merge_rank_manifests(tmp_path / "s", 3, total)
    assert_same_contents(logra.GradientStore.open(tmp_path / "s"), ref)


@pytest.mark.parametrize("kind", ["torch", "datasets", "generator"])
def test_log_trainer_streams_iterable_datasets(tmp_path: Path, kind: str) -> None:
    from logra.integrations.hf import log_trainer

    reference = log_trainer(common.hf_trainer(common.model(), tmp_path / "t"), common.CONFIG, tmp_path / "ref",
                            dataset=common.hf_dataset(), id_column="uid", batch_size=3, progress=False)  # fmt: skip
    rows = common.hf_dataset().to_list()
    if kind == "torch":

        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self) -> Iterator[dict]:
                return iter(rows)

        data = Stream()
    elif kind == "datasets":
        data = common.hf_dataset().to_iterable_dataset()
    else:
        data = (r for r in rows)
    got = log_trainer(common.hf_trainer(common.model(), tmp_path / "t"), common.CONFIG, tmp_path / "s",
                      dataset=data, id_column="uid", batch_size=4, progress=False)  # fmt: skip
    assert got.ids == reference.ids
    assert_same_contents(got, reference)
