"""Every `logra` subcommand against a table of bad inputs: status 2, one error line, no traceback.

Issue 13, defect classes 4 and 8 on the command line: broken and empty data files, ids that are
not ids, a pickled model, positions beyond the model's, edited settings and preconditioners,
malformed score matrices, full disks (a tmpfs where mountable, else a simulated ENOSPC) for
every writing subcommand, and silent acceptance turned into refusals or warnings.
"""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _disk import FullDisk, tmpfs_allowed
from test_cli import LOG_ARGS, _write_jsonl, make_env

from logra.cli import main

Argv = Callable[[dict[str, Path], Path], list[str]]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    """(exit status, stderr) of `logra argv`; usage errors exit through SystemExit."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 2
    return code, capsys.readouterr().err


def assert_one_error_line(code: int, err: str, message: str, argv: list[str]) -> None:
    assert code == 2, (argv, err)
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and lines[0] == err.rstrip("\n").splitlines()[-1], err
    assert message in lines[0], (message, lines[0])


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_env(tmp_path_factory.mktemp("cli-hostile"))


@pytest.fixture(scope="module")
def store(env: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A logged store with a saved kfac preconditioner and a score matrix."""
    out = tmp_path_factory.mktemp("hostile-cli") / "store"
    train = ["log", "--model", str(env["gpt2"]), "--data", str(env["train"]), "--out", str(out), *LOG_ARGS]
    assert main(train) == 0
    assert main(["fit", str(out)]) == 0
    query = ["--queries", str(env["queries"]), "--prompt-field", "prompt", "--id-field", "qid"]
    assert main(["score", "--store", str(out), *query, "--matrix", str(out.parent / "m.npy")]) == 0
    return out


def _copy_store(store: Path, tmp: Path) -> Path:
    import shutil

    return Path(shutil.copytree(store, tmp / "copy"))


def _log(env: dict[str, Path], tmp: Path, data: Path, *extra: str) -> list[str]:
    return ["log", "--model", str(env["gpt2"]), "--data", str(data), "--out", str(tmp / "out"), *LOG_ARGS, *extra]


def _text(tmp: Path, name: str, text: str) -> Path:
    (tmp / name).write_text(text, encoding="utf-8", errors="surrogatepass")
    return tmp / name


def _pickled_model(env: dict[str, Path], tmp: Path) -> Path:
    model = tmp / "pickled"
    model.mkdir()
    for f in env["gpt2"].iterdir():
        if f.suffix not in (".safetensors", ".bin"):
            (model / f.name).write_bytes(f.read_bytes())
    (model / "pytorch_model.bin").write_bytes(pickle.dumps({"not": "weights"}))
    return model


def _edited(store: Path, tmp: Path, name: str, edit: Callable[[dict[str, Any]], None]) -> Path:
    copy = _copy_store(store, tmp)
    path = copy / name
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    return copy


def _query_args(env: dict[str, Path], queries: Path | None = None) -> list[str]:
    return ["--queries", str(queries or env["queries"]), "--prompt-field", "prompt", "--id-field", "qid"]


def _bad_matrix(store: Path, tmp: Path, meta: str | None, array: Any) -> list[str]:
    m = tmp / "bad.npy"
    np.save(m, array, allow_pickle=True)
    (tmp / "bad.npy.json").write_text(meta if meta is not None else (store.parent / "m.npy.json").read_text())
    return ["report", "--scores", str(m), "--out", str(tmp / "r.html")]


# (name, argv builder (env, store, tmp), message fragment)
CASES: list[tuple[str, Callable[..., list[str]], str]] = [
    (
        "log: a broken JSONL line",
        lambda e, s, t: _log(e, t, _text(t, "b.jsonl", '{"id": "a", "text": "x y"}\n{"id": ')),
        "cannot read the dataset",
    ),
    (
        "log: a broken CSV line",
        lambda e, s, t: _log(e, t, _text(t, "b.csv", 'id,text\na,"the cat\nb,c,d,e\n'), "--id-field", "id"),
        "cannot read",
    ),
    ("log: an empty data file", lambda e, s, t: _log(e, t, _text(t, "e.jsonl", "")), "cannot read the dataset"),
    (
        "log: a dict as an id",
        lambda e, s, t: _log(e, t, _text(t, "d.jsonl", '{"id": {"a": 1}, "text": "the cat"}\n')),
        "ids must be ints or strings",
    ),
    (
        "log: a lone surrogate id",
        lambda e, s, t: _log(e, t, _text(t, "s.jsonl", '{"id": "\\ud800", "text": "the cat"}\n')),
        "cannot read the dataset",
    ),
    (
        "log: duplicate ids",
        lambda e, s, t: _log(e, t, _text(t, "u.jsonl", '{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')),
        "appears twice",
    ),
    ("log: --limit -3", lambda e, s, t: _log(e, t, e["train"], "--limit", "-3"), "negative"),
    ("log: --batch-size 0", lambda e, s, t: _log(e, t, e["train"], "--batch-size", "0"), "positive"),
    (
        "log: --max-length beyond the positions",
        lambda e, s, t: _log(e, t, e["train"], "--max-length", "64"),
        "exceeds the 32 positions",
    ),
    (
        "log: a pickled model file",
        lambda e, s, t: ["log", "--model", str(_pickled_model(e, t)), "--data", str(e["train"]), "--out", str(t / "o")],
        "cannot load the model",
    ),
    (
        "log: --resume with other data",
        lambda e, s, t: [
            "log",
            "--model",
            str(e["gpt2"]),
            "--out",
            str(_copy_store(s, t)),
            "--data",
            str(_text(t, "t.jsonl", e["train"].read_text())),
            *LOG_ARGS,
            "--resume",
        ],
        "same data",
    ),
    ("log: the data is a FIFO", lambda e, s, t: _log(e, t, _fifo(t / "f.jsonl")), "not a regular file"),
    (
        "fit: --out at an existing file",
        lambda e, s, t: ["fit", str(s), "--out", str(_text(t, "x", "x"))],
        "existing file",
    ),
    ("fit: the store is a file", lambda e, s, t: ["fit", str(_text(t, "x", "x"))], "not a gradient store"),
    (
        "score: duplicate query ids",
        lambda e, s, t: [
            "score",
            "--store",
            str(s),
            "--out",
            str(t / "o.csv"),
            *_query_args(e, _text(t, "q.jsonl", '{"qid": 1, "prompt": "a", "text": "b"}\n' * 2)),
        ],
        "appears twice",
    ),
    (
        "score: edited settings (max_length 16 -> 17)",
        lambda e, s, t: [
            "score",
            "--store",
            str(_edited(s, t, "logra-cli.json", lambda d: d.update(max_length=d["max_length"] + 1))),
            *_query_args(e),
            "--out",
            str(t / "o.csv"),
        ],
        "logra-cli.json",
    ),
    (
        "score: an edited preconditioner",
        lambda e, s, t: [
            "score",
            "--store",
            str(_edited(s, t, "preconditioner-kfac/preconditioner.json", lambda d: d.update(method="identity"))),
            *_query_args(e),
            "--out",
            str(t / "o.csv"),
        ],
        "preconditioner.json",
    ),
    (
        "score: --matrix not .npy",
        lambda e, s, t: ["score", "--store", str(s), *_query_args(e), "--matrix", str(t / "m.txt")],
        ".npy",
    ),
    (
        "score: --top-k 0",
        lambda e, s, t: ["score", "--store", str(s), *_query_args(e), "--out", str(t / "o.csv"), "--top-k", "0"],
        "positive",
    ),
    (
        "self-influence: a bad suffix",
        lambda e, s, t: ["self-influence", "--store", str(s), "--out", str(t / "o.txt")],
        "must end in",
    ),
    (
        "report: a bad .npy.json",
        lambda e, s, t: _bad_matrix(s, t, '{"query_ids": 3}', np.zeros((3, 10), np.float32)),
        "not the metadata",
    ),
    (
        "report: a .npy.json that is not JSON",
        lambda e, s, t: _bad_matrix(s, t, "{", np.zeros((3, 10), np.float32)),
        "not valid JSON",
    ),
    (
        "report: an object .npy",
        lambda e, s, t: _bad_matrix(s, t, None, np.array([{"a": 1}] * 3, dtype=object)),
        "not a score matrix",
    ),
    (
        "report: a matrix of the wrong shape",
        lambda e, s, t: _bad_matrix(s, t, None, np.zeros((2, 2), np.float32)),
        "shape",
    ),
    (
        "verify: edited settings",
        lambda e, s, t: ["verify", str(_edited(s, t, "logra-cli.json", lambda d: d.update(max_length=17)))],
        "logra-cli.json",
    ),
    (
        "verify: an edited saved preconditioner",
        lambda e, s, t: [
            "verify",
            str(
                _edited(
                    s,
                    t,
                    "preconditioner-kfac/preconditioner.json",
                    lambda d: d["damping"].update({k: v * 1.01 for k, v in d["damping"].items()}),
                )
            ),
        ],
        "preconditioner.json",
    ),
    (
        "verify: a manifest that is /dev/zero",
        lambda e, s, t: ["verify", str(_dev_zero_manifest(s, t))],
        "not a regular file",
    ),
]


def _fifo(path: Path) -> Path:
    import os

    os.mkfifo(path)
    return path


def _dev_zero_manifest(store: Path, tmp: Path) -> Path:
    copy = _copy_store(store, tmp)
    (copy / "manifest.json").unlink()
    (copy / "manifest.json").symlink_to("/dev/zero")
    return copy


@pytest.mark.parametrize("name", [c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(
    name: str,
    env: dict[str, Path],
    store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    _, build, message = next(c for c in CASES if c[0] == name)
    argv = build(env, store, tmp_path)
    code, err = run(argv, capsys)
    assert_one_error_line(code, err, message, argv)


# ---------------------------------------------------------------- full disks, per writing subcommand


@pytest.fixture(params=["simulated", "tmpfs"])
def full_disk(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FullDisk]:
    if request.param == "tmpfs" and not tmpfs_allowed(tmp_path / "probe"):
        pytest.skip("this machine does not allow mounting a tmpfs; the simulated disk covers the case")
    disk = FullDisk(tmp_path / "disk", request.param, monkeypatch)
    yield disk
    disk.close()


FULL_DISK = {
    "log": lambda e, s, d: [
        "log",
        "--model",
        str(e["gpt2"]),
        "--data",
        str(e["train"]),
        "--out",
        str(d / "new"),
        *LOG_ARGS,
    ],
    "fit": lambda e, s, d: ["fit", str(s), "--out", str(d / "pre")],
    "score --matrix": lambda e, s, d: ["score", "--store", str(s), *_query_args(e), "--matrix", str(d / "m.npy")],
    "score --out": lambda e, s, d: ["score", "--store", str(s), *_query_args(e), "--out", str(d / "top.csv")],
    "self-influence .npy": lambda e, s, d: ["self-influence", "--store", str(s), "--out", str(d / "si.npy")],
    "self-influence .csv": lambda e, s, d: ["self-influence", "--store", str(s), "--out", str(d / "si.csv")],
    "report": lambda e, s, d: ["report", "--scores", str(s.parent / "m.npy"), "--out", str(d / "r.html")],
}


@pytest.mark.parametrize("command", sorted(FULL_DISK))
def test_a_full_disk_exits_2_with_one_line(
    command: str,
    env: dict[str, Path],
    store: Path,
    full_disk: FullDisk,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = FULL_DISK[command](env, store, full_disk.root)
    with full_disk.full():
        code, err = run(argv, capsys)
    assert_one_error_line(code, err, "ENOSPC", argv)
    assert not [p.name for p in full_disk.root.rglob("*") if p.name.endswith(".tmp")]


def test_log_resume_on_a_full_disk_then_resumes(
    env: dict[str, Path],
    full_disk: FullDisk,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = full_disk.root / "store"
    base = ["log", "--model", str(env["gpt2"]), "--data", str(env["train"]), "--out", str(out), *LOG_ARGS]
    assert main([*base, "--limit", "3", "--shard-rows", "2"]) == 0
    with full_disk.full():
        code, err = run([*base, "--resume", "--shard-rows", "2"], capsys)
    assert_one_error_line(code, err, "ENOSPC", base)
    assert main([*base, "--resume", "--shard-rows", "2"]) == 0
    assert main(["verify", str(out)]) == 0


# ---------------------------------------------------------------- warnings instead of silence


def test_one_token_texts_warn_in_one_line(
    env: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    data = _write_jsonl(tmp_path / "short.jsonl", [{"id": "a", "text": "cat"}, {"id": "b", "text": "the cat sat"}])
    assert main(["log", "--model", str(env["gpt2"]), "--data", str(data), "--out", str(tmp_path / "s"), *LOG_ARGS]) == 0
    err = capsys.readouterr().err
    warning = [line for line in err.splitlines() if "warning:" in line]
    assert len(warning) == 1 and "['a']" in warning[0] and "all zero" in warning[0], err


def test_score_outputs_carry_provenance(
    env: dict[str, Path],
    store: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from logra.store import GradientStore

    meta = json.loads((store.parent / "m.npy.json").read_text())
    assert meta["provenance"]["store"] == GradientStore.open(store).fingerprint
    assert set(meta["provenance"]) == {"store", "preconditioner", "queries"}
    assert main(["self-influence", "--store", str(store), "--out", str(tmp_path / "si.csv")]) == 0
    side = json.loads((tmp_path / "si.csv.json").read_text())
    assert side["provenance"]["store"] == meta["provenance"]["store"]
    assert side["provenance"]["preconditioner"] == meta["provenance"]["preconditioner"]
    assert "provenance: store" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_a_lone_surrogate_in_an_output_table_is_refused(tmp_path: Path, suffix: str) -> None:
    from logra.cli.tables import write_table
    from logra.errors import ConfigError

    with pytest.raises(ConfigError, match="lone surrogate"):
        write_table(tmp_path / f"t{suffix}", {"query_id": ["\ud800"], "score": [1.0]})
    assert not list(tmp_path.iterdir())
