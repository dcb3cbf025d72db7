"""Explain a misclassification: which training patients pushed the model to its wrong answer?

A small MLP is trained on scikit-learn's breast-cancer data (569 patients, 30 features). For a
misclassified test patient, the query loss is the loss of the model's *own* (wrong) answer, so the
most helpful training examples are the ones that pushed the model towards that answer. As a check
that the attribution is causal, the model is retrained without those examples (and, as a control,
without as many random ones) and the test patient's margin for the wrong class is compared.

    python examples/misclassification.py [--small]
"""

from __future__ import annotations

import common
import numpy as np
import torch


def margin(model: torch.nn.Module, x: torch.Tensor, cls: int) -> float:
    """logit[cls] - max other logit: positive while the model predicts `cls`."""
    with torch.no_grad():
        z = model(x[None])[0]
    return float(z[cls] - torch.cat([z[:cls], z[cls + 1 :]]).max())


def main() -> None:
    args = common.parser(__doc__).parse_args()
    epochs, remove, controls = (150, 10, 2) if args.small else (300, 20, 5)
    data = common.load_split("breast_cancer", seed=args.seed)
    model = common.train(common.make_mlp(data.x_train.shape[1], 2, seed=args.seed), data.x_train, data.y_train, epochs)
    with torch.no_grad():
        pred = model(data.x_test).argmax(1)
    wrong = (pred != data.y_test).nonzero().flatten()
    print(
        f"test accuracy {common.accuracy(model, data.x_test, data.y_test):.3f}; "
        f"{len(wrong)} misclassified test patients"
    )
    if len(wrong) == 0:
        print("no misclassified patient to explain; try another --seed")
        return
    # The most confidently wrong patient.
    t = int(wrong[torch.tensor([margin(model, data.x_test[int(i)], int(pred[int(i)])) for i in wrong]).argmax()])
    answer, truth = int(pred[t]), int(data.y_test[t])
    print(
        f"\npatient #{t}: true class {data.classes[truth]!r}, predicted {data.classes[answer]!r} "
        f"(margin {margin(model, data.x_test[t], answer):.2f})"
    )

    cfg = common.config(k=16)
    store = common.log_store(model, data.x_train, data.y_train, args.out / "misclassification", cfg)
    query = common.query_rows(model, data.x_test[t : t + 1], torch.tensor([answer]), cfg)
    scores = common.scorer(store).score(query)[0].numpy()
    order = np.argsort(-scores)
    dist = (data.x_train - data.x_test[t]).norm(dim=1).numpy()
    near = np.argsort(dist)
    rows = [
        (
            int(j),
            f"{scores[j]:+.3g}",
            data.classes[int(data.y_train[j])],
            f"{dist[j]:.2f}",
            int(np.where(near == j)[0][0]) + 1,
        )
        for j in order[:8]
    ]
    print("\ntraining patients that pushed the model to its answer (most helpful for the wrong class):")
    print(common.table(rows, ["train id", "score", "label", "distance", "distance rank"]))
    share = float((data.y_train[torch.from_numpy(order[:remove].copy())] == answer).double().mean())
    base = float((data.y_train == answer).double().mean())
    print(
        f"\n{share:.0%} of the top {remove} carry the predicted label {data.classes[answer]!r} (base rate {base:.0%})"
    )

    # Causal check: retrain without the top helpful examples, and without random ones.
    def retrained_margin(drop: np.ndarray) -> float:
        keep = torch.from_numpy(np.setdiff1d(np.arange(len(data.x_train)), drop))
        m = common.train(
            common.make_mlp(data.x_train.shape[1], 2, seed=args.seed), data.x_train[keep], data.y_train[keep], epochs
        )
        return margin(m, data.x_test[t], answer)

    rng = np.random.default_rng(args.seed)
    top_margin = retrained_margin(order[:remove])
    random_margins = [retrained_margin(rng.choice(len(order), remove, replace=False)) for _ in range(controls)]
    print(
        f"retrained without the top {remove}: margin for the wrong class {top_margin:+.2f} "
        f"(without {remove} random examples: {np.mean(random_margins):+.2f} ± {np.std(random_margins):.2f})"
    )


if __name__ == "__main__":
    main()
