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
