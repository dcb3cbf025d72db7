"""The `logra` command line against independent batch-size-1 autograd references.

A tiny GPT-2 and a tiny BERT classifier are built from configs and saved as local Hugging Face
model directories with a word-level tokenizer made on the spot (nothing is downloaded). The
references tokenise each example alone, run plain autograd on its own loss, and project the full
weight gradient with `make_projection`, the pure function that defines the projections.
"""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from logra.capture import make_projection
from logra.capture.projection import SHARED_INPUT
from logra.cli import main
from logra.config import ProjectionInit
from logra.store import GradientStore

TRAIN = [
    "the cat sat on the mat",
    "a dog ran in the park",
    "the cat ate the fish",
    "a bird sang in the tree",
    "the dog sat on the cat",
    "fish swim in the sea",
    "the mat is red",
    "a park has a tree",
    "the sea is blue and deep",
    "birds eat fish",
]
QUERIES = [("the cat", "sat on the mat"), ("a bird", "sang in the park"), ("fish", "swim in the deep sea")]
LABELS = [0, 1, 0, 1, 0, 1, 0, 1, 1, 0]
K = 3
MAXLEN = 6


def _vocab() -> list[str]:
    words = sorted({w for t in TRAIN + [p + " " + c for p, c in QUERIES] for w in t.split()})
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *words]


def _tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocab())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(directory)


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_env(tmp_path_factory.mktemp("cli"))


def make_env(root: Path) -> dict[str, Path]:
    """A tiny GPT-2 and BERT config with tokenizers, and the train and query files, under `root`."""
    from transformers import BertConfig, GPT2Config, GPT2LMHeadModel

    n_vocab = len(_vocab())
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=16,
            n_head=2,
            n_positions=32,
            vocab_size=n_vocab,
            tie_word_embeddings=False,
            pad_token_id=0,
        )
    )
    lm.save_pretrained(root / "gpt2")
    _tokenizer(root / "gpt2")
    bert_cfg = BertConfig(
        vocab_size=n_vocab,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=24,
        max_position_embeddings=32,
        num_labels=2,
        pad_token_id=0,
    )
    bert_cfg.architectures = ["BertForSequenceClassification"]
    (root / "bert.json").write_text(bert_cfg.to_json_string())
    _tokenizer(root / "bert_tok")
    train = [{"id": f"doc{i}", "text": t, "label": LABELS[i]} for i, t in enumerate(TRAIN)]
    _write_jsonl(root / "train.jsonl", train)
    _write_jsonl(root / "queries.jsonl", [{"qid": f"q{i}", "prompt": p, "text": c} for i, (p, c) in enumerate(QUERIES)])
    return {
        "root": root,
        "gpt2": root / "gpt2",
        "bert": root / "bert.json",
        "bert_tok": root / "bert_tok",
        "train": root / "train.jsonl",
        "queries": root / "queries.jsonl",
    }


LOG_ARGS = [
    "--model-dtype",
    "float64",
    "--dtype",
    "float64",
    "--k",
    str(K),
    "--modules",
    "*mlp*",
    "--max-length",
    str(MAXLEN),
    "--id-field",
    "id",
]


def _log(env: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["log", "--model", str(env["gpt2"]), "--data", str(env["train"]), "--out", str(out), *LOG_ARGS, *extra])


def _score_queries(env: dict[str, Path], store_dir: Path, *extra: str) -> int:
    """`logra score` of the query file against `store_dir` with plain dot products."""
    query = ["--queries", str(env["queries"]), "--prompt-field", "prompt", "--id-field", "qid"]
    return main(["score", "--store", str(store_dir), *query, "--method", "identity", *extra])


# --------------------------------------------------------------------------------------------
# The reference: one example at a time, plain autograd, full gradients projected afterwards.


def _lm_and_tokenizer(env: dict[str, Path]):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(env["gpt2"], dtype=torch.float64).eval()
    return model, AutoTokenizer.from_pretrained(env["gpt2"])


def _reference_row(model, layers, ids: list[int], n_prompt: int, reduction: str) -> torch.Tensor:
    model.zero_grad()
    x = torch.tensor([ids])
    logits = model(input_ids=x).logits[0, :-1]
    token = F.cross_entropy(logits, x[0, 1:], reduction="none")[max(n_prompt - 1, 0) :]
    (token.sum() if reduction == "sum" else token.mean()).backward()
    parts = []
    for layer in layers:
        module = model.get_submodule(layer.name)
        grad = module.weight.grad.T  # Conv1D stores (n_in, n_out)
        p_in = make_projection(ProjectionInit.GAUSSIAN, 0, SHARED_INPUT, "in", layer.k_in, layer.n_in)
        p_out = make_projection(ProjectionInit.GAUSSIAN, 0, layer.name, "out", layer.k_out, layer.n_out)
        parts.append((p_out @ grad @ p_in.T).reshape(-1))
    return torch.cat(parts)


def _reference_train(env: dict[str, Path], layers, reduction: str) -> torch.Tensor:
    model, tok = _lm_and_tokenizer(env)
    return torch.stack([_reference_row(model, layers, tok(t)["input_ids"][:MAXLEN], 0, reduction) for t in TRAIN])


def _reference_queries(env: dict[str, Path], layers) -> torch.Tensor:
    model, tok = _lm_and_tokenizer(env)
    rows = []
    for prompt, text in QUERIES:
        p_ids = tok(prompt)["input_ids"]
        rows.append(
            _reference_row(
                model, layers, (p_ids + tok(text, add_special_tokens=False)["input_ids"])[:MAXLEN], len(p_ids), "mean"
            )
        )
    return torch.stack(rows)


# --------------------------------------------------------------------------------------------
# Tests.


def test_log_rows_match_per_example_autograd(env: dict[str, Path], tmp_path: Path) -> None:
    assert _log(env, tmp_path / "s", "--batch-size", "3", "--token-reduction", "sum") == 0
    store = GradientStore.open(tmp_path / "s")
    assert store.ids == [f"doc{i}" for i in range(len(TRAIN))]
    assert [layer.name for layer in store.layers] == [
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
        "transformer.h.1.mlp.c_fc",
        "transformer.h.1.mlp.c_proj",
    ]
    ref = _reference_train(env, store.layers, "sum")
    torch.testing.assert_close(store.rows(), ref, rtol=1e-9, atol=1e-12)
    settings = json.loads((tmp_path / "s" / "logra-cli.json").read_text())
    assert settings["task"] == "causal_lm" and settings["max_length"] == MAXLEN


def test_resume_continues_to_the_same_store(env: dict[str, Path], tmp_path: Path) -> None:
    assert _log(env, tmp_path / "full", "--batch-size", "4") == 0
    assert _log(env, tmp_path / "part", "--batch-size", "3", "--limit", "4", "--shard-rows", "2") == 0
    assert _log(env, tmp_path / "part", "--batch-size", "3", "--resume", "--shard-rows", "2") == 0
    full, part = GradientStore.open(tmp_path / "full"), GradientStore.open(tmp_path / "part")
    assert sorted(part.ids) == sorted(full.ids) and len(part.manifest.shards) > 1
    order = [part.ids.index(i) for i in full.ids]
    torch.testing.assert_close(part.rows()[order], full.rows(), rtol=1e-10, atol=1e-13)


def test_score_matrix_and_topk_match_reference(env: dict[str, Path], tmp_path: Path) -> None:
    store_dir = tmp_path / "s"
    assert _log(env, store_dir) == 0
    out = ["--top-k", "3", "--out", str(tmp_path / "top.csv"), "--matrix", str(tmp_path / "m.npy")]
    code = _score_queries(env, store_dir, *out)
    assert code == 0
    store = GradientStore.open(store_dir)
    expected = (_reference_queries(env, store.layers) @ _reference_train(env, store.layers, "mean").T).numpy()
    matrix = np.load(tmp_path / "m.npy")
    np.testing.assert_allclose(matrix, expected, rtol=1e-5, atol=1e-7 * np.abs(expected).max())
    meta = json.loads((tmp_path / "m.npy.json").read_text())
    assert meta["query_ids"] == ["q0", "q1", "q2"]
    with open(tmp_path / "top.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 * 2 * 3
    for q in range(3):
        helpful = [r["train_id"] for r in rows if r["query_id"] == f"q{q}" and r["direction"] == "helpful"]
        harmful = [r["train_id"] for r in rows if r["query_id"] == f"q{q}" and r["direction"] == "harmful"]
        assert helpful == [f"doc{j}" for j in np.argsort(-expected[q])[:3]]
        assert harmful == [f"doc{j}" for j in np.argsort(expected[q])[:3]]


def test_fit_then_self_influence_is_the_diagonal_of_train_scores(env: dict[str, Path], tmp_path: Path) -> None:
    store_dir = tmp_path / "s"
    assert _log(env, store_dir) == 0
    assert main(["fit", str(store_dir), "--method", "kfac"]) == 0
    assert (store_dir / "preconditioner-kfac" / "preconditioner.json").is_file()
    assert main(["self-influence", "--store", str(store_dir), "--out", str(tmp_path / "si.jsonl")]) == 0
    assert (
        main(["score", "--store", str(store_dir), "--queries", str(env["train"]), "--matrix", str(tmp_path / "m.npy")])
        == 0
    )
    si = [json.loads(line) for line in (tmp_path / "si.jsonl").read_text().splitlines()]
    values = np.array([r["self_influence"] for r in si])
    np.testing.assert_allclose(values, np.diag(np.load(tmp_path / "m.npy")), rtol=1e-5)
    assert sorted(r["rank"] for r in si) == list(range(1, len(TRAIN) + 1))
    assert min(si, key=lambda r: r["rank"])["self_influence"] == values.max()


@pytest.mark.parametrize("fmt", ["csv", "parquet", "disk"])
def test_every_dataset_format_gives_the_same_store(env: dict[str, Path], tmp_path: Path, fmt: str) -> None:
    import datasets

    data = datasets.load_dataset("json", data_files=str(env["train"]), split="train")
    path = tmp_path / f"train.{fmt}"
    {
        "csv": lambda: data.to_csv(str(path), index=False),
        "parquet": lambda: data.to_parquet(str(path)),
        "disk": lambda: data.save_to_disk(str(path)),
    }[fmt]()
    assert main(["log", "--model", str(env["gpt2"]), "--data", str(path), "--out", str(tmp_path / "s"), *LOG_ARGS]) == 0
    assert _log(env, tmp_path / "ref") == 0
    a, b = GradientStore.open(tmp_path / "s"), GradientStore.open(tmp_path / "ref")
    assert a.ids == b.ids
    torch.testing.assert_close(a.rows(), b.rows(), rtol=0, atol=0)


def test_classification_from_a_config_matches_reference(env: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    code = main(
        [
            "log",
            "--model",
            str(env["bert"]),
            "--tokenizer",
            str(env["bert_tok"]),
            "--init-seed",
            "3",
            "--data",
            str(env["train"]),
            "--label-field",
            "label",
            "--out",
            str(tmp_path / "s"),
            "--model-dtype",
            "float64",
            "--dtype",
            "float64",
            "--k",
            "3",
            "--modules",
            "*intermediate.dense",
            "classifier",
        ]
    )
    assert code == 0
    store = GradientStore.open(tmp_path / "s")
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_config(
        AutoConfig.from_pretrained(env["bert"]), dtype=torch.float64
    ).eval()
    tok = AutoTokenizer.from_pretrained(env["bert_tok"])
    for i, text in enumerate(TRAIN):
        model.zero_grad()
        logits = model(input_ids=torch.tensor([tok(text)["input_ids"]])).logits
        F.cross_entropy(logits, torch.tensor([LABELS[i]])).backward()
        parts = []
        for layer in store.layers:
            p_in = make_projection(ProjectionInit.GAUSSIAN, 0, SHARED_INPUT, "in", layer.k_in, layer.n_in)
            p_out = make_projection(ProjectionInit.GAUSSIAN, 0, layer.name, "out", layer.k_out, layer.n_out)
            parts.append((p_out @ model.get_submodule(layer.name).weight.grad @ p_in.T).reshape(-1))
        torch.testing.assert_close(store.rows(i, i + 1)[0], torch.cat(parts), rtol=1e-9, atol=1e-12)


def test_report_and_verify(env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    store_dir = tmp_path / "s"
    assert _log(env, store_dir) == 0
    assert _score_queries(env, store_dir, "--matrix", str(tmp_path / "m.npy")) == 0
    assert main(["report", "--scores", str(tmp_path / "m.npy"), "--out", str(tmp_path / "r.html"), "--top-k", "2"]) == 0
    page = (tmp_path / "r.html").read_text()
    assert page.count('<section class="query"') == 3 and "<b>a bird</b>sang in the park" in page
    best = TRAIN[int(np.argmax(np.load(tmp_path / "m.npy")[0]))]
    assert "most helpful" in capsys.readouterr().out
    assert best.split()[-1] in page
    assert main(["verify", str(store_dir)]) == 0
    shard = next(store_dir.glob("shard-*.bin"))
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    assert main(["verify", str(store_dir)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err


def test_report_tokens_shares_sum_to_the_matrix_scores(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store_dir, matrix = tmp_path / "s", tmp_path / "m.npy"
    assert _log(env, store_dir) == 0
    assert main(["fit", str(store_dir), "--method", "ekfac"]) == 0
    query = ["--queries", str(env["queries"]), "--prompt-field", "prompt", "--id-field", "qid"]
    score = ["score", "--store", str(store_dir), *query, "--method", "ekfac", "--normalization", "relative"]
    assert main([*score, "--matrix", str(matrix)]) == 0
    assert main(["report", "--scores", str(matrix), "--out", str(tmp_path / "r.html"), "--top-k", "2", "--tokens"]) == 0
    page = (tmp_path / "r.html").read_text()
    scores = np.load(matrix)
    store = GradientStore.open(store_dir)
    sections = page.split('<section class="query"')[1:]
    assert len(sections) == 3
    checked = 0
    for q, section in enumerate(sections):
        for item in re.findall(r"<li>(.*?)</li>", section, flags=re.S):
            doc = re.search(r'class="id">\[([^\]]+)\]', item).group(1)
            own, _, explained = item.partition("query tokens this document explains")
            expected = scores[q, store.ids.index(doc)]
            for part in (own, explained):
                shares = [float(v) for v in re.findall(r'data-share="([^"]+)"', part)]
                assert shares and abs(sum(shares) - expected) <= 1e-3 * np.abs(scores[q]).max()
            checked += 1
    assert checked == 3 * 4
    # A matrix scored with a damping the report cannot recompute is refused, not coloured wrongly.
    assert main([*score, "--damping", "1e-9", "--matrix", str(matrix)]) == 0
    capsys.readouterr()
    assert main(["report", "--scores", str(matrix), "--out", str(tmp_path / "x.html"), "--tokens"]) == 2
    assert "token shares of document" in capsys.readouterr().err


def test_errors_exit_2_with_a_clear_message(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def log(out: str, *extra: str, model: Path = env["gpt2"], data: Path = env["train"]) -> list[str]:
        return ["log", "--model", str(model), "--data", str(data), "--out", str(tmp_path / out), *extra]

    cases = [
        (log("a", data=tmp_path / "nope.jsonl"), "does not exist"),
        (log("b", "--text-field", "body"), "'body' is not a column"),
        (log("c", model=tmp_path), "neither a Hugging Face"),
        (log("d", "--modules", "*nothing*"), "matches no supported layer"),
        (["verify", str(tmp_path / "missing")], "not a gradient store"),
        (["score", "--store", str(tmp_path / "missing"), "--queries", str(env["queries"])], "pass --out"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert f"logra {argv[0]}: error:" in err and message in err, err
    assert _log(env, tmp_path / "s") == 0
    assert _log(env, tmp_path / "s") == 2
    assert "--resume" in capsys.readouterr().err
    other = tmp_path / "other"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(env["gpt2"])
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight.add_(0.1)
    model.save_pretrained(other)
    _tokenizer(other)
    argv = [
        "score",
        "--store",
        str(tmp_path / "s"),
        "--queries",
        str(env["queries"]),
        "--model",
        str(other),
        "--id-field",
        "qid",
        "--matrix",
        str(tmp_path / "m.npy"),
    ]
    assert main(argv) == 2
    assert "is not the one the store" in capsys.readouterr().err


@pytest.mark.parametrize(
    "command", ["log", "fit", "score", "self-influence", "report", "confirm", "validate", "verify"]
)
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    assert f"usage: logra {command}" in capsys.readouterr().out


@pytest.mark.subprocess
def test_installed_entry_point_runs() -> None:
    exe = Path(sys.executable).with_name("logra")
    done = subprocess.run([str(exe), "verify", "/nonexistent/store"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "not a gradient store" in done.stderr
    done = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and all(
        c in done.stdout for c in ("log", "fit", "score", "self-influence", "report", "verify")
    )


def test_fit_with_the_true_fisher_of_a_classifier(env: dict[str, Path], tmp_path: Path) -> None:
    """`logra fit --fisher true` reruns the logged model on the logged data: for the classifier head
    (2 classes, so k_out = 2 is the identity) S is exactly mean_i (diag p_i - p_i p_iᵀ), with p_i
    from each text alone; the saved preconditioner says fisher 'true'."""
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from logra.curvature import load_preconditioner

    store_dir = tmp_path / "s"
    bert = ["--model", str(env["bert"]), "--tokenizer", str(env["bert_tok"]), "--init-seed", "3"]
    log = ["log", *bert, "--data", str(env["train"]), "--label-field", "label", "--out", str(store_dir)]
    assert main([*log, "--model-dtype", "float64", "--dtype", "float64", "--k", "3", "--modules", "classifier"]) == 0
    assert main(["fit", str(store_dir), "--fisher", "true", "--batch-size", "4", "--out", str(tmp_path / "p")]) == 0
    pre = load_preconditioner(tmp_path / "p")
    assert pre.fisher.value == "true"
    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_config(
        AutoConfig.from_pretrained(env["bert"]), dtype=torch.float64
    ).eval()
    tok = AutoTokenizer.from_pretrained(env["bert_tok"])
    p = torch.cat([model(input_ids=torch.tensor([tok(t)["input_ids"]])).logits.softmax(-1) for t in TRAIN]).detach()
    expected = (torch.diag_embed(p) - p[:, :, None] * p[:, None, :]).mean(0)
    f = pre.factors["classifier"]
    got = f["grad_eigenvectors"] @ torch.diag(f["grad_eigenvalues"]) @ f["grad_eigenvectors"].T
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_fit_with_the_true_fisher_needs_the_logged_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import logra

    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with logra.GradientLogger(model, logra.LoGraConfig(k_in=2, k_out=2), store=tmp_path / "s") as logger:
        with logger.record(ids=[0, 1]):
            model(torch.randn(2, 3)).sum().backward()
    assert main(["fit", str(tmp_path / "s"), "--fisher", "true"]) == 2
    assert "--fisher empirical" in capsys.readouterr().err


def test_true_fisher_of_a_regression_head_is_refused() -> None:
    from logra.errors import ConfigError
    from logra.losses import likelihood_logits

    head = torch.nn.Linear(4, 1)
    with pytest.raises(ConfigError, match="'regression'.*empirical Fisher"):
        likelihood_logits(head, torch.randn(3, 1), torch.randn(3), "sequence_classification")


def test_fit_with_the_true_fisher_of_a_causal_lm(env: dict[str, Path], tmp_path: Path) -> None:
    """A causal LM samples labels per token (mean token loss weights); the fit is the true Fisher's."""
    from logra.curvature import load_preconditioner

    store_dir = tmp_path / "s"
    assert _log(env, store_dir) == 0
    args = ["fit", str(store_dir), "--fisher", "true", "--fisher-samples", "2", "--method", "ekfac"]
    assert main([*args, "--out", str(tmp_path / "p")]) == 0
    assert load_preconditioner(tmp_path / "p").fisher.value == "true"


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_likelihood_weights_give_back_the_causal_lm_loss(reduction: str) -> None:
    from logra.losses import causal_lm_loss, likelihood_logits

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 7, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 7, (3, 5), generator=gen)
    labels[0, 3:] = -100
    labels[2, :] = -100  # no target at all: loss 0
    head = torch.nn.Linear(2, 2)
    out, weights = likelihood_logits(head, logits, labels, "causal_lm", reduction)
    ce = F.cross_entropy(out.reshape(-1, 7), labels[:, 1:].clamp(min=0).reshape(-1), reduction="none")
    got = (ce.reshape(3, 4) * weights).sum(1)
    torch.testing.assert_close(got, causal_lm_loss(logits, labels, reduction=reduction), rtol=1e-12, atol=1e-14)
