"""Ground truth for the demo's source-recovery check: what fine-tuning on each article does.

`make demo` asks which of the 300 Lee articles a held-out passage came from and counts the
source article ranked first as a hit. Whether training on the source article *should* help the
passage most is a question about training, and this benchmark asks it directly. For every
article, from the pretrained SmolLM2 weights:

1. take a few optimizer steps on the article's logged tokens (its first --max-length tokens, as
   `logra log` saw them), updating only the weights of the logged layers (--modules; the LM head
   is untied from the embeddings, as logra's LM-head row is the head's gradient alone);
2. measure the loss of every held-out passage (the demo's five and the 33 validation passages);
3. restore the weights.

gain[q, d] = loss of passage q before - after training on article d (in nats, summed over the
passage's tokens). Reported: how often the source article has the largest gain (the ground
truth's own "source first"), and for each score matrix given with --scores (`logra score
--matrix` output for queries.jsonl and validation.jsonl): source first, the mean over passages of
the Spearman correlation between scores and gains, the top-10 overlap and how often both rank the
same article first.

Only the blocks from the first logged block on are recomputed: the hidden states entering that
block are computed once (they do not depend on the trained weights) and checked to reproduce the
full model's losses. Llama-style Hugging Face models (`model.model.layers`, `rotary_emb`, `norm`).

    make demo   # writes demo_out/ and its store
    .venv/bin/logra score --store demo_out/store --queries demo_out/validation.jsonl \\
        --prompt-field prompt --normalization relative --out /tmp/v.csv --matrix /tmp/validation.npy
    .venv/bin/python benchmarks/demo_ground_truth.py --optimizer adam --lr 5e-5 --steps 5 \\
        --scores kfac=demo_out/scores.npy,/tmp/validation.npy

About 3.3 s per article on 2 cores (17 minutes for 300).
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from logra.evaluation import spearman

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_MODULES = ("model.layers.2[6-9].mlp.down_proj", "lm_head")
sys.path.insert(0, str(HERE.parent / "scripts"))
from demo_setup import passage_sha256, read_jsonl  # noqa: E402  (the demo's passages and how its check names them)


def untie_head(model: nn.Module) -> None:
    """Give the LM head its own copy of the (possibly tied) embedding matrix."""
    head = model.lm_head
    own = nn.Linear(head.in_features, head.out_features, bias=head.bias is not None)
    own.weight = nn.Parameter(head.weight.detach().clone())
    if head.bias is not None:
        own.bias = nn.Parameter(head.bias.detach().clone())
    model.lm_head = own


def trained_weights(model: nn.Module, patterns: list[str]) -> tuple[list[nn.Parameter], int]:
    """The weights of the modules matching `patterns`, and the first decoder block they touch."""
    modules = dict(model.named_modules())
    names = [n for n, m in modules.items() if isinstance(m, nn.Linear) and any(fnmatch.fnmatch(n, p) for p in patterns)]
    if not names:
        raise SystemExit(f"--modules {patterns} match no Linear layer of the model.")
    blocks = [int(m.group(1)) for n in names if (m := re.match(r"model\.layers\.(\d+)\.", n))]
    outside = [n for n in names if not n.startswith("model.layers.") and n != "lm_head"]
    if outside:
        raise SystemExit(
            f"modules {outside} are neither in a decoder block nor the LM head; this benchmark cannot train them."
        )
    first = min(blocks) if blocks else len(model.model.layers)
    return [modules[n].weight for n in names], first


class Tail:
    """The model from decoder block `first` on, fed the hidden states that enter that block."""

    def __init__(self, model: nn.Module, first: int) -> None:
        self.model, self.first = model, first
        self._captured: Tensor | None = None
        block = model.model.layers[first] if first < len(model.model.layers) else model.model.norm
        block.register_forward_pre_hook(self._capture, with_kwargs=True)

    def _capture(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._captured = (args[0] if args else kwargs["hidden_states"]).detach()

    def entering(self, ids: Tensor) -> Tensor:
        """(B, T, d) hidden states entering block `first` for right-padded `ids`."""
        with torch.no_grad():
            self.model(input_ids=ids)
        assert self._captured is not None
        return self._captured

    def logits(self, hidden: Tensor) -> Tensor:
        inner = self.model.model
        positions = torch.arange(hidden.shape[1])[None]
        rotary = inner.rotary_emb(hidden, positions)
        for block in inner.layers[self.first :]:
            out = block(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary)
            hidden = out[0] if isinstance(out, tuple) else out
        return self.model.lm_head(inner.norm(hidden))


def padded(seqs: list[list[int]]) -> tuple[Tensor, Tensor]:
    """Right-padded (B, T) ids and their 0/1 mask; causal attention never sees the padding."""
    length = max(map(len, seqs))
    ids, mask = torch.zeros(len(seqs), length, dtype=torch.long), torch.zeros(len(seqs), length)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = torch.tensor(s), 1.0
    return ids, mask


def passage_losses(logits: Tensor, ids: Tensor, mask: Tensor) -> Tensor:
    """(B,) summed next-token losses over each sequence's real tokens."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -logp.gather(-1, ids[:, 1:, None])[..., 0]
    return (nll * mask[:, 1:]).sum(1)


def candidates(docs: list[dict], passages: list[dict], saved: Path | None, top: int) -> list[dict]:
    """`docs`, or with a saved gain matrix only each passage's `top` articles by it and its source."""
    if saved is None:
        return docs
    earlier = np.load(saved)
    articles, rows = list(earlier["articles"]), {p: i for i, p in enumerate(earlier["passages"])}
    keep = {p["id"].removeprefix("passage-from-") for p in passages}
    for p in passages:
        if p["id"] not in rows:
            raise SystemExit(f"--candidates-from {saved} has no gains for {p['id']}.")
        keep.update(articles[j] for j in np.argsort(-earlier["gain"][rows[p["id"]]], kind="stable")[:top])
    return [d for d in docs if d["id"] in keep]


def fine_tune(tail: Tail, weights: list[nn.Parameter], ids: Tensor, args: argparse.Namespace) -> float:
    """`args.steps` optimizer steps on one article's (1, T) `ids`: the change of its mean token loss."""
    mask = torch.ones(ids.shape)
    hidden = tail.entering(ids)
    tokens = mask[:, 1:].sum()
    opt = torch.optim.Adam(weights, lr=args.lr) if args.optimizer == "adam" else torch.optim.SGD(weights, lr=args.lr)
    for w in weights:
        w.requires_grad_(True)
    with torch.enable_grad():
        for step in range(args.steps):
            loss = passage_losses(tail.logits(hidden), ids, mask).sum() / tokens
            if step == 0:
                first = loss.item()
            opt.zero_grad()
            loss.backward()
            opt.step()
    for w in weights:
        w.requires_grad_(False)
    with torch.no_grad():
        return passage_losses(tail.logits(hidden), ids, mask).sum().item() / tokens.item() - first


def ground_truth(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    untie_head(model)
    for p in model.parameters():
        p.requires_grad_(False)
    weights, first = trained_weights(model, args.modules)
    tail = Tail(model, first)
    passages = [
        q
        for name in ("queries.jsonl",) + (() if args.only_demo else ("validation.jsonl",))
        for q in read_jsonl(args.demo_dir / name)
        if q["id"].startswith("passage-from-")
    ]
    docs = candidates(read_jsonl(args.demo_dir / "corpus.jsonl"), passages, args.candidates_from, args.top)
    seqs = [
        tokenizer(q["prompt"])["input_ids"] + tokenizer(q["text"], add_special_tokens=False)["input_ids"]
        for q in passages
    ]
    q_ids, q_mask = padded(seqs)
    q_hidden = tail.entering(q_ids)
    with torch.no_grad():
        full = passage_losses(model(input_ids=q_ids).logits, q_ids, q_mask)
        before = passage_losses(tail.logits(q_hidden), q_ids, q_mask)
    if not torch.allclose(full, before, rtol=1e-5, atol=1e-4):
        raise SystemExit(
            f"the tail forward does not reproduce the model's losses (max diff {(full - before).abs().max():.3g})."
        )
    saved = [w.detach().clone() for w in weights]
    gain = np.zeros((len(passages), len(docs)), dtype=np.float32)
    own = np.zeros(len(docs), dtype=np.float32)
    start = time.perf_counter()
    from tqdm import tqdm

    for j, doc in enumerate(tqdm(docs, desc="fine-tune per article", file=sys.stderr)):
        d_ids = torch.tensor([tokenizer(doc["text"], truncation=True, max_length=args.max_length)["input_ids"]])
        own[j] = fine_tune(tail, weights, d_ids, args)
        with torch.no_grad():
            gain[:, j] = (before - passage_losses(tail.logits(q_hidden), q_ids, q_mask)).numpy()
            for w, w0 in zip(weights, saved):
                w.copy_(w0)
    return {
        "gain": gain,
        "own_loss_change": own,
        "passages": [q["id"] for q in passages],
        "articles": [d["id"] for d in docs],
        "seconds": time.perf_counter() - start,
    }


def best(row: np.ndarray) -> set[int]:
    """The columns tied at the row's maximum (duplicate articles have bit-identical gains and scores)."""
    return set(np.flatnonzero(row == row.max()).tolist())


def source_counts(scores: np.ndarray, sources: list[int], n_demo: int) -> dict[str, Any]:
    """Each passage's source rank under `scores` (P, N) (ties count for the source), and how often
    it is first among the first `n_demo` passages and the rest, and in the top 5 of the rest."""
    ranks = [int((scores[i] > scores[i, s]).sum()) + 1 for i, s in enumerate(sources)]
    return {
        "source_ranks": ranks,
        "source_first_demo": sum(r == 1 for r in ranks[:n_demo]),
        "source_first_validation": sum(r == 1 for r in ranks[n_demo:]),
        "source_top5_validation": sum(r <= 5 for r in ranks[n_demo:]),
    }


def compare(scores: np.ndarray, gain: np.ndarray, sources: list[int], n_demo: int) -> dict[str, Any]:
    """How `scores` (P, N) find each passage's source, and how they agree with `gain` (P, N)."""
    same = [bool(best(scores[i]) & best(gain[i])) for i in range(len(sources))]
    return {
        **source_counts(scores, sources, n_demo),
        "spearman": float(spearman(scores, gain).mean()),  # per passage (average ranks for ties), then the mean
        "top10_overlap": float(
            np.mean(
                [
                    len(set(np.argsort(-scores[i])[:10]) & set(np.argsort(-gain[i])[:10])) / 10
                    for i in range(len(sources))
                ]
            )
        ),
        "same_first_demo": sum(same[:n_demo]),
        "same_first_validation": sum(same[n_demo:]),
    }


def store_ids(store: str | None, path: str) -> list[str]:
    """The ids of the store a score matrix was scored against: the order of its columns."""
    from logra import GradientStore

    if store is None or not Path(store).is_dir():
        raise SystemExit(f"{path}: the store it was scored against ({store}) is gone; its column order is unknown.")
    return [str(i) for i in GradientStore.open(store).ids]


def matrix_rows(spec: str, passages: list[str], articles: list[str]) -> tuple[str, np.ndarray]:
    """NAME=QUERIES.npy,VALIDATION.npy -> (NAME, (P, N) scores in the order of `passages`)."""
    name, _, paths = spec.partition("=")
    rows: dict[str, np.ndarray] = {}
    for path in paths.split(","):
        matrix = np.load(path)
        sidecar = Path(path + ".json")
        meta = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
        ids = meta.get("query_ids")
        if ids is None or len(ids) != matrix.shape[0]:
            raise SystemExit(
                f"{path}: needs the .json sidecar `logra score --matrix` writes, with one query id per row."
            )
        if list(store_ids(meta.get("store"), path)) != articles:
            raise SystemExit(f"{path}: its columns are not the corpus's articles in order.")
        rows.update(zip(ids, matrix))
    missing = [p for p in passages if p not in rows]
    if missing:
        raise SystemExit(f"--scores {name}: no rows for {missing[:3]}")
    return name, np.stack([rows[p] for p in passages])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", type=Path, default=Path("demo_out"))
    parser.add_argument("--model", type=Path, default=Path.home() / ".cache/logra/models/SmolLM2-135M-Instruct")
    parser.add_argument("--modules", nargs="+", default=list(DEFAULT_MODULES))
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument(
        "--gain", type=Path, help="reuse a gain matrix saved by an earlier run (.npz) instead of fine-tuning"
    )
    parser.add_argument("--only-demo", action="store_true", help="only the demo's own passages (not validation)")
    parser.add_argument(
        "--candidates-from", type=Path, help="fine-tune only on each passage's --top articles by this saved gain .npz"
    )
    parser.add_argument("--top", type=int, default=10, help="with --candidates-from: articles per passage")
    parser.add_argument("--tag", default="", help="appended to the output names")
    parser.add_argument("--scores", nargs="*", default=[], metavar="NAME=Q.npy,V.npy")
    parser.add_argument("--out", type=Path, help="results JSON (default: results/demo_ground_truth_<optimizer>.json)")
    args = parser.parse_args(argv)
    tag = f"{args.optimizer}_lr{args.lr:g}_steps{args.steps}" + (f"_{args.tag}" if args.tag else "")
    if args.scores and (args.only_demo or args.candidates_from):
        raise SystemExit("--scores compares whole score matrices: leave out --only-demo and --candidates-from.")
    if args.gain:
        saved = np.load(args.gain)
        truth = {k: saved[k] for k in saved.files}
        truth["passages"], truth["articles"] = list(truth["passages"]), list(truth["articles"])
    else:
        truth = ground_truth(args)
        RESULTS.mkdir(exist_ok=True)
        np.savez(RESULTS / f"demo_ground_truth_{tag}.npz", **{k: np.asarray(v) for k, v in truth.items()})
    gain, passages, articles = np.asarray(truth["gain"]), truth["passages"], truth["articles"]
    sources = [articles.index(p.removeprefix("passage-from-")) for p in passages]
    n_demo = sum(1 for q in read_jsonl(args.demo_dir / "queries.jsonl") if q["id"] in passages)
    table = {"ground truth": compare(gain, gain, sources, n_demo)}
    for spec in args.scores:
        name, scores = matrix_rows(spec, passages, articles)
        table[name] = compare(scores, gain, sources, n_demo)
    for name, row in table.items():
        print(
            f"{name:16s} source first: {row['source_first_demo']}/{n_demo} demo, "
            f"{row['source_first_validation']}/{len(passages) - n_demo} validation "
            f"(top 5: {row['source_top5_validation']}); spearman {row['spearman']:.3f}, "
            f"top-10 overlap {row['top10_overlap']:.2f}, same first as the ground truth "
            f"{row['same_first_demo']}/{n_demo} demo, {row['same_first_validation']}/{len(passages) - n_demo}; "
            f"demo ranks {row['source_ranks'][:n_demo]}"
        )
    out = args.out or RESULTS / f"demo_ground_truth_{tag}.json"
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("scores", "out")}
    own = np.asarray(truth["own_loss_change"])
    top5 = {p: [articles[j] for j in np.argsort(-gain[i], kind="stable")[:5]] for i, p in enumerate(passages)}
    texts = {
        q["id"]: passage_sha256(q)
        for name in ("queries.jsonl", "validation.jsonl")
        for q in read_jsonl(args.demo_dir / name)
        if q["id"] in top5
    }
    result = {
        "recipe": recipe,
        "own_loss_change_mean": float(own.mean()),
        "table": table,
        "articles": articles,
        "passage_sha256": texts,
        "first": {p: [articles[j] for j in sorted(best(gain[i]))] for i, p in enumerate(passages)},
        "top5": top5,
    }
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
