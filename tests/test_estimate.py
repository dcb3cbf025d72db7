"""Estimates before a run (logra.estimate): `logra log --dry-run`, the line before every run, and
log_trainer's estimate and progress bar; checked against the store a real run writes."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import test_cli as cli_env

from logra.cli import main
from logra.estimate import RunEstimate, format_bytes, format_seconds
from logra.store import GradientStore

sys.path.insert(0, str(Path(__file__).resolve().parent / "dist_scripts"))
import common  # noqa: E402


def test_the_issue_s_example_in_numbers() -> None:
    """SmolLM2's default log: 211 layers, D = 864,256 in float32 is 3.30 MiB per example, 3.14 TiB per million."""
    e = RunEstimate(211, 864_256, 4, "float32", 1_000_000)
    assert e.bytes_per_example == 3_457_024 and e.total_bytes == 3_457_024 * 10**6
    line = e.timed(examples=20, seconds=1.5).describe()
    assert "D=864256, 3.30 MiB per example (float32); 1000000 examples -> 3.14 TiB" in line
    assert "0.075 s per example (timed on 20) -> about 20.8 h" in line
    assert "unknown" in RunEstimate(1, 8, 2, "bfloat16", None).describe()
    assert RunEstimate(1, 8, 2, "bfloat16", 5).timed(0, 1.0).seconds_per_example is None
    assert [format_bytes(x) for x in (512, 1536, 3 * 2**30)] == ["512 B", "1.50 KiB", "3.00 GiB"]
    assert [format_seconds(x) for x in (42, 600, 7200, 3 * 86400)] == ["42 s", "10.0 min", "2.0 h", "3.0 days"]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return cli_env.make_env(tmp_path_factory.mktemp("cli"))


def _log(env: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["log", "--model", str(env["gpt2"]), "--data", str(env["train"]), "--out", str(out),
                 *cli_env.LOG_ARGS, "--batch-size", "3", *extra])  # fmt: skip


def test_dry_run_writes_nothing_and_predicts_the_store(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _log(env, tmp_path / "dry", "--dry-run", "--time-batches", "2") == 0
    dry = capsys.readouterr().err
    assert not (tmp_path / "dry").exists()
    assert _log(env, tmp_path / "real") == 0
    real = capsys.readouterr().err
    store = GradientStore.open(tmp_path / "real")
    rows_bytes = sum((tmp_path / "real" / s.file).stat().st_size for s in store.manifest.shards)
    assert rows_bytes == len(store) * store.dim * 8  # float64 rows, no header: what the estimate counts
    expected = f"row width D={store.dim}, {store.dim * 8} B per example (float64); {len(store)} examples -> "
    assert "dry run, nothing written: 4 layers, " + expected in dry
    assert re.search(r"s per example \(timed on 3\) -> about", dry)  # 6 timed, the warm-up batch of 3 left out
    before, timed = re.findall(r"\[logra\] estimate: (.*)", real)[:2]
    assert expected in before and "s per example (timed on 9)" in timed  # after the first 3 batches of 3


def test_bad_data_is_reported_before_the_model_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["log", "--model", str(tmp_path / "no-model"), "--data", str(tmp_path / "none.jsonl"),
                 "--out", str(tmp_path / "s")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "none.jsonl" in err and "does not exist" in err and "no-model" not in err
    assert not (tmp_path / "s").exists()


def test_log_trainer_says_the_estimate_and_shows_progress(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from logra.integrations.hf import log_trainer

    store = log_trainer(common.hf_trainer(common.model(), tmp_path / "t"), common.CONFIG, tmp_path / "s",
                        dataset=common.hf_dataset(), id_column="uid", batch_size=4)  # fmt: skip
    err = capsys.readouterr().err
    size = f"{len(store.layers)} layers, row width D={store.dim}, {store.dim * 8} B per example (float64)"
    assert "[logra] estimate: " + size in err
    assert f"{common.N_TRAIN} examples ->" in err
    assert re.search(rf"logra: logging: 100%.*{common.N_TRAIN}/{common.N_TRAIN}", err)
    log_trainer(common.hf_trainer(common.model(), tmp_path / "t"), common.CONFIG, tmp_path / "quiet",
                dataset=common.hf_dataset(), id_column="uid", progress=False)  # fmt: skip
    assert "logra" not in capsys.readouterr().err


def test_score_with_out_and_matrix_reads_the_store_once(
    env: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The top-k table comes from the matrix just written: one pass over the shards, the same table."""
    import csv

    import numpy as np

    assert _log(env, tmp_path / "s", "--shard-rows", "3") == 0
    reads: list[int] = []
    original = GradientStore.iter_chunks

    def counted(self: GradientStore, *args: object, **kwargs: object) -> object:
        reads.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(GradientStore, "iter_chunks", counted)
    query = ["--queries", str(env["queries"]), "--prompt-field", "prompt", "--id-field", "qid", "--top-k", "4"]
    score = ["score", "--store", str(tmp_path / "s"), *query, "--method", "identity"]
    assert main([*score, "--out", str(tmp_path / "both.csv"), "--matrix", str(tmp_path / "m.npy")]) == 0
    assert len(reads) == 1
    assert main([*score, "--out", str(tmp_path / "alone.csv")]) == 0  # the streamed top-k, for reference
    with open(tmp_path / "both.csv") as f, open(tmp_path / "alone.csv") as g:
        both, alone = list(csv.DictReader(f)), list(csv.DictReader(g))
    assert [(r["query_id"], r["direction"], r["train_id"]) for r in both] == [
        (r["query_id"], r["direction"], r["train_id"]) for r in alone
    ]
    matrix = np.load(tmp_path / "m.npy")  # the table's scores are the float32 matrix's
    np.testing.assert_allclose([float(r["score"]) for r in both], [float(r["score"]) for r in alone], rtol=1e-6)
    assert float(both[0]["score"]) == float(matrix[0].max())
