"""`logra log --streaming`: the same store as the in-memory path, resumable, checked before writing."""

from __future__ import annotations

from pathlib import Path

import pytest
import test_cli as cli_env
from test_distributed import assert_same_contents

from logra.cli import main
from logra.store import GradientStore


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return cli_env.make_env(tmp_path_factory.mktemp("cli"))


def _log(env: dict[str, Path], out: Path, *extra: str) -> int:
    return main(["log", "--model", str(env["gpt2"]), "--data", str(env["train"]), "--out", str(out),
                 *cli_env.LOG_ARGS, "--batch-size", "3", *extra])  # fmt: skip


def test_streaming_gives_the_in_memory_store_and_resumes(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _log(env, tmp_path / "mem") == 0
    reference = GradientStore.open(tmp_path / "mem")
    assert _log(env, tmp_path / "stream", "--streaming", "--shard-rows", "2") == 0
    streamed = GradientStore.open(tmp_path / "stream")
    assert streamed.ids == reference.ids == [f"doc{i}" for i in range(len(cli_env.TRAIN))]
    assert_same_contents(streamed, reference)
    capsys.readouterr()
    assert _log(env, tmp_path / "part", "--streaming", "--limit", "4") == 0  # an interrupted run: 4 committed
    assert _log(env, tmp_path / "part", "--streaming", "--resume") == 0
    err = capsys.readouterr().err
    assert "resuming: 4 examples already committed are skipped" in err
    assert "logged 6 new examples" in err  # only the rest went through the model
    assert_same_contents(GradientStore.open(tmp_path / "part"), reference)


def test_streaming_checks_the_data_before_writing(
    env: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _log(env, tmp_path / "s", "--streaming", "--text-field", "body") == 2
    assert "the text field 'body' is not a column" in capsys.readouterr().err
    assert _log(env, tmp_path / "s", "--streaming", "--dry-run") == 0
    assert "corpus size unknown (a stream)" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
