"""The `logra` argument parser: subcommands, their options, and their help."""

from __future__ import annotations

import argparse
import math
from typing import NoReturn

from logra.cli.commands import cmd_fit, cmd_score, cmd_self_influence, cmd_verify
from logra.cli.confirm_command import cmd_confirm
from logra.cli.inputs import MODEL_DTYPES
from logra.cli.log_command import cmd_log
from logra.cli.report_command import cmd_report
from logra.cli.validate_command import cmd_validate
from logra.config import NonFinitePolicy, ProjectionInit, StorageDtype
from logra.confirm import FineTuneOptimizer
from logra.curvature.fisher import EXACT_FISHER_MAX_CLASSES
from logra.curvature.moments import FisherKind
from logra.curvature.precondition import PreconditionerMethod
from logra.losses import Task, TokenReduction
from logra.presets import Preset
from logra.score import Normalization
from logra.types import enum_values

_METHODS = enum_values(PreconditionerMethod)
DAMPING_HELP = "λ (default: 0.1 x a mean eigenvalue of each layer's curvature; see fit_preconditioner)"

# --------------------------------------------------------------------------------------------
# Parser.


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (status 2), like every other error of the command line."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def count(text: str) -> int:
    """An argparse type: an int >= 0 (a count or a limit)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative; give a count >= 0")
    return value


def positive(text: str) -> int:
    """An argparse type: an int >= 1 (a size)."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be a positive int")
    return value


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one and the help text does not already say it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False) or "default" in text or action.default is argparse.SUPPRESS:
            return text
        return super()._get_help_string(action) or text


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number > 0")
    return value


def _model_options(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("model and encoding" + ("" if required else " (default: as logged with the store)"))
    g.add_argument(
        "--model",
        required=required,
        help="Hugging Face model directory, a config.json (fresh weights), or a .gguf file",
    )
    g.add_argument("--tokenizer", help="tokenizer directory (default: the model's own)")
    g.add_argument("--task", choices=enum_values(Task), help="default: from the model's architecture")
    g.add_argument(
        "--model-dtype",
        choices=list(MODEL_DTYPES),
        default=None if not required else "float32",
        help="dtype the model runs in",
    )
    g.add_argument("--init-seed", type=count, help="seed of the weights of a model built from a config.json")
    g.add_argument(
        "--max-length",
        type=positive,
        help="tokens per example, truncated (default: 512, or the model's positions when fewer)",
    )
    g.add_argument(
        "--token-reduction",
        choices=enum_values(TokenReduction),
        default=None if not required else TokenReduction.MEAN.value,
        help="an LM example's loss: mean (default) or sum of its token losses",
    )
    g.add_argument("--text-field", default=None if not required else "text", help="the text column")
    g.add_argument("--prompt-field", help="causal LM: a column of context tokens that are not loss targets")
    g.add_argument("--label-field", help="classification: the label column")
    g.add_argument("--id-field", help="the example id column (default: the row number)")
    g.add_argument("--split", help="the split of a DatasetDict folder")
    g.add_argument("--limit", type=count, help="use only the first N examples")
    g.add_argument(
        "--batch-size", type=positive, default=8, help="examples per forward/backward (does not change results)"
    )


def _precondition_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("preconditioner")
    g.add_argument(
        "--preconditioner", help="a directory written by `logra fit` (default: STORE/preconditioner-METHOD if present)"
    )
    g.add_argument(
        "--method", choices=_METHODS, default=PreconditionerMethod.KFAC.value, help="curvature approximation"
    )
    g.add_argument("--damping", type=float, help=DAMPING_HELP)


def build_parser() -> argparse.ArgumentParser:
    """The `logra` parser: one subcommand per pipeline step, each with its `func`."""
    parser = _Parser(
        prog="logra", description="LoGra influence functions: which training examples made the model say what it said."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        _add_log,
        _add_fit,
        _add_score,
        _add_self_influence,
        _add_report,
        _add_confirm,
        _add_validate,
        _add_verify,
    ):
        add(sub)
    return parser


def _add_log(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "log", help="log projected per-example gradients of a dataset into a store", formatter_class=_Formatter
    )
    p.add_argument("--data", required=True, help="a .jsonl/.json/.csv/.parquet file or a save_to_disk folder")
    p.add_argument("--out", required=True, help="the store directory")
    _model_options(p, required=True)
    g = p.add_argument_group("what to log")
    _log_selection_options(g)
    _log_run_options(g)
    p.set_defaults(func=cmd_log)


def _log_selection_options(g: argparse._ArgumentGroup) -> None:
    """`log`: which layers, their projections and the storage dtype."""
    g.add_argument(
        "--modules", nargs="+", help="fnmatch patterns of layer names, e.g. '*mlp*' (default: every Linear/Conv1D)"
    )
    g.add_argument("--exclude", nargs="+", help="patterns of layers to leave out, e.g. lm_head")
    g.add_argument("--k", type=positive, default=64, help="projection size k_in = k_out")
    g.add_argument("--k-in", type=positive, help="input-side projection size (overrides --k)")
    g.add_argument("--k-out", type=positive, help="output-side projection size (overrides --k)")
    g.add_argument(
        "--budget",
        action="store_true",
        help="share the row width of uniform --k across layers, each side sized from its curvature in a "
        "statistics-only probe pass (logra.capture.budget.allocate_k)",
    )
    g.add_argument(
        "--probe-examples", type=positive, default=256, help="with --budget: the first N examples form the probe"
    )
    g.add_argument("--init", default=ProjectionInit.GAUSSIAN.value, choices=enum_values(ProjectionInit))
    g.add_argument(
        "--pca-statistics", help="for --init pca: a store logged with --init identity at full size (its factors)"
    )
    g.add_argument("--seed", type=int, default=0, help="seed of the projections")
    g.add_argument(
        "--dtype", default=StorageDtype.FLOAT32.value, choices=enum_values(StorageDtype), help="storage dtype"
    )
    g.add_argument("--include-bias", action="store_true", help="log bias gradients too")
    g.add_argument(
        "--nonfinite", default=NonFinitePolicy.RAISE.value, choices=enum_values(NonFinitePolicy), help="on NaN/Inf"
    )


def _log_run_options(g: argparse._ArgumentGroup) -> None:
    """`log`: the optimizer correction, shards, resume, a dry run and streaming."""
    g.add_argument(
        "--preset",
        choices=enum_values(Preset),
        help="trackstar: log optimizer-corrected gradients (needs --optimizer-state); score the store with "
        "`logra score --preset trackstar` (logra.presets)",
    )
    g.add_argument(
        "--optimizer-state",
        help="a Hugging Face Trainer checkpoint directory (or its optimizer.pt, read with weights_only): divide "
        "gradients by Adam's factorised sqrt(v) (logra.curvature.optimizer)",
    )
    g.add_argument(
        "--correction-power",
        type=float,
        default=0.5,
        help="with --optimizer-state: gradients times v^-POWER per side; 0.5 is TrackStar's, 0.25 one Adam step's",
    )
    g.add_argument("--shard-rows", type=positive, help="rows per shard (default: 256 MiB shards)")
    g.add_argument("--no-statistics", action="store_true", help="do not accumulate KFAC statistics")
    g.add_argument("--resume", action="store_true", help="continue a store, skipping the examples it holds")
    g.add_argument(
        "--dry-run",
        action="store_true",
        help="print the row width D, bytes per example, the corpus total and a time estimate from the first "
        "--time-batches batches (logged in memory), then stop; nothing is written",
    )
    g.add_argument("--time-batches", type=positive, default=3, help="batches timed for the estimate")
    g.add_argument(
        "--streaming",
        action="store_true",
        help="read --data as a stream, one batch in memory at a time (for corpora larger than memory); ids from "
        "--id-field or the row number; with --resume, committed ids are skipped; split round-robin across ranks",
    )


def _add_fit(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("fit", help="fit a preconditioner on a store and save it", formatter_class=_Formatter)
    p.add_argument("store", help="the store directory")
    p.add_argument(
        "--method", choices=_METHODS, default=PreconditionerMethod.KFAC.value, help="curvature approximation"
    )
    p.add_argument("--damping", type=float, help=DAMPING_HELP)
    p.add_argument("--out", help="output directory (default: STORE/preconditioner-METHOD)")
    p.add_argument(
        "--fisher",
        choices=[FisherKind.EMPIRICAL.value, FisherKind.TRUE.value],
        default=FisherKind.EMPIRICAL.value,
        help="curvature of the logged labels (empirical) or of labels from the model (true: reruns the model on "
        "the training data named in STORE/logra-cli.json; exact over the classes of a classifier with at most "
        f"{EXACT_FISHER_MAX_CLASSES}, sampled per token for a causal LM)",
    )
    p.add_argument("--fisher-samples", type=positive, default=1, help="--fisher true: label draws per example")
    p.add_argument("--batch-size", type=positive, default=8, help="--fisher true: examples per forward/backward")
    p.set_defaults(func=cmd_fit)


def _add_score(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "score", help="score queries against a store: top-k table and/or the full matrix", formatter_class=_Formatter
    )
    p.add_argument("--store", required=True, help="the training store (from `logra log`)")
    p.add_argument("--queries", required=True, help="a dataset of queries, read like `log --data`")
    p.add_argument("--out", help="top-k table: .csv, .jsonl or .parquet")
    p.add_argument("--matrix", help="all scores [Q, N] as .npy (ids in FILE.json)")
    p.add_argument("--top-k", type=positive, default=10, help="helpful and harmful examples per query in --out")
    p.add_argument(
        "--normalization",
        choices=enum_values(Normalization),
        help="dot (default): g_qᵀH⁻¹g_i; cosine (the default of --preset trackstar): both normalised; "
        "relative: by the training example's norm",
    )
    p.add_argument(
        "--preset",
        choices=enum_values(Preset),
        help="trackstar: cosine scores with the mixed curvature (1-λ) R_train + λ R_queries of --method "
        "(kfac, ekfac or raw); the store should be logged with `logra log --preset trackstar`",
    )
    p.add_argument("--mix", type=float, help="--preset trackstar: λ in [0, 1] (default: TrackStar's automatic rule)")
    p.add_argument("--chunk-rows", type=positive, default=4096, help="training rows per matmul")
    _model_options(p, required=False)
    _precondition_options(p)
    p.set_defaults(func=cmd_score)


def _add_self_influence(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("self-influence", help="g_iᵀ H⁻¹ g_i of every training example", formatter_class=_Formatter)
    p.add_argument("--store", required=True, help="the training store (from `logra log`)")
    p.add_argument("--out", required=True, help=".csv, .jsonl, .parquet or .npy")
    p.add_argument("--show", type=count, default=10, help="print the N largest")
    _precondition_options(p)
    p.set_defaults(func=cmd_self_influence)


def _scored_matrix_options(p: argparse.ArgumentParser) -> None:
    """`report` and `confirm`: where the texts of a `logra score --matrix` come from."""
    p.add_argument("--store", help="default: the store the scores were computed on")
    p.add_argument("--data", help="the training texts (default: the dataset the store was logged from)")
    p.add_argument("--queries", help="default: the query file that was scored")


def _add_report(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "report", help="write the HTML report of a score matrix and print a summary", formatter_class=_Formatter
    )
    p.add_argument("--scores", required=True, help="the .npy written by `logra score --matrix`")
    p.add_argument("--out", required=True, help="the .html file")
    _scored_matrix_options(p)
    p.add_argument("--top-k", type=positive, default=5, help="helpful and harmful documents per query in the page")
    p.add_argument("--show", type=count, default=3, help="documents per query in the printed summary")
    p.add_argument("--title", default="logra influence report")
    p.add_argument(
        "--tokens",
        action="store_true",
        help="colour each shown document's and query's tokens by their signed share of the score (reruns the "
        "model on those examples only)",
    )
    p.add_argument(
        "--confirmed", help="a table of `logra confirm` on the same scores: show each query's shortlist by gain"
    )
    p.set_defaults(func=cmd_report)


def _add_confirm(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "confirm",
        help="fine-tune on each query's top documents alone and rank them by how much the query's loss drops",
        formatter_class=_Formatter,
    )
    p.add_argument("--scores", required=True, help="the .npy written by `logra score --matrix`")
    p.add_argument("--out", required=True, help=".csv, .jsonl or .parquet: each query's candidates by gain")
    _scored_matrix_options(p)
    p.add_argument("--top-k", type=positive, default=5, help="candidates per query: its most helpful documents")
    p.add_argument("--steps", type=positive, default=5, help="optimizer steps on each candidate")
    p.add_argument("--lr", type=positive_float, default=5e-5, help="the fine-tuning's learning rate")
    p.add_argument(
        "--optimizer",
        choices=enum_values(FineTuneOptimizer),
        default=FineTuneOptimizer.ADAM.value,
        help="the fine-tuning's optimizer, with a fresh state for each candidate",
    )
    p.add_argument(
        "--train-modules",
        nargs="+",
        help="fnmatch patterns of the modules to train, e.g. 'model.layers.*' lm_head (default: every Linear/Conv1D)",
    )
    p.set_defaults(func=cmd_confirm)


def _add_validate(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser(
        "validate",
        help="retrain on random subsets with your Python recipe; LDS per damping and k, with a bootstrap CI",
        formatter_class=_Formatter,
    )
    p.add_argument(
        "--train-fn", required=True, help="module:function, train_fn(indices) -> [Q] query losses (from scratch)"
    )
    p.add_argument(
        "--score-fn", required=True, help="module:function, score_fn(damping=, k=) -> [Q, N] scores of those queries"
    )
    p.add_argument("--n-train", type=positive, required=True, help="N, the number of training examples")
    p.add_argument("--subsets", type=positive, default=20, help="retrainings (each on a random subset)")
    p.add_argument("--fraction", type=float, default=0.5, help="the share of the training set in each subset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--dampings",
        default="default",
        help="comma-separated dampings to try; default = score_fn's own, e.g. 1e-3,1e-2,default",
    )
    p.add_argument("--ks", default="default", help="comma-separated k to try (as --dampings), e.g. 8,16")
    p.add_argument("--higher-is-better", action="store_true", help="train_fn returns margins, not losses")
    p.add_argument("--bootstrap", type=positive, default=1000, help="bootstrap resamples over queries")
    p.add_argument("--confidence", type=float, default=0.95, help="the interval's level")
    p.add_argument("--out", help="also write the result as .json")
    p.set_defaults(func=cmd_validate)


def _add_verify(sub: argparse._SubParsersAction[_Parser]) -> None:
    p = sub.add_parser("verify", help="check every checksum of a store", formatter_class=_Formatter)
    p.add_argument("store", help="the store directory")
    p.set_defaults(func=cmd_verify)
