"""Distributed logging and scoring: per-rank shards merged into one store, equal to one process.

In-process tests drive two rank writers from one process (no process group) and check the merge,
its refusals and the helpers. The `subprocess` tests launch two gloo ranks with `torchrun` and
with `accelerate launch` (tests/dist_scripts/) and compare every store, as a set of (id, row), and
every score with a single-process run computed here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import logra
from logra import distributed
from logra.curvature import fit_preconditioner
from logra.errors import ConfigError, DuplicateIdError, StoreError
from logra.score import Scorer
from logra.store import merge_rank_manifests

SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"
sys.path.insert(0, str(SCRIPTS))
import common  # noqa: E402
from _launch import free_port, launch  # noqa: E402

REL = 1e-10


# ---------------------------------------------------------------- splitting work


@pytest.mark.parametrize("world", [1, 2, 3, 5])
@pytest.mark.parametrize("n", [0, 1, 7, 11, 64])
def test_split_range_partitions_in_order(n: int, world: int) -> None:
    parts = [distributed.split_range(n, r, world) for r in range(world)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(len(p) for p in parts) - min(len(p) for p in parts) <= 1


@pytest.mark.parametrize("batch_size", [1, 2, 3, 8])
@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("n", [6, 11, 30])
def test_split_batches_same_count_on_every_rank(n: int, world: int, batch_size: int) -> None:
    per_rank = [
        distributed.split_batches(distributed.split_range(n, r, world), n, world, batch_size) for r in range(world)
    ]
    assert [i for batches in per_rank for b in batches for i in b] == list(range(n))
    assert all(0 < len(b) <= batch_size for batches in per_rank for b in batches)
    counts = {len(batches) for batches in per_rank}
    if n % world == 0 or batch_size > 1:  # shares differ by one: only batch size 1 can then differ in count
        assert counts == {distributed.batches_per_rank(n, world, batch_size)}


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("rows", [[3, 3, 3, 3], [5, 1, 1, 1, 1, 1], [10], [2, 0, 2, 7, 1]])
def test_assign_shards_contiguous_and_complete(rows: list[int], world: int) -> None:
    ranges = [distributed.assign_shards(rows, r, world) for r in range(world)]
    assert [i for r in ranges for i in r] == list(range(len(rows)))
    if world <= len(rows) and len(set(rows)) == 1:  # equal shards: balanced to within one shard
        sizes = [sum(rows[i] for i in r) for r in ranges]
        assert max(sizes) - min(sizes) <= rows[0]


# ---------------------------------------------------------------- two rank writers in one process


def _reference_store(path: Path, batches: list[range] | None = None) -> logra.GradientStore:
    """All training examples logged by one process (batch size 4)."""
    m = common.model()
    with logra.GradientLogger(m, common.CONFIG, path) as logger:
        common.log_batches(logger, m, batches or [range(0, 4), range(4, 8), range(8, 11)])
    return logra.GradientStore.open(path)


def _log_as_ranks(path: Path, world: int, shares: list[list[int]] | None = None) -> dict:
    """Each 'rank' logs its share with its own writer; returns the summed statistics."""
    total = None
    for rank in range(world):
        m = common.model()
        share = shares[rank] if shares else list(distributed.split_range(common.N_TRAIN, rank, world))
        with logra.GradientLogger(m, common.CONFIG, path, rank=rank, world_size=world, shard_rows=2) as logger:
            common.log_batches(logger, m, [share[i : i + 3] for i in range(0, len(share), 3)])
        stats = logger.statistics()
        total = stats if total is None else {k: total[k] + stats[k] for k in stats}
    return total


def assert_same_contents(store: logra.GradientStore, ref: logra.GradientStore) -> None:
    """The same set of (id, row) (rows within REL of each layer's scale) and the same statistics."""
    assert sorted(store.ids) == sorted(ref.ids) and len(store) == len(ref)
    position = {i: j for j, i in enumerate(store.ids)}
    rows = store.rows()[[position[i] for i in ref.ids]]
    expected = ref.rows()
    for layer in ref.layers:
        cols = slice(layer.offset, layer.offset + layer.size)
        scale = expected[:, cols].abs().max().item()
        assert scale > 0
        assert (rows[:, cols] - expected[:, cols]).abs().max().item() <= REL * scale, layer.name
    got, want = store.statistics(), ref.statistics()
    for name, w in want.items():
        g = got[name]
        assert (g.n_tokens, g.n_examples) == (w.n_tokens, w.n_examples)
        assert torch.allclose(g.input_sum, w.input_sum, rtol=1e-12, atol=1e-12 * w.input_sum.abs().max().item())
        assert torch.allclose(g.grad_sum, w.grad_sum, rtol=1e-12, atol=1e-12 * w.grad_sum.abs().max().item())


def test_rank_writers_merge_into_one_store(tmp_path: Path) -> None:
    ref = _reference_store(tmp_path / "ref")
    stats = _log_as_ranks(tmp_path / "dist", 2)
    assert not (tmp_path / "dist" / "manifest.json").exists()  # nothing readable before the merge
    merged = merge_rank_manifests(tmp_path / "dist", 2, stats)
    store = logra.GradientStore.open(tmp_path / "dist")
    store.verify()
    assert [s.file[:10] for s in merged.shards] == sorted(s.file[:10] for s in merged.shards)  # rank order
    assert store.ids == ref.ids  # contiguous shares in rank order keep the dataset order
    assert_same_contents(store, ref)
    # Merging again (e.g. after a resume) replaces the statistics file and leaves one.
    merge_rank_manifests(tmp_path / "dist", 2, stats)
    assert len(list((tmp_path / "dist").glob("statistics-all-*.npz"))) == 1
    assert_same_contents(logra.GradientStore.open(tmp_path / "dist"), ref)


def test_merge_refuses_ids_logged_by_two_ranks(tmp_path: Path) -> None:
    stats = _log_as_ranks(tmp_path / "s", 2, shares=[[0, 1, 2, 3], [3, 4, 5]])  # 3 twice, as a padding sampler does
    with pytest.raises(DuplicateIdError, match="t03"):
        merge_rank_manifests(tmp_path / "s", 2, stats)
    assert not (tmp_path / "s" / "manifest.json").exists()


def test_merge_refuses_missing_or_extra_ranks(tmp_path: Path) -> None:
    stats = _log_as_ranks(tmp_path / "s", 3)
    with pytest.raises(StoreError, match="manifest-rank-002"):
        merge_rank_manifests(tmp_path / "s", 2, stats)  # rank 2 logged too
    (tmp_path / "s" / "manifest-rank-001.json").unlink()
    with pytest.raises(StoreError):
        merge_rank_manifests(tmp_path / "s", 3, stats)


def test_single_and_multi_process_writers_do_not_mix(tmp_path: Path) -> None:
    _log_as_ranks(tmp_path / "multi", 2)
    with pytest.raises(StoreError, match="same number of processes"):
        logra.GradientLogger(common.model(), common.CONFIG, tmp_path / "multi")
    _reference_store(tmp_path / "single")
    with pytest.raises(StoreError, match="single process"):
        logra.GradientLogger(common.model(), common.CONFIG, tmp_path / "single", rank=0, world_size=2)
    with pytest.raises(StoreError, match="world_size"):
        logra.GradientLogger(common.model(), common.CONFIG, tmp_path / "x", rank=2, world_size=2)


def test_rank_resume_then_merge_equals_one_process(tmp_path: Path) -> None:
    ref = _reference_store(tmp_path / "ref")
    path = tmp_path / "dist"
    # Rank 1 logs only part of its share, then resumes (skipping its committed ids); rank 0 logs all.
    shares = [list(distributed.split_range(common.N_TRAIN, r, 2)) for r in range(2)]
    total = None
    for rank, parts in ((0, [shares[0]]), (1, [shares[1][:2], shares[1]])):
        for part in parts:
            m = common.model()
            with logra.GradientLogger(m, common.CONFIG, path, rank=rank, world_size=2, shard_rows=1) as logger:
                todo = [i for i in part if common.train_ids()[i] not in logger.committed_ids]
                common.log_batches(logger, m, [todo])
        stats = logger.statistics()  # a resumed logger starts from the committed statistics
        total = stats if total is None else {k: total[k] + stats[k] for k in total}
    merge_rank_manifests(path, 2, total)
    assert_same_contents(logra.GradientStore.open(path), ref)


# ---------------------------------------------------------------- helpers without a process group


def test_single_process_fallbacks(tmp_path: Path) -> None:
    assert distributed.rank_world() == (0, 1) and not distributed.is_distributed()
    store = _reference_store(tmp_path / "ref")
    stats = store.statistics()
    reduced = distributed.all_reduce_statistics(stats)
    assert all(torch.equal(reduced[k].grad_sum, stats[k].grad_sum) and reduced[k] is not stats[k] for k in stats)
    x = torch.randn(2, 5)
    assert torch.equal(distributed.gather_columns(x), x)
    with distributed.distributed_logger(common.model(), common.CONFIG, tmp_path / "d") as logger:
        common.log_batches(logger, logger.model, [range(0, 11)])
    assert_same_contents(logra.GradientStore.open(tmp_path / "d"), store)


def test_launcher_without_a_process_group_is_an_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """torchrun's variables but no initialised group: every entry point says so instead of logging as rank 0."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ConfigError, match=r"WORLD_SIZE=2 processes \(RANK=1.*init_from_env"):
        distributed.rank_world()
    with pytest.raises(ConfigError, match="no torch.distributed process group is initialised"):
        logra.GradientLogger(common.model(), common.CONFIG, tmp_path / "s")
    assert not (tmp_path / "s").exists()  # refused before anything is written
    logra.GradientLogger(common.model(), common.CONFIG).close()  # in memory: no rank needed
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert distributed.init_from_env() == (0, 1) and not distributed.is_distributed()


def test_rank_without_world_size_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pass both"):
        logra.GradientLogger(common.model(), common.CONFIG, tmp_path / "s", rank=1)


def test_distributed_scorer_on_one_process_equals_scorer(tmp_path: Path) -> None:
    store = _reference_store(tmp_path / "ref", [range(i, min(i + 2, 11)) for i in range(0, 11, 2)])
    queries = common.query_rows(common.model())
    pre = fit_preconditioner(store, "kfac")
    plain, split = Scorer(store, pre, chunk_rows=3), distributed.DistributedScorer(store, pre, chunk_rows=3)
    assert torch.equal(split.score(queries), plain.score(queries))
    assert torch.equal(split.self_influence(), plain.self_influence())
    a, b = split.top_k(queries, 4), plain.top_k(queries, 4)
    assert a.helpful_ids == b.helpful_ids and a.harmful_ids == b.harmful_ids
    assert torch.equal(a.helpful_scores, b.helpful_scores) and torch.equal(a.harmful_rows, b.harmful_rows)


def test_shard_view_selects_rows(tmp_path: Path) -> None:
    _log_as_ranks(tmp_path / "s", 1)  # one process, batches of 3 committed as shards of 3, 3, 3, 2 rows
    store = logra.GradientStore.open(tmp_path / "s")
    assert [s.rows for s in store.manifest.shards] == [3, 3, 3, 2]
    view, first = distributed.shard_view(store, range(1, 3))
    assert first == 3 and len(view) == 6
    assert view.ids == store.ids[3:9]
    assert torch.equal(view.rows(), store.rows(3, 9))


def test_unwrap_model_and_projection_digest() -> None:
    m = common.model()
    assert distributed.unwrap_model(nn.DataParallel(nn.DataParallel(m))) is m
    a = logra.GradientLogger(m, common.CONFIG)
    b = logra.GradientLogger(common.model(), common.CONFIG)
    c = logra.GradientLogger(m, logra.LoGraConfig(**{**common.CONFIG.to_dict(), "seed": 3}))
    assert distributed.projection_digest(a) == distributed.projection_digest(b) != distributed.projection_digest(c)
    for logger in (a, b, c):
        logger.close()


# ---------------------------------------------------------------- two real processes


def _free_port() -> int:
    return free_port()


def _launch(args: list[str], out: Path) -> None:
    launch(args, out)


def test_launch_retries_only_a_gloo_teardown_abort(tmp_path: Path) -> None:
    """A launch that aborts with gloo's teardown message runs once more (in an emptied folder);
    any other failure is not retried."""
    code = (
        "import sys, pathlib\n"
        "state, mode, out = pathlib.Path(sys.argv[1]), sys.argv[2], pathlib.Path(sys.argv[3])\n"
        "assert not any(out.iterdir()), 'the retry must start from an empty folder'\n"
        "(out / 'partial').touch()\n"
        "if mode == 'abort' and not (state / 'aborted').exists():\n"
        "    (state / 'aborted').touch()\n"
        "    sys.stderr.write('terminate called without an active exception\\n')\n"
        "    sys.exit(1)\n"
        "sys.exit(0 if mode == 'abort' else 1)\n"
    )
    state, out = tmp_path / "state", tmp_path / "out"
    state.mkdir(), out.mkdir()
    with pytest.warns(UserWarning, match="launching once more"):
        _launch([sys.executable, "-c", code, str(state), "abort"], out)
    assert (state / "aborted").exists()
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(AssertionError, match="failed"):
        _launch([sys.executable, "-c", code, str(state), "other"], other)


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("torchrun")
    run = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), str(SCRIPTS / "torchrun_worker.py")]  # fmt: skip
    _launch(run, out)
    return out


@pytest.fixture(scope="module")
def accelerate_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("accelerate")
    run = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", str(_free_port()), str(SCRIPTS / "accelerate_worker.py")]  # fmt: skip
    _launch(run, out)
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> logra.GradientStore:
    return _reference_store(tmp_path_factory.mktemp("reference") / "store")


@pytest.mark.subprocess
@pytest.mark.slow
@pytest.mark.parametrize("name", ["plain", "default", "ddp", "fsdp", "hf"])
def test_torchrun_store_equals_one_process(torchrun_out: Path, reference: logra.GradientStore, name: str) -> None:
    store = logra.GradientStore.open(torchrun_out / name)
    store.verify()
    assert {s.file[:10] for s in store.manifest.shards} == {"shard-000-", "shard-001-"}  # both ranks wrote
    assert_same_contents(store, reference)


@pytest.mark.subprocess
@pytest.mark.slow
def test_torchrun_scores_equal_one_process(torchrun_out: Path, reference: logra.GradientStore) -> None:
    got = torch.load(torchrun_out / "results.pt", weights_only=False)
    assert got["world"] == 2 and got["fsdp_sharded"] == "DTensor"
    res = got["plain"]
    queries = common.query_rows(common.model())
    assert torch.allclose(res["queries"], queries, rtol=0, atol=1e-12)
    assert res["ids"] == reference.ids
    kfac = Scorer(reference, fit_preconditioner(reference, "kfac"))
    cosine = Scorer(reference, fit_preconditioner(reference, "ekfac"), "cosine")
    for got_scores, want in ((res["kfac"], kfac.score(queries)), (res["ekfac_cosine"], cosine.score(queries))):
        assert got_scores.shape == (common.N_QUERY, common.N_TRAIN)
        assert torch.allclose(got_scores, want, rtol=1e-9, atol=1e-9 * want.abs().max().item())
    want_self = kfac.self_influence()
    assert torch.allclose(res["self"], want_self, rtol=1e-9, atol=0)
    top = kfac.top_k(queries, 4)
    assert res["top_ids"] == top.helpful_ids and res["bottom_ids"] == top.harmful_ids
    assert torch.allclose(res["top_scores"], top.helpful_scores, rtol=1e-9)
    assert res["shards"] == [0, 1, 2]  # rank 0 scored the first half of the 6 shards


@pytest.mark.subprocess
@pytest.mark.slow
def test_torchrun_ranks_that_disagree_raise(torchrun_out: Path) -> None:
    got = torch.load(torchrun_out / "results.pt", weights_only=False)
    assert "{'k_in': (4, 2)}" in got["mismatch_config"]
    assert "{'seed': (0, 1)}" in got["mismatch_seed"]
    assert "other model weights" in got["mismatch_weights"]


@pytest.mark.subprocess
@pytest.mark.slow
def test_accelerate_launch_equals_one_process(accelerate_out: Path, reference: logra.GradientStore) -> None:
    got = torch.load(accelerate_out / "results.pt", weights_only=False)
    assert got["world"] == 2 and got["distributed_type"] == "DistributedType.MULTI_CPU"
    assert got["wrapper"] == "DistributedDataParallel"
    store = logra.GradientStore.open(accelerate_out / "accelerate")
    store.verify()
    assert_same_contents(store, reference)
    queries = common.query_rows(common.model())
    want = Scorer(reference, fit_preconditioner(reference, "kfac")).score(queries)
    assert torch.allclose(got["kfac"], want, rtol=1e-9, atol=1e-9 * want.abs().max().item())
    order = want.argsort(dim=1, descending=True)[:, :3]
    assert got["top_ids"] == [[reference.ids[j] for j in row] for row in order.tolist()]


def test_plain_accelerator_under_a_multi_process_launch_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    from logra.integrations.accelerate import check_accelerator

    accelerator = Accelerator(cpu=True)
    try:
        check_accelerator(accelerator)  # one process, one rank: fine
        monkeypatch.setenv("WORLD_SIZE", "2")  # what `accelerate launch --multi_gpu` sets for a plain Accelerator()
        with pytest.raises(ConfigError, match="cpu=True"):
            check_accelerator(accelerator)
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)  # accelerate keeps process-wide state
