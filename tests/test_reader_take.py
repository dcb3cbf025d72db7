"""GradientStore.take: random row reads give the same rows, order and values as a full read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

import logra
from logra.store.writer import StoreWriter
from logra.types import LayerInfo

D = 24


def _store(root: Path, dtype: str, n: int = 1000, shard_rows: int = 170) -> logra.GradientStore:
    layers = [LayerInfo("a", "linear", 8, 6, 4, 6, False, 0)]
    writer = StoreWriter(root, logra.LoGraConfig(k_in=4, k_out=6, dtype=dtype), "f" * 16, layers, shard_rows)
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(n, D, generator=gen, dtype=torch.float64)
    rows *= torch.logspace(-6, 3, n, dtype=torch.float64)[torch.randperm(n, generator=gen), None]  # float16 scales
    for s in range(0, n, 130):
        writer.append([f"ex{i}" for i in range(s, min(n, s + 130))], rows[s : s + 130])
        writer.commit_if_full(None)
    writer.close(None)
    return logra.GradientStore.open(root)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
def test_take_equals_the_rows_read_in_order(tmp_path: Path, dtype: str) -> None:
    store = _store(tmp_path / dtype, dtype)
    assert len(store.manifest.shards) > 3
    full = store.rows()  # read through the memory maps, a different path from take's preads
    gen = torch.Generator().manual_seed(1)
    picks = [
        torch.tensor([999, 0, 169, 170, 171, 5, 5, 999, 340]),  # unsorted, repeated, both sides of shard edges
        torch.arange(150, 520),  # runs that cross several shards
        torch.randint(0, 1000, (700,), generator=gen),  # more runs than threads
        torch.randperm(1000, generator=gen),
    ]
    for rows in picks:
        got = store.take(rows)
        assert got.dtype == full.dtype and got.shape == (rows.numel(), D)
        assert torch.equal(got, full[rows])  # bit-identical, in the order asked
    assert torch.equal(store.take([3, 998]), full[[3, 998]])  # a list works too
    assert store.take([]).shape == (0, D) and store.take([]).dtype == full.dtype


def test_take_rejects_rows_outside_the_store(tmp_path: Path) -> None:
    store = _store(tmp_path / "s", "float32", n=300)
    for bad in ([300], [-1], [0, 5, 10**9]):
        with pytest.raises(logra.StoreError, match=r"row indices must lie in \[0, 300\)"):
            store.take(bad)


def test_take_from_a_shard_truncated_after_open(tmp_path: Path) -> None:
    store = _store(tmp_path / "s", "float32", n=300)
    last = store.root / store.manifest.shards[-1].file
    os.truncate(last, 4 * D)  # one row left of the last shard
    with pytest.raises(logra.StoreCorruptedError, match="truncated after open"):
        store.take([299])
    last.unlink()
    with pytest.raises(logra.StoreCorruptedError, match="cannot be opened"):
        store.take([0, 299])
    assert torch.equal(store.take([0, 1]), store.rows(0, 2))  # the other shards still read
