"""Rows in their storage dtype: encoding on write, decoding on read.

float32, float64 and bfloat16 rows are stored as they are (bfloat16 as its raw 16-bit pattern,
since numpy has no bfloat16) and read back as zero-copy views. bfloat16 keeps float32's exponent
range, so nothing underflows that float32 keeps.

float16 has a narrow range (largest 65504, smallest subnormal 6e-8): the projected gradients of
a well-trained model, often ~1e-9, would flush to zero, and large ones would overflow to Inf. So
each float16 row is stored divided by a per-row power of two, chosen so that the row's largest
|entry| lies in [2**13, 2**14); the float32 scales go to a sidecar file beside the shard. Every
entry within 2**-38 of its row's largest keeps 11 significant bits. Readers multiply the scale
back and return float32 rows: this costs one copy per chunk, so float16 stores are not zero-copy.
Scaling by a power of two is exact, so the only error is float16 rounding (relative 2**-11).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from logra.config import StorageDtype
from logra.errors import StoreError

NUMPY_DTYPES: dict[StorageDtype, type[np.generic]] = {
    StorageDtype.FLOAT32: np.float32,
    StorageDtype.FLOAT64: np.float64,
    StorageDtype.FLOAT16: np.float16,
    StorageDtype.BFLOAT16: np.uint16,  # raw bfloat16 bits; viewed as torch.bfloat16 on read
}
TORCH_DTYPES: dict[StorageDtype, torch.dtype] = {
    StorageDtype.FLOAT32: torch.float32,
    StorageDtype.FLOAT64: torch.float64,
    StorageDtype.FLOAT16: torch.float16,
    StorageDtype.BFLOAT16: torch.bfloat16,
}
FLOAT16_PEAK_EXPONENT = 14  # a scaled float16 row's largest |entry| lies in [2**13, 2**14)
_FLOAT32_MIN_EXPONENT, _FLOAT32_MAX_EXPONENT = -126, 127  # scales stay normal float32 numbers


def output_dtype(dtype: StorageDtype) -> torch.dtype:
    """The dtype readers return rows in: the storage dtype, except float32 for (scaled) float16."""
    return torch.float32 if dtype is StorageDtype.FLOAT16 else TORCH_DTYPES[dtype]


def encode_rows(rows: Tensor, dtype: StorageDtype) -> tuple[np.ndarray, np.ndarray | None]:
    """(n, D) rows -> (C-contiguous (n, D) array in the storage dtype, float32 scales (n,) or None).

    Scales are returned for float16 only. Entries that do not fit the storage dtype come back as
    Inf (the caller checks `encoded_finite`).
    """
    rows = rows.detach().to("cpu")
    if dtype is StorageDtype.BFLOAT16:
        return rows.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16), None
    if dtype is not StorageDtype.FLOAT16:
        return np.ascontiguousarray(rows.to(TORCH_DTYPES[dtype]).numpy()), None
    work = rows if rows.dtype == torch.float64 else rows.to(torch.float32)  # no float64 copy of float32 rows
    peak = work.abs().amax(dim=1).to(torch.float64)  # (n,); D >= 1 always
    _, exponent = torch.frexp(peak)  # peak = m * 2**exponent with m in [0.5, 1); exponent 0 for 0
    shift = (exponent.to(torch.int64) - FLOAT16_PEAK_EXPONENT).clamp(min=_FLOAT32_MIN_EXPONENT)
    shift = torch.where(peak > 0, shift, torch.zeros_like(shift))
    scales = torch.ldexp(torch.ones_like(peak), shift)  # exact powers of two, so dividing by them is exact
    scales = torch.where(shift > _FLOAT32_MAX_EXPONENT, torch.full_like(scales, float("inf")), scales)
    data = (work / scales.to(work.dtype).unsqueeze(1)).to(torch.float16)
    return np.ascontiguousarray(data.numpy()), scales.to(torch.float32).numpy()


def encoded_finite(data: np.ndarray, scales: np.ndarray | None, dtype: StorageDtype) -> np.ndarray:
    """(n,) bool: whether each encoded row is finite (NaN/Inf come from overflow of finite input)."""
    if dtype is StorageDtype.BFLOAT16:
        finite = torch.isfinite(torch.from_numpy(data.view(np.int16)).view(torch.bfloat16)).all(dim=1).numpy()
    else:
        finite = np.isfinite(data).all(axis=1)
    if scales is not None:
        finite &= np.isfinite(scales)
    return finite


def underflowed(rows: Tensor, data: np.ndarray, dtype: StorageDtype) -> np.ndarray:
    """(n,) bool: whether a row lost nonzero entries to zero in the storage dtype (underflow)."""
    zero = (data & 0x7FFF) == 0 if dtype is StorageDtype.BFLOAT16 else data == 0
    return np.asarray(np.asarray((rows.detach().to("cpu") != 0).numpy() & zero).any(axis=1))


def decode_rows(array: np.ndarray, dtype: StorageDtype, scales: np.ndarray | None) -> Tensor:
    """(n, D) stored array -> tensor in `output_dtype(dtype)`; a view except for float16."""
    if dtype is StorageDtype.BFLOAT16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    if dtype is StorageDtype.FLOAT16:
        if scales is None:
            raise StoreError("float16 rows need their per-row scales; the store reader passed none.")
        return torch.from_numpy(array).to(torch.float32) * torch.from_numpy(scales).unsqueeze(1)
    return torch.from_numpy(array)
