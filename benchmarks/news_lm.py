"""`news-lm`: a real-text language-model task, GPT-2 fine-tuned from a shared base on news chunks.

Data: the Lee corpus that ships in the `gensim` wheel (300 Australian news articles of 2001-02,
`lee_background.cor`, and the 50 articles of `lee.cor`), fetched once by scripts/fetch_data.py.
Text is lowercased and split into words and punctuation; the vocabulary is the 2,047 most
frequent tokens of all 350 articles plus <unk> (11 % of the training tokens are <unk>).
Examples are non-overlapping chunks of 64 tokens.

- The base model: GPT-2, 2 layers, width 128, 4 heads, untied LM head over the 2,048 tokens,
  pretrained once (AdamW, lr 2e-3, 7 epochs) on the chunks of articles 150-299 and lee.cor:
  text disjoint from everything attributed.
- Training set: 256 chunks of articles 0-149; queries: 32 held-out chunks of the same articles
  (one from each of the first 32 articles with at least two chunks), so queries share topics,
  names and phrasing with a few training chunks.
- Every ground-truth model is that base fine-tuned on its subset (AdamW, lr 1e-3, weight decay
  0.01, batch 16, 4 epochs); the seed decides the fine-tuning order only.

Training every model from scratch makes models sit near the unigram plateau, where seeds differ
more than subsets (a seed-vs-seed ceiling of -0.5 was measured that way); from a shared base the
subsets decide. `tasks.seed_ceiling` gives the seed-vs-seed ceiling of the cached ground truth.

Attributed layers: every Conv1D of the two blocks (attn.c_attn, attn.c_proj, mlp.c_fc,
mlp.c_proj) and the LM head, whose output side is the 2,048-token vocabulary.
"""

from __future__ import annotations

import collections
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "scripts"))
from fetch_data import fetch  # noqa: E402  (the same cached wheels as the demo and the examples)

VOCAB = 2048
LENGTH = 64
N_TRAIN, N_QUERY = 256, 32
SHAPE = dict(n_embd=128, n_layer=2, n_head=4, n_positions=LENGTH)
BASE_RECIPE = {"epochs": 7, "batch": 32, "lr": 2e-3, "weight_decay": 0.01, "seed": 0, "shape": SHAPE, "vocab": VOCAB}
BASE_CACHE = HERE / "cache" / "news-lm-base.npz"
LOGGED = [f"transformer.h.{i}.{m}" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
LOGGED.append("lm_head")
_WORD = re.compile(r"[a-z0-9]+|[^\sa-z0-9]")


def _articles() -> tuple[list[list[str]], list[list[str]]]:
    """(the 300 Lee background articles, the 50 Lee test articles), tokenised."""
    background = fetch("lee").read_text(encoding="latin-1").splitlines()
    test = fetch("lee-test").read_text(encoding="latin-1").splitlines()
    return [_WORD.findall(t.lower()) for t in background if t.strip()], [
        _WORD.findall(t.lower()) for t in test if t.strip()
    ]


def corpus() -> tuple[Tensor, Tensor, Tensor]:
    """(base chunks [n_b, 64], training chunks [256, 64], query chunks [32, 64]) as token ids."""
    background, test = _articles()
    counts = collections.Counter(w for doc in background + test for w in doc)
    index = {w: i + 1 for i, (w, _) in enumerate(counts.most_common(VOCAB - 1))}  # 0 is <unk>

    def chunks(doc: list[str]) -> list[list[int]]:
        ids = [index.get(w, 0) for w in doc]
        return [ids[i : i + LENGTH] for i in range(0, len(ids) - LENGTH + 1, LENGTH)]

    base = [c for doc in background[150:] + test for c in chunks(doc)]
    rng = np.random.default_rng(0)
    queries: list[list[int]] = []
    pool: list[list[int]] = []
    for doc in background[:150]:
        cs = chunks(doc)
        if len(cs) >= 2 and len(queries) < N_QUERY:
            j = int(rng.integers(len(cs)))
            queries.append(cs[j])
            pool += [c for i, c in enumerate(cs) if i != j]
        else:
            pool += cs
    train = [pool[i] for i in rng.permutation(len(pool))][:N_TRAIN]
    return torch.tensor(base), torch.tensor(train), torch.tensor(queries)


def gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=VOCAB, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **SHAPE)  # fmt: skip
    return GPT2LMHeadModel(config)


def summed_token_loss(model: nn.Module, x: Tensor) -> Tensor:
    """(B,) each chunk's summed next-token cross-entropy."""
    logits = model(input_ids=x).logits
    return F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none").sum(dim=1)


def pretrain(base: Tensor) -> dict[str, Tensor]:
    """The base model's weights: `BASE_RECIPE` on the disjoint articles' chunks."""
    r = BASE_RECIPE
    torch.manual_seed(r["seed"])
    model = gpt2()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], weight_decay=r["weight_decay"])
    gen = torch.Generator().manual_seed(r["seed"])
    for _ in range(r["epochs"]):
        order = torch.randperm(len(base), generator=gen)
        for start in range(0, len(base), r["batch"]):
            loss = summed_token_loss(model, base[order[start : start + r["batch"]]]).mean() / (LENGTH - 1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def base_weights(base: Tensor) -> dict[str, Tensor]:
    """The pretrained base, from `cache/news-lm-base.npz` (made when missing or its recipe changed)."""
    meta = BASE_CACHE.with_suffix(".json")
    recipe = json.loads(json.dumps(BASE_RECIPE))
    if not BASE_CACHE.exists() or not meta.exists() or json.loads(meta.read_text())["recipe"] != recipe:
        BASE_CACHE.parent.mkdir(exist_ok=True)
        start = time.perf_counter()
        weights = pretrain(base)
        np.savez_compressed(BASE_CACHE, **{k: v.numpy() for k, v in weights.items()})
        meta.write_text(json.dumps({"recipe": recipe, "seconds": round(time.perf_counter() - start)}, indent=1))
    with np.load(BASE_CACHE, allow_pickle=False) as data:
        return {k: torch.from_numpy(data[k].copy()) for k in data.files}
