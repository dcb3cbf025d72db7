"""Starting multi-process runs from tests: a free port, and a launch that survives gloo's teardown abort."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import warnings
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parent / "dist_scripts"

# gloo on this CPU build now and then aborts a rank at process teardown with this C++ message (a
# joinable std::thread destroyed); it is not a result of the test. Such a launch is run once more;
# any other failure, or the same one twice, fails the test.
GLOO_TEARDOWN_ABORT = "terminate called without an active exception"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(args: list[str], out: Path, *, cwd: Path | None = None, pass_out: bool = True) -> str:
    """Run `args` (+ `out` when `pass_out`) in `cwd`; returns stdout. `out` is emptied before a retry."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join([str(SCRIPTS), env.get("PYTHONPATH", "")])
    command = args + ([str(out)] if pass_out else [])
    proc = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    if proc.returncode != 0 and GLOO_TEARDOWN_ABORT in proc.stderr:
        warnings.warn(f"{args[:4]}: a rank aborted ({GLOO_TEARDOWN_ABORT!r}); launching once more", stacklevel=2)
        shutil.rmtree(out)  # start from nothing: no store or result of the aborted launch is reused
        out.mkdir()
        proc = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{args[:4]} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc.stdout
