"""Fact tracing, measured: does attribution find the one training document that taught a fact?

Data (seeded, deterministic; built by `fact_corpus.py`). The Lee news corpus of the `gensim`
wheel (300 articles, fetched once by scripts/fetch_data.py), each article cut to its first
`length` word tokens. Synthetic
facts about invented entities (random syllable names the model cannot know from anywhere else)
are written into the articles at a sentence boundary, one fact per article:

- `eval` facts: each stated in exactly one training document, by one of two statement templates
  of its relation (capital-of, founder-of, born-in, language-of, headquarters-in). These are
  the facts traced.
- `demo` facts: stated in one article *and* asked as "q : ... a : ..." in a short document of
  its own. They teach the model the question format (mixed training, as in Allen-Zhu & Li's
  "Physics of Language Models 3.1"), so it can answer questions about the eval facts, which it
  only ever read as statements.

Queries ask each eval fact with the relation's *question* template ("q : which city is
veltrania ' s capital ? a : morsk" for "the capital of veltrania is morsk ."): a paraphrase of
the source document's sentence. The query loss is the answer token's cross-entropy, the prompt
is context. Objects (cities, people, languages) come from small pools, so the answer word is in
several documents; the subject word is in exactly one.

Model: a GPT-2 built from a config (no download) and trained from scratch with AdamW on all
documents (summed next-token loss) until it recalls a good share of the eval facts; weights and
the optimizer's second moments are cached in benchmarks/cache/fact-tracing.npz. Recall is the
argmax answer-token accuracy on the paraphrased queries.

Attribution, with logra's default config (k = 64 per side, float32) on the Conv1D layers of every
block and the LM head (`logged`): the dot product (identity preconditioner), KFAC, EK-FAC (dot and
EK-FAC also with cosine normalisation), EK-FAC on the storage budget of uniform k = 64 shared
across layers by `allocate_k` from a probe pass, logra's TrackStar preset (rows corrected by the
trained AdamW's v̂, train/query mixed EK-FAC curvature, cosine; `logra.presets`), and the BM25
baseline (`bm25s` with its English stopwords, TrackStar's baseline, arXiv 2410.17413): query =
question + answer, corpus = the training documents. Metrics: recall@1, recall@10 and MRR of the
source document (ties ranked pessimistically), over all queries, the recalled ones, and ranked
among the articles only (without the question-answer documents, which share the queries'
wording).

Confirmed: the top 10 of TrackStar, EK-FAC cosine and BM25 re-ranked by fine-tuning
(`logra.confirm.fine_tune_gains`): each candidate document trained on alone from the trained
weights (Adam at the training's peak lr, 1 and 5 steps, every parameter), each query that
shortlisted it measuring its answer loss; recall@10 stays, recall@1 and MRR move.

Cost: with the cache, the run takes about 1.5 minutes on 2 cores plus the re-ranks (training
adds about 7). Writes results/fact_tracing.json and prints the table:

    .venv/bin/python benchmarks/fact_tracing.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fact_corpus import RELATIONS, Corpus, Recipe, build_corpus, query_batch
from fact_corpus import statement as statement  # re-exported
from torch import Tensor, nn

import logra
from logra.capture.budget import allocate_k
from logra.losses import causal_lm_loss

HERE = Path(__file__).resolve().parent

CACHE = HERE / "cache" / "fact-tracing.npz"
RESULTS = HERE / "results" / "fact_tracing.json"
PROBE_K = 2048  # the budget's probe sketch: wider than every side but the LM head's vocabulary side


# ------------------------------------------------------------------------------------ the model


def gpt2(r: Recipe, vocab_size: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=r.length, n_embd=r.n_embd, n_layer=r.n_layer,
                        n_head=r.n_head, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
                        resid_pdrop=r.dropout, embd_pdrop=r.dropout, attn_pdrop=0.0)  # fmt: skip
    return GPT2LMHeadModel(config)


def logged(r: Recipe) -> list[str]:
    """The attributed layers: every Conv1D of every block and the LM head."""
    convs = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
    return [*(f"transformer.h.{i}.{m}" for i in range(r.n_layer) for m in convs), "lm_head"]


def doc_losses(model: nn.Module, ids: Tensor, mask: Tensor) -> Tensor:
    """(B,) each document's summed next-token cross-entropy over its real (unpadded) tokens."""
    labels = ids.masked_fill(mask == 0, -100)
    return causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels, reduction="sum")


def answer_losses(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """(Q,) each query's summed cross-entropy of its answer tokens (the prompt is context)."""
    return causal_lm_loss(model(input_ids=ids, attention_mask=mask).logits, labels, reduction="sum")


def train(r: Recipe, c: Corpus, log: Any = print) -> tuple[nn.Module, dict[str, Tensor]]:
    """(the model trained on every document, {parameter name: AdamW exp_avg_sq}); `r` decides all."""
    torch.manual_seed(r.seed)
    model = gpt2(r, len(c.vocab) + 1)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    steps = r.epochs * -(-len(c.ids) // r.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=r.lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(r.seed)
    q_ids, q_mask, q_labels = query_batch(c)
    for epoch in range(r.epochs):
        order = torch.randperm(len(c.ids), generator=gen)
        total = 0.0
        for start in range(0, len(c.ids), r.batch):
            b = order[start : start + r.batch]
            loss = doc_losses(model, c.ids[b], c.mask[b]).sum() / c.mask[b].sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(b)
        if (epoch + 1) % 10 == 0 or epoch + 1 == r.epochs:
            acc = recalled(model.eval(), q_ids, q_mask, q_labels).float().mean()
            model.train()
            log(f"[fact-tracing] epoch {epoch + 1}: token loss {total / len(c.ids):.3f}, recall {acc:.2f}")
    model.eval()
    return model, _second_moments(model, opt)


def _second_moments(model: nn.Module, opt: torch.optim.AdamW) -> dict[str, Tensor]:
    """{parameter name: AdamW's bias-corrected second moment v̂ = exp_avg_sq / (1 - β₂^step)} (float64)."""
    beta2 = opt.param_groups[0]["betas"][1]
    out = {}
    for name, p in model.named_parameters():
        state = opt.state[p]
        out[name] = state["exp_avg_sq"].double() / (1.0 - beta2 ** float(state["step"]))
    return out


@torch.no_grad()
def recalled(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
    """(Q,) bool: every answer token is the model's argmax (greedy) prediction."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    target = labels[:, 1:]
    hit = (logits.argmax(-1) == target) | (target == -100)
    return hit.all(dim=1)


# ------------------------------------------------------------------------------------ attribution


def _log_docs(model: nn.Module, logger: logra.GradientLogger, c: Corpus, batch: int = 16) -> None:
    """One logging pass over the documents (ids = document index), inside `logger`."""
    with logger:
        for start in range(0, len(c.ids), batch):
            ids, mask = c.ids[start : start + batch], c.mask[start : start + batch]
            with logger.record(ids=list(range(start, start + len(ids))), mask=mask, param_grads=False):
                doc_losses(model, ids, mask).sum().backward()


def _query_rows(
    model: nn.Module, config: logra.LoGraConfig, c: Corpus, **kwargs: Any
) -> tuple[logra.Record, dict[str, Any]]:
    """(the queries' rows [Q, D], their Kronecker statistics) under `config`."""
    ids, mask, labels = query_batch(c)
    with logra.GradientLogger(model, config, statistics=True, **kwargs) as logger:
        with logger.record(ids=[f"q{i}" for i in range(len(ids))], mask=mask, param_grads=False) as rec:
            answer_losses(model, ids, mask, labels).sum().backward()
        stats = logger.statistics()
    return rec, stats


def _scores(store: logra.GradientStore, queries: logra.Record, method: str, norm: str = "dot") -> Tensor:
    pre = logra.fit_preconditioner(store, method=method, progress=False)
    return logra.Scorer(store, pre, norm, progress=False).score(queries)


def budget_layer_k(model: nn.Module, config: logra.LoGraConfig, c: Corpus) -> dict[str, tuple[int, int]]:
    """`allocate_k` over the row width D of `config`, from a statistics-only probe at k0 = PROBE_K."""
    with logra.GradientLogger(model, config, statistics=False) as uniform:
        budget = uniform.dim
    probe = logra.GradientLogger(model, logra.LoGraConfig(k_in=PROBE_K, k_out=PROBE_K, modules=config.modules))
    _log_docs(model, probe, c)
    return allocate_k(probe.statistics(), probe.layers, budget)


def logra_config(r: Recipe, k: int | None = None) -> logra.LoGraConfig:
    """logra's default config (k = 64 per side, float32, gaussian) on `logged(r)`; `k` overrides both sides."""
    config = logra.LoGraConfig(modules=tuple(logged(r)))
    return config if k is None else dataclasses.replace(config, k_in=k, k_out=k)


def logra_scores(
    model: nn.Module, moments: dict[str, Tensor], c: Corpus, config: logra.LoGraConfig, root: Path
) -> dict[str, Tensor]:
    """{method: scores [Q, N]} of every logra method under `config` (the budget: its row width D)."""
    _log_docs(model, logra.GradientLogger(model, config, store=root / "default"), c)
    store = logra.GradientStore.open(root / "default")
    queries, _ = _query_rows(model, config, c)
    out = {m: _scores(store, queries, m) for m in ("identity", "kfac", "ekfac")}
    out["identity, cosine"] = _scores(store, queries, "identity", "cosine")
    out["ekfac, cosine"] = _scores(store, queries, "ekfac", "cosine")
    layer_k = budget_layer_k(model, config, c)
    budget = logra.LoGraConfig(modules=config.modules, layer_k=layer_k)
    _log_docs(model, logra.GradientLogger(model, budget, store=root / "budget"), c)
    out["budget, ekfac"] = _scores(logra.GradientStore.open(root / "budget"), _query_rows(model, budget, c)[0], "ekfac")
    out.update(trackstar_scores(model, moments, config, c, root / "trackstar"))
    return out


def trackstar_scores(
    model: nn.Module, moments: dict[str, Tensor], config: logra.LoGraConfig, c: Corpus, root: Path
) -> dict[str, Tensor]:
    """TrackStar (logra.presets): rows corrected by AdamW's v̂, mixed train/query curvature, cosine."""
    from logra.curvature.optimizer import SecondMoments
    from logra.presets import trackstar_config, trackstar_scorer

    ts_config, correction = trackstar_config(model, config, SecondMoments(moments))
    _log_docs(model, logra.GradientLogger(model, ts_config, store=root, correction=correction), c)
    store = logra.GradientStore.open(root)
    queries, stats = _query_rows(model, store.config, c, correction=correction)
    scorer, _ = trackstar_scorer(store, queries, stats, method="ekfac")
    return {"trackstar": scorer.score(queries)}


def bm25_scores(c: Corpus) -> Tensor:
    """[Q, N] BM25 (bm25s defaults: Lucene variant, k1 = 1.5, b = 0.75) of question + answer vs documents."""
    import bm25s

    model = bm25s.BM25()
    model.index(_tokenised(c.docs), show_progress=False)
    return torch.tensor(np.stack([model.get_scores(q) for q in _tokenised([p + a for p, a in c.queries])]))


CONFIRMED = ("trackstar", "ekfac, cosine", "bm25")
"""The methods whose top --confirm-k are re-ranked by fine-tuning (`logra.confirm`)."""


def confirmed_scores(
    model: nn.Module, c: Corpus, scores: Tensor, k: int, steps: int, lr: float
) -> tuple[Tensor, float]:
    """([Q, N] `scores` with each query's top k re-ranked by `fine_tune_gains`, the seconds it took).

    Candidate d is trained on alone (Adam, `steps` at `lr`, its summed next-token loss, every
    parameter) and each query that shortlisted d measures its answer loss. The re-ranked top k
    are placed above every other document, in the order of their gains; the rest keep theirs."""
    from logra.confirm import fine_tune_gains

    top = scores.topk(k, dim=1).indices  # (Q, k)
    chosen = sorted(set(top.flatten().tolist()))
    q_ids, q_mask, q_labels = query_batch(c)
    docs = [{"ids": c.ids[d : d + 1], "mask": c.mask[d : d + 1],
             "labels": c.ids[d : d + 1].masked_fill(c.mask[d : d + 1] == 0, -100)} for d in chosen]  # fmt: skip
    queries = [{"ids": q_ids[q : q + 1], "mask": q_mask[q : q + 1], "labels": q_labels[q : q + 1]}
               for q in range(len(q_ids))]  # fmt: skip
    shortlisted = [set(row.tolist()) for row in top]
    pairs = [[q for q, row in enumerate(shortlisted) if d in row] for d in chosen]
    start = time.perf_counter()
    gains = fine_tune_gains(
        model, docs, queries, lambda m, b: answer_losses(m, b["ids"], b["mask"], b["labels"]),
        steps=steps, lr=lr, pairs=pairs, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    where = {d: j for j, d in enumerate(chosen)}
    out = scores.clone().double()
    for q, row in enumerate(top.tolist()):
        g = gains[q, [where[d] for d in row]]
        out[q, row] = out[q].max() + 1 + (g - g.min())
    return out, seconds


def _tokenised(texts: list[list[str]]) -> list[list[str]]:
    """Word tokens without punctuation, bm25s's English stopwords and the 'q' / 'a' markers (corpus and queries)."""
    from bm25s.stopwords import STOPWORDS_EN

    drop = {"q", "a", *STOPWORDS_EN}
    return [[w for w in t if w.isalnum() and w not in drop] for t in texts]


def ranks(scores: Tensor, source: Tensor) -> Tensor:
    """(Q,) 1-based rank of each query's source document: ties with it count as ranked above it."""
    own = scores.gather(1, source[:, None])
    return (scores >= own).sum(dim=1)


def metrics(rank: Tensor) -> dict[str, float]:
    r = rank.double()
    if not len(r):
        return {"n": 0, "recall@1": float("nan"), "recall@10": float("nan"), "mrr": float("nan")}
    return {"n": len(r), "recall@1": float((r <= 1).double().mean()), "recall@10": float((r <= 10).double().mean()),
            "mrr": float((1.0 / r).mean())}  # fmt: skip


# ------------------------------------------------------------------------------------ the run


def trained(r: Recipe, c: Corpus, cache: Path | None, log: Any = print) -> tuple[nn.Module, dict[str, Tensor]]:
    """The trained model and its AdamW v̂, from `cache` when it holds this recipe's (else trained, saved)."""
    meta = cache.with_suffix(".json") if cache is not None else None
    if cache is not None and meta is not None and cache.exists() and meta.exists():
        if json.loads(meta.read_text())["recipe"] == asdict(r):
            model = gpt2(r, len(c.vocab) + 1).eval()
            with np.load(cache, allow_pickle=False) as data:
                model.load_state_dict({k[2:]: torch.from_numpy(data[k]) for k in data.files if k.startswith("w/")})
                moments = {k[2:]: torch.from_numpy(data[k]).double() for k in data.files if k.startswith("v/")}
            return model, moments
    start = time.perf_counter()
    model, moments = train(r, c, log)
    if cache is not None and meta is not None:
        cache.parent.mkdir(exist_ok=True)
        arrays = {f"w/{k}": v.numpy() for k, v in model.state_dict().items()}
        arrays.update({f"v/{k}": v.float().numpy() for k, v in moments.items()})
        np.savez_compressed(cache, **arrays)
        meta.write_text(json.dumps({"recipe": asdict(r), "train_s": round(time.perf_counter() - start)}, indent=1))
    return model, moments


def run(
    r: Recipe,
    cache: Path | None = CACHE,
    log: Any = print,
    k: int | None = None,
    confirm: tuple[int, tuple[int, ...], float] | None = None,
) -> dict[str, Any]:
    """Build the corpus, train (or load) the model, attribute every query; the results as a dict.

    confirm: (k, step counts, lr): also re-rank the top k of each CONFIRMED method by fine-tuning."""
    c = build_corpus(r)
    model, moments = trained(r, c, cache, log)
    q_ids, q_mask, q_labels = query_batch(c)
    hit = recalled(model, q_ids, q_mask, q_labels)
    source = torch.tensor([f.doc for f in c.facts])
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        scores = logra_scores(model, moments, c, logra_config(r, k), Path(tmp))
    logra_s = time.perf_counter() - start
    scores["bm25"] = bm25_scores(c)
    confirm_s = {}
    if confirm is not None:
        k_c, steps, lr = confirm
        for name in CONFIRMED:
            for n in steps:
                label = f"{name} + confirm@{k_c}, {n} step{'s' if n > 1 else ''}"
                scores[label], confirm_s[label] = confirmed_scores(model, c, scores[name], k_c, n, lr)
    methods = {}
    for name, s in scores.items():
        rank = ranks(s, source)
        per_relation = {rel: metrics(rank[[f.relation == rel for f in c.facts]]) for rel in RELATIONS}
        methods[name] = {"all": metrics(rank), "recalled": metrics(rank[hit]), "not_recalled": metrics(rank[~hit]),
                         "per_relation": per_relation, "ranks": rank.tolist(),
                         "articles_only": metrics(ranks(s[:, : r.n_docs], source)),
                         "top1_is_qa_document": float((s.argmax(dim=1) >= r.n_docs).double().mean())}  # fmt: skip
    return {
        "recipe": asdict(r),
        "corpus": {"documents": len(c.docs), "articles": r.n_docs, "qa_documents": len(c.docs) - r.n_docs,
                   "vocab": len(c.vocab) + 1, "eval_facts": len(c.facts), "demo_facts": r.n_demo},
        "logged": logged(r),
        "config": logra_config(r, k).to_dict(),
        "recall": float(hit.double().mean()),
        "recalled": hit.tolist(),
        "facts": [asdict(f) for f in c.facts],
        "logra_s": round(logra_s, 1),
        "confirm": None if confirm is None else {"k": confirm[0], "steps": list(confirm[1]), "lr": confirm[2],
                                                  "optimizer": "adam", "seconds": confirm_s},
        "methods": methods,
    }  # fmt: skip


def table(result: dict[str, Any]) -> str:
    """The printed table: recall@1 / recall@10 / MRR per method, on all queries and on recalled ones."""
    heads = " ".join(f"{h:>6}" for h in ("R@1", "R@10", "MRR"))
    lines = [
        f"fact tracing: {result['corpus']['eval_facts']} facts, {result['corpus']['documents']} documents, "
        f"answer recall {result['recall']:.2f} ({sum(result['recalled'])} recalled)",
        f"{'method':<34} {heads} | recalled: {heads}   top-1 QA doc   MRR among articles only",
    ]
    for name, m in result["methods"].items():
        a, h = m["all"], m["recalled"]
        cells = [f"{x[key]:6.3f}" for x in (a, h) for key in ("recall@1", "recall@10", "mrr")]
        qa, art = m["top1_is_qa_document"], m["articles_only"]["mrr"]
        lines.append(f"{name:<34} {' '.join(cells[:3])} |           {' '.join(cells[3:])}   {qa:6.2f}   {art:6.3f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=RESULTS, help="the results JSON")
    parser.add_argument("--k", type=int, default=None, help="projection size of every side (default: logra's, 64)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1 is fastest on a shared box)")
    parser.add_argument("--confirm-k", type=int, default=10, help="candidates per query re-ranked by fine-tuning")
    parser.add_argument("--confirm-steps", type=int, nargs="+", default=[1, 5], help="Adam steps on each candidate")
    parser.add_argument("--confirm-lr", type=float, default=Recipe().lr, help="default: the training's peak lr")
    parser.add_argument("--no-confirm", action="store_true", help="skip the fine-tuning re-ranks")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    confirm = None if args.no_confirm else (args.confirm_k, tuple(args.confirm_steps), args.confirm_lr)
    result = run(Recipe(), k=args.k, confirm=confirm)
    print(table(result))
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
