"""The `logra` command line (`logra.cli.main`): log, fit, score, self-influence, report, verify.

    logra log --model MODEL_DIR --data train.jsonl --out runs/train --modules '*mlp*' --k 16
    logra fit runs/train --method kfac
    logra score --store runs/train --queries queries.jsonl --top-k 5 --out topk.csv --matrix scores.npy
    logra self-influence --store runs/train --out self.csv
    logra report --scores scores.npy --out report.html
    logra verify runs/train

`log` saves the model and encoding settings beside the store (`logra-cli.json`), so `score`
encodes queries exactly as the training data was encoded. Every error logra raises on purpose is
printed as one message and exits with status 2.
"""

from logra.cli.main import main

__all__ = ["main"]
