"""Fault injection: SIGKILL at random and chosen instants, disk full, concurrent readers, interrupts.

Killed runs are real processes killed with SIGKILL. To afford ~30 of them on two cores, this file
run as a script is a *fork server*: it imports torch and logra once, then forks one logging worker
per command. A worker logs a padded MLP dataset (float16 storage, so the per-row scale files are
exercised too, and `nonfinite="skip"` with a few NaN/Inf examples) into a store with small shards,
skipping `logger.committed_ids`; the server kills it after a random delay, or the worker kills
itself at a chosen point of the commit protocol (half-way through a shard, id, scale, statistics
or manifest write, right before or after a rename). Those points are armed by wrapping `open` and
`os.replace` inside the worker only; the library has no test hooks.

After every kill the store must open, verify and hold a prefix of the uninterrupted run's rows,
bit for bit; the final resumed store must equal the uninterrupted run exactly (ids, skipped ids,
rows and statistics).

    python tests/test_faults.py --serve    # the fork server (reads JSON commands on stdin)
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import random
import select
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import pytest
import torch
from models import build_model, collate, make_examples, per_example_loss

import logra
from logra.errors import CaptureError, StoreError

N, BATCH, SHARD_ROWS = 360, 4, 8  # 90 batches, a commit every 2 batches
POISONED = {13: float("nan"), 101: float("inf"), 102: float("nan")}  # loss weights that make NaN/Inf gradients
IDS = [f"ex{i:04d}" for i in range(N)]
KILL_POINTS = [  # (point, occurrence in the run): each must be reached, so each run must be killed
    ("shard-write", 3), ("ids-write", 2), ("scales-write", 2), ("stats-write", 2), ("manifest-write", 3),
    ("before-replace:.bin", 2), ("after-replace:.bin", 3), ("after-replace:.ids.json", 2),
    ("before-replace:manifest.json", 4), ("after-replace:manifest.json", 2), ("after-replace:.npz", 3),
]  # fmt: skip
RANDOM_KILLS = 20


def _config(dtype: str = "float16") -> logra.LoGraConfig:
    return logra.LoGraConfig(k_in=4, k_out=3, seed=5, dtype=dtype, include_bias=True, nonfinite="skip")


def _weights() -> torch.Tensor:
    w = torch.ones(N, dtype=torch.float64)
    for i, v in POISONED.items():
        w[i] = v
    return w


def log_dataset(store: Path | str, dtype: str = "float16", ready_fd: int | None = None, slow: float = 0.0) -> None:
    """Log the dataset into `store`, resuming it: whole batches are skipped when committed."""
    model, examples, weights = build_model("mlp"), make_examples("mlp", N, seed=7), _weights()
    with logra.GradientLogger(model, _config(dtype), store=store, shard_rows=SHARD_ROWS) as logger:
        done = logger.committed_ids
        if ready_fd is not None:
            os.write(ready_fd, b"r")
        for start in range(0, N, BATCH):
            hit = [i in done for i in IDS[start : start + BATCH]]
            if all(hit):
                continue
            if any(hit):
                raise RuntimeError(f"batch at {start} is partly committed: commits must fall on batch boundaries")
            batch, mask = collate(examples[start : start + BATCH])
            with logger.record(ids=IDS[start : start + BATCH], mask=mask):
                (per_example_loss(model, batch) * weights[start : start + BATCH]).sum().backward()
            if slow:
                time.sleep(slow)


# --------------------------------------------------------------------------------------------
# The worker side: kill points, armed in the forked worker only.


def _kill_self() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class WrappedFile:
    """A file whose `write(data)` is `on_write(file, raw bytes)`; everything else is the file's own."""

    def __init__(self, f: Any, on_write: Any) -> None:
        self._f, self._on_write = f, on_write

    def write(self, data: Any) -> int:
        return self._on_write(self._f, bytes(memoryview(data).cast("B")))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> WrappedFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def wrap_writes(match: Any, on_write: Any) -> Any:
    """An `open` that wraps the files it opens for writing whose name `match` accepts."""
    real_open = builtins.open

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        f = real_open(file, mode, *args, **kwargs)
        return WrappedFile(f, on_write) if "w" in mode and match(str(file)) else f

    return open_


_WRITE_SUFFIX = {"shard-write": ".bin.tmp", "ids-write": ".ids.json.tmp", "scales-write": ".scales.bin.tmp",
                 "stats-write": ".npz.tmp", "manifest-write": "manifest.json.tmp"}  # fmt: skip


def _arm(point: str, at: int) -> None:
    """Make this (forked, doomed) process SIGKILL itself at occurrence `at` of `point`."""
    counter = [0]
    if point in _WRITE_SUFFIX:
        suffix = _WRITE_SUFFIX[point]

        def half_then_die(f: Any, raw: bytes) -> int:
            counter[0] += 1
            if counter[0] == at:
                f.write(raw[: max(1, len(raw) // 2)])
                f.flush()
                os.fsync(f.fileno())
                _kill_self()
            return f.write(raw)

        def match(name: str) -> bool:
            return name.endswith(suffix) and not (point == "shard-write" and name.endswith(".scales.bin.tmp"))

        builtins.open = wrap_writes(match, half_then_die)
        return
    when, suffix = point.split(":")
    real_replace = os.replace

    def replace(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
        hit = str(dst).endswith(suffix) and not (suffix == ".bin" and str(dst).endswith(".scales.bin"))
        counter[0] += hit
        if hit and counter[0] == at and when == "before-replace":
            _kill_self()
        real_replace(src, dst, *args, **kwargs)
        if hit and counter[0] == at and when == "after-replace":
            _kill_self()

    os.replace = replace


def _serve() -> None:
    """The fork server: one JSON command per stdin line, one JSON reply per stdout line."""
    torch.set_num_threads(1)
    for line in sys.stdin:
        cmd = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            code = 0
            try:
                if cmd.get("kill_at"):
                    _arm(*cmd["kill_at"])
                log_dataset(cmd["store"], cmd.get("dtype", "float16"), ready_fd=w, slow=cmd.get("slow", 0.0))
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        os.close(w)
        os.read(r, 1)  # the worker is ready (or died before: EOF)
        start = time.monotonic()
        if cmd.get("kill_after") is not None:
            time.sleep(cmd["kill_after"])
            os.kill(pid, signal.SIGKILL)  # not yet reaped, so the pid is still this worker's
        _, status = os.waitpid(pid, 0)
        os.close(r)
        reply = {"signal": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                 "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None,
                 "seconds": time.monotonic() - start}  # fmt: skip
        print(json.dumps(reply), flush=True)


# --------------------------------------------------------------------------------------------
# The test side.


class ForkServer:
    def __init__(self, log: Path) -> None:
        self._err = open(log, "w")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--serve"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=self._err, text=True, cwd=Path(__file__).parent,
        )  # fmt: skip
        self.log = log

    def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in cmd.items()}) + "\n")
        self.proc.stdin.flush()

    def ready(self, timeout: float = 0.0) -> bool:
        return bool(select.select([self.proc.stdout], [], [], timeout)[0])

    def reply(self, timeout: float = 120.0) -> dict[str, Any]:
        if not self.ready(timeout):
            self.proc.kill()
            pytest.fail(f"the fork server did not answer in {timeout} s; its log: {self.log.read_text()[-3000:]}")
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            pytest.fail(f"the fork server died; its log: {self.log.read_text()[-3000:]}")
        return json.loads(line)

    def run(self, **cmd: Any) -> dict[str, Any]:
        self.send(**cmd)
        return self.reply()

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self._err.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    s = ForkServer(tmp_path_factory.mktemp("server") / "server.log")
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(server: ForkServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[logra.GradientStore, float]:
    """The uninterrupted run, and how long it took."""
    path = tmp_path_factory.mktemp("ref") / "store"
    result = server.run(store=path)
    assert result["code"] == 0, server.log.read_text()[-3000:]
    return logra.GradientStore.open(path), result["seconds"]


def _check_prefix(path: Path, ref: logra.GradientStore) -> int:
    """The store opens, verifies, and holds the first whole batches of the reference, bit for bit."""
    store = logra.GradientStore.open(path)
    store.verify()
    n = len(store)
    assert store.ids == ref.ids[:n], "the committed ids are not a prefix of the uninterrupted run's"
    assert set(store.skipped) <= set(ref.skipped)
    logged = len(store.ids) + len(store.skipped)
    assert all(IDS.index(i) < logged for i in store.skipped)
    assert torch.equal(store.rows(), ref.rows(0, n))
    if n:
        assert all(s.n_examples == n for s in store.statistics().values())
    return n


def _check_equal(path: Path, ref: logra.GradientStore) -> None:
    store = logra.GradientStore.open(path)
    store.verify()
    assert store.ids == ref.ids and sorted(map(str, store.skipped)) == sorted(map(str, ref.skipped))
    assert sorted(store.ids + list(store.skipped)) == IDS, "every example exactly once"
    assert sorted(store.skipped) == sorted(IDS[i] for i in POISONED)
    assert torch.equal(store.rows(), ref.rows())
    ours, theirs = store.statistics(), ref.statistics()
    for name, s in theirs.items():
        assert torch.equal(ours[name].input_sum, s.input_sum) and torch.equal(ours[name].grad_sum, s.grad_sum)
        assert (ours[name].n_tokens, ours[name].n_examples) == (s.n_tokens, s.n_examples)


@pytest.mark.subprocess
@pytest.mark.slow
def test_sigkill_at_chosen_and_random_instants_then_resume(server, reference, tmp_path) -> None:
    ref, seconds = reference
    path = tmp_path / "store"
    progress = []
    for point, at in KILL_POINTS:
        result = server.run(store=path, kill_at=[point, at])
        assert result["signal"] == signal.SIGKILL, f"kill point {point}#{at} was never reached: {result}"
        progress.append(_check_prefix(path, ref))
    assert progress[-1] < N - 40, "the chosen kills left too little for the random ones"
    rng = random.Random(20240601)
    landed = 0
    for _ in range(RANDOM_KILLS):
        result = server.run(store=path, kill_after=rng.uniform(0.0, seconds / 16))
        if result["signal"] == signal.SIGKILL:
            landed += 1
        else:
            assert result["code"] == 0, server.log.read_text()[-3000:]
        progress.append(_check_prefix(path, ref))
    assert server.run(store=path)["code"] == 0, server.log.read_text()[-3000:]
    _check_equal(path, ref)
    assert landed >= RANDOM_KILLS // 2, f"only {landed} of the random kills hit a running worker"
    assert len(set(progress)) >= 10, f"the kills did not land at varied points: {progress}"
    print(f"committed rows after each kill: {progress}; random kills that landed: {landed}/{RANDOM_KILLS}")


@pytest.mark.subprocess
def test_a_reader_sees_whole_committed_shards_while_a_writer_appends(server, reference, tmp_path) -> None:
    ref, _ = reference
    path = tmp_path / "live"
    server.send(store=path, slow=0.003)
    sizes = []
    while not server.ready(0.0):
        try:
            sizes.append(_check_prefix(path, ref))
        except StoreError as exc:
            if "not a gradient store" not in str(exc):  # before the writer created it
                raise
    assert server.reply()["code"] == 0, server.log.read_text()[-3000:]
    _check_equal(path, ref)
    assert len(set(sizes)) >= 5, f"the reader saw too few distinct states: {sorted(set(sizes))}"
    assert sizes == sorted(sizes), "a later reader saw fewer rows"
    print(f"{len(sizes)} snapshots, {len(set(sizes))} distinct sizes")


def test_a_second_writer_on_the_same_store_is_refused(tmp_path) -> None:
    model, examples = build_model("mlp"), make_examples("mlp", 4, seed=7)
    path = tmp_path / "store"
    first = logra.GradientLogger(model, _config("float32"), store=path, shard_rows=2)
    with pytest.raises(StoreError, match="another writer holds .*writer-000.lock"):
        logra.GradientLogger(model, _config("float32"), store=path)
    batch, mask = collate(examples[:2])
    with first.record(ids=[0, 1], mask=mask):
        per_example_loss(model, batch).sum().backward()
    first.close()
    with logra.GradientLogger(model, _config("float32"), store=path) as second:  # released by close()
        assert second.committed_ids == {0, 1}
    third = logra.GradientLogger(model, _config("float32"), store=path)
    del third  # still attached to the model by its hooks: still the writer, until closed
    with pytest.raises(StoreError, match="another writer holds"):
        logra.GradientLogger(model, _config("float32"), store=path)


# --------------------------------------------------------------------------------------------
# Disk full, and interrupts, in this process.


class _Disk:
    """A disk with `free` bytes left for files under `root`: writes past it fail with ENOSPC."""

    def __init__(self, root: Path, free: int) -> None:
        self.root, self.free = str(root), free

    def write(self, f: Any, raw: bytes) -> int:
        fits = min(len(raw), max(self.free, 0))
        f.write(raw[:fits])
        self.free -= fits
        if fits < len(raw):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)
        return len(raw)

    def open(self) -> Any:
        return wrap_writes(lambda name: name.startswith(self.root), self.write)


def _store_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir())


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory: pytest.TempPathFactory) -> logra.GradientStore:
    path = tmp_path_factory.mktemp("local") / "store"
    log_dataset(path)
    return logra.GradientStore.open(path)


@pytest.mark.parametrize("fraction", [0.0, 0.02, 0.3, 0.75])
def test_disk_full_raises_a_clear_error_and_keeps_the_committed_store(
    tmp_path, monkeypatch, local_reference, fraction
) -> None:
    ref = local_reference
    path = tmp_path / "store"
    disk = _Disk(path, int(fraction * _store_bytes(ref.root) * 1.5))  # writes and rewrites exceed the final size
    monkeypatch.setattr(builtins, "open", disk.open())
    with pytest.raises(StoreError) as info:
        log_dataset(path)
    monkeypatch.undo()
    message = str(info.value)
    assert str(path) in message and "ENOSPC" in message and "resume" in message, message
    if (path / "manifest.json").exists():
        _check_prefix(path, ref)
    log_dataset(path)  # space freed: resume
    _check_equal(path, ref)


@pytest.mark.parametrize("failing_call", [2, 9, 30])
def test_fsync_failure_stops_the_writer_and_resume_completes(
    tmp_path, monkeypatch, local_reference, failing_call
) -> None:
    path = tmp_path / "store"
    real_fsync, calls = os.fsync, [0]

    def fsync(fd: int) -> None:
        calls[0] += 1
        if calls[0] == failing_call:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(StoreError, match="ENOSPC"):
        log_dataset(path)
    monkeypatch.undo()
    if (path / "manifest.json").exists():
        _check_prefix(path, local_reference)
    log_dataset(path)
    _check_equal(path, local_reference)


def test_a_stopped_writer_refuses_further_batches(tmp_path, monkeypatch) -> None:
    model, examples = build_model("mlp"), make_examples("mlp", 8, seed=7)
    path = tmp_path / "store"
    with logra.GradientLogger(model, _config("float32"), store=path, shard_rows=2) as logger:
        batch, mask = collate(examples[:2])
        with logger.record(ids=[0, 1], mask=mask):
            per_example_loss(model, batch).sum().backward()

        def broken_fsync(fd: int) -> None:
            raise OSError(errno.EIO, os.strerror(errno.EIO))

        monkeypatch.setattr(os, "fsync", broken_fsync)
        batch, mask = collate(examples[2:4])
        with pytest.raises(StoreError, match="EIO"):
            with logger.record(ids=[2, 3], mask=mask):
                per_example_loss(model, batch).sum().backward()
        monkeypatch.undo()
        with pytest.raises(CaptureError, match="inconsistent"):
            with logger.record(ids=[4, 5], mask=mask):
                pass
    store = logra.GradientStore.open(path)
    store.verify()
    assert store.ids == [0, 1]


def test_interrupt_while_statistics_update_commits_nothing_half_done(tmp_path, monkeypatch, local_reference) -> None:
    """Ctrl-C in the middle of a batch's statistics: close() must not commit half-added statistics."""
    import logra.capture.logger as logger_module

    real, calls = logger_module._accumulate, [0]

    def accumulate(*args: Any, **kwargs: Any) -> None:
        calls[0] += 1
        if calls[0] == 3 * 10 + 2:  # 3 layers per batch: batch 10's second layer (batch 9's rows are pending)
            raise KeyboardInterrupt
        real(*args, **kwargs)

    monkeypatch.setattr(logger_module, "_accumulate", accumulate)
    path = tmp_path / "store"
    with pytest.raises(KeyboardInterrupt):
        log_dataset(path)
    monkeypatch.undo()
    assert _check_prefix(path, local_reference) == 9 * BATCH - 1  # batches 0-8 committed (ex0013 skipped), not 9
    log_dataset(path)
    _check_equal(path, local_reference)


if __name__ == "__main__" and sys.argv[1:] == ["--serve"]:
    _serve()
