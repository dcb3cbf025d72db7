"""Peak memory of logging a streamed corpus does not grow with the corpus.

Each corpus size runs in a fresh process: a generator makes the examples on the fly (nothing is
held), `logra.stream_batches` cuts them into batches of 256, and a GradientLogger writes the rows
of a 2-layer MLP (D = 416, float32) to a store in a temporary directory. The peak resident set
(VmHWM) of each process is reported, and the ratio largest / smallest corpus; flat means a ratio
near 1 while the corpus (and the store on disk) grows 20-fold. What does grow is the set of
committed ids (a few dozen bytes per example), which the writer keeps to refuse duplicates.

    .venv/bin/python benchmarks/streaming_memory.py            # sizes 5000 20000 100000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile


def child(n: int) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    import logra

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Tanh(), nn.Linear(64, 10))

    def corpus():  # noqa: ANN202
        g = torch.Generator().manual_seed(1)
        for i in range(n):
            yield {"x": torch.randn(64, generator=g), "y": i % 10}

    with tempfile.TemporaryDirectory() as root:
        config = logra.LoGraConfig(k_in=16, k_out=16)
        with logra.GradientLogger(model, config, f"{root}/store", shard_rows=4096) as logger:
            for ids, examples in logra.stream_batches(corpus(), 256):
                x, y = torch.stack([e["x"] for e in examples]), torch.tensor([e["y"] for e in examples])
                with logger.record(ids=ids, param_grads=False):
                    F.cross_entropy(model(x), y, reduction="sum").backward()
        store = logra.GradientStore.open(f"{root}/store")
        disk = sum(p.stat().st_size for p in (store.root).iterdir())
        peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
        print(json.dumps({"examples": len(store), "D": store.dim, "store_mib": disk / 2**20, "peak_mib": peak / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 100000])
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    rows = []
    for n in args.sizes:
        out = subprocess.run([sys.executable, __file__, "--child", str(n)], capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| examples | D | store on disk (MiB) | peak RSS (MiB) |\n| ---: | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r['examples']} | {r['D']} | {r['store_mib']:.1f} | {r['peak_mib']:.1f} |")
    ratio = rows[-1]["peak_mib"] / rows[0]["peak_mib"]
    print(f"peak RSS ratio, {rows[-1]['examples']} vs {rows[0]['examples']} examples: {ratio:.3f}")


if __name__ == "__main__":
    main()
