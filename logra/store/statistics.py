"""Kronecker statistics on disk: flattened to named float64 arrays in an .npz (no pickle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from logra.store.files import sha256_file, write_durable
from logra.types import KroneckerStatistics


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


def write_statistics(root: Path, name: str, statistics: dict[str, KroneckerStatistics]) -> tuple[str, str]:
    """Durably write statistics to `root/name`; returns the manifest entry (name, sha256)."""
    write_durable(root / name, lambda f: np.savez(f, **statistics_to_arrays(statistics)))  # type: ignore[arg-type]
    return name, sha256_file(root / name)
