"""Kronecker statistics on disk: flattened to named float64 arrays in an .npz (no pickle).

`parse_statistics` is the strict reader: the archive must hold exactly the arrays of the
manifest's layer table, each real float64 of the layer's shape and finite, with int64 counts
where every layer counts exactly the store's rows. Any other content (wrong shapes, structured
or complex dtypes, .npy bytes, an empty file, NaN/Inf, implausible counts) raises a
`StoreCorruptedError` naming the file; no other exception escapes.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from logra.errors import StoreCorruptedError
from logra.store.files import write_durable
from logra.types import KroneckerStatistics, LayerInfo

MAX_COUNT = 2**53


def statistics_to_arrays(stats: dict[str, KroneckerStatistics]) -> dict[str, np.ndarray]:
    """Flatten {layer: stats} to named numpy arrays (for an .npz file; no pickle)."""
    arrays: dict[str, np.ndarray] = {}
    for i, s in enumerate(stats.values()):
        arrays[f"{i}.input_sum"] = s.input_sum.numpy()
        arrays[f"{i}.grad_sum"] = s.grad_sum.numpy()
        arrays[f"{i}.counts"] = np.array([s.n_tokens, s.n_examples], dtype=np.int64)
    return arrays


def statistics_from_arrays(names: list[str], arrays: dict[str, np.ndarray]) -> dict[str, KroneckerStatistics]:
    """Inverse of `statistics_to_arrays`, given the layer names in order."""
    out: dict[str, KroneckerStatistics] = {}
    for i, name in enumerate(names):
        counts = arrays[f"{i}.counts"]
        out[name] = KroneckerStatistics(
            torch.from_numpy(np.array(arrays[f"{i}.input_sum"], dtype=np.float64)),
            torch.from_numpy(np.array(arrays[f"{i}.grad_sum"], dtype=np.float64)),
            int(counts[0]),
            int(counts[1]),
        )
    return out


def write_statistics(root: Path, name: str, statistics: dict[str, KroneckerStatistics]) -> tuple[str, str, int]:
    """Durably write statistics to `root/name`; returns the manifest entry (name, sha256, bytes)."""
    buffer = io.BytesIO()
    np.savez(buffer, **statistics_to_arrays(statistics))  # type: ignore[arg-type]
    data = buffer.getvalue()
    write_durable(root / name, lambda f: f.write(data))
    return name, hashlib.sha256(data).hexdigest(), len(data)


def _bad(path: Path, why: str) -> StoreCorruptedError:
    return StoreCorruptedError(f"{path}: {why}; the statistics file is damaged or was replaced. Re-log the store.")


def _arrays(raw: bytes, path: Path, expected: set[str]) -> dict[str, np.ndarray]:
    try:
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
    except Exception as exc:  # a parse boundary: zip, header or pickle refusals of any kind
        raise _bad(path, f"not a readable .npz archive ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise _bad(path, f"holds a single {type(loaded).__name__} (.npy bytes?), not an .npz archive")
    try:
        with loaded:
            names = set(loaded.files)
            if names != expected:
                extra, missing = sorted(names - expected)[:4], sorted(expected - names)[:4]
                raise _bad(path, f"holds the arrays {extra} it should not, and lacks {missing}")
            return {k: loaded[k] for k in expected}
    except StoreCorruptedError:
        raise
    except Exception as exc:
        raise _bad(path, f"an array cannot be read ({type(exc).__name__}: {str(exc)[:200]})") from None


def parse_statistics(
    raw: bytes, path: Path, layers: Sequence[LayerInfo], rows: int
) -> dict[str, KroneckerStatistics]:
    """Decode and check the bytes of a statistics file for `layers` of a store with `rows` rows."""
    names = [f"{i}.{k}" for i in range(len(layers)) for k in ("input_sum", "grad_sum", "counts")]
    arrays = _arrays(raw, path, set(names))
    out: dict[str, KroneckerStatistics] = {}
    for i, layer in enumerate(layers):
        sums = []
        for part, shape in (("input_sum", (layer.k_in, layer.k_in)), ("grad_sum", (layer.k_out, layer.k_out))):
            a = arrays[f"{i}.{part}"]
            if a.dtype != np.float64 or a.shape != shape:
                raise _bad(path, f"{part} of layer {layer.name!r} is {a.dtype} {a.shape}, not float64 {shape}")
            if not np.isfinite(a).all():
                raise _bad(path, f"{part} of layer {layer.name!r} holds NaN or Inf")
            sums.append(torch.from_numpy(np.array(a)))
        counts = arrays[f"{i}.counts"]
        if counts.dtype != np.int64 or counts.shape != (2,):
            raise _bad(path, f"the counts of layer {layer.name!r} are {counts.dtype} {counts.shape}, not int64 (2,)")
        n_tokens, n_examples = int(counts[0]), int(counts[1])
        if not 0 <= n_tokens <= MAX_COUNT or n_examples != rows:
            raise _bad(
                path,
                f"layer {layer.name!r} counts {n_tokens} tokens and {n_examples} examples, but the store has "
                f"{rows} rows (every layer counts each row once)",
            )
        out[layer.name] = KroneckerStatistics(sums[0], sums[1], n_tokens, n_examples)
    return out
