"""The README's code is the contract with a new user: its quickstart is examples/quickstart.py
verbatim (which tests/test_examples.py runs), and its scoring example runs exactly as written."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_shows_the_two_commands_at_the_top() -> None:
    head = "\n".join(README.splitlines()[:20])
    assert "make demo" in head and "make test" in head


def test_quickstart_block_is_the_quickstart_example_verbatim() -> None:
    match = re.search(r"<!-- quickstart:start -->\n```python\n(.*?)```\n<!-- quickstart:end -->", README, re.S)
    assert match, "README lost its quickstart markers"
    assert match.group(1) == (ROOT / "examples" / "quickstart.py").read_text(encoding="utf-8")


@pytest.mark.subprocess
def test_scoring_example_runs_as_written(tmp_path: Path) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    example = next(b for b in blocks if "logra.load_preconditioner" in b and "import tempfile" in b)
    script = tmp_path / "example.py"
    script.write_text(example, encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "torch.Size([64])" in proc.stdout


def _block(name: str) -> str:
    match = re.search(rf"<!-- {name}:start -->\n```python\n(.*?)```\n<!-- {name}:end -->", README, re.S)
    assert match, f"README lost its {name} markers"
    return match.group(1)


@pytest.mark.subprocess
@pytest.mark.slow
def test_distributed_block_runs_as_written_on_one_and_two_processes(tmp_path: Path) -> None:
    """The Distributed section's script, verbatim: `python` and `torchrun --nproc_per_node 2` give the
    same store as a set of (id, row) and the same top-k line."""
    from _launch import free_port, launch
    from test_distributed import assert_same_contents

    import logra

    outputs, stores = [], []
    for name, launcher in (
        ("one", [sys.executable]),
        ("two", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                 "--master_addr", "127.0.0.1", "--master_port", str(free_port())]),
    ):  # fmt: skip
        folder, script = tmp_path / name, tmp_path / f"train_influence_{name}.py"
        folder.mkdir()
        script.write_text(_block("distributed"), encoding="utf-8")  # outside `folder`, which a retry empties
        outputs.append(launch([*launcher, str(script)], folder, cwd=folder, pass_out=False))
        stores.append(logra.GradientStore.open(folder / "runs" / "dist"))
    assert "96 rows from 1 process(es)" in outputs[0] and "96 rows from 2 process(es)" in outputs[1]
    assert outputs[0].split("query 0:")[1] == outputs[1].split("query 0:")[1]
    assert {s.file[:10] for s in stores[1].manifest.shards} == {"shard-000-", "shard-001-"}
    assert_same_contents(stores[1], stores[0])


@pytest.mark.subprocess
def test_streaming_block_runs_as_written_and_resumes(tmp_path: Path) -> None:
    script = tmp_path / "stream.py"
    script.write_text(_block("streaming"), encoding="utf-8")
    runs = [subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300)
            for _ in range(2)]  # fmt: skip
    assert all(r.returncode == 0 for r in runs), runs[-1].stderr[-3000:]
    assert runs[0].stdout.strip() == "1000 rows (0 were already committed)"
    assert runs[1].stdout.strip() == "1000 rows (1000 were already committed)"  # resumed: nothing recomputed
