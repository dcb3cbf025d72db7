"""The report puts each score on its query's scale (fraction of the largest |score|, percentile
among all training scores), shows metadata columns beside documents, and explains the score."""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np
import pytest
import test_cli as cli_env

from logra.cli import main
from logra.report import SCALE_SENTENCE, build_queries, format_summary, render_html


def test_fraction_and_percentile_against_hand_values() -> None:
    scores = np.array([[4.0, -8.0, 1.0, 2.0, 0.0], [0.5, 0.25, -0.1, 0.0, 0.05]])
    built = build_queries(scores, ["a", "b"], ["qa", "qb"], [10, 11, 12, 13, 14], {}, k=2,
                          train_metadata={10: {"title": "Ten", "label": 1}})  # fmt: skip
    top = built[0].helpful[0]
    assert (top.id, top.fraction, top.percentile) == (10, 0.5, 100.0)  # 4 of max |score| 8; above all 5
    worst = built[0].harmful[0]
    assert (worst.id, worst.fraction, worst.percentile) == (11, -1.0, 20.0)  # only itself is <= -8
    second = built[0].helpful[1]
    assert (second.id, second.fraction, second.percentile) == (13, 0.25, 80.0)
    assert built[1].helpful[0].fraction == 1.0 and built[1].harmful[0].percentile == 20.0
    assert top.metadata == {"title": "Ten", "label": 1} and second.metadata is None
    page = render_html(built)
    assert html.escape(SCALE_SENTENCE) in page and page.index(html.escape(SCALE_SENTENCE)) < page.index("Query 1")
    assert "0.50 of top · 100th pct" in page and "-1.00 of top · 20th pct" in page
    assert "<b>title</b>: Ten" in page and "<b>label</b>: 1" in page
    assert "(+0.50 of top, 100th pct)" in format_summary(built)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return cli_env.make_env(tmp_path_factory.mktemp("cli"))


def test_logra_report_shows_the_scale_and_the_data_s_other_columns(env: dict[str, Path], tmp_path: Path) -> None:
    store = tmp_path / "s"
    assert main(["log", "--model", str(env["gpt2"]), "--data", str(env["train"]), "--out", str(store),
                 *cli_env.LOG_ARGS]) == 0  # fmt: skip
    query = ["--queries", str(env["queries"]), "--prompt-field", "prompt", "--id-field", "qid"]
    assert main(["score", "--store", str(store), *query, "--method", "identity",
                 "--matrix", str(tmp_path / "m.npy")]) == 0  # fmt: skip
    assert main(["report", "--scores", str(tmp_path / "m.npy"), "--out", str(tmp_path / "r.html")]) == 0
    page = (tmp_path / "r.html").read_text()
    scores = np.load(tmp_path / "m.npy")
    best = int(np.argmax(scores[0]))
    assert f'[doc{best}]</span> <span class="meta"><b>label</b>: {cli_env.LABELS[best]}</span>' in page
    fraction = scores[0].max() / np.abs(scores[0]).max()
    assert f"{fraction:.2f} of top · 100th pct" in page  # query 0's most helpful document
    assert html.escape(SCALE_SENTENCE) in page
