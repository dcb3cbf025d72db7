"""Find mislabelled data: flip a known fraction of labels, rank training examples by self-influence.

A small MLP is trained on scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) after
10% of the training labels were replaced by a random other class. Self-influence g_iᵀ H⁻¹ g_i
measures how much an example's own loss depends on the example itself: memorised, atypical
examples (such as wrong labels) score high. The example reports how many flips are found in the
top x% of the ranking, next to what random inspection (x%) and the training loss find.

    python examples/mislabelled.py [--small]
"""

from __future__ import annotations

import common
import numpy as np
import torch


def main() -> None:
    parser = common.parser(__doc__)
    parser.add_argument("--flip", type=float, default=0.10, help="fraction of training labels flipped")
    args = parser.parse_args()
    limit, epochs = (600, 200) if args.small else (None, 400)
    data = common.load_split("digits", seed=args.seed, limit=limit)
    n, n_classes = len(data.y_train), len(data.classes)
    rng = np.random.default_rng(args.seed)
    flipped = rng.choice(n, int(round(args.flip * n)), replace=False)
    y_noisy = data.y_train.clone()
    y_noisy[flipped] = (y_noisy[flipped] + torch.from_numpy(rng.integers(1, n_classes, len(flipped)))) % n_classes
    model = common.train(
        common.make_mlp(data.x_train.shape[1], n_classes, hidden=64, seed=args.seed),
        data.x_train,
        y_noisy,
        epochs,
        weight_decay=1e-4,
    )
    print(
        f"{n} training digits, {len(flipped)} labels flipped; "
        f"test accuracy {common.accuracy(model, data.x_test, data.y_test):.3f}"
    )

    cfg = common.config(k=16)
    store = common.log_store(model, data.x_train, y_noisy, args.out / "mislabelled", cfg)
    rows_of = {int(i): r for r, i in enumerate(store.ids)}
    signals = {}
    for method in ("kfac", "identity"):
        si = common.scorer(store, method).self_influence().numpy()
        signals[f"self-influence ({method})"] = np.array([si[rows_of[i]] for i in range(n)])
    with torch.no_grad():
        signals["training loss"] = common.per_example_loss(model, data.x_train, y_noisy).numpy()
    targets = set(flipped.tolist())
    fractions = (0.05, 0.10, 0.20, 0.30)
    rows = [
        (name, *[f"{common.rank_fraction(np.argsort(-v), targets, f):.0%}" for f in fractions])
        for name, v in signals.items()
    ]
    rows.append(("random inspection", *[f"{f:.0%}" for f in fractions]))
    print("\nshare of the flipped labels found when inspecting the top x% of the training set:")
    print(common.table(rows, ["ranking", *[f"top {f:.0%}" for f in fractions]]))
    top = np.argsort(-signals["self-influence (kfac)"])[:10]
    print("\nthe 10 highest self-influence examples (train id: given label / true label):")
    print(
        "  " + ", ".join(f"{i}: {int(y_noisy[i])}/{int(data.y_train[i])}{' FLIP' if i in targets else ''}" for i in top)
    )


if __name__ == "__main__":
    main()
