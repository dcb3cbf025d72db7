"""Scale: a synthetic bf16 store of millions of rows, scored streamed, on 1 and 2 processes, and two-stage.

For each --rows N (default 1M) this writes a bf16 store [N, D] through the public `StoreWriter`
(rows around 256 centres with varying norms, seeded), then runs each part in a fresh process,
one torch thread per process:

  read        disk bandwidth: O_DIRECT sequential reads of the first --read-gib GiB of shards
              (the page cache is bypassed, so this is the disk, whatever is cached)
  stream      `Scorer.score(q, out=file)`, `top_k` and `self_influence` over the whole store
              against the baseline: the same [Q, D] @ [D, n] matmuls (n = --chunk-rows) over a
              float32 [131072, D] matrix already in RAM (512 MiB, far larger than the caches), in a
              loop like the scorer's; also bf16 @ bf16 over the bf16 rows in RAM (what the store
              holds). Wall and process-CPU rows/s both: CPU time is robust to other load on a
              shared machine, wall time shows waiting for the disk. Memory, like for like at every
              N: what the open store holds (RssAnon), then per call the peak RssAnon (sampled
              every 5 ms, after the heap is trimmed) and VmHWM (resident, counting mapped shard
              pages and the [Q, N] output map) above the values at its start, after the same
              warm-up at every size (the three calls over the first shard, by another Scorer).
              A store that fits in half the RAM is first read into the page cache
  take        the disk's random 4 KiB O_DIRECT reads/s (1 and 16 in flight), then
              `GradientStore.take` of --take-rows random rows from a cold page cache against the
              previous implementation (fancy indexing of the shard maps); --take-threads tries
              other numbers of reads in flight
  two         `DistributedScorer` over gloo on 2 processes: top-k and self_influence times
              against `stream`'s 1-process times, and whether the top-k rows match
  index       `InfluenceIndex` (factory --factory, default `default_factory(N)`; --reuse-index
              opens the one built before) build time and size, the exact streamed top_k again in
              the same process, then per (nprobe, harmful nprobe, shortlist), from a cold page
              cache: recall@10 of the helpful and harmful top-10 against `stream`'s exact `top_k`,
              time split into stage one (FAISS) and stage two (take + exact scores), speedups;
              and how many lists hold the exact top-10 (an upper bound on any code's recall)

Each part takes --lock (an flock shared by everyone timing on this machine) for its run only,
waiting at most --lock-wait seconds; a part that ran without it says "locked": false.
Stores are written under --dir (default /tmp) and deleted at the end unless --keep. Linux only.

    .venv/bin/python benchmarks/scale.py --rows 1000000                 # ~2 GB store
    .venv/bin/python benchmarks/scale.py --rows 1000000 10000000        # and ~20 GB
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import itertools
import json
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

import logra
from logra.config import StorageDtype
from logra.index import InfluenceIndex, default_factory
from logra.store import StoreWriter, gather
from logra.types import LayerInfo

CENTRES = 256
BASELINE_ROWS = 131072
RESULTS = Path(__file__).resolve().parent / "results"


def build_store(root: Path, rows: int, dim: int, shard_mib: int = 256) -> float:
    """Write a bf16 store of `rows` clustered rows through StoreWriter; returns seconds taken."""
    side = int(dim**0.5)
    if side * side != dim:
        raise SystemExit(f"--dim={dim} must be a square (one synthetic k x k layer).")
    config = logra.LoGraConfig(k_in=side, k_out=side, dtype=StorageDtype.BFLOAT16)
    layer = LayerInfo("synthetic", "Linear", side, side, side, side, False, 0)
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(CENTRES, dim, generator=gen) * 2
    t = time.perf_counter()
    writer = StoreWriter(root, config, "synthetic", [layer], max(1, shard_mib * 2**20 // (2 * dim)))
    for start in range(0, rows, 8192):
        n = min(8192, rows - start)
        which = torch.randint(0, CENTRES, (n,), generator=gen)
        scale = torch.rand(n, 1, generator=gen) + 0.5
        writer.append(list(range(start, start + n)), (centres[which] + torch.randn(n, dim, generator=gen)) * scale)
        writer.commit_if_full(None)
    writer.close(None)
    return time.perf_counter() - t


def _queries(dim: int, count: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(CENTRES, dim, generator=gen) * 2  # the store's centres (same seed, same order)
    gen = torch.Generator().manual_seed(1)
    return centres[torch.randint(0, CENTRES, (count,), generator=gen)] + torch.randn(count, dim, generator=gen)


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


class Peak:
    """Peak RssAnon (sampled) and VmHWM (reset at start) above the values at start, in MiB.

    The heap's free memory is handed back to the kernel first (glibc malloc_trim), so memory freed
    by earlier work and reused inside the window cannot hide what the window allocates."""

    def __enter__(self) -> Peak:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        self.base_hwm, self.base_anon = _status("VmHWM"), _status("RssAnon")
        self.samples, self.done = [self.base_anon], threading.Event()
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.done.is_set():
            self.samples.append(_status("RssAnon"))
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.thread.join()
        self.anon_mib = (max(self.samples) - self.base_anon) / 2**20
        self.hwm_mib = (_status("VmHWM") - self.base_hwm) / 2**20


@contextlib.contextmanager
def timing_lock(path: str | None, wait_s: float) -> Iterator[bool]:
    """Hold the flock at `path` (None: no lock) for the block; yields whether it was taken in `wait_s` s."""
    if path is None:
        yield False
        return
    with open(path, "a") as f:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    locked = False
                    break
                time.sleep(1.0)
        try:
            yield locked
        finally:
            if locked:
                fcntl.flock(f, fcntl.LOCK_UN)


def _clocked(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _scorer(root: str, args: argparse.Namespace) -> tuple[logra.GradientStore, logra.Scorer]:
    store = logra.GradientStore.open(root)
    pre = logra.fit_preconditioner(store, "identity")
    return store, logra.Scorer(store, pre, chunk_rows=args.chunk_rows, query_config=store.config, progress=False)


def _store_bytes(store: logra.GradientStore) -> int:
    return len(store) * store.dim * store.dtype.itemsize


def _fits_cache(store: logra.GradientStore) -> bool:
    return _store_bytes(store) < os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def part_read(root: str, args: argparse.Namespace) -> dict[str, object]:
    """O_DIRECT sequential reads of the first --read-gib GiB of shard files: the disk's GB/s."""
    store = logra.GradientStore.open(root)
    budget, done, block = int(args.read_gib * 2**30), 0, mmap.mmap(-1, 16 * 2**20)  # page-aligned buffer
    t = time.perf_counter()
    for shard in store.manifest.shards:
        fd = os.open(store.root / shard.file, os.O_RDONLY | os.O_DIRECT)
        try:
            while done < budget and (n := os.readv(fd, [block])) > 0:
                done += n
        finally:
            os.close(fd)
        if done >= budget:
            break
    seconds = time.perf_counter() - t
    return {"bytes": done, "s": seconds, "disk_gb_s": done / seconds / 1e9}


def _baseline(store: logra.GradientStore, q: torch.Tensor, n: int) -> dict[str, float]:
    """Rows/s (wall and CPU) of the scorer's matmuls over rows already in RAM: float32, and bf16 @ bf16."""
    m = min(BASELINE_ROWS, len(store))
    rows_bf16 = store.rows(0, m).clone()
    rows_f32 = rows_bf16.to(torch.float32)
    q_bf16 = q.to(torch.bfloat16)
    out: dict[str, float] = {}
    for name, query, rows in (("f32", q, rows_f32), ("bf16", q_bf16, rows_bf16)):

        def loop(query: torch.Tensor = query, rows: torch.Tensor = rows) -> None:
            for s in range(0, m, n):
                torch.matmul(query, rows[s : s + n].T)

        best = min((_clocked(loop) for _ in range(3)), key=lambda x: x[0])
        out[f"in_memory_{name}_rows_per_s"], out[f"in_memory_{name}_cpu_rows_per_s"] = m / best[0], m / best[1]
    return out


def _warm_up(root: str, args: argparse.Namespace, q: torch.Tensor) -> None:
    """The same warm-up at every size: score, top_k and self_influence over the first shard only, by a
    Scorer of its own (torch's thread pool, the allocator, the code paths), so the measured Scorer
    allocates its own buffers inside the measured window at every N."""
    store = logra.GradientStore.open(root)
    head = logra.GradientStore(store.root, replace(store.manifest, shards=store.manifest.shards[:1]))
    scorer = logra.Scorer(
        head, logra.fit_preconditioner(head, "identity"), chunk_rows=args.chunk_rows, query_config=head.config,
        progress=False,
    )  # fmt: skip
    scorer.score(q), scorer.top_k(q, 10), scorer.self_influence()


def part_stream(root: str, args: argparse.Namespace) -> dict[str, object]:
    base = _status("RssAnon")
    with Peak() as opened:
        store, scorer = _scorer(root, args)
    out: dict[str, object] = {"page_cached": _fits_cache(store), "open_peak_rss_anon_mib": opened.anon_mib}
    out["open_rss_anon_mib"] = (_status("RssAnon") - base) / 2**20  # what the open store holds (ids, ...)
    q = _queries(store.dim, args.queries)
    _warm_up(root, args, q)
    if out["page_cached"]:
        _scorer(root, args)[1].self_influence()  # read the store into the page cache, by another Scorer
    scores_path = Path(root).parent / "scores.npy"
    top: list[logra.TopK] = []
    peaks: dict[str, float] = {}
    for name, fn in (
        ("score", lambda: scorer.score(q, out=scores_path)),
        ("top_k", lambda: top.append(scorer.top_k(q, 10))),
        ("self_influence", scorer.self_influence),
    ):
        with Peak() as peak:
            out[f"{name}_s"], out[f"{name}_cpu_s"] = _clocked(fn)
        peaks[name] = peak.anon_mib
        out[f"{name}_vm_hwm_mib"] = peak.hwm_mib
    scores_path.unlink()
    out["rss_anon_mib"] = max(peaks.values())
    out["rss_anon_mib_by_call"] = peaks
    out["self_influence_output_mib"] = len(store) * 4 / 2**20  # the [N] float32 it returns, asked for
    out["vm_hwm_mib"] = max(out[f"{name}_vm_hwm_mib"] for name in peaks)  # type: ignore[type-var]
    out.update(_baseline(store, q, args.chunk_rows))
    n = len(store)
    out["streamed_rows_per_s"], out["streamed_cpu_rows_per_s"] = n / out["score_s"], n / out["score_cpu_s"]  # type: ignore[operator]
    for kind in ("", "_cpu"):
        streamed = out[f"streamed{kind}_rows_per_s"]
        out[f"ratio{kind}"] = streamed / out[f"in_memory_f32{kind}_rows_per_s"]  # type: ignore[operator]
        out[f"ratio{kind}_vs_bf16"] = streamed / out[f"in_memory_bf16{kind}_rows_per_s"]  # type: ignore[operator]
    out["matmul_consumes_gb_s"] = out["in_memory_f32_rows_per_s"] * store.dim * store.dtype.itemsize / 1e9  # type: ignore[operator]
    exact = {
        "helpful": top[0].helpful_rows.tolist(),
        "harmful": top[0].harmful_rows.tolist(),
        "helpful_scores": top[0].helpful_scores.tolist(),
        "top_k_s": out["top_k_s"],
    }
    (Path(root).parent / "exact.json").write_text(json.dumps(exact))
    return out


def _rank(rank: int, root: str, args: argparse.Namespace, init: str, result: str) -> None:
    import torch.distributed as dist

    from logra.distributed import DistributedScorer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    store = logra.GradientStore.open(root)
    pre = logra.fit_preconditioner(store, "identity")
    scorer = DistributedScorer(store, pre, chunk_rows=args.chunk_rows, query_config=store.config, progress=False)
    q = _queries(store.dim, args.queries)
    if _fits_cache(store):
        scorer.self_influence()  # warm-up, as in `stream`
    dist.barrier()
    t = time.perf_counter()
    top = scorer.top_k(q, 10)
    top_s = time.perf_counter() - t
    dist.barrier()
    t = time.perf_counter()
    scorer.self_influence()
    self_s = time.perf_counter() - t
    if rank == 0:
        body = {"top_k_s": top_s, "self_influence_s": self_s, "rows": top.helpful_rows.tolist()}
        body["scores"] = top.helpful_scores.tolist()
        Path(result).write_text(json.dumps(body))
    dist.destroy_process_group()


def part_two_procs(root: str, args: argparse.Namespace) -> dict[str, object]:
    import torch.multiprocessing as mp

    base = Path(root).parent
    init, result = f"file://{base / 'dist-init'}", str(base / "dist.json")
    mp.spawn(_rank, args=(root, args, init, result), nprocs=2, join=True)
    out: dict[str, object] = json.loads(Path(result).read_text())
    os.unlink(result)
    exact = json.loads((base / "exact.json").read_text())
    rows: list[list[int]] = out.pop("rows")  # type: ignore[assignment]
    scores = torch.tensor(out.pop("scores"))
    out["same_top_k"] = rows == exact["helpful"]  # the same rows in the same order
    out["same_top_k_sets"] = all(set(a) == set(b) for a, b in zip(rows, exact["helpful"]))
    if "helpful_scores" in exact:  # ties or last-bit differences reorder rows; the scores say which
        out["max_abs_score_diff"] = float((scores - torch.tensor(exact["helpful_scores"])).abs().max())
    return out


def _evict(store: logra.GradientStore) -> None:
    """Drop the store's shard pages from the page cache (POSIX_FADV_DONTNEED): the next read is cold."""
    for shard in store.manifest.shards:
        fd = os.open(store.root / shard.file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _random_reads(store: logra.GradientStore, count: int, threads: int) -> float:
    """Random 4 KiB O_DIRECT reads per second over the shard files, `threads` reads in flight."""
    paths = [store.root / shard.file for shard in store.manifest.shards]
    rng = np.random.default_rng(threads)
    pages = [int(p.stat().st_size) // 4096 for p in paths]
    which = rng.integers(0, len(paths), count)
    picks = [(int(f), int(rng.integers(0, pages[f])) * 4096) for f in which]
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECT) for p in paths]

    def run(batch: list[tuple[int, int]]) -> None:
        block = mmap.mmap(-1, 4096)  # page-aligned, as O_DIRECT needs
        for f, offset in batch:
            os.preadv(fds[f], [block], offset)

    try:
        t = time.perf_counter()
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(run, [picks[i::threads] for i in range(threads)]))
        return count / (time.perf_counter() - t)
    finally:
        for fd in fds:
            os.close(fd)


def _take_mapped(store: logra.GradientStore, rows: torch.Tensor) -> torch.Tensor:
    """The previous `GradientStore.take`: fancy indexing of each shard's memory map, in the asked order."""
    index = rows.numpy()
    out = torch.empty(index.size, store.dim, dtype=torch.bfloat16)
    shard_of = np.searchsorted(store._starts, index, side="right") - 1
    for s in np.unique(shard_of).tolist():
        where = np.flatnonzero(shard_of == s)
        array = store._map(s)
        local = index[where] - int(store._starts[s])
        out[torch.from_numpy(where)] = torch.from_numpy(np.ascontiguousarray(array[local]).view(np.int16)).view(
            torch.bfloat16
        )
    return out


def part_take(root: str, args: argparse.Namespace) -> dict[str, object]:
    """The disk's random-read floor, then `take` of random rows from a cold page cache, new and old."""
    store = logra.GradientStore.open(root)
    out: dict[str, object] = {
        "random_4k_reads_per_s_qd1": _random_reads(store, 3000, 1),
        "random_4k_reads_per_s_qd16": _random_reads(store, 20000, 16),
    }
    gen = torch.Generator().manual_seed(2)
    for m in args.take_rows:
        rows = torch.randint(0, len(store), (m,), generator=gen)
        _evict(store)
        t = time.perf_counter()
        new = store.take(rows)
        out[f"take_{m}_s"] = time.perf_counter() - t
        _evict(store)
        t = time.perf_counter()
        old = _take_mapped(store, rows)
        out[f"take_{m}_mapped_s"] = time.perf_counter() - t
        out[f"take_{m}_same"] = bool(torch.equal(new, old))
        out[f"take_{m}_rows_per_s"] = m / out[f"take_{m}_s"]  # type: ignore[operator]
    rows = torch.randint(0, len(store), (args.take_rows[0],), generator=gen)
    for threads in args.take_threads:  # reads in flight (gather.TAKE_THREADS)
        gather.TAKE_THREADS, default = threads, gather.TAKE_THREADS
        _evict(store)
        t = time.perf_counter()
        store.take(rows)
        out[f"take_{rows.numel()}_threads_{threads}_s"] = time.perf_counter() - t
        gather.TAKE_THREADS = default
    return out


def _recall(found: torch.Tensor, exact: list[list[int]]) -> float:
    return sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact)) / sum(map(len, exact))


def _timed(times: dict[str, float], name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """fn, recording the seconds of its last call in times[name] (and its row count for score_rows)."""

    def call(*a: Any, **kw: Any) -> Any:
        t = time.perf_counter()
        result = fn(*a, **kw)
        times[name] = time.perf_counter() - t
        if name == "stage_two_s":
            times["candidates"] = int(a[1].numel())
        return result

    return call


def _lists_needed(index: InfluenceIndex, q: torch.Tensor, exact: dict[str, list[list[int]]]) -> dict[str, object]:
    """Where the exact top-10 rows lie in each query's probe order: the nprobe (and share of the rows
    scanned) at which 0.95 and 1.0 of them are in probed lists, an upper bound on any code's recall."""
    faiss = index._faiss
    ivf = faiss.extract_index_ivf(index.index)
    sizes = np.array([ivf.invlists.list_size(j) for j in range(ivf.nlist)])
    list_of: dict[int, int] = {}
    wanted = np.array(sorted({r for key in ("helpful", "harmful") for rows in exact[key] for r in rows}))
    for j in range(ivf.nlist):
        ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(j), int(sizes[j])).copy()
        for r in ids[np.isin(ids, wanted)].tolist():
            list_of[r] = j
    out: dict[str, object] = {"nlist": ivf.nlist}
    for key, sign in (("helpful", 1.0), ("harmful", -1.0)):
        lifted = np.zeros((q.shape[0], ivf.d), dtype=np.float32)
        lifted[:, : q.shape[1]] = sign * q.numpy()
        _, order = ivf.quantizer.search(lifted, ivf.nlist)  # (Q, nlist): lists nearest first
        rank = np.argsort(order, axis=1)  # rank[q, list]
        ranks = np.sort([rank[i, list_of[r]] for i, rows in enumerate(exact[key]) for r in rows])
        for share in (0.95, 1.0):
            nprobe = int(ranks[min(len(ranks) - 1, int(np.ceil(share * len(ranks))) - 1)]) + 1
            scanned = np.mean([sizes[order[i, :nprobe]].sum() for i in range(q.shape[0])]) / sizes.sum()
            out[f"{key}_nprobe_for_{share}"] = nprobe
            out[f"{key}_rows_scanned_for_{share}"] = float(scanned)
    return out


def part_index(root: str, args: argparse.Namespace) -> dict[str, object]:
    store, scorer = _scorer(root, args)
    q = _queries(store.dim, args.queries)
    factory = args.factory or default_factory(len(store), store.dim)
    directory = store.root / ("index-" + factory.replace(",", "-"))  # one folder per factory: kept side by side
    t = time.perf_counter()
    torch.set_num_threads(args.build_threads)  # the build may use every core; queries use one
    index = InfluenceIndex(
        scorer, factory=factory, directory=directory, rebuild=not args.reuse_index, train_rows=args.train_rows,
        threads=args.build_threads,
    )  # fmt: skip
    out: dict[str, object] = {
        "factory": factory,
        "built": index.built,
        "build_s": time.perf_counter() - t,
        "build_threads": args.build_threads,
    }
    torch.set_num_threads(1)
    index._faiss.omp_set_num_threads(1)
    out["train_rows"] = args.train_rows
    out["index_mib"] = index.path.stat().st_size / 2**20
    exact = json.loads((Path(root).parent / "exact.json").read_text())  # `stream`'s (may finish during the build)
    out["exact_top_k_s"] = exact.get("top_k_s")  # `stream`'s, another process
    _evict(store)
    t = time.perf_counter()
    scorer.top_k(q, 10)  # the exact streamed top-k again, in this process, for same-process speedups
    exact_here = out["exact_top_k_here_s"] = time.perf_counter() - t
    times: dict[str, float] = {}
    index.shortlist = _timed(times, "stage_one_s", index.shortlist)  # type: ignore[method-assign]
    scorer.score_rows = _timed(times, "stage_two_s", scorer.score_rows)  # type: ignore[method-assign]
    sweep = []
    for nprobe, harmful_nprobe, shortlist in itertools.product(
        args.nprobe, args.harmful_nprobe or [None], args.shortlist
    ):
        _evict(store)  # stage two reads its rows from the disk, as the exact pass does at this size
        t = time.perf_counter()
        two = index.top_k(q, 10, shortlist=shortlist, nprobe=nprobe, harmful_nprobe=harmful_nprobe)
        s = time.perf_counter() - t
        sweep.append(
            {
                "nprobe": nprobe,
                "harmful_nprobe": harmful_nprobe or nprobe,
                "shortlist": shortlist,
                "s": s,
                "speedup_here": exact_here / s,
                **times,
                "recall@10": _recall(two.helpful_rows, exact["helpful"]),
                "recall@10_harmful": _recall(two.harmful_rows, exact["harmful"]),
            }
        )
        print(json.dumps(sweep[-1]), file=sys.stderr, flush=True)
    out["sweep"] = sweep
    out["lists_needed"] = _lists_needed(index, q, exact)
    return out


PARTS = {
    "read": part_read,
    "stream": part_stream,
    "two": part_two_procs,
    "take": part_take,
    "index": part_index,
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--chunk-rows", type=int, default=4096, help="the Scorer's (and the baseline's) chunk")
    parser.add_argument("--factory", type=str, default=None, help="FAISS factory (default: default_factory(N))")
    parser.add_argument("--train-rows", type=int, default=None, help="index training sample (default: the index's)")
    parser.add_argument("--build-threads", type=int, default=2)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--harmful-nprobe", type=int, nargs="*", default=[], help="default: --nprobe's")
    parser.add_argument("--shortlist", type=int, nargs="+", default=[100, 300, 1000])
    parser.add_argument("--reuse-index", action="store_true", help="open the index built before, if current")
    parser.add_argument("--take-rows", type=int, nargs="+", default=[6400, 64000], help="rows per `take` timing")
    parser.add_argument("--take-threads", type=int, nargs="*", default=[], help="thread counts tried by `take`")
    parser.add_argument("--read-gib", type=float, default=4.0, help="GiB read by the `read` part")
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--lock", type=str, default="/tmp/logra-timing.lock", help="flock per part ('' for none)")
    parser.add_argument("--lock-wait", type=float, default=1800.0, help="seconds to wait for --lock per part")
    parser.add_argument("--dir", type=str, default="/tmp")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument("--out", type=str, default=str(RESULTS / "scale.json"))
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    return parser


def _run_part(part: str, root: Path, args: argparse.Namespace) -> dict[str, object]:
    cmd = [sys.executable, __file__, "--child", part, str(root)] + _forward(args)
    with timing_lock(args.lock or None, args.lock_wait) as locked:
        t = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t
    if done.returncode:
        raise SystemExit(f"part {part} failed:\n{done.stderr}")
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    result.update(locked=locked, part_wall_s=wall)
    return result


def _summary(result: dict[str, object]) -> None:
    """Derived figures: 2 processes vs 1, and two-stage speedups against the exact top-k."""
    one, two, index = (result.get(p) for p in ("stream", "two", "index"))
    if isinstance(one, dict) and isinstance(two, dict):
        result["two_vs_one"] = {
            "top_k_speedup": one["top_k_s"] / two["top_k_s"],
            "self_influence_speedup": one["self_influence_s"] / two["self_influence_s"],
            "same_top_k": two["same_top_k"],
            "same_top_k_sets": two["same_top_k_sets"],
        }
    if isinstance(one, dict) and isinstance(index, dict):
        for row in index["sweep"]:  # type: ignore[union-attr]
            row["speedup"] = one["top_k_s"] / row["s"]


def main() -> None:
    args = _parser().parse_args()
    if args.child:
        part, root = args.child
        torch.set_num_threads(1)  # 1 thread per process in every part: the 2-process runs compare like with like
        print(json.dumps(PARTS[part](root, args)))
        return
    results = []
    for rows in args.rows:
        root = Path(args.dir) / f"logra-scale-{rows}x{args.dim}" / "store"
        try:
            if not (root / "manifest.json").exists():
                shutil.rmtree(root.parent, ignore_errors=True)
                root.parent.mkdir(parents=True)
                write_s = build_store(root, rows, args.dim)
            else:
                write_s = float("nan")
            result: dict[str, object] = {"rows": rows, "dim": args.dim, "write_s": write_s}
            result["store_gib"] = sum(p.stat().st_size for p in root.iterdir()) / 2**30
            for part in args.parts:
                result[part] = _run_part(part, root, args)
                print(json.dumps({part: result[part]}), flush=True)
            _summary(result)
            results.append(result)
            print(json.dumps(result), flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(root.parent, ignore_errors=True)
    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(json.dumps(results, indent=1))


def _forward(args: argparse.Namespace) -> list[str]:
    out = ["--dim", str(args.dim), "--queries", str(args.queries), "--chunk-rows", str(args.chunk_rows)]
    out += ["--build-threads", str(args.build_threads), "--read-gib", str(args.read_gib)]
    out += ["--factory", args.factory] if args.factory else []
    out += ["--train-rows", str(args.train_rows)] if args.train_rows else []
    out += ["--reuse-index"] if args.reuse_index else []
    out += ["--take-rows", *map(str, args.take_rows), "--take-threads", *map(str, args.take_threads)]
    out += ["--harmful-nprobe", *map(str, args.harmful_nprobe)]
    return out + ["--nprobe", *map(str, args.nprobe), "--shortlist", *map(str, args.shortlist)]


if __name__ == "__main__":
    main()
