"""Group audit: which group of training examples drives the predictions for another group?

Patients of scikit-learn's breast-cancer data are grouped by tumour size (tercile of "mean
radius": small / medium / large). Influence scores [test, train] are summed over training groups
and averaged over test groups, giving a 3x3 table: how much each training group helps (+) or
hurts (-) the model's loss on each test group.

Check: the sum of the scores of a training group predicts how much each test group's loss would
rise if that group were removed (first order, divided by N). The example retrains without each
group and prints predicted against actual changes.

    python examples/group_audit.py [--small]
"""

from __future__ import annotations

import common
import numpy as np
import torch

GROUPS = ("small", "medium", "large")


def main() -> None:
    args = common.parser(__doc__).parse_args()
    epochs = 150 if args.small else 300
    data = common.load_split("breast_cancer", seed=args.seed)
    radius = data.feature_names.index("mean radius")
    cuts = np.quantile(data.x_train[:, radius].numpy(), [1 / 3, 2 / 3])
    g_train = np.digitize(data.x_train[:, radius].numpy(), cuts)
    g_test = np.digitize(data.x_test[:, radius].numpy(), cuts)
    n = len(g_train)

    def fit(keep: np.ndarray) -> torch.nn.Module:
        idx = torch.from_numpy(keep)
        return common.train(
            common.make_mlp(data.x_train.shape[1], 2, seed=args.seed), data.x_train[idx], data.y_train[idx], epochs
        )

    def group_losses(model: torch.nn.Module) -> np.ndarray:
        with torch.no_grad():
            loss = common.per_example_loss(model, data.x_test, data.y_test).numpy()
        return np.array([loss[g_test == h].mean() for h in range(3)])

    model = fit(np.arange(n))
    cfg = common.config(k=16)
    store = common.log_store(model, data.x_train, data.y_train, args.out / "group_audit", cfg)
    scores = common.scorer(store).score(common.query_rows(model, data.x_test, data.y_test, cfg)).numpy()  # [Q, N]
    scores = scores[:, np.argsort([int(i) for i in store.ids])]  # columns back to training-set order

    # influence[h, g]: mean over test patients of group h of the summed scores of training group g.
    influence = np.array([[scores[g_test == h][:, g_train == g].sum(1).mean() for g in range(3)] for h in range(3)])
    print(
        f"{n} training / {len(g_test)} test patients grouped by tumour size; test accuracy "
        f"{common.accuracy(model, data.x_test, data.y_test):.3f}\n"
    )
    print("summed influence of each training group (columns) on the loss of each test group (rows):")
    print(
        common.table(
            [(f"test {GROUPS[h]}", *influence[h].tolist()) for h in range(3)], ["", *[f"train {g}" for g in GROUPS]]
        )
    )
    share = influence / np.abs(influence).sum(1, keepdims=True)
    print("\nshare of each test group's absolute influence:")
    print(common.table([(f"test {GROUPS[h]}", *[f"{v:+.0%}" for v in share[h]]) for h in range(3)], ["", *GROUPS]))

    base = group_losses(model)
    rows = []
    for g in range(3):
        actual = group_losses(fit(np.flatnonzero(g_train != g))) - base
        predicted = influence[:, g] / n
        rows.extend((GROUPS[g], GROUPS[h], f"{predicted[h]:+.4f}", f"{actual[h]:+.4f}") for h in range(3))
    print("\nremoving a training group: predicted (influence / N) vs actual change of each test group's mean loss")
    print(common.table(rows, ["removed", "test group", "predicted", "actual (retrained)"]))
    pred = np.array([float(r[2]) for r in rows])
    act = np.array([float(r[3]) for r in rows])
    print(
        f"sign agreement {np.mean(np.sign(pred) == np.sign(act)):.0%}, Pearson r = {np.corrcoef(pred, act)[0, 1]:+.2f} "
        "(first-order estimates of removing a third of the data are rough; the ranking is what to read)"
    )


if __name__ == "__main__":
    main()
