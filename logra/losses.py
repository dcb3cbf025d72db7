"""Per-example losses for the usual Hugging Face heads, computed from logits with torch only.

LoGra logs ∇L_i for each example's *own* loss L_i, so the loss to backpropagate inside
`GradientLogger.record()` is Σ_i L_i. These functions give the (B,) vector of L_i for a batch,
defined so that L_i equals what the model's built-in loss returns for example i *alone* (a batch
of one): a causal LM's mean token cross-entropy over the example's labelled tokens, and a
sequence classifier's cross-entropy / MSE / BCE. Labels equal to `ignore_index` (-100) are
ignored; an example with no labelled token has loss 0 (not NaN) and a zero gradient.

The Hugging Face front end that the command line and `logra.integrations.hf` share lives here
too, without importing transformers: the `Task` enum, `detect_task` (from a model's class or a
config's `architectures`) and `per_example_losses` (a model's outputs -> (B,) losses by task).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from logra.errors import ConfigError
from logra.types import parse_enum

IGNORE_INDEX = -100


class TokenReduction(str, enum.Enum):
    """How a sequence example's token losses combine into its loss.

    mean: mean over its labelled tokens (what a Hugging Face causal LM returns for a batch of one).
    sum: their sum (every token weighs the same, whatever the example's length).
    """

    MEAN = "mean"
    SUM = "sum"


class Task(str, enum.Enum):
    """Which per-example loss a Hugging Face model's logits get.

    causal_lm: next-token cross-entropy on the labelled tokens (`causal_lm_loss`).
    sequence_classification: the classifier's loss on its label (`sequence_classification_loss`).
    """

    CAUSAL_LM = "causal_lm"
    SEQUENCE_CLASSIFICATION = "sequence_classification"


class ProblemType(str, enum.Enum):
    """The Hugging Face `config.problem_type` of a sequence classifier."""

    REGRESSION = "regression"
    SINGLE_LABEL = "single_label_classification"
    MULTI_LABEL = "multi_label_classification"


def _loss_dtype(logits: Tensor) -> Tensor:
    """Half-precision logits are upcast to float32 for the softmax, as Hugging Face does."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def causal_lm_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    reduction: TokenReduction | str = TokenReduction.MEAN,
) -> Tensor:
    """Per-example next-token cross-entropy.

    Args:
        logits: (B, T, V); position t predicts token t + 1.
        labels: (B, T) token ids, `ignore_index` where a token is not a target (padding, prompt).
        reduction: mean (default) or sum over each example's labelled tokens.

    Returns:
        (B,) losses, in the logits' dtype (float32 for half logits).
    """
    red = parse_enum(TokenReduction, reduction, "reduction")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise ConfigError(
            f"causal_lm_loss needs logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} and "
            f"{tuple(labels.shape)}. Pass the model's `logits` and the batch's `labels`."
        )
    B, T, V = logits.shape
    targets = labels[:, 1:].to(logits.device)  # (B, T-1)
    token = F.cross_entropy(
        _loss_dtype(logits[:, :-1]).reshape(-1, V), targets.reshape(-1), ignore_index=ignore_index, reduction="none"
    ).view(B, T - 1)
    total = token.sum(dim=1)
    if red is TokenReduction.SUM:
        return total
    counts = (targets != ignore_index).sum(dim=1)
    return total / counts.clamp(min=1).to(total.dtype)


def infer_problem_type(num_labels: int, labels: Tensor) -> ProblemType:
    """Hugging Face's rule: one label -> regression; integer labels -> single-label; else multi-label."""
    if num_labels == 1:
        return ProblemType.REGRESSION
    if not labels.is_floating_point():
        return ProblemType.SINGLE_LABEL
    return ProblemType.MULTI_LABEL


def sequence_classification_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    problem_type: ProblemType | str | None = None,
    ignore_index: int = IGNORE_INDEX,
) -> Tensor:
    """Per-example loss of a sequence classifier.

    Args:
        logits: (B, C).
        labels: (B,) class ids (single-label; `ignore_index` gives loss 0) or targets (regression),
            or (B, C) float multi-hot targets (multi-label).
        problem_type: as in the model's `config.problem_type`; None infers it like Hugging Face.

    Returns:
        (B,) losses: cross-entropy, squared error (mean over outputs) or BCE-with-logits (mean over
        labels), each equal to the model's built-in loss on that example alone.
    """
    if logits.dim() != 2 or labels.shape[0] != logits.shape[0]:
        raise ConfigError(
            f"sequence_classification_loss needs logits (B, C) and labels with B rows; got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}."
        )
    num_labels = logits.shape[1]
    if problem_type is None:
        kind = infer_problem_type(num_labels, labels)
    else:
        kind = parse_enum(ProblemType, problem_type, "problem_type")
    logits = _loss_dtype(logits)
    labels = labels.to(logits.device)
    if kind is ProblemType.SINGLE_LABEL:
        return F.cross_entropy(logits, labels.reshape(-1).long(), ignore_index=ignore_index, reduction="none")
    target = labels.to(logits.dtype).reshape(logits.shape)
    if kind is ProblemType.REGRESSION:
        return ((logits - target) ** 2).mean(dim=1)
    return F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dim=1)


def detect_task(source: Any) -> Task:
    """The task of a Hugging Face model, or of a config before its model is built.

    A model (an nn.Module) is judged by its class name and its config's `architectures`; a config
    by its `architectures` alone, and a config that names none is taken for a causal LM (as a
    config.json written for a test often is). Names with "ForSequenceClassification" mean
    sequence_classification; names with "CausalLM" or "LMHead" (GPT2LMHeadModel) mean causal_lm.
    """
    config = getattr(source, "config", None) if isinstance(source, torch.nn.Module) else source
    names = list(getattr(config, "architectures", None) or [])
    if isinstance(source, torch.nn.Module):
        names.insert(0, type(source).__name__)
    if any("SequenceClassification" in n for n in names):
        return Task.SEQUENCE_CLASSIFICATION
    if any("CausalLM" in n or "LMHead" in n for n in names) or not names:
        return Task.CAUSAL_LM
    raise ConfigError(
        f"cannot tell the task of {', '.join(dict.fromkeys(names))}: logra knows causal LMs and sequence "
        "classifiers. Pass task='causal_lm' or task='sequence_classification' (--task on the command line), or "
        "loss='compute_loss' (log_trainer) to use the Trainer's own loss example by example."
    )


def per_example_losses(
    model: torch.nn.Module,
    outputs: Any,
    labels: Tensor,
    task: Task | str,
    token_reduction: TokenReduction | str = TokenReduction.MEAN,
) -> Tensor:
    """(B,) losses L_i from a Hugging Face model's outputs (or logits) and the batch's labels (-100 ignored).

    outputs: the model's output (a mapping or tuple with the logits first) or the logits tensor.
    """
    if isinstance(outputs, Tensor):
        logits = outputs
    else:
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    if parse_enum(Task, task, "task") is Task.CAUSAL_LM:
        return causal_lm_loss(logits, labels, reduction=token_reduction)
    problem_type = getattr(getattr(model, "config", None), "problem_type", None)
    return sequence_classification_loss(logits, labels, problem_type=problem_type)


def likelihood_logits(
    model: torch.nn.Module,
    outputs: Any,
    labels: Tensor,
    task: Task | str,
    token_reduction: TokenReduction | str = TokenReduction.MEAN,
) -> tuple[Tensor, Tensor]:
    """The categorical likelihood behind `per_example_losses`, for the true Fisher: (logits, weights).

    causal_lm: logits (B, T-1, V) of the next tokens, weights (B, T-1) = 1 on labelled tokens (divided
    by their count for token_reduction="mean"), 0 elsewhere.  sequence_classification with
    single-label targets: logits (B, C), weights (B,) = 0 for an ignored label, else 1. Then
    Σ weights · cross-entropy(logits, labels) is the per-example loss, and labels drawn from
    softmax(logits) give the true Fisher (`logra.true_fisher_statistics(logits_fn=...)`).

    Raises ConfigError for a regression or multi-label classifier: squared error and BCE are not a
    softmax cross-entropy, so they have no categorical true Fisher here.
    """
    if isinstance(outputs, Tensor):
        logits = outputs
    else:
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
    if parse_enum(Task, task, "task") is Task.CAUSAL_LM:
        if logits.dim() != 3 or labels.shape != logits.shape[:2]:
            raise ConfigError(f"causal LM logits {tuple(logits.shape)} and labels {tuple(labels.shape)} do not match.")
        targets = labels[:, 1:].to(logits.device)
        weights = (targets != IGNORE_INDEX).to(_loss_dtype(logits).dtype)
        if parse_enum(TokenReduction, token_reduction, "token_reduction") is TokenReduction.MEAN:
            weights = weights / weights.sum(dim=1, keepdim=True).clamp(min=1)
        return _loss_dtype(logits[:, :-1]), weights
    problem_type = getattr(getattr(model, "config", None), "problem_type", None)
    kind = (
        infer_problem_type(logits.shape[-1], labels)
        if problem_type is None
        else parse_enum(ProblemType, problem_type, "problem_type")
    )
    if kind is not ProblemType.SINGLE_LABEL:
        raise ConfigError(
            f"the true Fisher needs a softmax cross-entropy likelihood, but this classifier's problem_type is "
            f"{kind.value!r} ({'squared error' if kind is ProblemType.REGRESSION else 'binary cross-entropy'}). "
            "Use the empirical Fisher (--fisher empirical, fisher='empirical'), or compute FisherStatistics with "
            "logra.true_fisher_statistics(loss_fn=...) sampling targets from your model's own likelihood."
        )
    weights = (labels.reshape(-1).to(logits.device) != IGNORE_INDEX).to(_loss_dtype(logits).dtype)
    return _loss_dtype(logits), weights


def hf_logits_fn(task: Task | str, token_reduction: TokenReduction | str = TokenReduction.MEAN) -> Any:
    """`logits_fn(model, batch)` of `likelihood_logits` for batches {input_ids, attention_mask, labels, ...}:
    the model is called on every key but labels (so it computes no loss of its own)."""
    task = parse_enum(Task, task, "task")

    def logits_fn(model: torch.nn.Module, batch: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        return likelihood_logits(model, model(**inputs), batch["labels"], task, token_reduction)

    return logits_fn
