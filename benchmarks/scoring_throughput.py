"""Throughput and peak memory of the streamed `Scorer` over a synthetic store on disk.

  throughput ratio = time of one in-memory torch.matmul [Q, D] @ [D, N] (rows already in RAM)
                     / time of `Scorer(store, identity).score(queries)` streaming the same rows
                     from the memory-mapped shards (warm page cache; best of --repeat runs)
  memory           = peak resident memory while scoring a store of N rows and one of 10 N rows,
                     each in a fresh process: VmHWM (reset through /proc/self/clear_refs; it
                     counts the shards' mapped file pages) and the peak of RssAnon (anonymous
                     memory only: the chunks, queries and outputs), sampled every 5 ms.

Linux only (/proc). Stores are written once into --dir and reused. Run:

    .venv/bin/python benchmarks/scoring_throughput.py                      # 200k x 4096, memory at 20k / 200k
    .venv/bin/python benchmarks/scoring_throughput.py --rows 20000 --memory-rows 2000   # a quick run
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

import logra
from logra.store import StoreWriter
from logra.types import LayerInfo


def build_store(root: Path, rows: int, dim: int, shard_bytes: int = 256 * 2**20) -> logra.GradientStore:
    """A float32 store of `rows` random rows [rows, dim] (one synthetic layer), written once."""
    if (root / "manifest.json").exists():
        return logra.GradientStore.open(root)
    side = int(dim**0.5)
    if side * side != dim:
        raise SystemExit(f"--dim={dim} must be a square (one synthetic k x k layer).")
    config = logra.LoGraConfig(k_in=side, k_out=side, dtype="float32")
    layer = LayerInfo("synthetic", "Linear", side, side, side, side, False, 0)
    shard_rows = max(1, shard_bytes // (dim * 4))
    writer = StoreWriter(root, config, "synthetic", [layer], shard_rows)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, rows, 4096):
        n = min(4096, rows - start)
        writer.append(list(range(start, start + n)), torch.randn(n, dim, generator=gen))
        writer.commit_if_full(None)
    writer.commit(None)
    return logra.GradientStore.open(root)


def throughput(store: logra.GradientStore, queries: int, chunk_rows: int, repeat: int) -> dict[str, float]:
    q = torch.randn(queries, store.dim, generator=torch.Generator().manual_seed(1))
    scorer = logra.Scorer(store, logra.fit_preconditioner(store, "identity"), chunk_rows=chunk_rows, progress=False)
    streamed = []
    for _ in range(repeat):
        t = time.perf_counter()
        scores = scorer.score(q)
        streamed.append(time.perf_counter() - t)
    rows = store.rows().clone()  # the whole store in RAM, for the reference matmul
    in_memory = []
    for _ in range(repeat):
        t = time.perf_counter()
        reference = torch.matmul(q, rows.T)
        in_memory.append(time.perf_counter() - t)
    if not torch.allclose(scores, reference, rtol=1e-4, atol=1e-3):
        raise SystemExit("streamed scores differ from the in-memory matmul")
    return {"streamed_s": min(streamed), "in_memory_s": min(in_memory), "ratio": min(in_memory) / min(streamed)}


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def peak_memory(root: str, queries: int, chunk_rows: int) -> dict[str, float]:
    """Run in a fresh process: score once, return peak VmHWM and peak RssAnon in MiB."""
    store = logra.GradientStore.open(root)
    q = torch.randn(queries, store.dim, generator=torch.Generator().manual_seed(1))
    scorer = logra.Scorer(store, logra.fit_preconditioner(store, "identity"), chunk_rows=chunk_rows, progress=False)
    peak_anon, done = [_status("RssAnon")], threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon.append(_status("RssAnon"))
            time.sleep(0.005)

    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    base_hwm, base_anon = _status("VmHWM"), _status("RssAnon")
    thread = threading.Thread(target=sample)
    thread.start()
    out = scorer.score(q, out=Path(root).parent / f"scores-{len(store)}.npy")
    done.set()
    thread.join()
    del out
    mib = 2**20
    return {"vm_hwm_mib": (_status("VmHWM") - base_hwm) / mib, "rss_anon_mib": (max(peak_anon) - base_anon) / mib}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=4096)
    parser.add_argument("--queries", type=int, default=32)
    parser.add_argument("--chunk-rows", type=int, default=4096)
    parser.add_argument("--memory-rows", type=int, default=20_000, help="N for the memory test (10 N too)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--dir", type=str, default=None, help="where stores are written (default: a temp dir)")
    parser.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.child:
        print(json.dumps(peak_memory(args.child, args.queries, args.chunk_rows)))
        return
    base = Path(args.dir or tempfile.mkdtemp(prefix="logra-bench-"))
    store = build_store(base / f"store-{args.rows}x{args.dim}", args.rows, args.dim)
    result = {"rows": args.rows, "dim": args.dim, "queries": args.queries, "chunk_rows": args.chunk_rows,
              "threads": torch.get_num_threads()}  # fmt: skip
    result.update(throughput(store, args.queries, args.chunk_rows, args.repeat))
    for n in (args.memory_rows, 10 * args.memory_rows):
        root = base / f"store-{n}x{args.dim}"  # the throughput store when n == --rows
        build_store(root, n, args.dim)
        cmd = [sys.executable, __file__, "--child", str(root), "--queries", str(args.queries),
               "--chunk-rows", str(args.chunk_rows)]  # fmt: skip
        result[f"memory_{n}"] = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)
    print(json.dumps(result, indent=1))
    print(
        f"\n| rows x D | Q | streamed | in-memory matmul | ratio |\n|---|---|---|---|---|\n"
        f"| {args.rows} x {args.dim} | {args.queries} | {result['streamed_s']:.3f} s | {result['in_memory_s']:.3f} s "
        f"| {result['ratio']:.2f} |"
    )
    small, large = result[f"memory_{args.memory_rows}"], result[f"memory_{10 * args.memory_rows}"]
    print(
        f"\n| rows | peak RssAnon | peak VmHWM |\n|---|---|---|\n"
        f"| {args.memory_rows} | {small['rss_anon_mib']:.1f} MiB | {small['vm_hwm_mib']:.1f} MiB |\n"
        f"| {10 * args.memory_rows} | {large['rss_anon_mib']:.1f} MiB | {large['vm_hwm_mib']:.1f} MiB |"
    )


if __name__ == "__main__":
    main()
