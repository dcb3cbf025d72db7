"""`logra validate`: retrain on random subsets with the user's Python recipe and report the LDS.

The recipe is Python, so the command imports it: `--train-fn module:function` is
train_fn(indices LongTensor [n_keep]) -> [Q] query outputs (losses by default), and
`--score-fn module:function` is score_fn(damping=float|None, k=int|None) -> [Q, N] scores of the
same queries against all N training examples. The module is imported from the current directory
or PYTHONPATH. See logra.evaluation.validate.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from logra.cli.commands import say, write_json
from logra.errors import ConfigError


def import_function(spec: str, flag: str) -> Callable[..., Any]:
    """The function named by 'package.module:function' (the current directory is importable)."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{flag} {spec!r} must be module:function, e.g. {flag} my_task:train_fn.")
    if "" not in sys.path and str(Path.cwd()) not in sys.path:
        sys.path.insert(0, str(Path.cwd()))
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(
            f"{flag} {spec!r}: module {module_name!r} could not be imported ({exc}); run from its directory "
            "or add it to PYTHONPATH."
        ) from None
    func = module
    for part in attr.split("."):
        if not hasattr(func, part):
            raise ConfigError(f"{flag} {spec!r}: {module_name} has no attribute {attr!r}; check the name.")
        func = getattr(func, part)
    if not callable(func):
        raise ConfigError(f"{flag} {spec!r} is a {type(func).__name__}, not a function.")
    return func  # type: ignore[return-value]


def settings_list(text: str, kind: type, flag: str) -> list[Any]:
    """'a,b,default' -> [a, b, None], each value parsed as `kind`."""
    out: list[Any] = []
    for item in text.split(","):
        item = item.strip()
        if item == "default":
            out.append(None)
            continue
        try:
            out.append(kind(item))
        except ValueError:
            raise ConfigError(
                f"{flag} {text!r}: {item!r} is not {'an integer' if kind is int else 'a number'}; give a "
                "comma-separated list ('default' allowed)."
            ) from None
    return out


def cmd_validate(args: argparse.Namespace) -> int:
    from logra.evaluation import validate

    train_fn = import_function(args.train_fn, "--train-fn")
    score_fn = import_function(args.score_fn, "--score-fn")
    result = validate(
        train_fn,
        score_fn,
        args.n_train,
        n_subsets=args.subsets,
        fraction=args.fraction,
        seed=args.seed,
        dampings=settings_list(args.dampings, float, "--dampings"),
        ks=settings_list(args.ks, int, "--ks"),
        outputs_are_losses=not args.higher_is_better,
        n_bootstrap=args.bootstrap,
        confidence=args.confidence,
    )
    print(result)
    best = result.best
    damping, k = ("default" if v is None else v for v in (best.damping, best.k))
    print(f"best: damping={damping}, k={k}")
    if args.out:
        rows = [
            {"damping": s.damping, "k": s.k, "lds": s.lds, "ci_low": s.ci_low, "ci_high": s.ci_high,
             "per_query": s.per_query.tolist()}
            for s in result.settings
        ]  # fmt: skip
        write_json(
            Path(args.out),
            {"n_train": result.n_train, "n_subsets": result.n_subsets, "n_queries": result.n_queries,
             "fraction": result.fraction, "confidence": result.confidence, "interval_over": "queries",
             "settings": rows},
        )  # fmt: skip
        say(f"wrote {args.out}")
    return 0
