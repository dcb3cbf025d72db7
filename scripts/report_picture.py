"""The README's pictures of a demo report: one query of a `logra report --tokens` page, rendered.

    .venv/bin/python scripts/report_picture.py demo_out/report.html docs/report_tokens.png
    .venv/bin/python scripts/report_picture.py demo_out/report.html docs/report_confirmed.png \
        --query 2 --confirmed --height 560

Keeps the page's head and one query section without the plots (the tokens are what the picture
is for), with every "query tokens" fold open; with --confirmed, only the query's text and its
"Confirmed by fine-tuning" list (`logra report --confirmed`). Screenshots it with headless
Chromium (Debian: `apt-get install chromium`).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("report", type=Path, help="an HTML page written by `logra report --tokens`")
    parser.add_argument("out", type=Path, help="the .png to write")
    parser.add_argument("--query", type=int, default=0, help="which query section (0 = the first)")
    parser.add_argument("--width", type=int, default=1000)
    parser.add_argument("--height", type=int, default=900)
    parser.add_argument("--confirmed", action="store_true", help="the query and its confirmed list only")
    args = parser.parse_args()
    page = args.report.read_text(encoding="utf-8")
    head = page[: page.index("<body>") + len("<body>")]
    sections = re.findall(r'<section class="query".*?</section>', page, flags=re.S)
    if 'class="tok"' not in page or not sections:
        raise SystemExit(f"{args.report} has no per-token shares; write it with `logra report --tokens`.")
    section = re.sub(r'<div class="plots">.*?</div>\n', "", sections[args.query], count=1, flags=re.S)
    section = section.replace("<details>", "<details open>")  # show the query tokens each document explains
    if args.confirmed:
        start = section.find('<div class="pos confirmed">')
        if start < 0:
            raise SystemExit(f"{args.report} has no confirmed list; write it with `logra report --confirmed`.")
        query = re.search(r'<section class="query".*?<div class="qtext">.*?</div>', section, flags=re.S)
        section = (query.group(0) if query else "") + section[start:]
    with tempfile.TemporaryDirectory() as tmp:
        cut = Path(tmp) / "one.html"
        cut.write_text(head + section + "</body></html>", encoding="utf-8")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            "chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--hide-scrollbars",
            f"--window-size={args.width},{args.height}", f"--screenshot={args.out.resolve()}", cut.as_uri(),
        ]  # fmt: skip
        subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    print(f"wrote {args.out} ({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
