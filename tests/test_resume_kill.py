"""Crash safety: a logging process killed with SIGKILL, then resumed, loses and repeats nothing.

The worker (this file run as a script) logs a small padded MLP dataset into a store with small
shards and kills itself with SIGKILL at a chosen point: after a number of batches (with or
without uncommitted rows), or at the n-th `os.replace` onto a given kind of file (just before or
after it), which lands between the steps of a commit. After every kill the store must open,
verify and hold only whole rows equal to those of an uninterrupted run; a new process then
resumes, skipping `logger.committed_ids`, and the final store must hold every id exactly once,
with the rows and statistics of the uninterrupted run.

    python tests/test_resume_kill.py STORE KILL   # KILL: none | batch:N | before:GLOB:N | after:GLOB:N
"""

from __future__ import annotations

import fnmatch
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

N_EXAMPLES, BATCH, SHARD_ROWS = 11, 2, 3  # commits after batches 2, 4, 6 (4 rows each) and at close


def _config():
    import logra

    return logra.LoGraConfig(k_in=4, k_out=3, seed=5, dtype="float64", include_bias=True)


def _arm(kill: str) -> None:
    """For kill = 'before:GLOB:N' or 'after:GLOB:N', SIGKILL this process at the N-th `os.replace`
    whose destination file name matches GLOB, just before or just after it runs."""
    if not kill.startswith(("before:", "after:")):
        return
    when, glob, n = kill.split(":")
    real = os.replace
    count = [0]

    def replace(src, dst, *args, **kwargs):
        hit = fnmatch.fnmatchcase(Path(dst).name, glob)
        count[0] += int(hit)
        if hit and count[0] == int(n) and when == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst, *args, **kwargs)
        if hit and count[0] == int(n) and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)

    os.replace = replace  # this process exists only to be killed


def log_dataset(store: str | Path, kill: str = "none") -> None:
    """Log the dataset into `store`, skipping committed ids; SIGKILL self as `kill` says."""
    from models import build_model, collate, make_examples, per_example_loss

    import logra

    model = build_model("mlp")
    examples = make_examples("mlp", N_EXAMPLES, seed=21)
    _arm(kill)
    kill_after = int(kill.split(":")[1]) if kill.startswith("batch:") else None
    with logra.GradientLogger(model, _config(), store=store, shard_rows=SHARD_ROWS) as logger:
        todo = [i for i in range(N_EXAMPLES) if i not in logger.committed_ids]
        for b, start in enumerate(range(0, len(todo), BATCH), start=1):
            ids = todo[start : start + BATCH]
            batch, mask = collate([examples[i] for i in ids])
            with logger.record(ids=ids, mask=mask):
                per_example_loss(model, batch).sum().backward()
            if b == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)


def _run_worker(store: Path, kill: str) -> int:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, __file__, str(store), kill], env=env, capture_output=True, text=True, timeout=120
    )
    if kill == "none":
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.returncode


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """Rows by id and statistics of a run that was never killed (logged in this process)."""
    path = tmp_path_factory.mktemp("uninterrupted") / "store"
    log_dataset(path)
    import logra

    store = logra.GradientStore.open(path)
    rows = store.rows()
    return {i: rows[r] for r, i in enumerate(store.ids)}, store.statistics()


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())


def _check_partial(path: Path, reference: dict) -> set:
    """A killed store opens, verifies, and holds only whole rows equal to the reference."""
    import logra

    store = logra.GradientStore.open(path)
    store.verify()
    assert len(set(store.ids)) == len(store.ids)
    rows = store.rows()
    for r, i in enumerate(store.ids):
        _assert_close(rows[r], reference[i])
    if store.manifest.statistics is not None:
        stats = store.statistics()
        assert all(s.n_examples == len(store) for s in stats.values())
    return set(store.ids)


# Kill scenarios: each (kill point, rows committed when it dies) is one process; a last process
# runs to the end. A fresh store writes an empty manifest first; every commit then renames its
# shard (and id and statistics files) into place and replaces the manifest last.
SCENARIOS = {
    # killed with an uncommitted batch; then right after a commit; then after a commit plus a pending batch
    "between-batches": [("batch:1", 0), ("batch:2", 4), ("batch:3", 8)],
    # before the first manifest exists; between a shard's rename and its manifest; just before the
    # manifest of a resumed run's first commit
    "inside-commits": [
        ("before:manifest.json:1", None),
        ("after:shard-*.bin:1", 0),
        ("before:manifest.json:1", 0),
    ],  # fmt: skip
    # after the second commit's manifest, before the first commit's statistics file is deleted
    "after-manifest-before-cleanup": [("after:manifest.json:3", 8)],
}


@pytest.mark.subprocess
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_killed_then_resumed_store_equals_an_uninterrupted_run(tmp_path, uninterrupted, scenario: str) -> None:
    import logra

    reference, ref_stats = uninterrupted
    path = tmp_path / "store"
    committed: set = set()
    for kill, n_committed in SCENARIOS[scenario]:
        assert _run_worker(path, kill) == -signal.SIGKILL, f"the worker did not die at {kill}"
        assert (path / "manifest.json").exists() == (n_committed is not None)
        if n_committed is not None:
            now = _check_partial(path, reference)
            assert committed <= now and len(now) == n_committed  # nothing committed is ever lost
            committed = now
    assert committed != set(range(N_EXAMPLES)), "the kill came too late to test anything"
    _run_worker(path, "none")
    store = logra.GradientStore.open(path)
    store.verify()
    assert sorted(store.ids) == list(range(N_EXAMPLES)) and len(store.ids) == N_EXAMPLES
    rows = store.rows()
    for r, i in enumerate(store.ids):
        _assert_close(rows[r], reference[i])
    stats = store.statistics()
    for name, s in ref_stats.items():
        _assert_close(stats[name].input_sum, s.input_sum)
        _assert_close(stats[name].grad_sum, s.grad_sum)
        assert (stats[name].n_tokens, stats[name].n_examples) == (s.n_tokens, s.n_examples)
    named = {"manifest.json", store.manifest.statistics[0]}
    named |= {s.file for s in store.manifest.shards} | {s.ids_file for s in store.manifest.shards}
    leftovers = {p.name for p in path.iterdir()} - named
    assert not {f for f in leftovers if f.endswith(".tmp") or f.startswith(("shard-", "statistics-"))}, leftovers


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    torch.set_num_threads(1)
    log_dataset(sys.argv[1], sys.argv[2])
