"""A preconditioner on disk: `preconditioner.json` (method, damping, layer table, checksums) and `factors.npz`.

Both are written durably (`logra.store.files.write_durable`). The JSON is signed like a store
manifest: it carries the SHA-256 of its own canonical form, and names the .npz with its size and
SHA-256, so an edited digit of damping, a changed method or altered factors are refused with a
`StoreCorruptedError` naming the file. Loading checks every field (finite non-negative damping,
one value per layer, the layer table, exact factor names, shapes and real float64 dtype, finite
values); only regular files are read, the .npz no larger than the size the JSON names, with
`allow_pickle=False`, so nothing on the load path executes code. A full or read-only disk while
saving raises `StoreError` naming the file, and leaves no temp file behind.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from logra.curvature.precondition import Preconditioner, PreconditionerMethod
from logra.errors import LograError, StoreCorruptedError, StoreError
from logra.store.files import json_checksum, read_regular, write_atomic, write_durable
from logra.store.manifest import MAX_COUNT
from logra.types import LayerInfo

FORMAT = "logra-preconditioner"
FORMAT_VERSION = 2  # 2: signed JSON, factor size recorded
MAX_JSON_BYTES = 64 * 2**20
_KEYS = {
    "format", "format_version", "method", "fisher", "projection_fingerprint", "layers", "damping", "factors", "sha256",
}  # fmt: skip
_JSON = "preconditioner.json"
_NPZ = "factors.npz"


def preconditioner_fingerprint(preconditioner: Preconditioner) -> str:
    """SHA-256 over everything that decides what `preconditioner` does to a query: method, Fisher
    kind, projection fingerprint, layer table, damping and the float64 bytes of every factor."""
    p = preconditioner
    h = hashlib.sha256()
    head = [p.method.value, p.fisher.value, p.fingerprint, [x.to_dict() for x in p.layers], p.damping]
    h.update(json.dumps(head, sort_keys=True).encode())
    for layer in p.layers:
        for k, v in sorted(p.factors[layer.name].items()):
            h.update(k.encode())
            h.update(v.detach().to("cpu", torch.float64).contiguous().numpy().tobytes())
    return h.hexdigest()


def save_preconditioner(preconditioner: Preconditioner, directory: str | os.PathLike[str]) -> Path:
    """Write `preconditioner.json` and `factors.npz` into `directory` (created); returns it.

    Raises StoreError naming the file when the disk is full or read-only; no temp file stays.
    """
    root = Path(directory)
    p = preconditioner
    arrays = {
        f"{i}.{k}": v.to("cpu", torch.float64).numpy()
        for i, layer in enumerate(p.layers)
        for k, v in p.factors[layer.name].items()
    }
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)  # type: ignore[arg-type]
    data = buffer.getvalue()
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": p.method.value,
        "fisher": p.fisher.value,
        "projection_fingerprint": p.fingerprint,
        "layers": [layer.to_dict() for layer in p.layers],
        "damping": p.damping,
        "factors": {"file": _NPZ, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()},
    }
    meta["sha256"] = json_checksum(meta, "sha256")
    target = root / _NPZ
    try:
        if root.exists() and not root.is_dir():
            raise StoreError(f"{root} exists and is not a directory; save the preconditioner to a directory.")
        root.mkdir(parents=True, exist_ok=True)
        write_durable(target, lambda f: f.write(data))
        target = root / _JSON
        write_atomic(target, json.dumps(meta, indent=1).encode())
    except OSError as exc:
        if isinstance(exc, LograError):
            raise
        name = errno.errorcode.get(exc.errno or 0, "OSError")
        raise StoreError(
            f"{target}: cannot save the preconditioner ({name}: {exc.strerror or exc}; {len(data)} bytes of factors); "
            "nothing half-written was left. Free space or choose a writable --out, then save again."
        ) from None
    return root


def _corrupt(path: Path, why: str) -> StoreCorruptedError:
    return StoreCorruptedError(f"{path}: not a valid saved preconditioner ({why}); fit and save it again.")


def _read_meta(path: Path) -> dict[str, Any]:
    """The signed, type-checked content of preconditioner.json."""
    meta = json.loads(read_regular(path, MAX_JSON_BYTES, "the preconditioner").decode("utf-8"))
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        found = f"{meta.get('format')!r} version {meta.get('format_version')!r}" if isinstance(meta, dict) else "?"
        raise ValueError(f"format {str(found)[:80]} is not {FORMAT!r} version {FORMAT_VERSION}")
    if set(meta) != _KEYS:
        raise ValueError(f"fields {sorted(str(k)[:40] for k in meta)[:12]} are not {sorted(_KEYS)}")
    if not isinstance(meta["sha256"], str) or meta["sha256"] != json_checksum(meta, "sha256"):
        raise ValueError("its sha256 does not match the content: the file was edited or damaged")
    factors = meta["factors"]
    if not isinstance(factors, dict) or set(factors) != {"file", "bytes", "sha256"} or factors["file"] != _NPZ:
        raise ValueError(f"the factors entry must name {_NPZ} with its bytes and sha256")
    if not isinstance(factors["bytes"], int) or not 0 < factors["bytes"] <= MAX_COUNT:
        raise ValueError("the factors' size is not a positive int")
    return meta


def _layers(meta: dict[str, Any]) -> list[LayerInfo]:
    layers = []
    for raw in meta["layers"]:
        layer = LayerInfo(**raw)
        ints = (layer.n_in, layer.n_out, layer.k_in, layer.k_out, layer.offset)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT for v in ints):
            raise ValueError(f"layer {str(layer.name)[:80]!r} has sizes that are not counts")
        if not (isinstance(layer.name, str) and 1 <= layer.k_in <= layer.n_in and 1 <= layer.k_out <= layer.n_out):
            raise ValueError(f"layer {str(layer.name)[:80]!r} has an invalid size")
        layers.append(layer)
    if not layers or len({x.name for x in layers}) != len(layers):
        raise ValueError("the layer table is empty or names a layer twice")
    return layers


def _damping(meta: dict[str, Any], layers: list[LayerInfo]) -> dict[str, float]:
    raw = meta["damping"]
    if not isinstance(raw, dict) or set(raw) != {x.name for x in layers}:
        raise ValueError("damping must give one value per layer of the layer table")
    for name, v in raw.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise ValueError(f"damping {str(v)[:40]} of layer {name[:80]!r} is not a finite number >= 0")
    return {str(k): float(v) for k, v in raw.items()}


def _factors(npz: Path, meta: dict[str, Any], cls: type[Preconditioner], layers: list[LayerInfo]) -> dict[str, Any]:
    size = meta["factors"]["bytes"]
    raw = read_regular(npz, size, f"{_NPZ} of the preconditioner")
    if len(raw) != size or hashlib.sha256(raw).hexdigest() != meta["factors"]["sha256"]:
        raise ValueError(f"{_NPZ} does not match its size and checksum")
    expected = {f"{i}.{k}": (layer.name, k, shape) for i, layer in enumerate(layers)
                for k, shape in cls.factor_shapes(layer).items()}  # fmt: skip
    factors: dict[str, dict[str, torch.Tensor]] = {layer.name: {} for layer in layers}
    with np.load(io.BytesIO(raw), allow_pickle=False) as arrays:
        if set(arrays.files) != set(expected):
            raise ValueError(f"{_NPZ} holds the arrays {sorted(arrays.files)[:8]}, not {sorted(expected)[:8]}")
        for key, (name, k, shape) in expected.items():
            a = arrays[key]
            if a.dtype != np.float64 or a.shape != shape or not np.isfinite(a).all():
                raise ValueError(f"factor {k!r} of layer {name[:80]!r} is not a finite float64 array of shape {shape}")
            factors[name][k] = torch.from_numpy(np.array(a))
    return factors
def load_preconditioner(directory: str | os.PathLike[str]) -> Preconditioner:
    """Read a preconditioner written by `Preconditioner.save` (JSON and an .npz; no pickle)."""
    root = Path(directory)
    path = root / _JSON
    if not os.path.lexists(path):
        raise StoreError(f"{root} holds no {_JSON}; write one with fit_preconditioner(...).save({str(root)!r}).")
    where = path
    try:
        meta = _read_meta(path)
        cls = Preconditioner.registry[PreconditionerMethod(meta["method"])]
        layers = _layers(meta)
        damping = _damping(meta, layers)
        if not isinstance(meta["projection_fingerprint"], str) or not isinstance(meta["fisher"], str):
            raise ValueError("projection_fingerprint and fisher must be strings")
        where = root / _NPZ
        factors = _factors(where, meta, cls, layers)
        where = path
        return cls(layers, factors, damping, meta["projection_fingerprint"], meta["fisher"])
    except FileNotFoundError:
        raise _corrupt(where, "the file is missing") from None
    except StoreCorruptedError:
        raise
    except StoreError as exc:
        raise _corrupt(where, str(exc)) from None
    except Exception as exc:  # a parse boundary: any defect of the bytes (zip, JSON, types) is corruption
        raise _corrupt(where, f"{type(exc).__name__}: {str(exc)[:300]}") from None
