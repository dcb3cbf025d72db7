"""The example ids of a store, held compactly: `ExampleIds`.

A list of Python ints costs ~40 bytes a row (0.4 GB at 10M rows, and a set of them for the
duplicate check at open as much again); a store's ids are mostly consecutive integers, which
cost nothing per row as a `range`.
"""

from __future__ import annotations

import bisect
import operator
from collections.abc import Iterator, Sequence
from typing import overload

import numpy as np

from logra.types import ExampleId


class _Utf8Ids:
    """String ids as their UTF-8 bytes plus one int64 offset a row."""

    def __init__(self, ids: list[str]) -> None:
        encoded = [i.encode("utf-8", "surrogatepass") for i in ids]  # json.loads can give lone surrogates
        self.blob, self.offsets = b"".join(encoded), np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)

    def __len__(self) -> int:
        return int(self.offsets.size) - 1

    def __iter__(self) -> Iterator[str]:
        return (self[j] for j in range(len(self)))

    def __getitem__(self, j: int) -> str:
        return self.blob[int(self.offsets[j]) : int(self.offsets[j + 1])].decode("utf-8", "surrogatepass")


_IdPart = range | np.ndarray | _Utf8Ids | tuple[ExampleId, ...]


def _int64(i: object) -> bool:
    return type(i) is int and -(2**63) <= i < 2**63


class ExampleIds(Sequence[ExampleId]):
    """The example ids of a store, in row order, held compactly (a list of Python ints costs ~40
    bytes a row, 0.4 GB at 10M rows). Per shard: consecutive integers as a `range` (nothing per
    row), other integers as an int64 array (8 bytes a row), strings as UTF-8 bytes plus an int64
    offset a row, a mix of both as a tuple. Indexing gives an int or str (a slice: a list); it
    equals any sequence of the same ids in the same order, a list included."""

    def __init__(self) -> None:
        self._parts: list[_IdPart] = []
        self._starts: list[int] = [0]

    def append(self, ids: list[ExampleId]) -> None:
        """Add one shard's ids (ints and strs, as `parse_ids_file` returns them)."""
        part: _IdPart
        if all(map(_int64, ids)):
            part = np.array(ids, dtype=np.int64)
            if part.size and bool((part == np.arange(part[0], part[0] + part.size)).all()):
                part = range(int(part[0]), int(part[0]) + int(part.size))
        elif all(type(i) is str for i in ids):
            part = _Utf8Ids(ids)  # type: ignore[arg-type]
        else:
            part = tuple(ids)
        self._parts.append(part)
        self._starts.append(self._starts[-1] + len(ids))

    def __len__(self) -> int:
        return self._starts[-1]

    @overload
    def __getitem__(self, i: int) -> ExampleId: ...
    @overload
    def __getitem__(self, i: slice) -> list[ExampleId]: ...
    def __getitem__(self, i: int | slice) -> ExampleId | list[ExampleId]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        j = operator.index(i)
        j = j + len(self) if j < 0 else j
        if not 0 <= j < len(self):
            raise IndexError(f"id index {i} is outside the store's {len(self)} rows")
        s = bisect.bisect_right(self._starts, j) - 1
        value = self._parts[s][j - self._starts[s]]
        return int(value) if isinstance(value, np.integer) else value

    def __iter__(self) -> Iterator[ExampleId]:
        for part in self._parts:
            if isinstance(part, np.ndarray):
                yield from part.tolist()
            else:
                yield from (part[j] for j in range(len(part)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence) or isinstance(other, (str, bytes)):
            return NotImplemented
        return len(self) == len(other) and all(a == b and type(a) is type(b) for a, b in zip(self, other))

    __hash__ = None  # type: ignore[assignment]  # like a list

    def __add__(self, other: object) -> list[ExampleId]:
        """`store.ids + [...]` (or + another ExampleIds): a list, as when ids were a list."""
        if not isinstance(other, (list, tuple, ExampleIds)):
            return NotImplemented
        return [*self, *other]

    def __radd__(self, other: object) -> list[ExampleId]:
        if not isinstance(other, (list, tuple)):
            return NotImplemented
        return [*other, *self]

    def __repr__(self) -> str:
        head = ", ".join(map(repr, self[:5]))
        return f"ExampleIds([{head}{', ...' if len(self) > 5 else ''}], n={len(self)})"

    def has_duplicates(self, others: Sequence[ExampleId] = ()) -> bool:
        """Whether an id appears twice, here or between here and `others`, without a set of N Python
        ints: one in-place sort of the int64 ids, the ranges as intervals, a set for the rest."""
        loose = [i for p in self._parts if isinstance(p, (_Utf8Ids, tuple)) for i in p] + list(others)
        small = [i for i in loose if _int64(i)]
        arrays = [p for p in self._parts if isinstance(p, np.ndarray)] + [np.array(small, dtype=np.int64)]
        values = np.concatenate(arrays)
        values.sort()
        if bool((values[1:] == values[:-1]).any()):
            return True
        spans = sorted((r.start, r.stop) for r in self._parts if isinstance(r, range) and len(r))
        if any(b[0] < a[1] for a, b in zip(spans, spans[1:])):
            return True
        if spans and values.size:
            starts, stops = np.array([a for a, _ in spans]), np.array([b for _, b in spans])
            k = np.searchsorted(starts, values, side="right") - 1
            if bool(((k >= 0) & (values < stops[np.maximum(k, 0)])).any()):
                return True
        rest = [i for i in loose if not _int64(i)]  # strings, and ints past int64
        return len(set(rest)) != len(rest)
