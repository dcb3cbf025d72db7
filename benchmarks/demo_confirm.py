"""Does confirming the demo's top articles by fine-tuning find the passages' sources?

`make demo` scores 300 Lee articles for held-out passages with KFAC and then runs `logra
confirm`: each passage's top articles are trained on alone (Adam, from SmolLM2's weights, every
Linear layer and the untied head) and re-ranked by how much the passage's loss drops. This
benchmark asks how the answer depends on the shortlist's size k and the fine-tuning recipe, on
the demo's 5 passages and the 33 validation passages, with the same command line:

1. `logra score` of validation.jsonl against the demo's store (the demo's own matrix is reused);
2. `logra confirm --top-k K` for each --recipe (STEPS:LR), on both query files;
3. for every k <= K, each passage's top k re-ranked by its gains (a candidate's gain does not
   depend on the other candidates, so the top k of a K run is exactly a k run), and the source
   first counted as the demo's check counts it (a verbatim copy of the source article counts).

A confirm table whose sidecar records the same recipe, K and score-matrix provenance is reused
(pass --fresh to recompute). Writes results/demo_confirm.json.

    make demo
    .venv/bin/python benchmarks/demo_confirm.py      # about 5 + 10 + 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))
from demo_setup import copies  # noqa: E402  (what the demo's check counts as the source)

LOGRA = Path(sys.executable).with_name("logra")


def _run(*argv: str) -> None:
    subprocess.run([str(LOGRA), *argv], check=True)


def validation_matrix(demo: Path) -> Path:
    """demo/validation.npy, the validation passages scored as the demo scores its queries."""
    matrix = demo / "validation.npy"
    if not Path(str(matrix) + ".json").is_file():
        _run("score", "--store", str(demo / "store"), "--queries", str(demo / "validation.jsonl"),
             "--prompt-field", "prompt", "--normalization", "relative", "--matrix", str(matrix))  # fmt: skip
    return matrix


def confirmed(matrix: Path, out: Path, k: int, steps: int, lr: float, fresh: bool) -> dict[str, Any]:
    """The sidecar of `logra confirm` for `matrix` at (k, steps, lr), run unless a matching one exists."""
    sidecar = Path(str(out) + ".json")
    provenance = json.loads(Path(str(matrix) + ".json").read_text())["provenance"]
    if not fresh and sidecar.is_file() and out.is_file():
        meta = json.loads(sidecar.read_text())
        recipe = meta["recipe"]
        if (meta["top_k"], recipe["steps"], recipe["lr"], meta["provenance"]) == (k, steps, lr, provenance):
            return meta
    _run("confirm", "--scores", str(matrix), "--top-k", str(k), "--steps", str(steps), "--lr", str(lr),
         "--out", str(out))  # fmt: skip
    return json.loads(sidecar.read_text())


def first_counts(table: Path, same_text: dict[str, set[str]], k_max: int) -> dict[int, list[bool]]:
    """{k: per passage, is a source first once its score top k is ordered by gain}."""
    rows = [r for r in csv.DictReader(table.open(encoding="utf-8")) if r["query_id"].startswith("passage-from-")]
    out: dict[int, list[bool]] = {}
    for k in range(1, k_max + 1):
        hits = []
        for q in sorted({r["query_id"] for r in rows}):
            mine = [r for r in rows if r["query_id"] == q and int(r["score_rank"]) <= k]
            best = max(mine, key=lambda r: (float(r["gain"]), -int(r["score_rank"])))  # ties: the higher score
            source = q.removeprefix("passage-from-")
            hits.append(best["train_id"] in same_text.get(source, {source}))
        out[k] = hits
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", type=Path, default=Path("demo_out"))
    parser.add_argument("--k", type=int, default=10, help="the largest shortlist, confirmed once")
    parser.add_argument("--recipes", nargs="+", default=["1:2e-4", "2:1e-4", "5:5e-5"], help="STEPS:LR of Adam")
    parser.add_argument("--fresh", action="store_true", help="recompute confirm tables even when they match")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "demo_confirm.json")
    args = parser.parse_args(argv)
    demo = args.demo_dir
    if not (demo / "scores.npy.json").is_file():
        raise SystemExit(f"{demo}/scores.npy is missing: run `make demo` first.")
    same_text = copies(demo / "corpus.jsonl")
    sets = {"demo": demo / "scores.npy", "validation": validation_matrix(demo)}
    (demo / "confirm").mkdir(exist_ok=True)
    result: dict[str, Any] = {"k": args.k, "recipes": {}}
    for recipe in args.recipes:
        steps, lr = int(recipe.split(":")[0]), float(recipe.split(":")[1])
        entry: dict[str, Any] = {}
        for name, matrix in sets.items():
            table = demo / "confirm" / f"{name}_steps{steps}_lr{lr:g}_k{args.k}.csv"
            meta = confirmed(matrix, table, args.k, steps, lr, args.fresh)
            counts = first_counts(table, same_text, args.k)
            entry[name] = {
                "passages": len(counts[1]),
                "candidates": meta["candidates"],
                "seconds": round(meta["seconds"], 1),
                "seconds_per_candidate": round(meta["seconds"] / meta["candidates"], 2),
                "source_first_by_k": {k: sum(hits) for k, hits in counts.items()},
                "hits_by_k": {k: hits for k, hits in counts.items()},
            }
        result["recipes"][recipe] = entry
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("source first (demo of 5; validation of 33) after re-ranking the KFAC top k by fine-tuning; k = 1 is KFAC")
    print("recipe (Adam)   " + " ".join(f"{k:>8}" for k in range(1, args.k + 1)))
    for recipe, entry in result["recipes"].items():
        d, v = entry["demo"]["source_first_by_k"], entry["validation"]["source_first_by_k"]
        cells = " ".join(f"{d[k]:>3};{v[k]:>4}" for k in range(1, args.k + 1))
        print(f"{recipe:<15} {cells}   ({entry['demo']['seconds_per_candidate']} s per candidate on the demo)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
