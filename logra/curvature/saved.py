"""A preconditioner on disk: `preconditioner.json` (method, damping, layer table, checksums) and `factors.npz`.

Both are written durably (`logra.store.files.write_durable`); the JSON names the .npz with its
SHA-256, and the .npz is read with `allow_pickle=False`, so nothing on the load path executes code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from logra.curvature.precondition import Preconditioner, PreconditionerMethod
from logra.errors import ConfigError, StoreCorruptedError, StoreError
from logra.store.files import sha256_file, write_atomic, write_durable
from logra.types import LayerInfo

FORMAT = "logra-preconditioner"
FORMAT_VERSION = 1
_JSON = "preconditioner.json"
_NPZ = "factors.npz"


def save_preconditioner(preconditioner: Preconditioner, directory: str | os.PathLike[str]) -> Path:
    """Write `preconditioner.json` and `factors.npz` into `directory` (created); returns it."""
    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    p = preconditioner
    arrays = {
        f"{i}.{k}": v.to("cpu", torch.float64).numpy()
        for i, layer in enumerate(p.layers)
        for k, v in p.factors[layer.name].items()
    }
    write_durable(root / _NPZ, lambda f: np.savez(f, **arrays))  # type: ignore[arg-type]
    meta = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": p.method.value,
        "fisher": p.fisher.value,
        "projection_fingerprint": p.fingerprint,
        "layers": [layer.to_dict() for layer in p.layers],
        "damping": p.damping,
        "factors": {"file": _NPZ, "sha256": sha256_file(root / _NPZ)},
    }
    write_atomic(root / _JSON, json.dumps(meta, indent=1).encode())
    return root


def load_preconditioner(directory: str | os.PathLike[str]) -> Preconditioner:
    """Read a preconditioner written by `Preconditioner.save` (JSON and an .npz; no pickle)."""
    root = Path(directory)
    path = root / _JSON
    if not path.is_file():
        raise StoreError(f"{root} holds no {_JSON}; write one with fit_preconditioner(...).save({str(root)!r}).")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            found = f"{meta.get('format')!r} version {meta.get('format_version')!r}"
            raise ValueError(f"format {found} is not {FORMAT!r} version {FORMAT_VERSION}")
        cls = Preconditioner.registry[PreconditionerMethod(meta["method"])]
        layers = [LayerInfo(**raw) for raw in meta["layers"]]
        npz = root / _NPZ
        if meta["factors"]["file"] != _NPZ or not npz.is_file() or sha256_file(npz) != meta["factors"]["sha256"]:
            raise ValueError(f"{_NPZ} is missing or does not match its checksum")
        with np.load(npz, allow_pickle=False) as arrays:
            factors = {
                layer.name: {k: torch.from_numpy(np.array(arrays[f"{i}.{k}"], dtype=np.float64)) for k in shapes}
                for i, layer in enumerate(layers)
                for shapes in [cls.factor_shapes(layer)]
            }
        damping = {str(k): float(v) for k, v in meta["damping"].items()}
        return cls(layers, factors, damping, str(meta["projection_fingerprint"]), str(meta["fisher"]))
    except (ValueError, KeyError, TypeError, AttributeError, OSError, json.JSONDecodeError, ConfigError) as exc:
        raise StoreCorruptedError(f"{root}: not a valid saved preconditioner ({exc}); fit and save it again.") from None
