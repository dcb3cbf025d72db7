"""Half-precision storage: half the bytes, scores that correlate with float32 storage, no underflow.

bfloat16 and float16 stores of the same rows as a float32 store must take exactly half the row
bytes, keep every entry within the dtype's rounding of the float32 value (relative to its row's
largest entry), and give query-train scores (plain dot products) that correlate >= 0.99 with the
float32 store's. float16 scales every row by a power of two (logra.encoding): gradients of
magnitude ~1e-9, which a plain float16 cast flushes to zero, must survive with 11 significant
bits, and large ones must not overflow. Models are float64, so the float32 store is the reference.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import build_model, collate, make_examples, per_example_loss

import logra

N, Q, SHARD_ROWS = 30, 6, 8
EPS = {"bfloat16": 2.0**-8, "float16": 2.0**-11}
TINY = 2.0**-30  # ~9.3e-10: scales every gradient, exactly (a power of two)


def _cfg(dtype: str) -> logra.LoGraConfig:
    return logra.LoGraConfig(k_in=6, k_out=6, seed=4, dtype=dtype, include_bias=True)


def _log(model, examples, path: Path | None, dtype: str, loss_scale: float = 1.0) -> torch.Tensor:
    """Rows of `examples` (in memory when `path` is None, else read back from the store)."""
    rows = []
    with logra.GradientLogger(model, _cfg(dtype), store=path, shard_rows=SHARD_ROWS) as logger:
        for start in range(0, len(examples), 5):
            batch, mask = collate(examples[start : start + 5])
            with logger.record(ids=list(range(start, start + len(examples[start : start + 5]))), mask=mask) as rec:
                (per_example_loss(model, batch) * loss_scale).sum().backward()
            rows.append(rec.rows)
    return torch.cat(rows) if path is None else logra.GradientStore.open(path).rows()


@pytest.fixture(scope="module", params=["mlp", "gpt2"])
def case(request: pytest.FixtureRequest) -> tuple[torch.nn.Module, list, torch.Tensor]:
    model = build_model(request.param)
    examples = make_examples(request.param, N, seed=12)
    queries = _log(model, make_examples(request.param, Q, seed=13), None, "float64")  # (Q, D) float64
    return model, examples, queries


def _shard_bytes(path: Path, suffix: str = ".bin") -> list[int]:
    files = sorted(path.glob(f"shard-*{suffix}"))
    return [p.stat().st_size for p in files if suffix != ".bin" or not p.name.endswith(".scales.bin")]


def _pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.corrcoef(torch.stack([a.flatten(), b.flatten()]).double())[0, 1].item()


def _assert_within_rounding(half: torch.Tensor, full: torch.Tensor, eps: float) -> None:
    """Each entry within eps x its row's largest |entry| of the float32 value (rounding once)."""
    peak = full.abs().amax(dim=1, keepdim=True)
    assert (peak > 0).all()
    err = ((half.double() - full.double()).abs() / peak).max().item()
    assert err <= eps, f"error {err:.3g} of the row peak exceeds {eps:.3g}"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_storage_halves_bytes_and_scores_correlate(tmp_path: Path, case, dtype: str) -> None:
    model, examples, queries = case
    full = _log(model, examples, tmp_path / "f32", "float32")
    half = _log(model, examples, tmp_path / dtype, dtype)
    assert [2 * b for b in _shard_bytes(tmp_path / dtype)] == _shard_bytes(tmp_path / "f32")
    if dtype == "float16":  # plus one float32 scale per row
        assert [4 * r.rows for r in logra.GradientStore.open(tmp_path / dtype).manifest.shards] == _shard_bytes(
            tmp_path / dtype, ".scales.bin"
        )
    assert half.dtype == (torch.float32 if dtype == "float16" else torch.bfloat16)
    _assert_within_rounding(half, full, EPS[dtype])
    scores_full = queries @ full.double().T  # (Q, N)
    scores_half = queries @ half.double().T
    assert _pearson(scores_half, scores_full) >= 0.99
    assert _pearson(scores_half, scores_full) >= 0.9999  # what the rounding bounds above imply here


def test_float16_keeps_gradients_of_magnitude_1e_9(tmp_path: Path, case) -> None:
    model, examples, queries = case
    normal = _log(model, examples, tmp_path / "normal", "float16")
    tiny = _log(model, examples, tmp_path / "tiny", "float16", loss_scale=TINY)
    full = _log(model, examples, tmp_path / "f32", "float32", loss_scale=TINY)
    assert 1e-12 < full.abs().amax(dim=1).min() and full.abs().max() < 1e-7, "the test gradients are not ~1e-9"
    naive = full.to(torch.float16)
    assert (naive == 0).double().mean() > 0.9, "a plain float16 cast should have flushed these rows to zero"
    # Power-of-two scaling is exact: the tiny rows are the normal rows times 2**-30, bit for bit.
    assert torch.equal(tiny, normal * TINY)
    assert (tiny.abs().amax(dim=1) > 0).all()
    _assert_within_rounding(tiny, full, EPS["float16"])
    assert _pearson(queries @ tiny.double().T, queries @ full.double().T) >= 0.9999


def test_float16_scaling_is_exact_for_a_float32_model(tmp_path: Path) -> None:
    model = build_model("mlp").float()
    examples = [{"x": e["x"].float(), "y": e["y"]} for e in make_examples("mlp", 12, seed=14)]
    normal = _log(model, examples, tmp_path / "normal", "float16")
    tiny = _log(model, examples, tmp_path / "tiny", "float16", loss_scale=TINY)
    full = _log(model, examples, tmp_path / "f32", "float32", loss_scale=TINY)
    assert torch.equal(tiny, normal * TINY) and (tiny.abs().amax(dim=1) > 0).all()
    _assert_within_rounding(tiny, full, EPS["float16"])


def test_float16_does_not_overflow_large_gradients(tmp_path: Path, case) -> None:
    model, examples, _ = case
    full = _log(model, examples, tmp_path / "f32", "float32", loss_scale=2.0**20)
    assert full.abs().max() > 65504, "the test gradients do not exceed the float16 range"
    big = _log(model, examples, tmp_path / "big", "float16", loss_scale=2.0**20)
    assert torch.isfinite(big).all()
    _assert_within_rounding(big, full, EPS["float16"])


def test_float16_readers_return_the_same_rescaled_rows(tmp_path: Path, case) -> None:
    model, examples, _ = case
    rows = _log(model, examples, tmp_path / "s", "float16", loss_scale=TINY)
    store = logra.GradientStore.open(tmp_path / "s")
    store.verify()
    chunks = list(store.iter_chunks(3))
    assert all(c.dtype == torch.float32 for _, c in chunks)
    assert torch.equal(torch.cat([c for _, c in chunks]), rows)
    assert [first for first, _ in chunks] == [0, 3, 6, 9, 10, 13, 16, 19, 20, 23, 26, 29]  # shards of 10: none crossed
    assert torch.equal(store.rows(5, 13), rows[5:13])
    for layer in store.layers:
        assert torch.equal(store.layer_rows(layer.name, 2, 9), rows[2:9, layer.offset : layer.offset + layer.size])
    chunks[0][1].fill_(1.0)  # a copy: the store is not touched
    assert torch.equal(logra.GradientStore.open(tmp_path / "s").rows(), rows)
