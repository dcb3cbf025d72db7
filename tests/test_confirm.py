"""`logra.confirm.fine_tune_gains` and `logra confirm` against hand-written fine-tuning.

The reference deep-copies the model and runs Adam or SGD written out by hand (not torch.optim)
in float64 on one candidate at a time; the gains must match it, be invariant to the order of
the candidates and the batching of the queries, reduce to lr · g_qᵀ g_c for one small SGD step,
and leave the model exactly as it was (weights, gradients, requires_grad, training mode), also
when a candidate fails.
"""

from __future__ import annotations

import copy
import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cli import LOG_ARGS, MAXLEN, TRAIN, _log, _score_queries, make_env
from torch import nn

from logra.cli import main
from logra.cli.confirm_command import _trained
from logra.confirm import FineTuneError, fine_tune_gains
from logra.errors import ConfigError
from logra.store import GradientStore


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.5), nn.Linear(6, 3)).double()


def _loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")  # (B,)


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (n,), generator=g)


def _candidates(n: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    x, y = _data(n, 1)
    return [(x[i : i + 1], y[i : i + 1]) for i in range(n)]


def _reference(model, candidates, queries, *, steps, lr, optimizer, names=None) -> torch.Tensor:
    """(Q, C) by hand: a copy of the model per candidate, Adam/SGD written out, float64."""
    base = copy.deepcopy(model).eval()
    with torch.no_grad():
        before = _loss(base, queries)
    out = torch.empty(len(before), len(candidates), dtype=torch.float64)
    for c, batch in enumerate(candidates):
        net = copy.deepcopy(base)
        params = [p.requires_grad_(True) for n, p in net.named_parameters() if names is None or n in names]
        m = [torch.zeros_like(p) for p in params]
        v = [torch.zeros_like(p) for p in params]
        for t in range(1, steps + 1):
            grads = torch.autograd.grad(_loss(net, batch).sum(), params)
            with torch.no_grad():
                for i, (p, g) in enumerate(zip(params, grads)):
                    if optimizer == "sgd":
                        p -= lr * g
                        continue
                    m[i] = 0.9 * m[i] + 0.1 * g
                    v[i] = 0.999 * v[i] + 0.001 * g * g
                    p -= lr * (m[i] / (1 - 0.9**t)) / ((v[i] / (1 - 0.999**t)).sqrt() + 1e-8)
        with torch.no_grad():
            out[:, c] = before - _loss(net, queries)
    return out


@pytest.mark.parametrize(("optimizer", "steps", "lr"), [("adam", 5, 1e-2), ("sgd", 3, 0.3), ("adam", 1, 1e-3)])
def test_gains_match_hand_written_fine_tuning(optimizer: str, steps: int, lr: float) -> None:
    model, candidates, queries = _model(), _candidates(), _data(5, 2)
    gains = fine_tune_gains(
        model, candidates, [queries], _loss, steps=steps, lr=lr, optimizer=optimizer, progress=False
    )
    expected = _reference(model, candidates, queries, steps=steps, lr=lr, optimizer=optimizer)
    assert gains.shape == (5, 4) and gains.dtype == torch.float64
    torch.testing.assert_close(gains, expected, rtol=1e-10, atol=1e-12)
    assert gains.abs().min() > 0  # every candidate moved every query


def test_only_the_given_parameters_are_trained() -> None:
    model, candidates, queries = _model(), _candidates(), _data(5, 2)
    model.requires_grad_(False)  # given parameters are trained whatever their requires_grad
    params = [model[3].weight]
    gains = fine_tune_gains(model, candidates, [queries], _loss, lr=1e-2, parameters=params, progress=False)
    expected = _reference(model, candidates, queries, steps=5, lr=1e-2, optimizer="adam", names={"3.weight"})
    torch.testing.assert_close(gains, expected, rtol=1e-10, atol=1e-12)
    assert not any(p.requires_grad for p in model.parameters())


def test_invariant_to_candidate_order_and_query_batching() -> None:
    model, candidates, queries = _model(), _candidates(5), _data(6, 2)
    gains = fine_tune_gains(model, candidates, [queries], _loss, lr=1e-2, progress=False)
    perm = [3, 0, 4, 1, 2]
    x, y = queries
    split = [(x[:1], y[:1]), (x[1:4], y[1:4]), (x[4:], y[4:])]
    again = fine_tune_gains(model, [candidates[i] for i in perm], split, _loss, lr=1e-2, progress=False)
    torch.testing.assert_close(again, gains[:, perm], rtol=1e-12, atol=1e-14)


def test_one_small_sgd_step_is_lr_times_the_gradient_dot_product() -> None:
    """The first-order limit influence scores approximate: gain = lr g_qᵀ g_c + O(lr²)."""
    model, candidates, queries = _model(), _candidates(), _data(3, 2)
    lr = 1e-6
    gains = fine_tune_gains(model, candidates, [queries], _loss, steps=1, lr=lr, optimizer="sgd", progress=False)
    params = list(model.eval().parameters())

    def flat(loss: torch.Tensor) -> torch.Tensor:
        return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])

    x, y = queries
    g_q = torch.stack([flat(_loss(model, (x[i : i + 1], y[i : i + 1])).sum()) for i in range(3)])
    g_c = torch.stack([flat(_loss(model, c).sum()) for c in candidates])
    torch.testing.assert_close(gains / lr, g_q @ g_c.T, rtol=1e-4, atol=1e-8)


def test_the_model_is_left_exactly_as_it_was_also_after_a_failing_candidate() -> None:
    model = _model().train()
    model[3].weight.requires_grad_(False)
    model[0].weight.grad = torch.full_like(model[0].weight, 7.0)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    candidates = _candidates(3)
    fine_tune_gains(model, candidates, [_data(2, 2)], _loss, lr=1e-2, progress=False)
    bad = (torch.full((1, 4), float("inf"), dtype=torch.float64), torch.tensor([0]))
    with pytest.raises(FineTuneError, match="candidate 1: its loss is nan at fine-tuning step 1 of 5"):
        fine_tune_gains(model, [candidates[0], bad, candidates[2]], [_data(2, 2)], _loss, lr=1e-2, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(m.training for m in model.modules())
    assert not model[3].weight.requires_grad and model[0].weight.requires_grad
    assert torch.equal(model[0].weight.grad, torch.full_like(model[0].weight, 7.0)) and model[3].bias.grad is None


def test_bad_arguments_name_the_value_and_the_fix() -> None:
    model, candidates, queries = _model(), _candidates(2), [_data(2, 2)]
    cases = [
        (dict(steps=0), "steps=0 must be an integer >= 1"),
        (dict(steps=True), "steps=True must be an integer >= 1"),
        (dict(lr=float("nan")), "lr=nan must be a finite number > 0"),
        (dict(lr=-1e-3), "lr=-0.001 must be a finite number > 0"),
        (dict(optimizer="lion"), "optimizer='lion' is not one of 'adam', 'sgd'"),
        (dict(parameters=[nn.Parameter(torch.zeros(2))]), r"parameters \[0\] \(by position\) are not parameters"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ConfigError, match=message):
            fine_tune_gains(model, candidates, queries, _loss, progress=False, **kwargs)
    with pytest.raises(ConfigError, match="candidates must be a sequence of batches \\(a list\\), not generator"):
        fine_tune_gains(model, (c for c in candidates), queries, _loss, progress=False)
    with pytest.raises(ConfigError, match=r"pairs\[1\] is 0, not a list of query-batch positions"):
        fine_tune_gains(model, candidates, queries, _loss, pairs=[[0], 0], progress=False)
    gains = fine_tune_gains(model, candidates, queries, _loss, lr=np.float32(1e-2), progress=False)
    assert torch.isfinite(gains).all()  # a numpy learning rate is a number
    with pytest.raises(ConfigError, match="candidates must be a non-empty sequence of batches"):
        fine_tune_gains(model, [], queries, _loss, progress=False)
    with pytest.raises(ConfigError, match="queries must be a non-empty sequence of batches"):
        fine_tune_gains(model, candidates, queries[0][0], _loss, progress=False)
    with pytest.raises(ConfigError, match="nothing to fine-tune"):
        fine_tune_gains(model.requires_grad_(False), candidates, queries, _loss, progress=False)


def test_a_tied_weight_is_untied_so_only_the_matched_modules_train() -> None:
    class Tied(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(5, 3)
            self.head = nn.Linear(3, 5, bias=False)
            self.head.weight = self.embed.weight

    model = Tied()
    before = model.embed.weight.detach().clone()
    params, untied = _trained(model, ["head"])
    assert untied == ["head.weight"] and len(params) == 1 and params[0] is model.head.weight
    assert model.head.weight is not model.embed.weight and torch.equal(model.head.weight, before)
    both, untied = _trained(Tied(), ["head", "embed"])  # both matched: they stay one weight
    assert untied == [] and len(both) == 1
    with pytest.raises(ConfigError, match=r"--train-modules \['nothing'\] match no module"):
        _trained(model, ["nothing"])


# --------------------------------------------------------------------------------------------
# `logra confirm` on a tiny GPT-2 (tests/test_cli.py's environment), against the hand-written loop.


def _lm_loss(model, ids: list[int], n_prompt: int) -> torch.Tensor:
    x = torch.tensor([ids])
    token = F.cross_entropy(model(input_ids=x).logits[0, :-1], x[0, 1:], reduction="none")
    return token[max(n_prompt - 1, 0) :].mean()


def test_cli_confirm_ranks_each_querys_top_k_by_hand_written_fine_tuning(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    env = make_env(tmp_path / "env")
    store_dir, matrix, out = tmp_path / "s", tmp_path / "m.npy", tmp_path / "confirmed.csv"
    assert _log(env, store_dir) == 0 and LOG_ARGS[1] == "float64"
    assert _score_queries(env, store_dir, "--matrix", str(matrix)) == 0
    cmd = ["confirm", "--scores", str(matrix), "--out", str(out), "--top-k", "3", "--steps", "2", "--lr", "1e-2"]
    assert main([*cmd, "--train-modules", "transformer.h.1.*"]) == 0
    rows = list(csv.DictReader(out.open()))
    meta = json.loads(Path(str(out) + ".json").read_text())
    assert meta["candidates"] == len({r["train_id"] for r in rows}) and meta["recipe"]["steps"] == 2
    assert "training's first candidate is the score's first for" in capsys.readouterr().out

    model = AutoModelForCausalLM.from_pretrained(env["gpt2"], dtype=torch.float64).eval()
    tok = AutoTokenizer.from_pretrained(env["gpt2"])
    queries = [json.loads(line) for line in env["queries"].read_text().splitlines()]
    scores = np.load(matrix)
    ids = GradientStore.open(store_dir).ids
    names = {n for n, _ in model.named_parameters() if n.startswith("transformer.h.1.")}
    for q, query in enumerate(queries):
        p_ids = tok(query["prompt"])["input_ids"]
        q_ids = (p_ids + tok(query["text"], add_special_tokens=False)["input_ids"])[:MAXLEN]
        mine = [r for r in rows if r["query_id"] == query["qid"]]
        assert [r["rank"] for r in mine] == ["1", "2", "3"]
        top = [ids[i] for i in np.argsort(-scores[q], kind="stable")[:3]]
        assert sorted(r["train_id"] for r in mine) == sorted(top)
        for r in mine:
            net = copy.deepcopy(model)
            params = [p for n, p in net.named_parameters() if n in names]
            opt_m = [torch.zeros_like(p) for p in params]
            opt_v = [torch.zeros_like(p) for p in params]
            doc = tok(TRAIN[int(r["train_id"].removeprefix("doc"))])["input_ids"][:MAXLEN]
            for t in (1, 2):
                grads = torch.autograd.grad(_lm_loss(net, doc, 0), params)
                with torch.no_grad():
                    for i, (p, g) in enumerate(zip(params, grads)):
                        opt_m[i] = 0.9 * opt_m[i] + 0.1 * g
                        opt_v[i] = 0.999 * opt_v[i] + 0.001 * g * g
                        p -= 1e-2 * (opt_m[i] / (1 - 0.9**t)) / ((opt_v[i] / (1 - 0.999**t)).sqrt() + 1e-8)
            with torch.no_grad():
                gain = float(_lm_loss(model, q_ids, len(p_ids)) - _lm_loss(net, q_ids, len(p_ids)))
            assert abs(float(r["gain"]) - gain) <= 1e-9 * max(abs(gain), 1e-3), (r, gain)
            assert int(r["score_rank"]) == top.index(r["train_id"]) + 1
        assert [float(r["gain"]) for r in mine] == sorted((float(r["gain"]) for r in mine), reverse=True)


def test_cli_confirm_refuses_bad_input_without_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    env = make_env(tmp_path / "env")
    store_dir, matrix = tmp_path / "s", tmp_path / "m.npy"
    assert _log(env, store_dir) == 0
    assert _score_queries(env, store_dir, "--matrix", str(matrix)) == 0
    base = ["confirm", "--scores", str(matrix), "--out", str(tmp_path / "c.csv")]

    def run(argv: list[str]) -> int:
        try:
            return main(argv)
        except SystemExit as exc:  # argparse's usage errors: one line, status 2
            return int(exc.code or 0)

    for extra, message in [
        (["--lr", "nan"], "argument --lr: 'nan' must be a finite number > 0"),
        (["--steps", "0"], "argument --steps: 0 must be a positive int"),
        (["--train-modules", "nope*"], "--train-modules ['nope*'] match no module"),
    ]:
        assert run([*base, *extra]) == 2, extra
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(line + "\n" for line in env["train"].read_text().splitlines()[:1]))
    assert main([*base, "--data", str(fewer)]) == 2
    assert "are in the store but not in the training data read from" in capsys.readouterr().err
    assert main(["confirm", "--scores", str(tmp_path / "none.npy"), "--out", str(tmp_path / "c.csv")]) == 2
    assert "write them with `logra score --matrix" in capsys.readouterr().err
    assert main([*base[:-1], str(tmp_path / "c.txt")]) == 2
    assert "must end in .csv, .jsonl or .parquet" in capsys.readouterr().err
    bad = np.load(matrix)
    bad[1, 2] = np.nan
    np.save(matrix, bad)
    assert main(base) == 2
    assert "holds nan at query 1, column 2 (1 non-finite scores)" in capsys.readouterr().err
    assert not (tmp_path / "c.csv").exists()


def test_pairs_measure_only_the_chosen_query_batches() -> None:
    model, candidates, queries = _model(), _candidates(3), _data(5, 2)
    x, y = queries
    split = [(x[:2], y[:2]), (x[2:3], y[2:3]), (x[3:], y[3:])]
    full = fine_tune_gains(model, candidates, split, _loss, lr=1e-2, progress=False)
    some = fine_tune_gains(model, candidates, split, _loss, lr=1e-2, pairs=[[2], [], [0, 2, 0]], progress=False)
    measured = torch.zeros(5, 3, dtype=torch.bool)
    measured[3:, 0] = measured[:2, 2] = measured[3:, 2] = True
    assert torch.equal(some[measured], full[measured]) and some[~measured].isnan().all()
    for pairs, message in [
        ([[0]], "one list of query-batch positions per candidate \\(3\\)"),
        ([[0], [3], []], r"pairs\[1\] holds \[3\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            fine_tune_gains(model, candidates, split, _loss, pairs=pairs, progress=False)


def test_a_non_finite_update_or_query_loss_is_named_and_the_model_restored() -> None:
    model, candidates, queries = _model(), _candidates(2), [_data(2, 2)]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    hook = model[0].weight.register_hook(lambda g: g * float("nan"))  # a backward that returns NaN
    with pytest.raises(FineTuneError, match=r"candidate 0: query batch 0's loss is \[nan, nan\] after 1"):
        fine_tune_gains(model, candidates, queries, _loss, steps=1, lr=1e-2, progress=False)
    with pytest.raises(FineTuneError, match="candidate 0: its loss is nan at fine-tuning step 2 of 5"):
        fine_tune_gains(model, candidates, queries, _loss, lr=1e-2, progress=False)
    hook.remove()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    x, y = queries[0]
    bad = [(x.clone().fill_(float("nan")), y)]
    with pytest.raises(ConfigError, match=r"query batch 0's loss is \[nan, nan\] at the model's weights"):
        fine_tune_gains(model, candidates, bad, _loss, lr=1e-2, progress=False)


def test_report_shows_each_querys_shortlist_by_gain_and_refuses_other_scores(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    env = make_env(tmp_path / "env")
    store_dir, matrix, out = tmp_path / "s", tmp_path / "m.npy", tmp_path / "c.jsonl"
    assert _log(env, store_dir) == 0
    assert _score_queries(env, store_dir, "--matrix", str(matrix)) == 0
    assert main(["confirm", "--scores", str(matrix), "--out", str(out), "--top-k", "3", "--lr", "1e-2"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    page_path = tmp_path / "r.html"
    capsys.readouterr()
    assert main(["report", "--scores", str(matrix), "--out", str(page_path), "--confirmed", str(out)]) == 0
    assert "confirmed by fine-tuning (5 adam steps at lr 0.01):" in capsys.readouterr().out
    sections = page_path.read_text().split('<section class="query"')[1:]
    for q, section in enumerate(sections):
        block = section.split("<h3>Confirmed by fine-tuning</h3>")[1]
        shown = re.findall(r'class="id">\[([^\]]+)\]', block)
        assert shown == [r["train_id"] for r in rows if r["query_id"] == f"q{q}"]  # in gain order
        assert "Each of the top 3 helpful documents trained on alone" in block
    # Scores of another preconditioner: the confirmed table is not theirs.
    assert main(["fit", str(store_dir), "--method", "kfac"]) == 0
    assert _score_queries(env, store_dir, "--matrix", str(matrix), "--method", "kfac") == 0
    assert main(["report", "--scores", str(matrix), "--out", str(page_path), "--confirmed", str(out)]) == 2
    assert "confirmed another score matrix" in capsys.readouterr().err
    (tmp_path / "broken.csv").write_text("query_id,rank\nq0,x\n")
    (tmp_path / "broken.csv.json").write_text(Path(str(out) + ".json").read_text())
    assert (
        main(["report", "--scores", str(matrix), "--out", str(page_path), "--confirmed", str(tmp_path / "broken.csv")])
        == 2
    )
    assert "not a table of `logra confirm`" in capsys.readouterr().err


def test_cli_confirm_on_a_classifier_built_from_a_config(tmp_path: Path) -> None:
    """A sequence classifier (labels, no prompt): the candidates' gains are the hand-written loop's."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    env = make_env(tmp_path / "env")
    store_dir, matrix, out = tmp_path / "s", tmp_path / "m.npy", tmp_path / "c.csv"
    model_args = ["--model", str(env["bert"]), "--tokenizer", str(env["bert_tok"]), "--init-seed", "3"]
    log = ["log", *model_args, "--data", str(env["train"]), "--label-field", "label", "--id-field", "id"]
    assert main([*log, "--out", str(store_dir), "--model-dtype", "float64", "--k", "3", "--max-length", "8"]) == 0
    assert main(["score", "--store", str(store_dir), "--queries", str(env["train"]), "--label-field", "label",
                 "--id-field", "id", "--limit", "2", "--matrix", str(matrix)]) == 0  # fmt: skip
    assert main(["confirm", "--scores", str(matrix), "--out", str(out), "--top-k", "2", "--optimizer", "sgd",
                 "--lr", "0.5", "--steps", "1", "--train-modules", "classifier"]) == 0  # fmt: skip
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 4 and all(np.isfinite(float(r["gain"])) for r in rows)
    from transformers import AutoTokenizer

    torch.manual_seed(3)
    cfg = AutoConfig.from_pretrained(env["bert"])
    model = AutoModelForSequenceClassification.from_config(cfg, dtype=torch.float64).eval()
    assert len(GradientStore.open(store_dir)) == len(TRAIN)
    tok = AutoTokenizer.from_pretrained(env["bert_tok"])
    labels = json.loads("[" + ",".join(env["train"].read_text().splitlines()) + "]")

    def loss(net: nn.Module, i: int) -> torch.Tensor:
        enc = tok(labels[i]["text"], truncation=True, max_length=8, return_tensors="pt")
        return F.cross_entropy(net(**enc).logits, torch.tensor([labels[i]["label"]]))

    for r in rows:
        q, d = (int(r[c].removeprefix("doc")) for c in ("query_id", "train_id"))
        net = copy.deepcopy(model)
        params = list(net.classifier.parameters())
        grads = torch.autograd.grad(loss(net, d), params)
        with torch.no_grad():
            for p, g in zip(params, grads):
                p -= 0.5 * g
            gain = float(loss(model, q) - loss(net, q))
        assert abs(float(r["gain"]) - gain) <= 1e-9 * max(abs(gain), 1e-3), (r, gain)
