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
              shared machine, wall time shows waiting for the disk. Peak RssAnon (anonymous:
              chunks, queries, top-k; sampled every 5 ms) and VmHWM (resident, counting mapped
              shard pages) over the part, above the process's base. A warm-up pass runs first only
              when the store fits in half the RAM (then it is read from the page cache)
  two         `DistributedScorer` over gloo on 2 processes: top-k and self_influence times
              against `stream`'s 1-process times, and whether the top-k rows match
  index       `InfluenceIndex` (factory --factory, default `default_factory(N)`) build time and
              size, then per (nprobe, shortlist): recall@10 of the helpful and harmful top-10
              against `stream`'s exact `top_k`, and exact time / two-stage time (1 thread each)

Each part takes --lock (an flock shared by everyone timing on this machine) for its run only,
waiting at most --lock-wait seconds; a part that ran without it says "locked": false.
Stores are written under --dir (default /tmp) and deleted at the end unless --keep. Linux only.

    .venv/bin/python benchmarks/scale.py --rows 1000000                 # ~2 GB store
    .venv/bin/python benchmarks/scale.py --rows 1000000 10000000        # and ~20 GB
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import mmap
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

import logra
from logra.config import StorageDtype
from logra.index import InfluenceIndex, default_factory
from logra.store import StoreWriter
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
    """Peak RssAnon (sampled) and VmHWM (reset at start) above the values at start, in MiB."""

    def __enter__(self) -> Peak:
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


def part_stream(root: str, args: argparse.Namespace) -> dict[str, object]:
    store, scorer = _scorer(root, args)
    q = _queries(store.dim, args.queries)
    out: dict[str, object] = {"page_cached": _fits_cache(store)}
    if out["page_cached"]:
        scorer.self_influence()  # warm-up pass: thread pools, the page cache
    scores_path = Path(root).parent / "scores.npy"
    top: list[logra.TopK] = []
    with Peak() as peak:
        out["score_s"], out["score_cpu_s"] = _clocked(lambda: scorer.score(q, out=scores_path))
        out["top_k_s"], out["top_k_cpu_s"] = _clocked(lambda: top.append(scorer.top_k(q, 10)))
        out["self_influence_s"], out["self_influence_cpu_s"] = _clocked(scorer.self_influence)
    scores_path.unlink()
    out.update(rss_anon_mib=peak.anon_mib, vm_hwm_mib=peak.hwm_mib)
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


def _recall(found: torch.Tensor, exact: list[list[int]]) -> float:
    return sum(len(set(a) & set(b)) for a, b in zip(found.tolist(), exact)) / sum(map(len, exact))


def part_index(root: str, args: argparse.Namespace) -> dict[str, object]:
    store, scorer = _scorer(root, args)
    q = _queries(store.dim, args.queries)
    exact = json.loads((Path(root).parent / "exact.json").read_text())
    factory = args.factory or default_factory(len(store), store.dim)
    t = time.perf_counter()
    torch.set_num_threads(args.build_threads)  # the build may use every core; queries use one
    index = InfluenceIndex(
        scorer, factory=factory, rebuild=True, train_rows=args.train_rows, threads=args.build_threads
    )
    out: dict[str, object] = {
        "factory": factory,
        "build_s": time.perf_counter() - t,
        "build_threads": args.build_threads,
    }
    torch.set_num_threads(1)
    index._faiss.omp_set_num_threads(1)
    out["train_rows"] = args.train_rows
    out["index_mib"] = index.path.stat().st_size / 2**20
    t = time.perf_counter()
    InfluenceIndex(scorer, factory=factory)  # open + verify the file
    out["open_s"] = time.perf_counter() - t
    sweep = []
    for nprobe in args.nprobe:
        for shortlist in args.shortlist:
            t = time.perf_counter()
            two = index.top_k(q, 10, shortlist=shortlist, nprobe=nprobe)
            s = time.perf_counter() - t
            sweep.append(
                {
                    "nprobe": nprobe,
                    "shortlist": shortlist,
                    "s": s,
                    "recall@10": _recall(two.helpful_rows, exact["helpful"]),
                    "recall@10_harmful": _recall(two.harmful_rows, exact["harmful"]),
                }
            )
    out["sweep"] = sweep
    return out


PARTS = {"read": part_read, "stream": part_stream, "two": part_two_procs, "index": part_index}


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
    parser.add_argument("--shortlist", type=int, nargs="+", default=[100, 300, 1000])
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
    return out + ["--nprobe", *map(str, args.nprobe), "--shortlist", *map(str, args.shortlist)]


if __name__ == "__main__":
    main()
