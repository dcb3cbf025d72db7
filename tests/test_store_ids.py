"""ExampleIds: the store's compact id sequence behaves like the list of ids it replaces."""

from __future__ import annotations

import pytest

from logra.store.ids import ExampleIds


def _ids(*shards: list[int | str]) -> ExampleIds:
    ids = ExampleIds()
    for shard in shards:
        ids.append(list(shard))
    return ids


SHARDS: list[list[int | str]] = [
    [0, 5, -3, 2**63 - 1],  # int64
    ["a", "", "é✓", "x\ud800y", "1"],  # UTF-8, an empty id, a lone surrogate (json.loads can give one)
    [7, "b", 2**70],  # mixed, and an int past int64
    [],
    [-(2**63), 9],
    [100, 101, 102, 103],  # consecutive: held as a range
]


def test_ids_read_back_as_the_list() -> None:
    flat = [i for shard in SHARDS for i in shard]
    ids = _ids(*SHARDS)
    assert len(ids) == len(flat) and list(ids) == flat and ids == flat and flat == ids
    assert [ids[j] for j in range(len(flat))] == flat
    assert all(type(a) is type(b) for a, b in zip(ids, flat))  # ints stay ints, strs stay strs
    assert all(type(ids[j]) is type(flat[j]) for j in range(len(flat)))
    assert isinstance(ids._parts[-1], range)
    assert ids[-1] == 103 and ids[-5] == 9 and ids[-len(flat)] == 0
    assert ids[3:8] == flat[3:8] and ids[::-3] == flat[::-3]
    assert ids.index("1") == flat.index("1") and 2**70 in ids and "zz" not in ids
    assert ids != flat[:-1] and ids != flat[:-1] + ["103"]  # the str "103" is not the int 103
    assert ids + ["z"] == flat + ["z"] and ["z"] + ids == ["z"] + flat and ids + ids == flat + flat
    assert type(ids + []) is list
    with pytest.raises(IndexError, match="outside"):
        ids[len(flat)]
    with pytest.raises(TypeError):
        hash(ids)


@pytest.mark.parametrize(
    ("shards", "skipped", "duplicated"),
    [
        (SHARDS, (), False),
        ([[1, 2], [3, 2]], (), True),  # across int64 shards
        ([[1, 2], ["2", 3]], (), False),  # "2" is not 2
        ([[1, 2], ["a", 2]], (), True),  # an int of a mixed shard against an int64 shard
        ([["a", "b"], ["b"]], (), True),
        ([[1, 2]], (2,), True),  # a row and a skipped id
        ([["a"]], ("a",), True),
        ([[2**70], [2**70, "x"]], (), True),
        ([[1]], ("1",), False),
        ([[0, 1, 2], [2, 3]], (), True),  # two ranges overlap
        ([[5, 6], [0, 1], [2, 4]], (), False),  # ranges out of order, and an array
        ([[0, 1, 2], [7, 1]], (), True),  # an array value inside a range
        ([[0, 1, 2], [3, "a"]], (), False),
        ([[0, 1, 2], [4, "a", 1]], (), True),  # a mixed shard's int inside a range
        ([[0, 1, 2]], (2,), True),
    ],
)
def test_duplicates(shards: list[list[int | str]], skipped: tuple[int | str, ...], duplicated: bool) -> None:
    assert _ids(*shards).has_duplicates(skipped) is duplicated
    flat = [i for shard in shards for i in shard] + list(skipped)
    assert duplicated == (len(set(flat)) != len(flat))  # the reference: a set of the ids
