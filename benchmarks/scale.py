"""Scale: a synthetic bf16 store of millions of rows, scored streamed, on 1 and 2 processes, and two-stage.

For each --rows N (default 1M) this writes a bf16 store [N, D] through the public `StoreWriter`
(rows around 256 centres with varying norms, seeded), then, each part in a fresh process:

  throughput  rows/s of `Scorer.score(q, out=file)` streaming the shards / rows/s of one
              in-memory torch.matmul [Q, D] @ [D, n] of a float32 chunk already in RAM
              (n = --chunk-rows * 8); also `top_k` and `self_influence` times
  memory      peak RssAnon (anonymous: chunks, queries, top-k) sampled every 5 ms, and peak VmHWM
              (resident, counting mapped shard pages) over the part above, above the process's base
  2 processes `DistributedScorer` over gloo against `Scorer` on 1 process: top-k and
              self_influence times, and whether the top-k rows match (every process: 1 thread)
  two-stage   `InfluenceIndex` build time, then per nprobe: recall@10 of the helpful top-10
              against exact `Scorer.top_k`, and exact time / two-stage time (index open excluded)

Stores are written under --dir (default /tmp) and deleted at the end unless --keep. Linux only.

    .venv/bin/python benchmarks/scale.py --rows 1000000                 # ~2 GB store
    .venv/bin/python benchmarks/scale.py --rows 1000000 10000000        # and ~20 GB
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

import logra
from logra.store import StoreWriter
from logra.types import LayerInfo

CENTRES = 256


def build_store(root: Path, rows: int, dim: int, shard_mib: int = 256) -> float:
    """Write a bf16 store of `rows` clustered rows through StoreWriter; returns seconds taken."""
    side = int(dim**0.5)
    if side * side != dim:
        raise SystemExit(f"--dim={dim} must be a square (one synthetic k x k layer).")
    config = logra.LoGraConfig(k_in=side, k_out=side, dtype="bfloat16")
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


def _scorer(root: str, args: argparse.Namespace) -> tuple[logra.GradientStore, logra.Scorer]:
    store = logra.GradientStore.open(root)
    pre = logra.fit_preconditioner(store, "identity")
    return store, logra.Scorer(store, pre, chunk_rows=args.chunk_rows, query_config=store.config, progress=False)


def part_stream(root: str, args: argparse.Namespace) -> dict[str, float]:
    store, scorer = _scorer(root, args)
    q = _queries(store.dim, args.queries)
    out: dict[str, float] = {}
    scorer.self_influence()  # warm-up pass: thread pools, the page cache
    with Peak() as peak:
        t = time.perf_counter()
        scores = scorer.score(q, out=Path(root).parent / "scores.npy")
        out["score_s"] = time.perf_counter() - t
        del scores
        t = time.perf_counter()
        scorer.top_k(q, 10)
        out["top_k_s"] = time.perf_counter() - t
        t = time.perf_counter()
        scorer.self_influence()
        out["self_influence_s"] = time.perf_counter() - t
    os.unlink(Path(root).parent / "scores.npy")
    out.update(rss_anon_mib=peak.anon_mib, vm_hwm_mib=peak.hwm_mib)
    n = min(args.chunk_rows * 8, len(store))
    chunk = store.rows(0, n).to(torch.float32).clone()
    best = min(_timed(lambda: torch.matmul(q, chunk.T)) for _ in range(5))
    out["in_memory_rows_per_s"] = n / best
    out["streamed_rows_per_s"] = len(store) / out["score_s"]
    out["ratio"] = out["streamed_rows_per_s"] / out["in_memory_rows_per_s"]
    return out


def _timed(fn: object) -> float:
    t = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - t


def part_single(root: str, args: argparse.Namespace) -> dict[str, object]:
    store, scorer = _scorer(root, args)
    q = _queries(store.dim, args.queries)
    scorer.self_influence()  # warm-up, as in every part
    t = time.perf_counter()
    top = scorer.top_k(q, 10)
    top_s = time.perf_counter() - t
    t = time.perf_counter()
    scorer.self_influence()
    return {"top_k_s": top_s, "self_influence_s": time.perf_counter() - t, "rows": top.helpful_rows.tolist()}


def _rank(rank: int, root: str, args: argparse.Namespace, init: str, result: str) -> None:
    import torch.distributed as dist

    from logra.distributed import DistributedScorer

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    store = logra.GradientStore.open(root)
    pre = logra.fit_preconditioner(store, "identity")
    scorer = DistributedScorer(store, pre, chunk_rows=args.chunk_rows, query_config=store.config, progress=False)
    q = _queries(store.dim, args.queries)
    scorer.self_influence()  # warm-up, as in every part
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
        Path(result).write_text(json.dumps(body))
    dist.destroy_process_group()


def part_two_procs(root: str, args: argparse.Namespace) -> dict[str, object]:
    import torch.multiprocessing as mp

    base = Path(root).parent
    init, result = f"file://{base / 'dist-init'}", str(base / "dist.json")
    mp.spawn(_rank, args=(root, args, init, result), nprocs=2, join=True)
    out = json.loads(Path(result).read_text())
    os.unlink(result)
    return out


def part_index(root: str, args: argparse.Namespace) -> dict[str, object]:
    store, scorer = _scorer(root, args)
    q = _queries(store.dim, args.queries)
    scorer.self_influence()  # warm-up, as in every part
    t = time.perf_counter()
    exact = scorer.top_k(q, 10)
    exact_s = time.perf_counter() - t
    t = time.perf_counter()
    index = logra.InfluenceIndex(scorer, factory=f"IVF{args.lists},SQ8", rebuild=True, train_rows=40 * args.lists)
    out: dict[str, object] = {"build_s": time.perf_counter() - t, "exact_top_k_s": exact_s, "lists": args.lists}
    t = time.perf_counter()
    logra.InfluenceIndex(scorer, factory=f"IVF{args.lists},SQ8")  # open + verify the file
    out["open_s"] = time.perf_counter() - t
    out["index_mib"] = index.path.stat().st_size / 2**20
    sweep = []
    for nprobe in args.nprobe:
        t = time.perf_counter()
        two = index.top_k(q, 10, shortlist=100, nprobe=nprobe)
        s = time.perf_counter() - t
        hits = sum(len(set(a) & set(b)) for a, b in zip(two.helpful_rows.tolist(), exact.helpful_rows.tolist()))
        sweep.append({"nprobe": nprobe, "s": s, "recall@10": hits / exact.helpful_rows.numel(), "speedup": exact_s / s})
    out["sweep"] = sweep
    return out


PARTS = {"stream": part_stream, "single": part_single, "two": part_two_procs, "index": part_index}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000])
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--chunk-rows", type=int, default=16384)
    parser.add_argument("--lists", type=int, default=1024, help="IVF lists of the two-stage index")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[16, 32, 64, 128])
    parser.add_argument("--parts", nargs="+", default=list(PARTS), choices=list(PARTS))
    parser.add_argument("--dir", type=str, default="/tmp")
    parser.add_argument("--keep", action="store_true", help="keep the stores")
    parser.add_argument("--child", nargs=2, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
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
                cmd = [sys.executable, __file__, "--child", part, str(root)] + _forward(args)
                done = subprocess.run(cmd, capture_output=True, text=True)
                if done.returncode:
                    raise SystemExit(f"part {part} failed:\n{done.stderr}")
                result[part] = json.loads(done.stdout.strip().splitlines()[-1])
            if "single" in result and "two" in result:
                one, two = result["single"], result["two"]
                assert isinstance(one, dict) and isinstance(two, dict)
                result["two_vs_one"] = {
                    "top_k_speedup": one["top_k_s"] / two["top_k_s"],
                    "self_influence_speedup": one["self_influence_s"] / two["self_influence_s"],
                    "same_top_k": one.pop("rows") == two.pop("rows"),
                }
            results.append(result)
            print(json.dumps(result), flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(root.parent, ignore_errors=True)
    print(json.dumps(results, indent=1))


def _forward(args: argparse.Namespace) -> list[str]:
    out = ["--dim", str(args.dim), "--queries", str(args.queries), "--chunk-rows", str(args.chunk_rows)]
    return out + ["--lists", str(args.lists), "--nprobe", *map(str, args.nprobe)]


if __name__ == "__main__":
    main()
