"""`logra` subcommands under `torchrun --nproc_per_node 2 --no-python logra ...` equal one process.

Each subcommand is one torchrun launch (two gloo ranks on the CPU); the CLI initialises the process
group itself. The 2-process store is compared with a single-process `logra log` as a set of
(id, row), and the score matrix, top-k table and self-influence with single-process outputs.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import test_cli as cli_env
import test_distributed as dist_tests
from _launch import free_port, launch

from logra.cli import main
from logra.store import GradientStore

pytestmark = [pytest.mark.subprocess, pytest.mark.slow]

LOGRA = str(Path(sys.executable).with_name("logra"))


def _args(env: dict[str, Path], command: str, out: Path) -> list[str]:
    store = str(out / "s")
    if command == "log":
        return ["log", "--model", str(env["gpt2"]), "--data", str(env["train"]), "--out", store,
                *cli_env.LOG_ARGS, "--shard-rows", "2"]  # fmt: skip
    if command == "score":
        return ["score", "--store", store, "--queries", str(env["queries"]), "--prompt-field", "prompt",
                "--id-field", "qid", "--method", "kfac", "--top-k", "3",
                "--out", str(out / "top.csv"), "--matrix", str(out / "m.npy")]  # fmt: skip
    if command == "self-influence":
        return ["self-influence", "--store", store, "--method", "kfac", "--out", str(out / "self.csv")]
    return ["fit", store, "--method", "kfac"]


COMMANDS = ["log", "score", "self-influence", "fit"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    env = cli_env.make_env(tmp_path_factory.mktemp("env"))
    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    for command in COMMANDS:
        assert main(_args(env, command, one)) == 0
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                    "127.0.0.1", "--master_port", str(free_port()), "--no-python", LOGRA]  # fmt: skip
        launch(torchrun + _args(env, command, two), two, pass_out=False)
    return one, two


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path) as f:
        return list(csv.DictReader(f))


def test_log_on_two_ranks_gives_the_one_process_store(runs: tuple[Path, Path]) -> None:
    one, two = runs
    store = GradientStore.open(two / "s")
    store.verify()
    assert {s.file[:10] for s in store.manifest.shards} == {"shard-000-", "shard-001-"}  # both ranks wrote
    reference = GradientStore.open(one / "s")
    assert store.ids == reference.ids  # contiguous shares in rank order keep the data's order
    dist_tests.assert_same_contents(store, reference)
    assert (two / "s" / "logra-cli.json").read_bytes() == (one / "s" / "logra-cli.json").read_bytes()


def test_score_and_self_influence_on_two_ranks_equal_one_process(runs: tuple[Path, Path]) -> None:
    one, two = runs
    want, got = np.load(one / "m.npy"), np.load(two / "m.npy")
    assert got.shape == want.shape == (3, 10)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    meta = json.loads((two / "m.npy.json").read_text())
    assert meta["provenance"]["store"] == GradientStore.open(two / "s").fingerprint  # the whole store, not a rank's
    assert meta["query_ids"] == ["q0", "q1", "q2"]
    top_one, top_two = _rows(one / "top.csv"), _rows(two / "top.csv")
    assert [(r["query_id"], r["direction"], r["train_id"]) for r in top_two] == [
        (r["query_id"], r["direction"], r["train_id"]) for r in top_one
    ]
    np.testing.assert_allclose([float(r["score"]) for r in top_two], [float(r["score"]) for r in top_one], rtol=1e-6)
    s_one, s_two = _rows(one / "self.csv"), _rows(two / "self.csv")
    assert [r["train_id"] for r in s_two] == [r["train_id"] for r in s_one]
    np.testing.assert_allclose([float(r["self_influence"]) for r in s_two],
                               [float(r["self_influence"]) for r in s_one], rtol=1e-9)  # fmt: skip


def test_fit_on_two_ranks_saves_one_preconditioner(runs: tuple[Path, Path]) -> None:
    import torch

    from logra.curvature.saved import load_preconditioner

    one, two = runs
    want, got = (load_preconditioner(d / "s" / "preconditioner-kfac") for d in runs)
    assert got.method == want.method and got.damping == pytest.approx(want.damping, rel=1e-12)
    for layer, factors in want.factors.items():
        for name, tensor in factors.items():  # float64 sums in another order: equal to rounding
            assert torch.allclose(got.factors[layer][name], tensor, rtol=1e-9, atol=1e-9 * tensor.abs().max().item())


def test_log_under_accelerate_launch_gives_the_one_process_store(runs: tuple[Path, Path], tmp_path: Path) -> None:
    """`accelerate launch` (2 CPU processes) of the `logra` script: the CLI starts the group itself."""
    one, _ = runs
    env = cli_env.make_env(tmp_path / "env")  # the same seeded model and data as the fixture's
    out = tmp_path / "acc"
    out.mkdir()
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                  "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(free_port()), LOGRA]  # fmt: skip
    launch(accelerate + _args(env, "log", out), out, pass_out=False)
    store = GradientStore.open(out / "s")
    assert {s.file[:10] for s in store.manifest.shards} == {"shard-000-", "shard-001-"}  # both ranks wrote
    reference = GradientStore.open(one / "s")
    assert store.ids == reference.ids
    dist_tests.assert_same_contents(store, reference)
