"""The fact-tracing benchmark's data: news articles with invented facts written in, and their queries.

Seeded and deterministic (see benchmarks/fact_tracing.py for the design). The Lee news corpus of
the `gensim` wheel (fetched once by scripts/fetch_data.py) gives the articles; `build_corpus`
writes one synthetic fact about an invented entity into each host article (eval facts as
statements only, demo facts also as "q : ... a : ..." documents that teach the question format),
builds the vocabulary and token ids, and asks each eval fact with its relation's question
template. `query_batch` pads the queries, with labels on the answer only.
"""

from __future__ import annotations

import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
from fetch_data import fetch  # noqa: E402  (the same cached gensim wheel as news_lm.py and the demo)

_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


# relation: (subject kind, object kind, statement templates, question template). Every statement names
# the subject before the object: a causal LM reading "{o} is the capital of {s}" learns nothing that
# answers "which city is {s}'s capital?" (the reversal curse), so such a fact could not be recalled.
RELATIONS: dict[str, tuple[str, str, tuple[str, ...], str]] = {
    "capital-of": ("country", "city", ("the capital of {s} is {o} .", "{s} has {o} as its capital ."),
                   "q : which city is {s} ' s capital ? a :"),
    "founder-of": ("company", "person", ("{s} was founded by {o} .", "the company {s} was set up by {o} ."),
                   "q : who started the firm {s} ? a :"),
    "born-in": ("person", "city", ("{s} was born in {o} .", "{s} is a native of {o} ."),
                "q : what is the hometown of {s} ? a :"),
    "language-of": ("country", "language", ("people in {s} speak {o} .", "in {s} , most people speak {o} ."),
                    "q : which tongue do the citizens of {s} use ? a :"),
    "headquarters-in": ("company", "city", ("{s} has its headquarters in {o} .", "{s} is headquartered in {o} ."),
                        "q : where is the firm {s} based ? a :"),
}  # fmt: skip
POOL = {"city": 30, "person": 30, "language": 12}  # objects are shared by several facts
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "st", "vl")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "", "n", "r", "s", "k", "sk", "nd", "th", "x")


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the corpus and the trained model (cached under its JSON)."""

    n_docs: int = 300
    n_eval: int = 100
    n_demo: int = 150
    qa_per_doc: int = 1  # 5 pairs a document: recall 0.09 instead of 0.38 (the pairs' context gets memorised)
    length: int = 64
    vocab_words: int = 1200
    n_embd: int = 128
    n_layer: int = 2
    n_head: int = 4
    epochs: int = 60
    batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    dropout: float = 0.0
    seed: int = 0


@dataclass(frozen=True)
class Fact:
    relation: str
    subject: str
    object: str
    template: int
    doc: int  # the training document that states it


@dataclass
class Corpus:
    """Token ids of the documents ([N, T], 0-padded, `mask` [N, T]) and queries (prompt + answer)."""

    docs: list[list[str]]
    ids: Tensor
    mask: Tensor
    vocab: dict[str, int]
    facts: list[Fact]  # the eval facts, one query each
    queries: list[tuple[list[str], list[str]]] = field(default_factory=list)  # (prompt words, answer words)


def _names(n: int, rng: np.random.Generator, taken: set[str]) -> list[str]:
    """n distinct invented words of 2-3 syllables, none in `taken` (which they are added to)."""
    out: list[str] = []
    while len(out) < n:
        parts = [str(rng.choice(_ONSETS)) + str(rng.choice(_VOWELS)) for _ in range(int(rng.integers(2, 4)))]
        word = "".join(parts) + str(rng.choice(_CODAS))
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


def _facts(r: Recipe, rng: np.random.Generator, taken: set[str]) -> list[tuple[str, str, str, int]]:
    """n_eval + n_demo (relation, subject, object, template) with unique subjects, pooled objects."""
    pools = {kind: _names(size, rng, taken) for kind, size in POOL.items()}
    names = list(RELATIONS)
    out = []
    for i in range(r.n_eval + r.n_demo):
        relation = names[i % len(names)]
        _, obj_kind, statements, _ = RELATIONS[relation]
        subject = _names(1, rng, taken)[0]
        out.append((relation, subject, str(rng.choice(pools[obj_kind])), int(rng.integers(len(statements)))))
    return out


def _insert(article: list[str], sentence: list[str], length: int, rng: np.random.Generator) -> list[str]:
    """`article` cut to `length` tokens with `sentence` after one of its sentence ends (or first)."""
    room = length - len(sentence)
    ends = [i + 1 for i, w in enumerate(article[:room]) if w == "." and i + 1 < room]
    at = int(rng.choice([0, *ends]))
    return (article[:at] + sentence + article[at:])[:length]


def statement(fact: tuple[str, str, str, int]) -> list[str]:
    relation, s, o, t = fact
    return RELATIONS[relation][2][t].format(s=s, o=o).split()


def question(relation: str, subject: str) -> list[str]:
    return RELATIONS[relation][3].format(s=subject).split()


def _qa_documents(demo: list[tuple[str, str, str, int]], per_doc: int, length: int) -> list[list[str]]:
    """The demo facts as "q : <question> a : <object>" pairs, up to `per_doc` pairs and `length` tokens a document."""
    docs: list[list[str]] = [[]]
    pairs = 0
    for relation, subject, obj, _ in demo:
        pair = [*question(relation, subject), obj]
        if docs[-1] and (len(docs[-1]) + len(pair) > length or pairs == per_doc):
            docs.append([])
            pairs = 0
        docs[-1] += pair
        pairs += 1
    return docs


def build_corpus(r: Recipe) -> Corpus:
    """The documents (articles with facts, then QA documents) and the eval facts' queries."""
    lines = fetch("lee").read_text(encoding="latin-1").splitlines()
    articles = [_WORD.findall(t.lower()) for t in lines if t.strip()][: r.n_docs]
    if r.n_eval + r.n_demo > len(articles):
        raise ValueError(f"n_eval + n_demo = {r.n_eval + r.n_demo} facts need as many articles; {len(articles)} given.")
    rng = np.random.default_rng(r.seed)
    known = {w for a in articles for w in a}
    taken = set(known)
    facts = _facts(r, rng, taken)
    invented = {w for f in facts for w in (f[1], f[2])}
    hosts = rng.permutation(len(articles))[: len(facts)]
    docs = [a[: r.length] for a in articles]
    for fact, host in zip(facts, hosts):
        docs[host] = _insert(articles[host], statement(fact), r.length, rng)
    demo = facts[r.n_eval :]
    docs += _qa_documents(demo, r.qa_per_doc, r.length)
    counts = Counter(w for d in docs for w in d if w not in invented)
    words = [w for w, _ in counts.most_common(r.vocab_words)] + sorted(invented)
    vocab = {w: i + 1 for i, w in enumerate(words)}  # 0: <unk> and padding
    ids = torch.zeros(len(docs), r.length, dtype=torch.long)
    mask = torch.zeros(len(docs), r.length, dtype=torch.long)
    for i, d in enumerate(docs):
        ids[i, : len(d)] = torch.tensor([vocab.get(w, 0) for w in d])
        mask[i, : len(d)] = 1
    evals = [Fact(f[0], f[1], f[2], f[3], int(h)) for f, h in zip(facts[: r.n_eval], hosts)]
    queries = [(question(f.relation, f.subject), [f.object]) for f in evals]
    return Corpus(docs, ids, mask, vocab, evals, queries)


def query_batch(c: Corpus) -> tuple[Tensor, Tensor, Tensor]:
    """(ids [Q, T], mask [Q, T], labels [Q, T]): right-padded prompt + answer, labels on the answer only."""
    seqs = [[c.vocab.get(w, 0) for w in p + a] for p, a in c.queries]
    T = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), T, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, (p, _)) in enumerate(zip(seqs, c.queries)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        labels[i, len(p) : len(s)] = ids[i, len(p) : len(s)]
    return ids, mask, labels
