"""A self-contained HTML report of influence scores: queries, their top documents, and plots.

One file, no network assets, no scripts: inline CSS and inline SVG only, so it opens anywhere
and can be mailed around. For each query it shows the query text, a histogram of its scores over
every training example (with the k most helpful and most harmful marked), bars for those top
examples, and their texts. Where per-token shares are given (`ReportDocument.tokens`, from
`logra.tokens`; `logra report --tokens`), every token of a document is coloured by its signed
share of the score: green where it raises the score, red where it lowers it, the stronger the
larger |share| is relative to the document's largest; `ReportDocument.query_tokens` colours
the query's tokens by the part of this document's score each one carries. Without shares the
texts are shown plain.

    queries = logra.report.build_queries(scores, query_ids, query_texts, train_ids, train_texts, k=5)
    logra.report.write_report("report.html", queries, title="...", settings={"model": "..."})
    print(logra.report.format_summary(queries))

Sign convention (as in `logra.score`): a positive score means training on that example lowers the
query's loss (helpful); a negative score raises it (harmful).
"""

from __future__ import annotations

import html
import math
import os
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from logra.errors import ConfigError
from logra.store.files import write_atomic
from logra.types import ExampleId

HIST_BINS = 40
TokenPieces = tuple[tuple[str, float], ...]
"""(text piece, signed share) per token, in order: the pieces concatenate to the text the model saw."""


@dataclass(frozen=True)
class ReportDocument:
    """One training example as shown in the report.

    tokens: its tokens with their shares of `score` (they sum to it), or None.
    query_tokens: the query's tokens with their shares of `score`, or None.
    fraction: `score` / the query's largest |score| over all training examples (1 for the strongest).
    percentile: the share (0-100) of all training examples' scores for this query that are <= `score`.
    metadata: the example's other columns (title, source, label, ...), shown beside it.
    """

    id: ExampleId
    text: str
    score: float
    tokens: TokenPieces | None = None
    query_tokens: TokenPieces | None = None
    fraction: float | None = None
    percentile: float | None = None
    metadata: Mapping[str, object] | None = None


@dataclass(frozen=True)
class ConfirmedDocument:
    """A shortlisted training example trained on alone (`logra confirm`, `logra.confirm`).

    gain: the query's loss before minus after that fine-tuning (positive: it lowered the loss).
    score, score_rank: its influence score and its rank (1 = highest) in the query's shortlist.
    """

    id: ExampleId
    text: str
    gain: float
    score: float
    score_rank: int


@dataclass(frozen=True)
class Confirmation:
    """A query's shortlist ordered by gain (highest first), and how it was fine-tuned (`recipe`, one line)."""

    recipe: str
    documents: tuple[ConfirmedDocument, ...]


@dataclass(frozen=True)
class ReportQuery:
    """One query: its text (prompt + completion for an LM), all its scores [N], and its top examples."""

    id: ExampleId
    text: str
    prompt: str | None
    scores: np.ndarray
    helpful: list[ReportDocument]
    harmful: list[ReportDocument]
    confirmed: Confirmation | None = None


def build_queries(
    scores: np.ndarray,
    query_ids: Sequence[ExampleId],
    query_texts: Sequence[str],
    train_ids: Sequence[ExampleId],
    train_texts: Mapping[ExampleId, str],
    k: int = 5,
    query_prompts: Sequence[str | None] | None = None,
    train_metadata: Mapping[ExampleId, Mapping[str, object]] | None = None,
) -> list[ReportQuery]:
    """Pick each query's k most helpful (largest) and k most harmful (smallest) training examples.

    Args:
        scores: [Q, N] influence scores (rows follow `query_ids`, columns `train_ids`).
        train_texts: the text of each training id (ids missing here are shown as "(text not given)").
        train_metadata: other columns of each training id, shown beside its text.

    Each document carries its score's scale within its query (`ReportDocument.fraction`, `.percentile`).
    """
    scores = np.asarray(scores, dtype=np.float64)
    Q = len(query_ids)
    if scores.ndim != 2 or scores.shape != (Q, len(train_ids)):
        raise ConfigError(
            f"scores of shape {scores.shape} do not match {Q} queries x {len(train_ids)} training ids; "
            "pass the matrix written by `logra score --matrix` with its ids."
        )
    if len(query_texts) != Q or (query_prompts is not None and len(query_prompts) != Q):
        raise ConfigError(f"got {len(query_texts)} query texts (and prompts) for {Q} query ids; give one per query.")
    if not 1 <= k <= scores.shape[1]:
        raise ConfigError(f"k={k} must be between 1 and the {scores.shape[1]} training examples.")
    out = []
    for q in range(Q):
        order = np.argsort(-scores[q], kind="stable")

        row = scores[q]
        finite = np.sort(row[np.isfinite(row)])
        top = float(np.abs(finite).max()) if finite.size else 0.0

        def docs(rows: np.ndarray, q: int = q, finite: np.ndarray = finite, top: float = top) -> list[ReportDocument]:
            out = []
            for j in rows:
                v, tid = float(scores[q, j]), train_ids[j]
                fraction = v / top if top > 0 and math.isfinite(v) else None
                pct = 100.0 * np.searchsorted(finite, v, side="right") / finite.size if finite.size else None
                meta = train_metadata.get(tid) if train_metadata is not None else None
                out.append(ReportDocument(tid, train_texts.get(tid, "(text not given)"), v, fraction=fraction,
                                          percentile=None if pct is None else float(pct), metadata=meta))  # fmt: skip
            return out

        prompt = query_prompts[q] if query_prompts is not None else None
        out.append(ReportQuery(query_ids[q], query_texts[q], prompt, scores[q], docs(order[:k]), docs(order[::-1][:k])))
    return out


# --------------------------------------------------------------------------------------------
# Text.


def tokens_html(pieces: TokenPieces) -> str:
    """Escaped HTML of the token pieces, each a <span> coloured by its signed share.

    Green for a positive share, red for a negative one, opacity |share| / max |share| of the
    pieces; each span carries `data-share` and a tooltip with the value.
    """
    top = max((abs(v) for _, v in pieces if math.isfinite(v)), default=0.0)
    parts = []
    for text, value in pieces:
        frac = min(abs(value) / top, 1.0) if top > 0 and math.isfinite(value) else 0.0
        rgb = "46,157,87" if value >= 0 else "210,69,61"
        parts.append(
            f'<span class="tok" data-share="{value:.6g}" title="{value:+.3g}" '
            f'style="background:rgba({rgb},{0.75 * frac:.2f})">{html.escape(text)}</span>'
        )
    return "".join(parts)


def _snippet(text: str, limit: int = 420) -> str:
    return text if len(text) <= limit else text[: text.rfind(" ", 0, limit) if " " in text[:limit] else limit] + " …"


# --------------------------------------------------------------------------------------------
# Plots (inline SVG).


def _fmt(x: float) -> str:
    return f"{x:.3g}"


def histogram_svg(
    scores: np.ndarray, marks_pos: Sequence[float], marks_neg: Sequence[float], bins: int = HIST_BINS
) -> str:
    """An SVG histogram of `scores` with the helpful (green) and harmful (red) top scores as ticks.

    Each bar carries `data-count` (its number of examples) so that tests can read the plot back.
    """
    W, H, L, B = 560, 170, 40, 30
    finite = scores[np.isfinite(scores)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi <= lo:
        lo, hi = lo - 0.5, hi + 0.5
    counts, edges = np.histogram(finite, bins=bins, range=(lo, hi))
    top = max(int(counts.max()), 1)
    pw, ph = W - L - 10, H - B - 10
    bw = pw / bins
    parts = [
        f'<svg class="hist" viewBox="0 0 {W} {H}" width="{W}" height="{H}" role="img" '
        f'aria-label="histogram of {finite.size} scores">'
    ]
    for i, c in enumerate(counts):
        h = ph * c / top
        parts.append(
            f'<rect class="bar" data-count="{int(c)}" x="{L + i * bw:.1f}" y="{10 + ph - h:.1f}" '
            f'width="{max(bw - 1, 0.5):.1f}" height="{h:.1f}">'
            f"<title>[{_fmt(edges[i])}, {_fmt(edges[i + 1])}): {int(c)}</title></rect>"
        )

    def x_of(v: float) -> float:
        return L + pw * (v - lo) / (hi - lo)

    for cls, values in (("pos", marks_pos), ("neg", marks_neg)):
        for v in values:
            parts.append(
                f'<line class="{cls}" x1="{x_of(v):.1f}" x2="{x_of(v):.1f}" y1="{10 + ph}" y2="{10 + ph + 8}"/>'
            )
    if lo < 0 < hi:
        parts.append(f'<line class="zero" x1="{x_of(0):.1f}" x2="{x_of(0):.1f}" y1="10" y2="{10 + ph}"/>')
    parts.append(f'<line class="axis" x1="{L}" x2="{L + pw}" y1="{10 + ph}" y2="{10 + ph}"/>')
    parts.append(f'<text x="{L}" y="{H - 4}">{_fmt(lo)}</text>')
    parts.append(f'<text x="{L + pw}" y="{H - 4}" text-anchor="end">{_fmt(hi)}</text>')
    parts.append(f'<text x="{L + pw / 2}" y="{H - 4}" text-anchor="middle">score</text>')
    parts.append(f'<text x="{L - 4}" y="18" text-anchor="end">{top}</text>')
    parts.append(f'<text x="{L - 4}" y="{10 + ph}" text-anchor="end">0</text>')
    parts.append("</svg>")
    return "".join(parts)


def bars_svg(docs: Sequence[ReportDocument], scale: float) -> str:
    """Horizontal bars, one per document, length |score| / scale, green for positive, red for negative."""
    W, row = 560, 22
    H = row * len(docs) + 6
    parts = [f'<svg class="bars" viewBox="0 0 {W} {H}" width="{W}" height="{H}">']
    for i, d in enumerate(docs):
        frac = min(abs(d.score) / scale, 1.0) if scale > 0 and math.isfinite(d.score) else 0.0
        y = 3 + i * row
        cls = "pos" if d.score >= 0 else "neg"
        label = html.escape(str(d.id))[:18]
        parts.append(f'<text x="120" y="{y + 15}" text-anchor="end">{label}</text>')
        parts.append(
            f'<rect class="{cls}" data-score="{d.score:.6g}" x="126" y="{y + 2}" '
            f'width="{max(340 * frac, 1):.1f}" height="{row - 6}"/>'
        )
        parts.append(f'<text x="{130 + 340 * frac:.1f}" y="{y + 15}">{_fmt(d.score)}</text>')
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------------------------
# The page.

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem} h2{font-size:1.2rem;margin:0 0 .5rem} .sub{color:#666;margin-top:0}
table.settings{border-collapse:collapse;font-size:.85rem;margin:.5rem 0 1.5rem}
table.settings td{border-bottom:1px solid #eee;padding:.15rem .8rem .15rem 0} table.settings td:first-child{color:#666}
section.query{border:1px solid #ddd;border-radius:8px;padding:1rem 1.2rem;margin:1.5rem 0;box-shadow:0 1px 3px #0001}
.qtext{background:#f6f8fa;border-radius:6px;padding:.6rem .8rem;white-space:pre-wrap}
.qtext b{color:#555;font-weight:600}
.plots{display:flex;flex-wrap:wrap;gap:1rem;margin:.8rem 0}
.plots figure{margin:0} figcaption{font-size:.8rem;color:#666}
svg text{font-size:11px;fill:#444} svg .bar{fill:#8aa4c8} svg .axis,svg .zero{stroke:#888;stroke-width:1}
svg .zero{stroke-dasharray:3 3} svg rect.pos{fill:#2e9d57} svg rect.neg{fill:#d2453d}
svg line.pos{stroke:#2e9d57;stroke-width:2} svg line.neg{stroke:#d2453d;stroke-width:2}
.cols{display:grid;grid-template-columns:1fr 1fr;gap:1rem} @media(max-width:800px){.cols{grid-template-columns:1fr}}
ol.docs{padding-left:1.3rem;margin:.3rem 0} ol.docs li{margin:.45rem 0;font-size:.88rem;line-height:1.35}
.score{font-variant-numeric:tabular-nums;font-weight:600} .pos .score{color:#1f7a40} .neg .score{color:#b3261e}
.id{color:#666;font-size:.8rem} .tokens{white-space:pre-wrap} .tok{border-radius:2px}
details summary{cursor:pointer;color:#555;font-size:.8rem} .note{font-size:.8rem;color:#666}
.scale{color:#555;font-size:.78rem}
.meta{color:#555;font-size:.78rem;background:#f3f3f3;border-radius:3px;padding:0 .3rem}
.explain{margin:.2rem 0 .6rem;max-width:60rem}
"""


def _doc_items(docs: Sequence[ReportDocument]) -> str:
    items = []
    for d in docs:
        if d.tokens is not None:
            body = f'<span class="tokens">{tokens_html(d.tokens)}</span>'
        else:
            short = _snippet(d.text)
            full = "" if short == d.text else f"<details><summary>full text</summary>{html.escape(d.text)}</details>"
            body = html.escape(short) + full
        if d.query_tokens is not None:
            body += (
                "<details><summary>query tokens this document explains</summary>"
                f'<span class="tokens">{tokens_html(d.query_tokens)}</span></details>'
            )
        items.append(
            f'<li><span class="score">{_fmt(d.score)}</span>{_scale_html(d)} '
            f'<span class="id">[{html.escape(str(d.id))}]</span>{_metadata_html(d)} {body}</li>'
        )
    return "".join(items)


def _scale_html(d: ReportDocument) -> str:
    """' 0.83 of top · 99th pct': the score against its query's scale, when known."""
    parts = []
    if d.fraction is not None:
        parts.append(f"{d.fraction:.2f} of top")
    if d.percentile is not None:
        parts.append(f"{_ordinal(d.percentile)} pct")
    return f' <span class="scale">{" · ".join(parts)}</span>' if parts else ""


def _ordinal(p: float) -> str:
    """99.5 -> '99.5th', 1 -> '1st', 0 -> '0th'."""
    r = round(p, 1)
    if r != int(r):
        return f"{r:.1f}th"
    n = int(r)
    return f"{n}" + ("th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th"))


def _metadata_html(d: ReportDocument) -> str:
    if not d.metadata:
        return ""
    cells = " ".join(f"<b>{html.escape(str(k))}</b>: {html.escape(str(v)[:80])}" for k, v in d.metadata.items())
    return f' <span class="meta">{cells}</span>'


SCALE_SENTENCE = (
    "Each score is the change in the query's loss predicted from up-weighting that training example (positive: "
    "training on it lowers the loss), shown beside its fraction of the query's largest |score| and its percentile "
    "among the scores of all training examples for that query, so that sizes compare within and across queries."
)


def _query_section(i: int, q: ReportQuery) -> str:
    prompt = f"<b>{html.escape(q.prompt)}</b>" if q.prompt else ""
    scale = max([abs(d.score) for d in q.helpful + q.harmful if math.isfinite(d.score)] or [1.0])
    k = len(q.helpful)
    return f"""<section class="query" id="q{i}">
<h2>Query {i + 1} <span class="id">[{html.escape(str(q.id))}]</span></h2>
<div class="qtext">{prompt}{html.escape(q.text)}</div>
<div class="plots">
<figure>{histogram_svg(q.scores, [d.score for d in q.helpful], [d.score for d in q.harmful])}
<figcaption>Scores of all {q.scores.size} training examples; ticks mark the top {k} helpful (green)
and harmful (red).</figcaption></figure>
<figure>{bars_svg(q.helpful + q.harmful, scale)}<figcaption>Top {k} helpful and harmful scores.</figcaption></figure>
</div>
<div class="cols">
<div class="pos"><h3>Most helpful</h3><ol class="docs">{_doc_items(q.helpful)}</ol></div>
<div class="neg"><h3>Most harmful</h3><ol class="docs">{_doc_items(q.harmful)}</ol></div>
</div>{_confirmed_html(q.confirmed)}
</section>"""


def _confirmed_html(c: Confirmation | None) -> str:
    if c is None:
        return ""
    items = "".join(
        f'<li><span class="score">{_fmt(d.gain)}</span> <span class="scale">score rank {d.score_rank} · score '
        f'{_fmt(d.score)}</span> <span class="id">[{html.escape(str(d.id))}]</span> '
        f"{html.escape(_snippet(d.text))}</li>"
        for d in c.documents
    )
    return (
        f'\n<div class="pos confirmed"><h3>Confirmed by fine-tuning</h3><p class="note">Each of the top '
        f"{len(c.documents)} helpful documents trained on alone from the model's weights ({html.escape(c.recipe)}), "
        "ordered by how much this query's loss fell (the gain, in the loss's units).</p>"
        f'<ol class="docs">{items}</ol></div>'
    )


def render_html(
    queries: Sequence[ReportQuery], title: str = "logra influence report", settings: Mapping[str, object] | None = None
) -> str:
    """The whole report as one HTML string (no external resources)."""
    rows = "".join(
        f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(str(v))}</td></tr>" for k, v in (settings or {}).items()
    )
    body = "\n".join(_query_section(i, q) for i, q in enumerate(queries))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width,initial-scale=1">
<title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="explain">{html.escape(SCALE_SENTENCE)}</p>
<p class="sub">Which training examples made the model say what it said. A positive score means training on the
example lowers the query's loss (helpful); a negative score raises it (harmful). Where per-token shares were
computed, each token is coloured by its share of the score: <span class="tok" style="background:rgba(46,157,87,.6)">
raises it</span>, <span class="tok" style="background:rgba(210,69,61,.6)">lowers it</span>.</p>
<table class="settings">{rows}</table>
{body}
<p class="note">Written by logra. Self-contained: no scripts, no network resources.</p>
</body></html>
"""


def write_report(
    path: str | os.PathLike[str],
    queries: Sequence[ReportQuery],
    title: str = "logra influence report",
    settings: Mapping[str, object] | None = None,
) -> Path:
    """Write `render_html(...)` to `path` (UTF-8) and return the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, render_html(queries, title, settings).encode("utf-8"))
    return out


def format_summary(queries: Sequence[ReportQuery], width: int = 100, show: int = 3) -> str:
    """A plain-text summary: each query and its `show` most helpful and harmful examples."""
    lines = []
    for i, q in enumerate(queries):
        text = (q.prompt or "") + ("" if not q.prompt else " ▸ ") + q.text
        lines.append(f"Query {i + 1} [{q.id}]: " + textwrap.shorten(text, width - 12, placeholder=" …"))
        for label, docs in (("helpful", q.helpful), ("harmful", q.harmful)):
            lines.append(f"  most {label}:")
            for d in docs[:show]:
                scale = f" ({d.fraction:+.2f} of top, {_ordinal(d.percentile)} pct)" if d.fraction is not None and \
                    d.percentile is not None else ""  # fmt: skip
                lines.append(f"    {d.score:+.3g}{scale}  [{d.id}] " + textwrap.shorten(d.text, width - 24,
                                                                                   placeholder=" …"))  # fmt: skip
        if q.confirmed is not None:
            lines.append(f"  confirmed by fine-tuning ({q.confirmed.recipe}):")
            for c in q.confirmed.documents[:show]:
                lines.append(f"    gain {c.gain:+.3g} (score rank {c.score_rank})  [{c.id}] "
                             + textwrap.shorten(c.text, width - 34, placeholder=" …"))  # fmt: skip
        lines.append("")
    return "\n".join(lines)
