"""Turn benchmarks/results/*.json into the results section of the READMEs.

Reads `throughput`, `e2e` and `accuracy` results (of each, the newer of the `*_peers` file written by
`make bench-peers` and the logra-only file of `make bench`), and writes a markdown
section with the date, versions and machine, one table per measurement, the issue's targets
with what was reached, and where a peer wins. The section replaces the text between
`<!-- BENCHMARKS:START -->` and `<!-- BENCHMARKS:END -->` in each file given with --write
(default: benchmarks/README.md, and README.md when it has the markers).

    .venv/bin/python benchmarks/report.py            # print and write the section
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
START, END = "<!-- BENCHMARKS:START -->", "<!-- BENCHMARKS:END -->"


OURS = ("floor", "logra", "logra-kfac", "logra-ekfac", "logra, no projection", "gradient dot product",
        "logra, pca projection (2 passes)", "logra, true Fisher")  # fmt: skip


PEERS = ("logix-ai", "kronfluence", "traker", "bergson")  # distributions named in the header
PEER_LABELS = ("Kronfluence", "LogIX", "TRAK", "Bergson")  # accuracy rows of a peer start with one of these


def when(r: dict[str, Any]) -> str:
    """' †' for a row kept from an earlier run of its table (bench_common.merged_rows; see `kept_note`)."""
    return " †" if "measured" in r else ""


def kept_note(*tables: dict[str, Any] | None) -> list[str]:
    """The header's line on rows marked † (re-running one tool keeps the others' rows)."""
    dates = sorted({r["measured"] for t in tables if t for r in t["rows"] if "measured" in r})
    if not dates:
        return []
    return [f"Rows marked † were measured on {', '.join(dates)} by an earlier run of the same command and "
            "kept when only the other tools were re-run; every time figure is a ratio to a bare pass "
            "measured in its own process, so the rows compare.", ""]  # fmt: skip


def load(name: str, results: Path = HERE / "results") -> dict[str, Any] | None:
    """results/<name>_peers.json (make bench-peers) with logra's rows from results/<name>.json (make
    bench) when that file is newer; either file alone when only one exists.

    Every time figure is a ratio to a bare pass measured in the same process, so rows from two
    runs stay comparable; the header then names both dates (`machine["logra_rows"]`).
    """
    peers_path, ours_path = results / f"{name}_peers.json", results / f"{name}.json"
    if not peers_path.exists():
        return json.loads(ours_path.read_text()) if ours_path.exists() else None
    merged = json.loads(peers_path.read_text())
    if ours_path.exists() and ours_path.stat().st_mtime > peers_path.stat().st_mtime:
        ours = json.loads(ours_path.read_text())
        merged["rows"] = ours["rows"] + [r for r in merged["rows"] if r["tool"] not in OURS]
        merged["machine"] = {**merged["machine"], "logra_rows": ours["machine"]["date"]}
    return merged


def header(m: dict[str, Any]) -> str:
    v = m["versions"]
    peers = ", ".join(f"{k} {v[k]}" for k in PEERS if v.get(k, "-") != "-")
    return (
        f"Measured {m['date']} on {m['cpu']} ({m['cores']} cores, {m['memory_gib']} GiB), Python {m['python']}, "
        f"torch {v['torch']} (CPU, {m['threads']} thread), transformers {v['transformers']}, logra {v['logra']}"
        + (f"; peers: {peers}" if peers else "; peers not installed")
        + "."
        + (f" logra's own rows were re-measured on {m['logra_rows']} by `make bench`." if "logra_rows" in m else "")
    )


def fmt(x: float | None, digits: int = 2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def throughput_table(t: dict[str, Any]) -> list[str]:
    lines = [
        "| tool | k | statistics | weight grads | time / bare | examples/s | tokens/s | peak MiB (bare) "
        "| bytes/example |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in t["rows"]:
        tool = {
            "floor": "floor: forward + activation gradients, no hooks",
            "logra": "logra",
            "logix": "LogIX",
            "trak": f"TRAK (proj_dim {r.get('proj_dim', '?')})",
            "bergson": "Bergson build" + (" + its KFAC covariance pass" if r.get("hessian") == "kfac" else ""),
        }[r["tool"]] + when(r)
        stats = {
            "floor": "–",
            "logra": "yes" if r.get("statistics") else "no",
            "logix": "KFAC" if r.get("hessian") == "kfac" else "no",
            "trak": "–",
            "bergson": "KFAC (2nd pass)" if r.get("hessian") == "kfac" else "no",
        }[r["tool"]]
        grads = {"floor": "no", "logra": "yes" if r.get("param_grads") else "no", "logix": "no", "trak": "–",
                 "bergson": "no"}[r["tool"]]  # fmt: skip
        k = "–" if r["k"] is None else r["k"]
        if "error" in r:
            lines.append(f"| {tool} | {k} | {stats} | {grads} | did not run: {r['error'][:160]} | | | | |")
            continue
        lines.append(
            f"| {tool} | {k} | {stats} | {grads} | {r['time_ratio']:.2f} | {r['examples_per_s']:.1f} "
            f"| {r['tokens_per_s']:.0f} "
            f"| {r['tool_peak_mib']:.0f} ({r['bare_peak_mib']:.0f}) | {r['bytes_per_example']:,.0f} |"
        )
    return lines


def e2e_table(e: dict[str, Any]) -> list[str]:
    more = sorted({int(q) for r in e["rows"] for q in r.get("more", {})})
    lines = [
        "| tool | phases (CPU s) | total × N·bare | peak memory / bare | "
        + " | ".join(f"+{q} queries × N·bare" for q in more)
        + " |",
        "| --- | --- | --- | --- |" + " --- |" * len(more),
    ]
    for r in e["rows"]:
        tool = r["tool"] + (f" (k={r['k']})" if r.get("k", e["k"]) != e["k"] else "") + when(r)
        if "error" in r:
            lines.append(f"| {tool} | did not run: {r['error'][:200]} | | |" + " |" * len(more))
            continue
        phases = ", ".join(
            f"{k[:-2]} {v:.1f}" for k, v in r.items() if k.endswith("_s") and k not in ("bare_s", "total_s")
        )
        extra = " | ".join(fmt(r["more"].get(str(q), {}).get("n_bare")) for q in more)
        lines.append(
            f"| {tool} | {phases} | {r['cost_n_bare']:.2f} | {r['peak_ratio']:.2f} "
            f"({r['peak_mib']:.0f} / {r['bare_peak_mib']:.0f} MiB) | {extra} |"
        )
    return lines


def query_sets(e: dict[str, Any], sets: tuple[int, ...] = (1, 4, 16, 64)) -> list[str]:
    """Cost of scoring m query sets of Q arriving one after another: first run + (m-1) x marginal."""
    rows = {r["tool"]: r for r in e["rows"] if "error" not in r and str(e["q"]) in r.get("more", {})}
    if "logra-ekfac" not in rows or "kronfluence-ekfac" not in rows:
        return []
    q = e["q"]
    lines = [
        f"| query sets of {q} | " + " | ".join(rows) + " | Kronfluence / logra-ekfac |",
        "| --- |" + " --- |" * (len(rows) + 1),
    ]
    for m in sets:
        cost = {t: r["cost_n_bare"] + (m - 1) * r["more"][str(q)]["n_bare"] for t, r in rows.items()}
        ratio = cost["kronfluence-ekfac"] / cost["logra-ekfac"]
        lines.append(
            f"| {m} ({m * q} queries) | " + " | ".join(f"{c:.2f}" for c in cost.values()) + f" | {ratio:.1f}× |"
        )
    return lines


def storage_lines(t: dict[str, Any] | None, e: dict[str, Any] | None) -> list[str]:
    """Bytes on disk per training example (3): each tool without statistics, and what e2e left."""
    lines = ["| tool | setting | bytes / example |", "| --- | --- | --- |"]
    for r in (t or {}).get("rows", []):
        if (
            r["tool"] == "floor"
            or "error" in r
            or r.get("statistics")
            or r.get("param_grads")
            or r.get("hessian") == "kfac"
        ):
            continue
        setting = f"proj_dim {r['proj_dim']}" if r["tool"] == "trak" else f"k={r['k']}"
        setting += " (its index: k x k per layer, float32)" if r["tool"] == "bergson" else ""
        lines.append(f"| {r['tool']} | {setting}, {r['batches'] * 8} examples | {r['bytes_per_example']:,.0f} |")
    for r in (e or {}).get("rows", []):
        if "error" not in r:
            per = f"{r['stored_bytes'] / e['n']:,.0f}"
            if r["tool"].startswith(("kron", "bergson")):
                per = "0 (recomputes training gradients for every query set)"
            total = f"{r['stored_bytes'] / 2**20:,.0f} MiB in all"
            setting = f"end to end, k={r.get('k', e['k'])}, N={e['n']}, with statistics / factors"
            lines.append(f"| {r['tool']} | {setting} | {per} ({total}) |")
    return lines if len(lines) > 2 else []


def accuracy_tables(a: dict[str, Any]) -> list[str]:
    lines = []
    for task in dict.fromkeys(r["task"] for r in a["rows"]):
        r0 = a["recipes"][task]
        lines += [
            "",
            f"**{task}** ({r0['n_train']} training examples, {r0['n_query']} queries, {r0['n_subsets']} "
            f"subsets of {r0['fraction']:.0%} x {r0['seeds']} seeds):",
            "",
            *module_note(a.get("modules", {}).get(task)),
            "| method | k | floats stored / example | LDS (mean ± sd over seeds) |",
            "| --- | --- | --- | --- |",
        ]
        for r in a["rows"]:
            if r["task"] != task:
                continue
            name = (
                r["tool"]
                if r["tool"] in ("gradient dot product", "TRAK (1 model)") or r["tool"].startswith("Bergson TrackStar")
                else f"{r['tool']} {r.get('method', '')}"
            ) + when(r)
            k = "full" if r["k"] is None else r["k"]
            if "error" in r:
                lines.append(f"| {name} | {k} | | did not run: {r['error'][:160]} |")
            else:
                spread = f" ± {r['lds_std']:.3f}" if r.get("lds_std") is not None else ""
                lines.append(f"| {name} | {k} | {r['row_floats']:,} | {r['lds']:.3f}{spread} |")
    return lines


def module_note(m: dict[str, Any] | None) -> list[str]:
    """Which layers the tools log on a task (each is handed the same list), and Bergson's default set."""
    if not m:
        return []
    skips = m.get("bergson_default_skips") or []
    logged_out = [n for n in skips if n in m["logged"]]
    if logged_out:
        bergson = (f"; Bergson hooks only modules under `model.base_model`, so its rows go without "
                   f"{', '.join(f'`{n}`' for n in logged_out)}")  # fmt: skip
    elif skips:
        bergson = f"; Bergson's default module set (under `model.base_model`) would leave out {', '.join(skips)}"
    else:
        bergson = "; Bergson's default module set covers them all"
    return [f"Every tool is handed the same {len(m['logged'])} layers{bergson}.", ""]


def lds(a: dict[str, Any], task: str, tool: str, method: str | None, k: int | None) -> float | None:
    for r in a["rows"]:
        if r["task"] == task and r["tool"] == tool and r.get("method") == method and r["k"] == k and "lds" in r:
            return float(r["lds"])
    return None


def targets(t: dict | None, e: dict | None, a: dict | None) -> list[str]:
    """The issue's targets for logra, each with the measured value and whether it is met."""
    out = []

    def line(text: str, value: str, ok: bool | None) -> None:
        out.append(f"| {text} | {value} | {'–' if ok is None else ('met' if ok else '**not met**')} |")

    if t:
        by = {(r["tool"], r["k"], r.get("statistics"), r.get("param_grads"), r.get("hessian")): r for r in t["rows"]}
        for k in sorted({r["k"] for r in t["rows"] if r["tool"] == "logix"}):
            ours, theirs = by.get(("logra", k, True, False, None)), by.get(("logix", k, None, None, "kfac"))
            if ours and theirs and "error" not in ours and "error" not in theirs:
                speedup = theirs["time_ratio"] / ours["time_ratio"]  # each over its own bare pass
                floor = by.get(("floor", None, None, None, None))
                bound = theirs["time_ratio"] / floor["time_ratio"] if floor and "error" not in floor else None
                unreachable = (
                    f" (no logging pass can reach it here: the floor is {bound:.2f}× LogIX's throughput)"
                    if bound is not None and bound < 1.5
                    else ""
                )
                line(
                    f"logging with statistics ≥ 1.5× LogIX KFAC throughput (k={k}, weight grads off)",
                    f"{speedup:.2f}×{unreachable}",
                    speedup >= 1.5,
                )
        for k in sorted({r["k"] for r in t["rows"] if r["tool"] == "bergson"}):
            ours = by.get(("logra", k, True, False, None))
            for hessian, what in (("none", "its build alone, no statistics"), ("kfac", "build + its KFAC pass")):
                theirs = by.get(("bergson", k, None, None, hessian))
                if ours and theirs and "error" not in ours and "error" not in theirs:
                    speedup = theirs["time_ratio"] / ours["time_ratio"]
                    line(f"logging with statistics ≥ Bergson's throughput (k={k}, {what})", f"{speedup:.2f}×",
                         speedup >= 1.0)  # fmt: skip
    if e:
        for r in e["rows"]:
            if r["tool"].startswith("logra") and "error" not in r:
                line(f"{r['tool']}: end to end ≤ 1.5× N·bare", f"{r['cost_n_bare']:.2f}×", r["cost_n_bare"] <= 1.5)
                line(f"{r['tool']}: peak memory ≤ 1.2× bare", f"{r['peak_ratio']:.2f}×", r["peak_ratio"] <= 1.2)
                for q, m in r.get("more", {}).items():
                    line(
                        f"{r['tool']}: scoring {q} more queries < one pass over the corpus",
                        f"{m['n_bare']:.2f} N·bare",
                        m["n_bare"] < 1.0,
                    )
    if a:
        for task in dict.fromkeys(r["task"] for r in a["rows"]):
            for fisher, name in (("true Fisher", "Kronfluence"), ("empirical Fisher", "Kronfluence, empirical Fisher")):
                kron = lds(a, task, name, "ekfac", None)
                for method in ("kfac", "ekfac"):
                    ours = lds(a, task, "logra", method, 64)
                    if ours is not None and kron is not None:
                        line(
                            f"{task}: logra {method} LDS at k=64 within 0.02 of Kronfluence EK-FAC ({fisher})",
                            f"{ours:.3f} vs {kron:.3f}",
                            ours >= kron - 0.02,
                        )
            for r in a["rows"]:
                if r["task"] == task and r["tool"].startswith("TRAK") and "lds" in r:
                    ours = lds(a, task, "logra", "ekfac", r["k"])
                    if ours is not None:
                        line(
                            f"{task}: logra ekfac above single-model TRAK at equal storage (k={r['k']})",
                            f"{ours:.3f} vs {r['lds']:.3f}",
                            ours > r["lds"],
                        )
    return (["| target | measured | |", "| --- | --- | --- |"] + out) if out else []


LOGRA_K64 = ("logra", "logra, true Fisher")  # one logging pass at k, as a user runs it


def targets_17(a: dict | None) -> list[str]:
    """Issue 17's benchmark target (digits-mlp LDS at k = 64 >= 0.55), with the reason when missed."""
    if not a:
        return []
    best = max((r for r in a["rows"] if r["task"] == "digits-mlp" and r["tool"] in LOGRA_K64 and r["k"] == 64
                and "lds" in r), key=lambda r: r["lds"], default=None)  # fmt: skip
    if best is None:
        return []
    full = lds(a, "digits-mlp", "logra, no projection", "ekfac", None)
    kron = [lds(a, "digits-mlp", name, "ekfac", None) for name in ("Kronfluence", "Kronfluence, empirical Fisher")]
    ceiling = max([x for x in (full, *kron) if x is not None], default=None)
    reason = (
        f" — unprojected EK-FAC (logra's, empirical Fisher; Kronfluence's, either Fisher) reaches at most "
        f"{ceiling:.3f} here, so 0.55 is beyond Kronecker-factored influence on this task at any k"
        if ceiling is not None and ceiling < 0.55
        else ""
    )
    ok = best["lds"] >= 0.55
    return [
        "| target | measured | |",
        "| --- | --- | --- |",
        f"| digits-mlp: LDS at k=64 ≥ 0.55 | {best['lds']:.3f} ({best['tool']} {best['method']}){'' if ok else reason} "
        f"| {'met' if ok else '**not met**'} |",
    ]


def k64_bytes(b: dict[str, Any], task: str) -> int | None:
    """Bytes per example of uniform k = 64 float32 LoGra on `task` (the issue's storage line)."""
    return next((r["bytes"] for r in b["rows"] if r["task"] == task and r["candidate"] == "uniform k, float32"
                 and r["k"] == 64), None)  # fmt: skip


def best_within(b: dict[str, Any], task: str, method: str = "ekfac") -> dict[str, Any] | None:
    """The candidate of highest LDS that stores no more than uniform k = 64 float32."""
    limit = k64_bytes(b, task)
    rows = [r for r in b["rows"] if r["task"] == task and r["method"] == method and limit is not None
            and r["bytes"] <= limit and "no projection" not in r["candidate"]]  # fmt: skip
    return max(rows, key=lambda r: r["lds"], default=None)


def targets_17_lm(b: dict | None) -> list[str]:
    """Issue 17's language-model targets, from benchmarks/bytes_curve.py."""
    if not b:
        return []
    out = []
    for task in dict.fromkeys(r["task"] for r in b["rows"]):
        best = best_within(b, task)
        full = next((r["lds"] for r in b["rows"] if r["task"] == task and r["candidate"] == "logra, no projection"),
                    None)  # fmt: skip
        if best is None or full is None:
            continue
        what = f"{best['lds']:.3f} ({best['candidate']}, k={best['k']}, {best['bytes'] / 1024:,.0f} KiB) vs {full:.3f}"
        ok = best["lds"] >= full - 0.01
        out.append(f"| {task}: LDS within 0.01 of unprojected EK-FAC at ≤ k=64 float32 storage | {what} | "
                   f"{'met' if ok else '**not met**'} |")  # fmt: skip
        kron = b.get("kronfluence", {}).get(task)
        if kron is not None:
            ok = best["lds"] > kron
            out.append(f"| {task}: stretch, above Kronfluence EK-FAC | {best['lds']:.3f} vs {kron:.3f} | "
                       f"{'met' if ok else '**not met**'} |")  # fmt: skip
        else:
            out.append(f"| {task}: stretch, above Kronfluence EK-FAC | Kronfluence not run on this task "
                       "(`make bench-peers` has no news-lm adapter yet) | – |")  # fmt: skip
    for task, cost in b.get("logging_cost", {}).items():
        added = cost["budget_k64"] / cost["uniform_k64"] - 1
        out.append(f"| {task}: the budget adds ≤ 5 % to logging time | +{100 * added:.0f} % (×{cost['budget_k64']:.2f} "
                   f"bare vs ×{cost['uniform_k64']:.2f}; the probe pass ×{cost['probe']:.2f} bare over its sample) "
                   f"— so `--budget` stays opt-in | {'met' if added <= 0.05 else '**not met**'} |")  # fmt: skip
    return out


def peer_wins(t: dict | None, e: dict | None, a: dict | None, b: dict | None = None) -> list[str]:
    """Plain sentences for every comparison a peer wins."""
    wins = []
    if t:
        ours = {r["k"]: r for r in t["rows"] if r["tool"] == "logra" and r.get("statistics") and "error" not in r}
        for r in t["rows"]:
            if r["tool"] in ("logix", "bergson") and "error" not in r and r["k"] in ours:
                same_k = [x for x in t["rows"] if x["tool"] == "logra" and x["k"] == r["k"] and "time_ratio" in x]
                best = min(x["time_ratio"] for x in same_k)
                if r["time_ratio"] < best:
                    name = {"logix": "LogIX", "bergson": "Bergson"}[r["tool"]]
                    wins.append(f"{name} ({r['hessian']}, k={r['k']}) logs faster than every logra mode at that k "
                                f"({r['time_ratio']:.3f}× bare against logra's best {best:.3f}×).")  # fmt: skip
                least = min(x["bytes_per_example"] for x in same_k)
                if r["tool"] == "bergson" and r["hessian"] == "none" and r["bytes_per_example"] < least:
                    wins.append(f"Bergson's index at k={r['k']} takes fewer bytes per example "
                                f"({r['bytes_per_example']:,.0f}) than any logra store ({least:,.0f}).")  # fmt: skip
    if e:
        rows = [r for r in e["rows"] if "error" not in r]
        for r in rows:
            if not r["tool"].startswith("logra"):
                if r["cost_n_bare"] < min(x["cost_n_bare"] for x in rows if x["tool"].startswith("logra")):
                    wins.append(f"{r['tool']} is cheaper end to end than logra.")
                if r["peak_ratio"] < min(x["peak_ratio"] for x in rows if x["tool"].startswith("logra")):
                    wins.append(f"{r['tool']} peaks lower in memory than logra ({r['peak_ratio']:.2f}× bare).")
    if a:
        for r in a["rows"]:
            if r["tool"].startswith(PEER_LABELS) and "lds" in r:
                k = 64 if r["k"] is None else r["k"]
                ours = max(
                    (
                        x["lds"]
                        for x in a["rows"]
                        if x["task"] == r["task"] and x["tool"] in LOGRA_K64 and x["k"] == k and "lds" in x
                    ),
                    default=None,
                )
                if b and k == 64 and best_within(b, r["task"]) is not None:  # the budget stores no more
                    budget = best_within(b, r["task"])
                    ours = max(ours if ours is not None else -1.0, budget["lds"] if budget else -1.0)
                if ours is not None and r["lds"] > ours:
                    d = 3 if f"{r['lds']:.3f}" != f"{ours:.3f}" else 4  # a near tie shows its digits
                    wins.append(
                        f"{r['task']}: {r['tool']} {r.get('method', '')} (LDS {r['lds']:.{d}f}) beats the best "
                        f"logra method at k={k} ({ours:.{d}f})."
                    )
    return [f"- {w}" for w in wins] or ["- No peer wins any of the comparisons above in this run."]


def section(results: Path = HERE / "results") -> str:
    t, e, a = (load(name, results) for name in ("throughput", "e2e", "accuracy"))
    any_result = next((x for x in (t, e, a) if x), None)
    if any_result is None:
        return "No results yet: run `make bench` or `make bench-peers`."
    out = [header(any_result["machine"]), "", *kept_note(t, e, a)]
    if t:
        shape = t["model"]
        out += [
            f"**1. Logging throughput** — Llama-shaped model ({shape['num_hidden_layers']} layers, width "
            f"{shape['hidden_size']}, vocabulary {shape['vocab_size']}), batches of {t['batch'][0]} × {t['batch'][1]} "
            "tokens, 28 decoder Linear layers logged; CPU time over a bare forward+backward of the same batches "
            "(median of interleaved rounds); bytes/example = everything left on disk / examples.",
            "",
            *throughput_table(t),
            "",
        ]
    if e:
        out += [
            f"**2. End to end** — from the unprepared model to the {e['q']} × {e['n']} score matrix (k={e['k']}), "
            "in units of N·bare (one bare forward+backward over the N training sequences, same process); then "
            "the marginal cost of scoring more query sets against the same data.",
            "",
            *e2e_table(e),
            "",
        ]
        sets = query_sets(e)
        if sets:
            out += [
                "Query sets arriving one after another (first run + marginal cost per further set, in N·bare, "
                "from the measured phases above):",
                "",
                *sets,
                "",
            ]
    storage = storage_lines(t, e)
    if storage:
        out += ["**3. Storage** — bytes on disk per training example (rows, ids, manifest; statistics or "
                "factors where stated).", "", *storage, ""]  # fmt: skip
    if a:
        out += [
            "**4. Accuracy** — LDS (Spearman, mean over queries) against retraining on random subsets; "
            "recipes in `benchmarks/tasks.py`, ground truth cached in `benchmarks/cache/`.",
            *accuracy_tables(a),
            "",
        ]
    b = load("bytes_curve", results)
    if b:
        out += bytes_curve_lines(b)
    tg = targets(t, e, a)
    if tg:
        out += ["**Targets of issue 7**", "", *tg, ""]
    tg17 = targets_17(a)
    lm17 = targets_17_lm(b)
    if lm17:
        tg17 = (tg17 or ["| target | measured | |", "| --- | --- | --- |"]) + lm17
    if tg17:
        out += ["**Targets of issue 17** (the convex leave-one-out target is under *Scoring* above)", "", *tg17, ""]
    out += ["**Where a peer wins**", "", *peer_wins(t, e, a, b)]
    return "\n".join(out)


def bytes_curve_lines(b: dict[str, Any], method: str = "ekfac") -> list[str]:
    """Section 5: LDS against bytes per example on the language-model tasks (benchmarks/bytes_curve.py)."""
    out = [
        "**5. Accuracy per byte on language models** — LDS of EK-FAC against the bytes stored per training "
        "example, for each way of spending them (`benchmarks/bytes_curve.py`; "
        "plot: `benchmarks/results/bytes_curve.svg`). *budget* shares one row width D across layers "
        "(`logra.capture.budget.allocate_k`, from a statistics-only probe pass); its D is that of uniform k "
        "in the k column (twice that in bfloat16).",
        "",
        "![LDS against bytes per example](benchmarks/results/bytes_curve.svg)",
        "",
    ]
    for task in dict.fromkeys(r["task"] for r in b["rows"]):
        rows = [r for r in b["rows"] if r["task"] == task and r["method"] == method]
        full = next((r for r in rows if r["candidate"] == "logra, no projection"), None)
        head = next((r for r in rows if r["candidate"] == "LM head only, no projection"), None)
        refs = []
        if full:
            kib = full["bytes"] / 1024
            refs.append(f"logra EK-FAC without projection {full['lds']:.3f} ({kib:,.0f} KiB per example)")
        if head:
            refs.append(f"the LM head alone, without projection, {head['lds']:.3f} ({head['bytes'] / 1024:,.0f} KiB)")
        if task in b.get("kronfluence", {}):
            refs.append(f"Kronfluence EK-FAC {b['kronfluence'][task]:.3f}")
        if task in b.get("ceilings", {}):
            refs.append(f"seed-vs-seed ceiling {b['ceilings'][task]:.3f}")
        out += [f"*{task}* — " + "; ".join(refs) + ".", "",
                "| candidate | k | KiB / example | LDS (EK-FAC) | ± seeds | LDS (KFAC) |",
                "| --- | --- | --- | --- | --- | --- |"]  # fmt: skip
        kfac = {(r["candidate"], r["k"]): r["lds"] for r in b["rows"] if r["task"] == task and r["method"] == "kfac"}
        curve = [r for r in rows if r is not full and r is not head]
        for r in sorted(curve, key=lambda r: (r["candidate"], r["bytes"])):
            out.append(f"| {r['candidate']} | {r['k']} | {r['bytes'] / 1024:,.1f} | {r['lds']:.3f} | "
                       f"{fmt(r.get('lds_std'), 3)} | {fmt(kfac.get((r['candidate'], r['k'])), 3)} |")  # fmt: skip
        out.append("")
    return out


def write(path: Path, text: str) -> bool:
    if not path.exists():
        return False
    current = path.read_text()
    if START not in current or END not in current:
        return False
    if path.resolve().parent == HERE:  # benchmarks/README.md: image paths relative to this folder
        text = text.replace("](benchmarks/", "](")
    before, rest = current.split(START, 1)
    _, after = rest.split(END, 1)
    path.write_text(f"{before}{START}\n{text}\n{END}{after}")
    return True


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write", nargs="*", type=Path, default=[HERE / "README.md", HERE.parent / "README.md"])
    args = parser.parse_args()
    text = section()
    print(text)
    for path in args.write:
        if write(path, text):
            print(f"\n(wrote {path})")


if __name__ == "__main__":
    main()
