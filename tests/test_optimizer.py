"""Optimizer-aware scoring (TrackStar): Adam's second moments, the factorised correction folded into
the projections, the store's record of it, mixed curvature and the preset.

References are independent of logra's machinery: per-example gradients from a batch-size-1
autograd loop (tests/models.py), divided elementwise by the square root of the row x column
factorisation of v̂ + eps computed here by hand in float64; curvatures and inverses built with
dense float64 linear algebra.
"""

from __future__ import annotations

import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from models import build_model, collate, log_rows, make_examples, per_example_loss, reference_rows
from torch import Tensor, nn

import logra
from logra.capture.layers import draw_projections
from logra.curvature.mixed import mixed_preconditioner, mixing_weight
from logra.curvature.optimizer import (
    CORRECTION_FILE,
    OptimizerCorrection,
    SecondMoments,
    adam_second_moments,
    trainer_second_moments,
)
from logra.errors import ConfigError, StoreCorruptedError

EPS = 1e-12


def trained(arch: str, steps: int = 3, seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A tiny float64 model after `steps` AdamW steps on its own examples (so v̂ is not uniform)."""
    model = build_model(arch, seed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.9, 0.99), weight_decay=0.01)
    examples = make_examples(arch, 6, seed=11)
    for step in range(steps):
        batch, _ = collate(examples[2 * (step % 3) : 2 * (step % 3) + 2])
        batch.pop("attention_mask", None) if arch == "mlp" else None
        opt.zero_grad()
        per_example_loss(model, batch).sum().backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval(), opt


def corrected_reference(
    model: nn.Module, opt: torch.optim.Optimizer, examples: list[Any], layers: Any, include_bias: bool,
    projection: Any = None, power: float = 0.5,
) -> Tensor:  # fmt: skip
    """(N, D): each example's ∂L/∂W / (r cᵀ / S)^power of V = v̂ + eps (bias column appended), then projected."""
    modules = dict(model.named_modules())
    divisors = {}
    for layer in layers:
        m = modules[layer.name]
        state = opt.state[m.weight]
        t, beta2 = float(state["step"]), opt.param_groups[0]["betas"][1]
        v = state["exp_avg_sq"] / (1 - beta2**t)
        v = v if isinstance(m, nn.Linear) else v.T
        if include_bias and m.bias is not None:
            vb = opt.state[m.bias]["exp_avg_sq"] / (1 - beta2**t)
            v = torch.cat([v, vb[:, None]], dim=1)
        v = v.double() + EPS
        r, c = v.sum(1), v.sum(0)
        divisors[layer.name] = (torch.outer(r, c) / r.sum()) ** power
    by_name = {layer.name: layer for layer in layers}
    project = None if projection is None else (lambda name: projection(by_name[name]))
    return reference_rows(model, examples, layers, project, include_bias, divisors=divisors)


def assert_close(actual: Tensor, expected: Tensor, rel: float = 1e-9) -> None:
    scale = expected.abs().max().item()
    assert scale > 0
    err = (actual.double() - expected).abs().max().item()
    assert err <= rel * scale, f"max error {err:.3e} > {rel:.0e} x {scale:.3e}"


def corrected_logger(
    model: nn.Module, opt: Any, config: logra.LoGraConfig, power: float = 0.5, **kw: Any
) -> logra.GradientLogger:
    moments = adam_second_moments(opt, model)
    correction = OptimizerCorrection.from_moments(moments, model, config, eps=EPS, power=power)
    return logra.GradientLogger(model, correction.configure(config), correction=correction, **kw)


# ---------------------------------------------------------------- the correction itself


FULL_WIDTH = [("mlp", True, 0.5), ("mlp", False, 0.5), ("gpt2", True, 0.5), ("mlp", True, 0.25)]


@pytest.mark.parametrize(("arch", "include_bias", "power"), FULL_WIDTH)
def test_full_width_rows_are_gradients_over_factorised_v_power(arch: str, include_bias: bool, power: float) -> None:
    model, opt = trained(arch)
    config = logra.LoGraConfig(k_in=4096, k_out=4096, init="identity", include_bias=include_bias, dtype="float64",
                               modules=None if arch == "mlp" else ["*mlp*", "*attn.c_attn"])  # fmt: skip
    examples = make_examples(arch, 5, seed=3)
    with corrected_logger(model, opt, config, power=power) as logger:
        _, rows = log_rows(logger, examples, list(range(5)), batch_size=2)
        layers = logger.layers
    assert all(layer.k_in == layer.n_in and layer.k_out == layer.n_out for layer in layers)
    assert_close(rows, corrected_reference(model, opt, examples, layers, include_bias, power=power))


@pytest.mark.parametrize("init", ["gaussian", "sjlt"])  # sjlt: the hooks' sparse path must see the scalings
def test_projected_rows_are_p_out_diag_a_g_diag_b_p_in(init: str) -> None:
    model, opt = trained("gpt2")
    config = logra.LoGraConfig(k_in=5, k_out=3, modules=["*mlp*", "*attn.c_attn"], include_bias=True, dtype="float64",
                               init=init)  # fmt: skip
    examples = make_examples("gpt2", 4, seed=8)
    with corrected_logger(model, opt, config) as logger:
        _, rows = log_rows(logger, examples, list(range(4)), batch_size=3)
        layers = logger.layers
    base = {layer.name: draw_projections(config, layer, None, None) for layer in layers}  # uncorrected P
    expected = corrected_reference(model, opt, examples, layers, True, projection=lambda layer: base[layer.name])
    assert_close(rows, expected)


def test_the_factorisation_is_exact_for_a_rank_one_v_and_matches_elementwise_division() -> None:
    model = nn.Linear(4, 3, bias=False).double()
    r, c = torch.tensor([1.0, 4.0, 0.25]), torch.tensor([2.0, 0.5, 1.0, 9.0])
    v = torch.outer(r, c).double()
    correction = OptimizerCorrection.from_moments(SecondMoments({"weight": v}), model, logra.LoGraConfig(), eps=0.0)
    a, b = correction.scales["root"]
    g = torch.randn(3, 4, dtype=torch.float64)
    assert_close(a[:, None] * g * b[None, :], g / v.sqrt(), rel=1e-14)


def test_adam_moments_are_bias_corrected_exp_avg_sq() -> None:
    model, opt = trained("mlp", steps=2)
    moments = adam_second_moments(opt, model)
    for name, p in model.named_parameters():
        state = opt.state[p]
        expected = state["exp_avg_sq"] / (1 - 0.99 ** float(state["step"]))
        assert torch.equal(moments.values[name], expected.double())
    raw = adam_second_moments(opt, model, bias_correction=False)
    assert torch.equal(raw.values["fc1.weight"], opt.state[model.fc1.weight]["exp_avg_sq"].double())


def test_bad_correction_values_are_refused() -> None:
    model, opt = trained("mlp")
    moments = adam_second_moments(opt, model)
    for kwargs in ({"power": 0.0}, {"power": True}, {"eps": -1.0}):
        with pytest.raises(ConfigError):
            OptimizerCorrection.from_moments(moments, model, logra.LoGraConfig(), **kwargs)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="optimizer_correction"):
        logra.LoGraConfig(optimizer_correction="not-a-fingerprint")
    partial = SecondMoments({k: v for k, v in moments.values.items() if not k.startswith("fc2")})
    with pytest.raises(ConfigError, match="fc2"):
        OptimizerCorrection.from_moments(partial, model, logra.LoGraConfig())


def test_sgd_and_fresh_optimizers_are_refused() -> None:
    model = build_model("mlp")
    with pytest.raises(ConfigError, match="no state"):
        adam_second_moments(torch.optim.AdamW(model.parameters()), model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    batch, _ = collate(make_examples("mlp", 2))
    per_example_loss(model, batch).sum().backward()
    sgd.step()
    with pytest.raises(ConfigError, match="exp_avg_sq"):
        adam_second_moments(sgd, model)


# ---------------------------------------------------------------- the store records it


def test_store_keeps_the_correction_and_refuses_uncorrected_queries(tmp_path: Path) -> None:
    model, opt = trained("mlp")
    config = logra.LoGraConfig(k_in=4, k_out=3, dtype="float64")
    examples = make_examples("mlp", 6, seed=4)
    with corrected_logger(model, opt, config, store=tmp_path / "s") as logger:
        log_rows(logger, examples, list(range(6)), batch_size=3)
        correction = logger.correction
    store = logra.GradientStore.open(tmp_path / "s")
    assert correction is not None and store.config.optimizer_correction == correction.fingerprint()
    back = OptimizerCorrection.from_store(store)
    assert back.fingerprint() == correction.fingerprint()
    # queries logged with the store's correction score; plain ones are refused
    with logra.GradientLogger(model, store.config, correction=back) as q:
        _, ok = log_rows(q, examples[:2], ["a", "b"], batch_size=2)
    pre = logra.fit_preconditioner(store, "kfac")
    scorer = logra.Scorer(store, pre, query_config=store.config)
    assert_close(scorer.score(ok)[:, :2], scorer.score(store.rows()[:2])[:, :2], rel=1e-10)
    with logra.GradientLogger(model, config) as plain:
        with plain.record(ids=["a"]) as rec:
            batch, _ = collate(examples[:1])
            per_example_loss(model, batch).sum().backward()
    with pytest.raises(ConfigError, match="optimizer_correction"):
        scorer.score(rec)
    with pytest.raises(ConfigError, match="no correction"):
        logra.GradientLogger(model, store.config)
    with pytest.raises(ConfigError, match="fingerprint"):
        logra.GradientLogger(model, config, correction=back)


def test_an_altered_correction_file_is_refused(tmp_path: Path) -> None:
    model, opt = trained("mlp")
    with corrected_logger(model, opt, logra.LoGraConfig(k_in=4, k_out=3), store=tmp_path / "s") as logger:
        log_rows(logger, make_examples("mlp", 2), [0, 1], batch_size=2)
        correction = logger.correction
    assert correction is not None
    altered = OptimizerCorrection({k: (a * 2, b) for k, (a, b) in correction.scales.items()}, correction.eps)
    altered.save(tmp_path / "s" / CORRECTION_FILE)
    with pytest.raises(StoreCorruptedError, match="altered"):
        OptimizerCorrection.from_store(logra.GradientStore.open(tmp_path / "s"))
    from logra.cli import main

    assert main(["verify", str(tmp_path / "s")]) == 2  # `logra verify` checks the correction file too
    correction.save(tmp_path / "s" / CORRECTION_FILE)
    assert main(["verify", str(tmp_path / "s")]) == 0


# ---------------------------------------------------------------- Hugging Face Trainer checkpoints


def _trainer_checkpoint(tmp_path: Path) -> tuple[nn.Module, Any, Path]:
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))
    import common
    from transformers import Trainer, TrainingArguments

    model = common.model().train()
    arguments = TrainingArguments(
        output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True, disable_tqdm=True, max_steps=2, save_steps=2,
        save_strategy="steps", per_device_train_batch_size=3, learning_rate=1e-2, weight_decay=0.1,
    )  # fmt: skip
    trainer = Trainer(model=model, args=arguments, train_dataset=common.hf_dataset(), data_collator=common.hf_collate)
    trainer.train()  # the Trainer itself writes checkpoint-2/optimizer.pt
    return model, trainer, tmp_path / "t" / "checkpoint-2"


def test_trainer_checkpoint_moments_equal_the_live_optimizer(tmp_path: Path) -> None:
    model, trainer, ckpt = _trainer_checkpoint(tmp_path)
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert len(saved["param_groups"]) == 2 and "param_names" not in saved["param_groups"][0]  # index mapping used
    live = adam_second_moments(trainer.optimizer, model)
    loaded = trainer_second_moments(ckpt, model)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(loaded.values) == sorted(live.values) == sorted(trainable)
    for name in trainable:
        assert torch.equal(loaded.values[name], live.values[name]), name
    # the decay group comes first: with the groups swapped every shape check has to catch it
    decay = trainer.get_decay_parameter_names(model)
    with pytest.raises(ConfigError, match="groups|shape"):
        trainer_second_moments(ckpt, model, decay_parameter_names=[n for n in trainable if n not in decay])


def test_checkpoints_with_objects_are_refused_not_unpickled(tmp_path: Path) -> None:
    class Boom:
        def __reduce__(self) -> Any:
            return (print, ("executed!",))

    path = tmp_path / "optimizer.pt"
    path.write_bytes(pickle.dumps({"state": {0: Boom()}, "param_groups": []}))
    with pytest.raises(ConfigError, match="weights_only"):
        trainer_second_moments(tmp_path, build_model("mlp"))


# ---------------------------------------------------------------- mixed curvature


def _store_and_queries(tmp_path: Path) -> tuple[logra.GradientStore, logra.QueryRows, dict[str, Any]]:
    model = build_model("mlp")
    config = logra.LoGraConfig(k_in=3, k_out=2, init="orthogonal", dtype="float64")  # P Pᵀ = I: damping is λ I
    with logra.GradientLogger(model, config, store=tmp_path / "s") as logger:
        log_rows(logger, make_examples("mlp", 12, seed=2), list(range(12)), batch_size=4)
    with logra.GradientLogger(model, config, statistics=True) as q:
        _, rows = log_rows(q, make_examples("mlp", 5, seed=7), list(range(5)), batch_size=5)
        qrows = logra.QueryRows(list(range(5)), rows.double(), config, q.model_fingerprint, tuple(q.layers))
        stats = q.statistics()
    return logra.GradientStore.open(tmp_path / "s"), qrows, stats


def test_mixed_raw_inverse_is_the_dense_mixed_covariance_inverse(tmp_path: Path) -> None:
    store, queries, _ = _store_and_queries(tmp_path)
    pre, lam = mixed_preconditioner(store, queries, "raw", mix=0.3, damping=0.05)
    assert lam == 0.3
    train, q = store.rows().double(), queries.rows
    out = pre.apply(q)
    for layer in store.layers:
        cols = slice(layer.offset, layer.offset + layer.size)
        cov = 0.7 * train[:, cols].T @ train[:, cols] / len(train) + 0.3 * q[:, cols].T @ q[:, cols] / len(q)
        expected = torch.linalg.solve(cov + 0.05 * torch.eye(layer.size, dtype=torch.float64), q[:, cols].T).T
        assert_close(out[:, cols], expected, rel=1e-8)


def test_mixed_kfac_uses_mixed_kronecker_factors(tmp_path: Path) -> None:
    store, queries, stats = _store_and_queries(tmp_path)
    pre, _ = mixed_preconditioner(store, queries, "kfac", mix=0.4, query_statistics=stats, damping=0.01)
    train = store.statistics()
    out = pre.apply(queries.rows)
    for layer in store.layers:
        t, s = train[layer.name], stats[layer.name]
        a = 0.6 * t.input_sum / t.n_tokens + 0.4 * s.input_sum / s.n_tokens
        g = 0.6 * t.grad_sum / t.n_examples + 0.4 * s.grad_sum / s.n_examples
        h = torch.kron(g, a) + 0.01 * torch.eye(layer.size, dtype=torch.float64)
        cols = slice(layer.offset, layer.offset + layer.size)
        assert_close(out[:, cols], torch.linalg.solve(h, queries.rows[:, cols].T).T, rel=1e-8)


def test_mixed_ekfac_eigenvalues_mix_both_sides_moments(tmp_path: Path) -> None:
    store, queries, stats = _store_and_queries(tmp_path)
    pre, _ = mixed_preconditioner(store, queries, "ekfac", mix=0.25, query_statistics=stats)
    train = store.rows().double()
    for layer in store.layers:
        f = pre.factors[layer.name]
        q_s, q_a = f["grad_eigenvectors"], f["input_eigenvectors"]
        cols = slice(layer.offset, layer.offset + layer.size)
        m_train, m_query = (
            (q_s.T @ rows[:, cols].reshape(-1, layer.k_out, layer.k_in) @ q_a).square().mean(0)
            for rows in (train, queries.rows)
        )
        assert_close(f["eigenvalues"], 0.75 * m_train + 0.25 * m_query, rel=1e-10)


def test_automatic_mix_solves_trackstar_rule() -> None:
    train = [torch.tensor([8.0, 4.0, 2.0]), torch.tensor([1.0])]
    query = [torch.tensor([3.0, 0.0]), torch.tensor([6.0, 1.0])]
    # pooled and sorted: train 8, 4, 2, 1; query 6, 3, 1, 0; at t = 2 (fraction 0.5): 4 λ' ... λ = 4 / (4 + 3)
    lam = mixing_weight(train, query, fraction=0.5)
    assert lam == pytest.approx(4 / 7)
    assert lam * 3 == pytest.approx((1 - lam) * 4)
    with pytest.raises(ConfigError):
        mixing_weight(train, query[:1], fraction=0.5)


def test_mixed_kronecker_needs_query_statistics(tmp_path: Path) -> None:
    store, queries, _ = _store_and_queries(tmp_path)
    with pytest.raises(ConfigError, match="query_statistics"):
        mixed_preconditioner(store, queries, "ekfac")
    with pytest.raises(ConfigError, match="mix"):
        mixed_preconditioner(store, queries, "raw", mix=1.5)


# ---------------------------------------------------------------- the preset, Python API and CLI


def test_trackstar_scorer_is_the_cosine_in_the_mixed_metric(tmp_path: Path) -> None:
    from logra.presets import trackstar_config, trackstar_scorer

    model, opt = trained("mlp")
    base = logra.LoGraConfig(k_in=3, k_out=2, init="orthogonal", dtype="float64")
    config, correction = trackstar_config(model, base, adam_second_moments(opt, model), eps=EPS)
    with logra.GradientLogger(model, config, store=tmp_path / "s", correction=correction) as logger:
        log_rows(logger, make_examples("mlp", 10, seed=2), list(range(10)), batch_size=5)
    store = logra.GradientStore.open(tmp_path / "s")
    with logra.GradientLogger(model, config, correction=OptimizerCorrection.from_store(store)) as q:
        _, rows = log_rows(q, make_examples("mlp", 4, seed=6), list(range(4)), batch_size=4)
        queries = logra.QueryRows(list(range(4)), rows.double(), config, q.model_fingerprint, tuple(q.layers))
    scorer, lam = trackstar_scorer(store, queries, method="raw", mix=0.5, damping=0.02)
    assert lam == 0.5 and scorer.normalization is logra.Normalization.COSINE
    train, qr = store.rows().double(), queries.rows
    h_inv = []
    for layer in store.layers:
        cols = slice(layer.offset, layer.offset + layer.size)
        cov = 0.5 * train[:, cols].T @ train[:, cols] / len(train) + 0.5 * qr[:, cols].T @ qr[:, cols] / len(qr)
        h_inv.append(torch.linalg.inv(cov + 0.02 * torch.eye(layer.size, dtype=torch.float64)))
    h = torch.block_diag(*h_inv)
    dots = qr @ h @ train.T
    expected = dots / torch.outer((qr @ h * qr).sum(1).sqrt(), (train @ h * train).sum(1).sqrt())
    assert_close(scorer.score(queries), expected, rel=1e-6)
    plain_store = tmp_path / "plain"
    with logra.GradientLogger(model, base, store=plain_store) as logger:
        log_rows(logger, make_examples("mlp", 4, seed=2), list(range(4)), batch_size=4)
    with pytest.raises(ConfigError, match="without an optimizer correction"):
        trackstar_scorer(logra.GradientStore.open(plain_store), queries.rows, method="raw")


def test_cli_preset_trackstar_logs_the_correction_and_scores_like_the_python_api(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("transformers")
    from test_cli import LOG_ARGS, make_env
    from transformers import AutoModelForCausalLM

    from logra.cli import main
    from logra.presets import trackstar_scorer

    env = make_env(tmp_path / "env")
    model = AutoModelForCausalLM.from_pretrained(env["gpt2"])
    opt = torch.optim.AdamW(model.named_parameters(), lr=1e-2)  # saved groups carry param_names
    for seed in range(2):
        ids = torch.randint(4, model.config.vocab_size, (3, 6), generator=torch.Generator().manual_seed(seed))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    for f in Path(env["gpt2"]).glob("*token*"):
        (ckpt / f.name).write_bytes(f.read_bytes())
    torch.save(opt.state_dict(), ckpt / "optimizer.pt")
    common = ["--model", str(ckpt), *LOG_ARGS, "--preset", "trackstar", "--optimizer-state", str(ckpt)]
    assert main(["log", "--data", str(env["train"]), "--out", str(tmp_path / "s"), *common]) == 0
    query_fields = ["--prompt-field", "prompt", "--id-field", "qid"]
    assert main(["log", "--data", str(env["queries"]), "--out", str(tmp_path / "q"), *common, *query_fields]) == 0
    assert main(["log", "--data", str(env["train"]), "--out", str(tmp_path / "st"), *common, "--streaming"]) == 0
    store, qstore = logra.GradientStore.open(tmp_path / "s"), logra.GradientStore.open(tmp_path / "q")
    streamed = logra.GradientStore.open(tmp_path / "st")
    assert streamed.config == store.config and streamed.ids == store.ids
    assert_close(streamed.rows(), store.rows().double(), rel=1e-12)
    cli_model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float64)
    moments = trainer_second_moments(ckpt, cli_model)
    plain = logra.LoGraConfig.from_dict({**store.config.to_dict(), "optimizer_correction": None})
    expected_correction = OptimizerCorrection.from_moments(moments, cli_model, plain)
    assert store.config.optimizer_correction == expected_correction.fingerprint()
    matrix = tmp_path / "m.npy"
    code = main(["score", "--store", str(tmp_path / "s"), "--queries", str(env["queries"]), *query_fields,
                 "--preset", "trackstar", "--method", "ekfac", "--matrix", str(matrix)])  # fmt: skip
    assert code == 0
    scorer, _ = trackstar_scorer(store, qstore.rows(), qstore.statistics(), method="ekfac")
    expected = scorer.score(qstore).double()
    import numpy as np

    assert_close(torch.from_numpy(np.load(matrix)).double(), expected, rel=1e-5)
    no_state = ["log", "--data", str(env["train"]), "--out", str(tmp_path / "x"), "--model", str(ckpt), *LOG_ARGS]
    assert main([*no_state, "--preset", "trackstar"]) == 2  # needs --optimizer-state
    assert "optimizer-state" in capsys.readouterr().err


def test_benchmark_retraining_reproduces_the_cached_full_model_with_its_optimizer() -> None:
    """benchmarks/optimizer_parts.py takes v̂ from retraining the cached full model: it must be that model."""
    pytest.importorskip("transformers")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import tasks

    task = tasks.lm_task()
    cached, _, _ = tasks.ground_truth(task)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the cache was made
    try:
        model, opt = tasks.train_with_optimizer(task, torch.arange(task.recipe.n_train), seed=0)
    finally:
        torch.set_num_threads(threads)
    ref = cached.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, ref[key], rtol=1e-5, atol=1e-6)
    moments = adam_second_moments(opt, model)
    assert sorted(moments.values) == sorted(n for n, _ in model.named_parameters())
