"""Shared pytest setup: offline Hugging Face, one torch thread, the tiny-model helpers on sys.path.

The test machines have two shared cores and no internet (except PyPI). Tiny models run fastest
on one thread, and nothing may be downloaded at run time.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))  # `from models import ...` in every test file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
torch.set_num_threads(1)

try:  # datasets binds its log handler to sys.stderr on first use: make that the session's stream,
    # not one test's capsys stream (closed after that test, later logs print "--- Logging error ---")
    from datasets.utils import logging as _datasets_logging

    _datasets_logging.get_logger("datasets")
except ImportError:  # the hf extra is not installed: those tests are skipped
    pass


@pytest.fixture
def store_dir(tmp_path: Path) -> Path:
    """A not-yet-existing store directory inside the test's temporary directory."""
    return tmp_path / "store"


@pytest.fixture
def watchdog() -> Iterator[None]:
    """Fail instead of hanging (a FIFO read, a reader loop): 60 s per test at most.

    Used by the hostile-input suites: `pytestmark = pytest.mark.usefixtures("watchdog")`.
    """

    def timeout(signum: int, frame: Any) -> None:
        raise TimeoutError("a store reader hung")

    old = signal.signal(signal.SIGALRM, timeout)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)
