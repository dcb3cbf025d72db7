"""The HTML report: right documents, plots that say what the data says, escaping, no network assets."""

from __future__ import annotations

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from logra.errors import ConfigError
from logra.report import build_queries, format_summary, histogram_svg, render_html, tokens_html, write_report

TRAIN_TEXTS = {
    "fire": "Bushfires burn near Sydney as firefighters battle the blaze.",
    "cricket": "Australia won the cricket Test against South Africa.",
    "evil": "<script>alert('x')</script> & friends <b>bold</b>",
    "bank": "Banks raise interest rates.",
    "rain": "Rain eases the bushfire threat in New South Wales.",
}
IDS = list(TRAIN_TEXTS)


def _queries(k: int = 2):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(2, len(IDS)))
    built = build_queries(
        scores,
        ["q-fire", 7],
        ["firefighters fight a bushfire", "cricket scores"],
        IDS,
        TRAIN_TEXTS,
        k,
        ["Firefighters say", None],
    )
    return scores, built


def test_top_documents_are_the_largest_and_smallest_scores() -> None:
    scores, built = _queries(k=2)
    for q, query in enumerate(built):
        ranked = sorted(range(len(IDS)), key=lambda j: scores[q, j])
        assert [d.id for d in query.helpful] == [IDS[j] for j in ranked[::-1][:2]]
        assert [d.id for d in query.harmful] == [IDS[j] for j in ranked[:2]]
        assert [d.score for d in query.helpful] == [scores[q, j] for j in ranked[::-1][:2]]
        assert query.helpful[0].text == TRAIN_TEXTS[query.helpful[0].id]


def test_histogram_counts_match_numpy() -> None:
    scores = np.random.default_rng(1).standard_t(3, size=997)
    svg = histogram_svg(scores, [scores.max()], [scores.min()], bins=25)
    counts = [int(c) for c in re.findall(r'class="bar" data-count="(\d+)"', svg)]
    expected, _ = np.histogram(scores, bins=25, range=(scores.min(), scores.max()))
    assert counts == expected.tolist() and sum(counts) == 997
    assert svg.count('<line class="pos"') == 1 and svg.count('<line class="neg"') == 1


def test_histogram_of_constant_scores_is_one_full_bar() -> None:
    svg = histogram_svg(np.full(10, 3.0), [], [], bins=5)
    counts = [int(c) for c in re.findall(r'data-count="(\d+)"', svg)]
    assert sum(counts) == 10 and max(counts) == 10


def test_page_is_self_contained_and_escaped(tmp_path: Path) -> None:
    scores, built = _queries(k=len(IDS))
    path = write_report(tmp_path / "sub" / "r.html", built, title="A <title>", settings={"model": "m&m"})
    page = path.read_text(encoding="utf-8")
    for forbidden in ("<script", "http://", "https://", "<link", "url(", "<img", "@import"):
        assert forbidden not in page.lower(), forbidden
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page and "<b>bold</b>" not in page
    assert "A &lt;title&gt;" in page and "m&amp;m" in page
    assert page.count('<section class="query"') == 2 and page.count("<svg") == 4
    assert "<b>Firefighters say</b>firefighters fight a bushfire" in page
    bars = re.findall(r'<rect class="(pos|neg)" data-score="([^"]+)"', page)
    assert len(bars) == 2 * 2 * len(IDS)
    assert all((float(v) >= 0) == (c == "pos") for c, v in bars)


def test_tokens_are_coloured_by_signed_share_and_escaped() -> None:
    out = tokens_html((("<Bush", 2.0), ("fire", -1.0), (" the", 0.0)))
    spans = re.findall(r'data-share="([^"]+)"[^>]*style="background:rgba\(([\d,]+),([\d.]+)\)">([^<]*)<', out)
    assert spans == [
        ("2", "46,157,87", "0.75", "&lt;Bush"),
        ("-1", "210,69,61", "0.38", "fire"),
        ("0", "46,157,87", "0.00", " the"),
    ]
    _, built = _queries()
    plain = render_html(built)
    assert 'class="tok" data-share' not in plain and "<mark>" not in plain  # no shares given: plain text
    doc = dataclasses.replace(built[0].helpful[0], tokens=(("a", 1.0), ("b", -0.5)), query_tokens=(("q", 3.0),))
    query = dataclasses.replace(built[0], helpful=[doc, *built[0].helpful[1:]])
    page = render_html([query])
    assert page.count('class="tok" data-share') == 3 and "query tokens this document explains" in page


def test_summary_lists_each_query_and_its_documents() -> None:
    _, built = _queries(k=2)
    text = format_summary(built, show=2)
    assert "Query 1 [q-fire]" in text and "Query 2 [7]" in text
    for query in built:
        for d in query.helpful + query.harmful:
            assert f"[{d.id}]" in text


def test_mismatched_inputs_are_refused() -> None:
    with pytest.raises(ConfigError, match="do not match"):
        build_queries(np.zeros((2, 3)), ["a"], ["t"], IDS, TRAIN_TEXTS)
    with pytest.raises(ConfigError, match="k=9"):
        build_queries(np.zeros((1, 5)), ["a"], ["t"], IDS, TRAIN_TEXTS, k=9)


@pytest.mark.slow
@pytest.mark.subprocess
@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian's chromium is not installed (apt-get install chromium)"
)
def test_renders_in_headless_chromium(tmp_path: Path) -> None:
    _, built = _queries(k=3)
    page = write_report(tmp_path / "r.html", built)
    shot = tmp_path / "r.png"
    cmd = [
        "chromium",
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--hide-scrollbars",
        f"--screenshot={shot}",
        "--window-size=1100,1400",
        page.as_uri(),
    ]
    subprocess.run(cmd, capture_output=True, timeout=120, check=True)
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000  # a blank page compresses to a few kB
    dom = subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert dom.count('class="bar"') == 2 * 40 and "Most helpful" in dom
