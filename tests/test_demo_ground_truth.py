"""benchmarks/demo_ground_truth.py: the fine-tuning ground truth of the demo's check, against autograd.

In the linear regime (one SGD step of a small learning rate) the measured gain of passage q from
training on article d is lr · ∇L_q · ∇L_d over the trained weights, with L_q the passage's summed
token loss and L_d the article's mean token loss over its first max_length tokens; the LM head's
gradient is its own (untied from the embeddings). The reference computes those gradients with
autograd on a fresh copy of the model, the head taken as a detached copy of the embedding matrix.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))

import demo_ground_truth as gt  # noqa: E402

ARTICLES = [
    "the fire burned near the town and residents left their homes",
    "police said the union strike would end after talks with the company",
    "the minister said talks on the border would resume next week",
    "a storm hit the coast and the town lost power for a day",
]
PASSAGES = {
    "passage-from-lee-000": "firefighters said the fire near the town was out",
    "passage-from-lee-002": "the minister said the border talks",
}
VALIDATION = {"passage-from-lee-001": "the union said the strike would end"}
TRAINED = ["model.layers.1.mlp.down_proj", "lm_head"]
MAX_LENGTH = 8


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("demo_gt")
    texts = ARTICLES + list(PASSAGES.values()) + list(VALIDATION.values())
    words = ["[PAD]", "[UNK]", *sorted({w for t in texts for w in t.split()})]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]").save_pretrained(root / "model")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(words), hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=32, tie_word_embeddings=True,
    )  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(root / "model")
    _write_jsonl(root / "corpus.jsonl", [{"id": f"lee-{i:03d}", "text": t} for i, t in enumerate(ARTICLES)])
    queries = [{"id": k, "prompt": "", "text": v} for k, v in PASSAGES.items()]
    _write_jsonl(root / "queries.jsonl", [*queries, {"id": "query-0", "prompt": "the fire", "text": "burned"}])
    _write_jsonl(root / "validation.jsonl", [{"id": k, "prompt": "", "text": v} for k, v in VALIDATION.items()])
    return root


def _args(demo: Path, **kw: object) -> argparse.Namespace:
    base = dict(
        demo_dir=demo, model=demo / "model", modules=TRAINED, max_length=MAX_LENGTH, optimizer="sgd", lr=1e-3, steps=1,
        only_demo=False, candidates_from=None, top=10,
    )  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def _gradients(demo: Path, text: str, max_length: int | None, mean: bool) -> torch.Tensor:
    """The flattened gradient of one text's loss over the trained weights, the head untied."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(demo / "model")
    model = AutoModelForCausalLM.from_pretrained(demo / "model", dtype=torch.float32)
    down = model.model.layers[1].mlp.down_proj.weight
    head = model.lm_head.weight.detach().clone().requires_grad_(True)
    enc = tokenizer(text, truncation=max_length is not None, max_length=max_length, add_special_tokens=False)
    ids = torch.tensor([enc["input_ids"]])
    logits = model.model(input_ids=ids).last_hidden_state @ head.T
    losses = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")
    loss = losses.mean() if mean else losses.sum()
    grads = torch.autograd.grad(loss, [down, head])
    return torch.cat([g.reshape(-1) for g in grads])


def test_gains_equal_lr_times_gradient_dot_products_in_the_linear_regime(demo: Path) -> None:
    truth = gt.ground_truth(_args(demo))
    assert truth["passages"] == [*PASSAGES, *VALIDATION]  # free prompts are not passages
    assert truth["articles"] == [f"lee-{i:03d}" for i in range(len(ARTICLES))]
    texts = {**PASSAGES, **VALIDATION}
    g_q = torch.stack([_gradients(demo, texts[p], None, mean=False) for p in truth["passages"]])
    g_d = torch.stack([_gradients(demo, t, MAX_LENGTH, mean=True) for t in ARTICLES])
    expected = 1e-3 * (g_q @ g_d.T).numpy()
    np.testing.assert_allclose(truth["gain"], expected, rtol=3e-2, atol=1e-6 + 1e-2 * np.abs(expected).max())
    own = 1e-3 * (g_d * g_d).sum(1).numpy()  # an article's own mean loss falls by lr·|g|² to first order
    np.testing.assert_allclose(-truth["own_loss_change"], own, rtol=3e-2)


def test_adam_steps_restore_the_weights_between_articles(demo: Path) -> None:
    """Every article starts from the pretrained weights: its gain does not depend on the order."""
    first = gt.ground_truth(_args(demo, optimizer="adam", lr=1e-2, steps=3))
    corpus = demo / "corpus.jsonl"
    rows = corpus.read_text().splitlines()
    try:
        corpus.write_text("\n".join(rows[::-1]) + "\n")
        reversed_ = gt.ground_truth(_args(demo, optimizer="adam", lr=1e-2, steps=3))
    finally:
        corpus.write_text("\n".join(rows) + "\n")
    np.testing.assert_allclose(reversed_["gain"][:, ::-1], first["gain"], rtol=1e-5, atol=1e-6)
    assert np.all(first["own_loss_change"] < 0)  # each article's own loss falls


def test_candidates_and_demo_passages_only_give_the_same_gains(demo: Path, tmp_path: Path) -> None:
    """Restricted to each demo passage's best article by an earlier run and its source, the gains
    of those articles are the full run's (every article starts from the same weights)."""
    full = gt.ground_truth(_args(demo, optimizer="adam", lr=1e-2, steps=2))
    saved = tmp_path / "full.npz"
    np.savez(saved, **{k: np.asarray(v) for k, v in full.items()})
    part = gt.ground_truth(
        _args(demo, optimizer="adam", lr=1e-2, steps=2, only_demo=True, candidates_from=saved, top=1)
    )
    assert part["passages"] == list(PASSAGES)
    best = {full["articles"][int(np.argmax(full["gain"][i]))] for i in range(len(PASSAGES))}
    assert set(part["articles"]) == best | {p.removeprefix("passage-from-") for p in PASSAGES}
    cols = [full["articles"].index(a) for a in part["articles"]]
    np.testing.assert_allclose(part["gain"], full["gain"][: len(PASSAGES)][:, cols], rtol=1e-5, atol=1e-6)


def test_compare_counts_sources_and_agreement() -> None:
    gain = np.array([[3.0, 1.0, 0.0], [0.0, 2.0, 5.0], [1.0, 4.0, 0.0]])
    scores = np.array([[2.0, 2.5, 0.0], [0.0, 1.0, 9.0], [5.0, 1.0, 0.0]])
    row = gt.compare(scores, gain, sources=[0, 2, 1], n_demo=2)
    assert row["source_ranks"] == [2, 1, 2]
    assert (row["source_first_demo"], row["source_first_validation"]) == (1, 0)
    assert (row["same_first_demo"], row["same_first_validation"]) == (1, 0)
    tied = gain.copy()
    tied[2, 0] = 4.0  # articles 0 and 1 tie at the top of row 2: scores' first (0) counts as the same
    assert gt.compare(scores, tied, sources=[0, 2, 1], n_demo=2)["same_first_validation"] == 1
    truth = gt.compare(gain, gain, sources=[0, 2, 1], n_demo=2)
    assert truth["spearman"] == pytest.approx(1.0) and truth["same_first_demo"] + truth["same_first_validation"] == 3
