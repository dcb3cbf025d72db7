"""logra quickstart: log -> fit -> score -> top-k on a tiny classifier, in a few seconds on a CPU.

Five training labels are flipped on purpose; the most *harmful* training examples for test points
near them should be those flips.

    python examples/quickstart.py
"""

import shutil

import torch
import torch.nn.functional as F
from torch import nn

import logra

torch.manual_seed(0)

# 1. A tiny model trained on 2-D points: class 1 when x0 + x1 > 0. Five labels are flipped.
X = torch.randn(300, 2)
y = (X.sum(dim=1) > 0).long()
flipped = torch.arange(5)
y[flipped] = 1 - y[flipped]
model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 2))
optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
for _ in range(400):
    optimizer.zero_grad()
    F.cross_entropy(model(X), y).backward()
    optimizer.step()

# 2. Log one projected gradient per training example into a store on disk.
#    The loss to backpropagate is the SUM of per-example losses.
shutil.rmtree("runs/quickstart", ignore_errors=True)  # start fresh on every run
config = logra.LoGraConfig(k_in=16, k_out=16)
with logra.GradientLogger(model, config, store="runs/quickstart") as logger:
    for batch in torch.arange(300).split(64):
        with logger.record(ids=batch):
            F.cross_entropy(model(X[batch]), y[batch], reduction="sum").backward()

# 3. Fit a KFAC preconditioner on the store.
store = logra.GradientStore.open("runs/quickstart")
preconditioner = logra.fit_preconditioner(store, method="kfac")

# 4. Query gradients: test points right next to the flipped ones, with their true labels.
X_test = X[flipped] + 0.05 * torch.randn(5, 2)
y_test = (X_test.sum(dim=1) > 0).long()
with logra.GradientLogger(model, config) as query_logger:  # no store: rows stay in memory
    with query_logger.record(ids=range(5)) as queries:
        F.cross_entropy(model(X_test), y_test, reduction="sum").backward()

# 5. Score: positive = helpful (lowers the query's loss), negative = harmful.
scorer = logra.Scorer(store, preconditioner)
top = scorer.top_k(queries, k=3)  # the Record: its config and model are checked against the store
for q in range(5):
    print(
        f"test point {q}: most harmful training examples {top.harmful_ids[q]} "
        f"(scores {[round(s, 1) for s in top.harmful_scores[q].tolist()]})"
    )
found = sum(int(ids[0]) in flipped.tolist() for ids in top.harmful_ids)
print(f"the most harmful example is a flipped label for {found} of 5 test points")
