"""Hugging Face integration: per-example losses, the Trainer logging pass, the TracIn callback, exports.

References are independent of logra's machinery: Hugging Face's own loss on each example alone,
and batch-size-1 autograd gradients of each example's own loss (projected afterwards), in float64.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import logra
from logra.errors import ConfigError
from logra.losses import causal_lm_loss, sequence_classification_loss

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))
import common  # noqa: E402
from models import VOCAB, weight_out_in  # noqa: E402
from transformers import GPT2Config, GPT2ForSequenceClassification, Trainer, TrainerCallback  # noqa: E402

from logra.integrations.hf import detect_task, log_trainer, trainer_rows  # noqa: E402
from logra.integrations.hf_callback import (  # noqa: E402
    LoGraCallback,
    read_checkpoints,
    tracin_ensemble,
    tracin_scores,
)
from logra.integrations.hf_export import add_scores_column, save_parquet, scores_table, top_k_table  # noqa: E402

REL = 1e-10


# ---------------------------------------------------------------- references


def reference_rows(
    model: nn.Module, examples: list[Any], loss_of: Callable[[nn.Module, Any], Tensor], layers: Any, projection: Any
) -> Tensor:
    """(N, D): P_out (∂L_i/∂W) P_inᵀ per layer, each example alone through plain autograd."""
    modules = dict(model.named_modules())
    weights = [modules[layer.name].weight for layer in layers]
    rows = []
    for example in examples:
        grads = torch.autograd.grad(loss_of(model, example), weights, allow_unused=True)
        parts = []
        for layer, g, w in zip(layers, grads, weights):
            g = torch.zeros_like(w) if g is None else g
            g = g if isinstance(modules[layer.name], nn.Linear) else g.T  # HF Conv1D stores (n_in, n_out)
            assert g.shape == weight_out_in(modules[layer.name]).shape
            p_in, p_out = projection(layer.name)
            parts.append((p_out @ g @ p_in.T).reshape(-1))
        rows.append(torch.cat(parts))
    return torch.stack(rows)


def lm_token_losses(model: nn.Module, ids: Tensor, labels: Tensor) -> Tensor:
    """Token cross-entropies of one unpadded example (labels -100 dropped), by log_softmax."""
    logp = torch.log_softmax(model(input_ids=ids[None]).logits[0], dim=-1)  # (T, V)
    targets = labels[1:]
    keep = targets != -100
    return -logp[:-1][keep].gather(1, targets[keep][:, None])[:, 0]


def lm_loss(reduction: str) -> Callable[[nn.Module, Any], Tensor]:
    def loss(model: nn.Module, example: dict[str, Any]) -> Tensor:
        ids = torch.tensor(example["input_ids"])
        token = lm_token_losses(model, ids, ids)
        return token.sum() if reduction == "sum" else token.mean()

    return loss


def assert_rows_close(actual: Tensor, expected: Tensor, layers: Any, rel: float = REL) -> None:
    assert actual.shape == expected.shape
    for layer in layers:
        cols = slice(layer.offset, layer.offset + layer.size)
        scale = expected[:, cols].abs().max().item()
        assert scale > 0, layer.name
        err = (actual[:, cols] - expected[:, cols]).abs().max().item()
        assert err <= rel * scale, f"{layer.name}: {err:.3e} > {rel:.0e} x {scale:.3e}"


def projections(config: logra.LoGraConfig, model: nn.Module) -> tuple[Any, Callable[[str], Any]]:
    logger = logra.GradientLogger(model, config)
    layers = logger.layers
    mats = {layer.name: logger.projection(layer.name) for layer in layers}
    logger.close()
    return layers, mats.__getitem__


def snapshot(model: nn.Module) -> dict[str, Any]:
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "flags": [p.requires_grad for p in model.parameters()],
        "grads": [None if p.grad is None else p.grad.clone() for p in model.parameters()],
        "training": [m.training for m in model.modules()],
    }


def assert_untouched(model: nn.Module, before: dict[str, Any]) -> None:
    after = snapshot(model)
    assert all(torch.equal(after["state"][k], v) for k, v in before["state"].items())
    assert after["flags"] == before["flags"] and after["training"] == before["training"]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(after["grads"], before["grads"]))


# ---------------------------------------------------------------- per-example losses


def test_causal_lm_loss_equals_hf_loss_of_each_example_alone() -> None:
    model = common.model()
    examples = common.train_examples()[:5]
    batch, mask = common.collate(examples)
    labels = batch["input_ids"].masked_fill(mask == 0, -100)
    labels[0, 1:3] = -100  # a masked prompt inside an example
    labels[1, :] = -100  # nothing to predict: loss 0, not NaN
    logits = model(input_ids=batch["input_ids"], attention_mask=mask).logits
    mean, total = causal_lm_loss(logits, labels), causal_lm_loss(logits, labels, reduction="sum")
    assert mean[1] == 0 and total[1] == 0
    for i, e in enumerate(examples):
        t = len(e["input_ids"])
        own = labels[i, :t]
        token = lm_token_losses(model, e["input_ids"], own)
        assert torch.allclose(total[i], token.sum(), rtol=1e-12) and (i == 1 or torch.allclose(mean[i], token.mean()))
        if i != 1:  # Hugging Face's loss (computed in float32) on the example alone
            hf = model(input_ids=e["input_ids"][None], labels=own[None]).loss
            assert torch.allclose(mean[i], hf.to(mean.dtype), rtol=1e-6)


@pytest.mark.parametrize("problem", ["single_label_classification", "regression", "multi_label_classification"])
def test_sequence_classification_loss_equals_hf_loss_of_each_example_alone(problem: str) -> None:
    num_labels = 1 if problem == "regression" else 3
    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=16, vocab_size=VOCAB, pad_token_id=0,
                        num_labels=num_labels, problem_type=problem)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config).double().eval()
    gen = torch.Generator().manual_seed(2)
    ids = torch.randint(1, VOCAB, (4, 5), generator=gen)
    if problem == "single_label_classification":
        labels = torch.tensor([0, 2, -100, 1])
    elif problem == "regression":
        labels = torch.randn(4, generator=gen, dtype=torch.float64)
    else:
        labels = torch.randint(0, 2, (4, 3), generator=gen).double()
    losses = sequence_classification_loss(model(input_ids=ids).logits, labels, problem_type=problem)
    assert losses.shape == (4,)
    for i in range(4):
        if problem == "single_label_classification" and labels[i] == -100:
            assert losses[i] == 0  # an ignored example contributes nothing
            continue
        hf = model(input_ids=ids[i : i + 1], labels=labels[i : i + 1]).loss
        assert torch.allclose(losses[i], hf.to(losses.dtype), rtol=1e-6), (i, losses[i], hf)


def test_task_detection() -> None:
    assert detect_task(common.model()).value == "causal_lm"
    cls = GPT2ForSequenceClassification(GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=VOCAB, pad_token_id=0))
    assert detect_task(cls).value == "sequence_classification"
    with pytest.raises(ConfigError, match="task="):
        detect_task(nn.Linear(2, 2))


# ---------------------------------------------------------------- the Trainer logging pass


@pytest.mark.parametrize(("reduction", "batch_size"), [("sum", 1), ("sum", 4), ("mean", 3)])
def test_log_trainer_rows_equal_batch_size_one_reference(tmp_path: Path, reduction: str, batch_size: int) -> None:
    model = common.model().train()  # the pass must switch to eval and back
    trainer = common.hf_trainer(model, tmp_path / "t", common.hf_dataset())
    before = snapshot(model)
    store = log_trainer(trainer, common.CONFIG, tmp_path / "s", id_column="uid", batch_size=batch_size,
                        token_reduction=reduction)  # fmt: skip
    assert_untouched(model, before)
    assert store.ids == common.train_ids()
    layers, projection = projections(common.CONFIG, model)
    model.eval()
    dataset = [{"input_ids": e["input_ids"].tolist()} for e in common.train_examples()]
    expected = reference_rows(model, dataset, lm_loss(reduction), layers, projection)
    assert_rows_close(store.rows(), expected, layers)
    stats = store.statistics()[layers[0].name]
    assert stats.n_examples == common.N_TRAIN
    assert stats.n_tokens == sum(len(e["input_ids"]) for e in common.train_examples())  # padding excluded


def test_customised_compute_loss_is_used_example_by_example(tmp_path: Path) -> None:
    class TwiceSumTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            assert inputs["input_ids"].shape[0] == 1, "compute_loss mode runs one example at a time"
            logits = model(input_ids=inputs["input_ids"]).logits[0]
            labels = inputs["labels"][0]
            return 2 * F.cross_entropy(logits[:-1], labels[1:], ignore_index=-100, reduction="sum")

    model = common.model()
    trainer = common.hf_trainer(model, tmp_path / "t", common.hf_dataset())
    trainer.__class__ = TwiceSumTrainer
    store = log_trainer(trainer, common.CONFIG, tmp_path / "s")  # loss="auto" sees the override
    layers, projection = projections(common.CONFIG, model)
    dataset = [{"input_ids": e["input_ids"].tolist()} for e in common.train_examples()]
    expected = 2 * reference_rows(model, dataset, lm_loss("sum"), layers, projection)
    assert_rows_close(store.rows(), expected, layers)
    assert store.ids == list(range(common.N_TRAIN))  # no id column: row indices


def test_default_compute_loss_mode_agrees_with_per_example_mode(tmp_path: Path) -> None:
    model = common.model()
    trainer = common.hf_trainer(model, tmp_path / "t", common.hf_dataset())
    fast = trainer_rows(trainer, common.CONFIG, common.hf_dataset(), id_column="uid")
    slow = trainer_rows(trainer, common.CONFIG, common.hf_dataset(), id_column="uid", loss="compute_loss")
    assert fast.ids == slow.ids == common.train_ids()
    layers, _ = projections(common.CONFIG, model)
    assert_rows_close(slow.rows, fast.rows, layers, rel=1e-5)  # Hugging Face computes its loss in float32


def test_sequence_classification_through_the_trainer(tmp_path: Path) -> None:
    from datasets import Dataset

    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=16, vocab_size=VOCAB, pad_token_id=0,
                        num_labels=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config).double()
    gen = torch.Generator().manual_seed(4)
    rows = [{"input_ids": torch.randint(1, VOCAB, (5,), generator=gen).tolist(), "labels": int(i % 3), "key": 10 + i}
            for i in range(6)]  # fmt: skip
    rows[2]["labels"] = -100  # ignored: a zero row
    trainer = Trainer(
        model=model, args=common.hf_trainer(model, tmp_path / "t").args, train_dataset=Dataset.from_list(rows)
    )
    cfg = logra.LoGraConfig(k_in=3, k_out=3, modules=["*mlp*", "score"], dtype="float64")
    store = log_trainer(trainer, cfg, tmp_path / "s", id_column="key", batch_size=4)
    assert store.ids == [10 + i for i in range(6)]
    layers, projection = projections(cfg, model)

    def ce(m: nn.Module, example: dict[str, Any]) -> Tensor:
        logits = m(input_ids=torch.tensor(example["input_ids"])[None]).logits
        return F.cross_entropy(logits, torch.tensor([example["labels"]]), ignore_index=-100, reduction="sum")

    keep = [0, 1, 3, 4, 5]
    expected = reference_rows(model.eval(), [rows[i] for i in keep], ce, layers, projection)
    assert_rows_close(store.rows()[keep], expected, layers)
    assert store.rows()[2].abs().max() == 0


def test_true_fisher_through_the_trainer(tmp_path: Path) -> None:
    """trainer_fisher: the exact expectation over the 3 classes; for the score head (k_out = 3, the
    identity) S = Σ_i w_i (diag p_i - p_i p_iᵀ) / N with w_i = 0 for the ignored label; .grad untouched."""
    from datasets import Dataset

    from logra.integrations.hf import trainer_fisher

    config = GPT2Config(n_layer=1, n_embd=8, n_head=2, n_positions=16, vocab_size=VOCAB, pad_token_id=0,
                        num_labels=3, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(config).double()
    gen = torch.Generator().manual_seed(4)
    rows = [{"input_ids": torch.randint(1, VOCAB, (5,), generator=gen).tolist(), "labels": int(i % 3)}
            for i in range(6)]  # fmt: skip
    rows[2]["labels"] = -100
    trainer = Trainer(
        model=model, args=common.hf_trainer(model, tmp_path / "t").args, train_dataset=Dataset.from_list(rows)
    )
    cfg = logra.LoGraConfig(k_in=3, k_out=3, modules=["score"], dtype="float64")
    fisher = trainer_fisher(trainer, cfg, batch_size=4, method="ekfac")
    assert fisher.exact and fisher.n_samples == 3 and fisher.n_examples == 6
    assert all(p.grad is None for p in model.parameters())
    with torch.no_grad():
        p = torch.cat([model(input_ids=torch.tensor(r["input_ids"])[None]).logits.softmax(-1) for r in rows])
    curv = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    expected = curv[[0, 1, 3, 4, 5]].sum(0) / 6
    torch.testing.assert_close(fisher.kronecker["score"].grad_covariance(), expected, rtol=1e-10, atol=1e-13)
    assert fisher.eigenvalues is not None and fisher.eigenvalues["score"].shape == (3, 3)

    class CustomTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[override]
            return model(**inputs).logits.square().sum()

    trainer.__class__ = CustomTrainer
    with pytest.raises(ConfigError, match="customised.*true Fisher needs"):
        trainer_fisher(trainer, cfg)


def test_ids_from_the_dataset_are_checked(tmp_path: Path) -> None:
    trainer = common.hf_trainer(common.model(), tmp_path / "t", common.hf_dataset())
    duplicated = common.hf_dataset().map(lambda e, i: {"uid": f"x{i // 2}"}, with_indices=True)
    with pytest.raises(ConfigError, match="repeats ids"):
        log_trainer(trainer, common.CONFIG, tmp_path / "a", dataset=duplicated, id_column="uid")
    with pytest.raises(ConfigError, match="not a column"):
        log_trainer(trainer, common.CONFIG, tmp_path / "b", id_column="nope")


def test_log_trainer_resumes_a_partial_store(tmp_path: Path) -> None:
    model = common.model()
    trainer = common.hf_trainer(model, tmp_path / "t", common.hf_dataset())
    log_trainer(trainer, common.CONFIG, tmp_path / "s", dataset=common.hf_dataset().select(range(4)), id_column="uid")
    resumed = log_trainer(trainer, common.CONFIG, tmp_path / "s", id_column="uid", batch_size=5)
    whole = log_trainer(trainer, common.CONFIG, tmp_path / "whole", id_column="uid")
    assert resumed.ids == whole.ids
    layers, _ = projections(common.CONFIG, model)
    assert_rows_close(resumed.rows(), whole.rows(), layers)
    a, b = resumed.statistics(), whole.statistics()
    assert all(torch.allclose(a[k].input_sum, b[k].input_sum, rtol=1e-12) and a[k].n_tokens == b[k].n_tokens for k in a)


# ---------------------------------------------------------------- the TracIn callback


class Snapshots(TrainerCallback):
    """Copies of the model at given steps (taken where LoGraCallback logs: on_step_end)."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.models = steps, {}

    def on_step_end(self, args: Any, state: Any, control: Any, model: nn.Module = None, **kwargs: Any) -> None:
        if state.global_step in self.steps:
            self.models[state.global_step] = copy.deepcopy(model).eval()


def _train(tmp_path: Path, callbacks: list[Callable[[Trainer], TrainerCallback]]) -> tuple[nn.Module, list[Any]]:
    model = common.model()
    args = {"max_steps": 4, "per_device_train_batch_size": 4, "learning_rate": 0.05, "lr_scheduler_type": "linear",
            "logging_strategy": "no", "seed": 3}  # fmt: skip
    trainer = common.hf_trainer(model, tmp_path, common.hf_dataset(), **args)
    made = [make(trainer) for make in callbacks]
    for cb in made:
        trainer.add_callback(cb)
    trainer.train()
    return model, made


def test_callback_logs_checkpoints_without_changing_training(tmp_path: Path) -> None:
    queries = common.hf_dataset().select([1, 4])
    model, (logra_cb, snaps) = _train(tmp_path / "a", [
        lambda t: LoGraCallback(t, common.CONFIG, tmp_path / "tracin", steps=[1, 3], query_dataset=queries,
                                id_column="uid", query_id_column="uid", token_reduction="sum"),
        lambda t: Snapshots({1, 3}),
    ])  # fmt: skip
    plain, _ = _train(tmp_path / "b", [])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    checkpoints = read_checkpoints(tmp_path / "tracin")
    assert [c.step for c in checkpoints] == [1, 3] and logra_cb.seconds > 0
    # Linear decay from 0.05 over 4 steps; the lr recorded is the optimizer's after that step's scheduler step.
    assert [c.learning_rate for c in checkpoints] == [pytest.approx(0.0375), pytest.approx(0.0125)]
    layers, projection = projections(common.CONFIG, model)
    dataset = [{"input_ids": e["input_ids"].tolist()} for e in common.train_examples()]
    total = torch.zeros(2, common.N_TRAIN, dtype=torch.float64)
    for c in checkpoints:
        expected = reference_rows(snaps.models[c.step], dataset, lm_loss("sum"), layers, projection)
        train = logra.GradientStore.open(c.train)
        assert train.ids == common.train_ids()
        assert_rows_close(train.rows(), expected, layers)
        query = logra.GradientStore.open(c.query)
        assert query.ids == ["t01", "t04"]
        assert_rows_close(query.rows(), expected[[1, 4]], layers)
        total += c.learning_rate * expected[[1, 4]] @ expected.T
    result = tracin_scores(tmp_path / "tracin")
    assert result.train_ids == common.train_ids() and result.query_ids == ["t01", "t04"]
    assert torch.allclose(result.scores, total, rtol=1e-9, atol=1e-9 * total.abs().max().item())


def test_zero_learning_rate_checkpoint_warns_and_runs_ensemble(tmp_path: Path) -> None:
    """The last step of a linear schedule has lr 0: named at logging and at scoring; ensembles average runs."""
    queries = common.hf_dataset().select([1, 4])
    with pytest.warns(UserWarning, match=r"checkpoint step-000004 \(step 4\) has learning rate 0"):
        _train(tmp_path / "a", [
            lambda t: LoGraCallback(t, common.CONFIG, tmp_path / "run", steps=[2, 4], query_dataset=queries,
                                    id_column="uid", query_id_column="uid", token_reduction="sum"),
        ])  # fmt: skip
    assert [c.learning_rate for c in read_checkpoints(tmp_path / "run")] == [pytest.approx(0.025), 0.0]
    with pytest.warns(UserWarning, match="step-000004 .* adds nothing to the TracIn sum"):
        weighted = tracin_scores(tmp_path / "run")
    plain = tracin_scores(tmp_path / "run", learning_rates=False)  # no warning: every checkpoint weighs 1
    assert not torch.allclose(weighted.scores * 40, plain.scores)  # the lr-0 checkpoint counts only in `plain`
    both = tracin_ensemble([tmp_path / "run", tmp_path / "run"], weights=[1.0, 3.0], learning_rates=False)
    torch.testing.assert_close(both.scores, plain.scores, rtol=1e-12, atol=0.0)
    assert both.train_ids == plain.train_ids and both.query_ids == ["t01", "t04"]


def test_callback_needs_a_schedule(tmp_path: Path) -> None:
    trainer = common.hf_trainer(common.model(), tmp_path, common.hf_dataset())
    with pytest.raises(ConfigError, match="logs nothing"):
        LoGraCallback(trainer, common.CONFIG, tmp_path / "x")


# ---------------------------------------------------------------- exports


def test_scores_join_back_by_id_and_export_to_parquet(tmp_path: Path) -> None:
    import pyarrow.parquet as pq

    model = common.model()
    trainer = common.hf_trainer(model, tmp_path / "t", common.hf_dataset())
    store = log_trainer(trainer, common.CONFIG, tmp_path / "s", id_column="uid")
    from logra.curvature import fit_preconditioner
    from logra.score import Scorer

    scorer = Scorer(store, fit_preconditioner(store, "identity"), compute_dtype=torch.float64)
    queries = trainer_rows(trainer, common.CONFIG, common.hf_dataset().select([0, 3]), id_column="uid")
    scores = scorer.score(queries.rows)
    shuffled = common.hf_dataset().shuffle(seed=0)
    joined = add_scores_column(shuffled, scores[1], store.ids, id_column="uid", name="influence_t03")
    by_id = dict(zip(store.ids, scores[1].tolist()))
    assert joined["influence_t03"] == [by_id[i] for i in shuffled["uid"]]
    with pytest.raises(ConfigError, match="id_column"):
        add_scores_column(shuffled, scores[1], store.ids)  # row indices are not the logged ids
    from_numpy = add_scores_column(shuffled, scores.numpy()[1], store.ids, id_column="uid", name="influence_np")
    assert from_numpy["influence_np"] == joined["influence_t03"]  # a numpy row (np.load of a matrix) joins the same
    with pytest.raises(ConfigError, match=r"scores of shape \(2, 11\): scores must be a float tensor or numpy"):
        add_scores_column(shuffled, scores.numpy(), store.ids, id_column="uid")

    table = scores_table(scores, store.ids, queries.ids)
    save_parquet(table, tmp_path / "scores.parquet")
    back = pq.read_table(tmp_path / "scores.parquet").to_pydict()
    assert len(back["score"]) == 2 * common.N_TRAIN
    for q, t, s in zip(back["query_id"], back["train_id"], back["score"]):
        assert s == scores[queries.ids.index(q), store.ids.index(t)].item()
    top = top_k_table(scorer.top_k(queries.rows, 2), queries.ids)
    first = top.filter(lambda r: r["kind"] == "helpful" and r["rank"] == 0)
    assert first["train_id"] == [store.ids[j] for j in scores.argmax(dim=1).tolist()]
    assert first["score"] == scores.max(dim=1).values.tolist()
