"""The two accuracy tasks of the benchmark, their retraining recipe and cached ground truth.

- `digits-mlp`: an MLP 64-128-128-10 (ReLU) on sklearn's bundled 8x8 digits; 1,000 training
  images, 100 held-out query images; AdamW (lr 3e-3, weight decay 1e-3), batch 64, 30 epochs.
- `markov-lm`: a 2-layer Llama-shaped language model (width 64, MLP 128, 4 heads, vocabulary
  64, untied head) on a corpus generated here: sequences of 33 tokens from a mixture of 6
  sparse random Markov chains ("topics", each token has 4 likely successors); 256 training and
  32 held-out query sequences; AdamW (lr 2e-3, weight decay 0.01), batch 16, 8 epochs.

Ground truth for the LDS: random 50 % subsets of the training set (100 for the MLP, 64 for the
LM; seeded), each trained from 3 seeds; the measured output of a subset is each query's loss (summed
over its tokens for the LM) averaged over the seeds. The model that is attributed is the one
trained on the whole training set with seed 0. Everything is a pure function of the seeds, and
`ground_truth(task)` caches the result in `benchmarks/cache/<task>.npz` (+ `.json` recipe):

    .venv/bin/python benchmarks/tasks.py --task digits-mlp     # regenerate one cache file
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_common import BLOCK_LINEARS
from torch import Tensor, nn

CACHE = Path(__file__).resolve().parent / "cache"


@dataclass(frozen=True)
class Recipe:
    """Everything that decides a task's ground truth (saved beside the cache)."""

    n_train: int
    n_query: int
    epochs: int
    batch: int
    lr: float
    weight_decay: float
    n_subsets: int = 64
    seeds: int = 3
    fraction: float = 0.5
    data_seed: int = 0
    subset_seed: int = 1
    extra: dict = field(default_factory=dict)


@dataclass
class Task:
    """A task: its data as tensors, a model builder and a per-example loss.

    train_x / query_x: inputs (features [n, 64] or token ids [n, T]); train_y / query_y: labels
    for the classifier, None for the LM (its labels are the inputs shifted).
    """

    name: str
    recipe: Recipe
    train_x: Tensor
    train_y: Tensor | None
    query_x: Tensor
    query_y: Tensor | None
    build: Callable[[], nn.Module]
    logged: list[str]  # qualified names of the Linear layers every method attributes through

    def batch(self, x: Tensor, y: Tensor | None) -> tuple[Tensor, ...]:
        return (x,) if y is None else (x, y)

    def per_example_loss(self, model: nn.Module, x: Tensor, y: Tensor | None = None) -> Tensor:
        """Each example's own loss (B,): cross-entropy, or the LM's summed next-token loss."""
        if y is not None:
            return F.cross_entropy(model(x), y, reduction="none")
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits[:, :-1].transpose(1, 2), x[:, 1:], reduction="none").sum(dim=1)


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(64, 128), nn.Linear(128, 128), nn.Linear(128, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def digits_task() -> Task:
    from sklearn.datasets import load_digits

    recipe = Recipe(n_train=1000, n_query=100, epochs=30, batch=64, lr=3e-3, weight_decay=1e-3, n_subsets=100)
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(recipe.data_seed).permutation(len(x))
    x = torch.tensor(x[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    n, q = recipe.n_train, recipe.n_query
    return Task("digits-mlp", recipe, x[:n], y[:n], x[n : n + q], y[n : n + q], MLP, ["fc1", "fc2", "fc3"])


LM_SHAPE = dict(
    vocab_size=64,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    tie_word_embeddings=False,
)


def markov_corpus(n: int, length: int, seed: int, topics: int = 6, vocab: int = 64, fanout: int = 4) -> Tensor:
    """[n, length] token ids: each sequence follows one of `topics` sparse random Markov chains."""
    gen = np.random.default_rng(seed)
    chains = np.zeros((topics, vocab, vocab))
    for t in range(topics):
        for a in range(vocab):
            succ = gen.choice(vocab, size=fanout, replace=False)
            chains[t, a, succ] = gen.dirichlet(np.ones(fanout))
    seqs = np.zeros((n, length), dtype=np.int64)
    sample = np.random.default_rng(seed + 1)
    for i in range(n):
        t = sample.integers(topics)
        seqs[i, 0] = sample.integers(vocab)
        for j in range(1, length):
            seqs[i, j] = sample.choice(vocab, p=chains[t, seqs[i, j - 1]])
    return torch.from_numpy(seqs)


def build_lm() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**LM_SHAPE, attn_implementation="eager"))


def lm_task() -> Task:
    recipe = Recipe(
        n_train=256,
        n_query=32,
        epochs=8,
        batch=16,
        lr=2e-3,
        weight_decay=0.01,
        extra={"length": 33, "topics": 6, "shape": LM_SHAPE},
    )
    seqs = markov_corpus(recipe.n_train + recipe.n_query, 33, recipe.data_seed)
    names = [f"model.layers.{i}.{m}" for i in range(LM_SHAPE["num_hidden_layers"]) for m in BLOCK_LINEARS]
    n = recipe.n_train
    return Task("markov-lm", recipe, seqs[:n], None, seqs[n:], None, build_lm, names)


def news_task() -> Task:
    """`news-lm` (see news_lm.py): GPT-2 fine-tuned from a shared base on real news chunks."""
    import news_lm

    recipe = Recipe(n_train=news_lm.N_TRAIN, n_query=news_lm.N_QUERY, epochs=4, batch=16, lr=1e-3,
                    weight_decay=0.01, n_subsets=100, seeds=2,
                    extra={"base": news_lm.BASE_RECIPE, "length": news_lm.LENGTH, "finetuned": True})  # fmt: skip
    base, train_x, query_x = news_lm.corpus()
    weights = news_lm.base_weights(base)

    def build() -> nn.Module:
        model = news_lm.gpt2()
        model.load_state_dict(weights)
        return model

    return Task("news-lm", recipe, train_x, None, query_x, None, build, list(news_lm.LOGGED))


TASKS: dict[str, Callable[[], Task]] = {"digits-mlp": digits_task, "markov-lm": lm_task}
ALL_TASKS: dict[str, Callable[[], Task]] = {**TASKS, "news-lm": news_task}


def train(task: Task, indices: Tensor, seed: int) -> nn.Module:
    """The task's recipe on the training examples `indices`, from seed `seed` (init and order)."""
    return train_with_optimizer(task, indices, seed)[0]


def train_with_optimizer(task: Task, indices: Tensor, seed: int) -> tuple[nn.Module, torch.optim.AdamW]:
    """`train`, also returning its AdamW optimizer in its final state (its exp_avg_sq: optimizer_parts.py)."""
    r = task.recipe
    torch.manual_seed(seed)
    model = task.build()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=r.lr, weight_decay=r.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    x = task.train_x[indices]
    y = task.train_y[indices] if task.train_y is not None else None
    for _ in range(r.epochs):
        order = torch.randperm(len(x), generator=gen)
        for start in range(0, len(x), r.batch):
            b = order[start : start + r.batch]
            loss = task.per_example_loss(model, x[b], y[b] if y is not None else None).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return model, opt


@torch.no_grad()
def query_losses(task: Task, model: nn.Module) -> Tensor:
    """[Q] float64: each query's loss under `model`."""
    return task.per_example_loss(model, task.query_x, task.query_y).double()


def subsets(task: Task) -> Tensor:
    from logra.evaluation import random_subsets

    r = task.recipe
    return random_subsets(r.n_train, r.n_subsets, r.fraction, seed=r.subset_seed)


def generate(task: Task, log: Callable[[str], None] = print) -> dict[str, np.ndarray]:
    """Train the full model and every (subset, seed) model; return the arrays that are cached."""
    r = task.recipe
    masks = subsets(task)
    full = train(task, torch.arange(r.n_train), seed=0)
    seed_outputs = np.zeros((r.seeds, r.n_subsets, r.n_query))
    start = time.perf_counter()
    for m, mask in enumerate(masks):
        idx = mask.nonzero().flatten()
        for s in range(r.seeds):
            seed_outputs[s, m] = query_losses(task, train(task, idx, seed=100 + 7 * m + s)).numpy()
        log(f"{task.name}: subset {m + 1}/{r.n_subsets} ({time.perf_counter() - start:.0f} s)")
    arrays = {"subsets": masks.numpy(), "outputs": seed_outputs.mean(0), "seed_outputs": seed_outputs,
              "full_query_losses": query_losses(task, full).numpy()}  # fmt: skip
    arrays.update({f"model.{k}": v.numpy() for k, v in full.state_dict().items()})
    return arrays


def cache_paths(name: str) -> tuple[Path, Path]:
    return CACHE / f"{name}.npz", CACHE / f"{name}.json"


def ground_truth(task: Task, regenerate: bool = False) -> tuple[nn.Module, Tensor, Tensor]:
    """(the full model, subsets [M, N] bool, measured outputs [M, Q]) from the cache, made if missing."""
    npz, meta = cache_paths(task.name)
    recipe = json.loads(json.dumps(task.recipe.__dict__))
    if regenerate or not npz.exists() or json.loads(meta.read_text())["recipe"] != recipe:
        CACHE.mkdir(exist_ok=True)
        started = time.perf_counter()
        arrays = generate(task)
        np.savez_compressed(npz, **arrays)
        meta.write_text(
            json.dumps(
                {
                    "task": task.name,
                    "recipe": recipe,
                    "torch": torch.__version__,
                    "seconds": round(time.perf_counter() - started),
                },
                indent=1,
            )
        )
    with np.load(npz, allow_pickle=False) as data:
        model = task.build()
        model.load_state_dict({k[6:]: torch.from_numpy(data[k]) for k in data.files if k.startswith("model.")})
        model.eval()
        return model, torch.from_numpy(data["subsets"]), torch.from_numpy(data["outputs"])


def seed_outputs(task: Task) -> np.ndarray | None:
    """[seeds, subsets, queries]: each seed's measured query losses, from the cache (None in caches older
    than that array)."""
    npz, _ = cache_paths(task.name)
    with np.load(npz, allow_pickle=False) as data:
        return data["seed_outputs"] if "seed_outputs" in data.files else None


def seed_ceiling(outputs_by_seed: np.ndarray) -> float:
    """Mean over queries of Spearman(seed 0's outputs, seed 1's) across subsets: the LDS of one
    retraining seed as a predictor of another, a ceiling for any attribution method.

    outputs_by_seed: [seeds >= 2, subsets, queries].
    """
    from logra.evaluation import spearman

    a, b = (torch.from_numpy(np.ascontiguousarray(outputs_by_seed[i].T)) for i in (0, 1))  # [Q, M]
    return float(spearman(a, b).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", choices=list(ALL_TASKS), nargs="*", default=list(TASKS))
    parser.add_argument("--force", action="store_true", help="regenerate even when the cache matches")
    args = parser.parse_args()
    torch.set_num_threads(1)
    for name in args.task:
        task = ALL_TASKS[name]()
        model, masks, outputs = ground_truth(task, regenerate=args.force)
        print(f"{name}: {masks.shape[0]} subsets x {outputs.shape[1]} queries", file=sys.stderr)


if __name__ == "__main__":
    main()
