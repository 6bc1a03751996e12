"""Server-rendered pages of the admin app: HTML and inline SVG, no script.

The admin's CSP allows nothing but its own stylesheet, so every page works without
JavaScript: the charts are SVG drawn here, each with a text summary and a data table,
and every control is a plain form. Everything that comes from the store (names,
reasons, verdict sentences, operator names) is escaped on the way out.
"""

from __future__ import annotations

import html
import math
import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any
from urllib.parse import quote, urlencode

from ..store._model import Change
from ._auth import Principal

# Old is blue and new is orange, on white: both over 4.5:1, and new's lines are also
# dashed, so the two never depend on colour alone.
COLOURS = {"old": "#1c4f9c", "new": "#a8400e"}

ICON = (
    b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
    b'<rect width="8" height="16" fill="#1f5fa8"/><rect x="8" width="8" height="16" fill="#2e7d32"/></svg>'
)
"""The page's icon: blue and green halves."""

CSS = b"""\
:root{color-scheme:light;--ink:#1a1a1a;--muted:#4d4d4d;--line:#c8c8c8;--accent:#0b57a4;--bad:#a51d1d}
*{box-sizing:border-box}
body{margin:0;font:16px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--ink);
background:#fff}
.top{display:flex;flex-wrap:wrap;justify-content:space-between;align-items:baseline;gap:.5rem 2rem;
padding:.75rem 1.5rem;border-bottom:1px solid var(--line);background:#f4f6f9}
.top p{margin:0;color:var(--muted)}
.brand{font-weight:700;color:var(--ink);text-decoration:none}
main{max-width:72rem;margin:0 auto;padding:1rem 1.5rem 3rem}
h1{font-size:1.6rem;margin:.5rem 0 1rem;overflow-wrap:anywhere}
h2{font-size:1.25rem;margin:2rem 0 .75rem;padding-top:.5rem;border-top:1px solid var(--line)}
a{color:var(--accent)}
a:focus-visible,button:focus-visible,input:focus-visible,summary:focus-visible,[tabindex]:focus-visible{
outline:3px solid #e07b00;outline-offset:2px}
code{font-family:ui-monospace,"SFMono-Regular",Menlo,Consolas,monospace;overflow-wrap:anywhere}
.muted,.crumbs{color:var(--muted)}
.scroll{overflow-x:auto}
table{border-collapse:collapse;width:100%;margin:.5rem 0 1rem;font-variant-numeric:tabular-nums}
caption{text-align:left;color:var(--muted);padding:.25rem 0}
th,td{text-align:left;padding:.4rem .6rem;border-bottom:1px solid var(--line);vertical-align:top}
thead th{border-bottom:2px solid var(--ink)}
td.num,th.num{text-align:right}
.facts{display:grid;grid-template-columns:repeat(auto-fit,minmax(11rem,1fr));gap:.75rem;margin:0}
.facts div{border:1px solid var(--line);border-radius:6px;padding:.6rem .8rem}
.facts dt{color:var(--muted);font-size:.875rem}
.facts dd{margin:0;font-size:1.125rem;font-weight:600;overflow-wrap:anywhere}
.facts dd.big{font-size:2rem}
.verdict{border-left:4px solid var(--accent);padding:.5rem 1rem;margin:1rem 0;background:#f4f6f9}
.verdict p{margin:.25rem 0}
.badge{display:inline-block;padding:0 .45rem;border-radius:4px;border:1px solid currentColor;font-weight:600}
.d-rollback{color:var(--bad)}
.status{padding:.75rem 1rem;border:2px solid #1d6b32;border-radius:6px;background:#eaf6ed;color:#14501f}
.error{padding:.75rem 1rem;border:2px solid var(--bad);border-radius:6px;background:#fbeeee}
figure{margin:1rem 0 1.5rem}
figcaption{color:var(--muted)}
svg.chart{width:100%;height:auto;max-width:48rem;display:block}
svg.split{width:100%;max-width:32rem;height:auto;display:block;margin:.75rem 0}
svg text{font:12px system-ui,sans-serif;fill:#333}
svg .mark{font-size:11px;fill:#5a2a82}
details{margin:.5rem 0 1rem}
summary{cursor:pointer;color:var(--accent)}
.controls{display:grid;grid-template-columns:repeat(auto-fit,minmax(16rem,1fr));gap:1rem}
.controls form{border:1px solid var(--line);border-radius:6px;padding:.75rem 1rem}
.controls h3{font-size:1rem;margin:0 0 .5rem}
label{display:block;font-size:.875rem;margin:.5rem 0 .15rem}
input[type=number],input[type=text]{width:100%;padding:.4rem;font:inherit;border:1px solid #6b6b6b;
border-radius:4px}
button{margin-top:.75rem;padding:.45rem 1rem;font:inherit;font-weight:600;border-radius:4px;cursor:pointer;
border:1px solid var(--accent);background:var(--accent);color:#fff}
button.danger{border-color:var(--bad);background:var(--bad)}
"""

_TITLES = {
    400: "Bad request",
    401: "Sign in required",
    403: "Not allowed",
    404: "Not found",
    405: "Method not allowed",
    409: "Conflict: the page was stale",
    413: "Request too large",
    415: "Unsupported form",
    500: "Internal error",
    503: "Store unavailable",
}

_DONE = {
    "set": "Percent set",
    "promote": "Promoted",
    "rollback": "Rolled back",
    "pause": "Paused",
    "resume": "Resumed",
    "reset": "Assignments reset",
}


# -- formatting ---------------------------------------------------------------------------
def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}%"


def _rate(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 100:.2f}%"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds * 1000:.3g} ms" if seconds < 1 else f"{seconds:.3g} s"


def _count(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f}" if value == int(value) else f"{value:,.3g}"


def _utc(at: float, fmt: str = "%Y-%m-%d %H:%M:%S") -> str:
    return time.strftime(fmt, time.gmtime(at))


def _ago(seconds: float) -> str:
    s = max(0, round(seconds))
    if s < 120:
        return f"{s} s ago"
    if s < 7200:
        return f"{s // 60} min ago"
    return f"{s / 3600:.1f} h ago" if s < 172800 else f"{s // 86400} days ago"


def _time(at: float) -> str:
    return f'<time datetime="{_utc(at, "%Y-%m-%dT%H:%M:%SZ")}">{_utc(at)} UTC</time>'


def _href(root: str, path: str = "/") -> str:
    # The root arrives decoded (SCRIPT_NAME, root_path): quoted again for a URL, then escaped.
    return _e(quote(root) + path)


def _rollout_href(root: str, name: str) -> str:
    return _href(root, "/rollout?" + urlencode({"name": name}))


def _table(caption: str, head: Sequence[str], rows: Iterable[Sequence[str]], label: str) -> str:
    """A table in a scroll box; cells are HTML already; a heading ending in ``#`` marks a
    column of numbers (right-aligned); the first cell of a row is its header."""

    def cell(i: int, c: str) -> str:
        if i == 0:
            return f'<th scope="row">{c}</th>'
        return f'<td class="num">{c}</td>' if head[i].endswith("#") else f"<td>{c}</td>"

    ths = "".join(
        f'<th scope="col" class="num">{h[:-1]}</th>' if h.endswith("#") else f'<th scope="col">{h}</th>'
        for h in head
    )
    body = "".join("<tr>" + "".join(cell(i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    # Focusable with a name: a keyboard user can scroll a table wider than the screen.
    return (
        f'<div class="scroll" role="region" aria-label="{_e(label)}" tabindex="0"><table>'
        f"<caption>{caption}</caption><thead><tr>{ths}</tr></thead><tbody>{body}</tbody></table></div>"
    )


def _page(title: str, body: str, root: str, who: Principal | None) -> str:
    user = (
        f"<p>Signed in as <strong>{_e(who.name)}</strong> (role <code>{_e(who.role)}</code>)</p>"
        if who is not None
        else ""
    )
    return (
        '<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_e(title)} · canarymw</title>"
        f'<link rel="stylesheet" href="{_href(root, "/static/admin.css")}">'
        f'<link rel="icon" type="image/svg+xml" href="{_href(root, "/static/icon.svg")}"></head><body>'
        f'<header class="top"><a class="brand" href="{_href(root)}">canarymw rollouts</a>{user}</header>'
        f"<main>{body}</main></body></html>\n"
    )


def _stage(state: dict[str, Any]) -> str:
    return _e(state.get("stage") or "not guarded")


def _verdict(rollout: dict[str, Any]) -> tuple[str | None, str | None]:
    """The guard's decision (when it judges live) and the sentence behind it."""
    guard = rollout.get("guard")
    if guard is None:
        return None, None
    return guard.get("decision"), guard.get("sentence") or rollout["state"].get("verdict")


def _decision(decision: str | None) -> str:
    return "" if decision is None else f'<span class="badge d-{_e(decision)}">{_e(decision)}</span> '


# -- the list -----------------------------------------------------------------------------
def index(report: dict[str, Any], who: Principal, root: str) -> str:
    rollouts: dict[str, Any] = report["rollouts"]
    rows = []
    for name, r in rollouts.items():
        state, old, new = r["state"], r["variants"]["old"], r["variants"]["new"]
        decision, sentence = _verdict(r)
        verdict = (
            '<span class="muted">no guard</span>'
            if r.get("guard") is None
            else _decision(decision) + _e(sentence or "no verdict yet")
        )
        rows.append(
            (
                f'<a href="{_rollout_href(root, name)}">{_e(name)}</a>',
                _pct(state["percent"]),
                _stage(state) + (" · <strong>paused</strong>" if state["paused"] else ""),
                verdict,
                f"{_count(old['requests'])} / {_count(new['requests'])}",
                f"{_rate(old['error_rate'])} / {_rate(new['error_rate'])}",
                f"{_rate(r['success']['blended'])} / {_rate(r['success']['measured'])}",
                f"{_e(state['updated_by'])}, {_ago(r['age'])}",
            )
        )
    window = f"{report['window']:g} s"
    if rows:
        listing = _table(
            f"{len(rows)} rollout{'s' * (len(rows) != 1)}; traffic over the last {window}, "
            f"as of {_time(report['at'])}.",
            [
                "Rollout",
                "Percent on new#",
                "Stage",
                "Verdict",
                "Requests old / new#",
                "Error rate old / new#",
                "Success blended / measured#",
                "Last change",
            ],
            rows,
            "Rollouts",
        )
    else:
        listing = (
            "<p>The store holds no rollouts yet. A rollout appears once a process "
            "running it with this store has started.</p>"
        )
    return _page("Rollouts", f"<h1>Rollouts</h1>{listing}", root, who)


# -- one rollout --------------------------------------------------------------------------
def detail(
    report: dict[str, Any],
    name: str,
    history: list[Any],
    series: dict[str, Any],
    who: Principal,
    csrf: str,
    root: str,
    done: str | None,
) -> str:
    r = report["rollouts"][name]
    state = r["state"]
    parts = [f'<p class="crumbs"><a href="{_href(root)}">All rollouts</a></p>', f"<h1>{_e(name)}</h1>"]
    if done in _DONE:
        parts.append(
            f'<p class="status" role="status">{_DONE[done]}. The rollout is now at '
            f"{_pct(state['percent'])} on new{', paused' if state['paused'] else ''} "
            f"(version {state['version']}).</p>"
        )
    parts.append(_state_section(r))
    parts.append(_traffic_section(r, report["window"]))
    parts.append(_charts_section(series, history, report["at"]))
    if who.may_operate:
        parts.append(_controls(name, state, csrf, root))
    else:
        parts.append(
            '<h2 id="controls">Controls</h2><p class="muted">You may look but not change this '
            "rollout (role <code>read</code>).</p>"
        )
    parts.append(_audit(history, report["at"]))
    return _page(name, "".join(parts), root, who)


def _state_section(r: dict[str, Any]) -> str:
    state = r["state"]
    percent = float(state["percent"])
    facts = [
        ("Percent on new", f'<dd class="big" id="percent">{_pct(percent)}</dd>'),
        ("Stage", f'<dd id="stage">{_stage(state)}</dd>'),
        ("Paused", f'<dd id="paused">{"yes" if state["paused"] else "no"}</dd>'),
        ("Version", f'<dd id="version">{state["version"]}</dd>'),
        (
            "Last change",
            f"<dd>{_e(state['updated_by'] or 'unknown')}, {_ago(r['age'])}</dd>",
        ),
    ]
    dl = "".join(f"<div><dt>{k}</dt>{v}</div>" for k, v in facts)
    new_width = 400 * percent / 100
    split = (
        f'<svg class="split" viewBox="0 0 400 28" role="img" '
        f'aria-label="Split: {_pct(100 - percent)} of cohorts on old, {_pct(percent)} on new">'
        f'<rect x="0" y="4" width="400" height="20" fill="{COLOURS["old"]}"/>'
        f'<rect x="{400 - new_width:.1f}" y="4" width="{new_width:.1f}" height="20" fill="{COLOURS["new"]}"/>'
        "</svg>"
        f'<p class="muted">Old {_pct(100 - percent)} (blue), new {_pct(percent)} (orange). '
        f"Last reason: {_e(state['reason'] or 'none given')}.</p>"
    )
    guard = r.get("guard")
    if guard is None:
        verdict = (
            '<p id="verdict"><strong>Verdict:</strong> no guard judges this rollout; its percent '
            "changes only when an operator or a deploy changes it.</p>"
        )
    else:
        decision, sentence = _verdict(r)
        if guard.get("live"):
            said = f" (judged now): {_decision(decision)}{_e(sentence or 'none yet')}"
        elif sentence:
            said = f" (behind the guard's last action): {_e(sentence)}"
        else:
            said = ": none; the guard judges only while the rollout ramps."
        verdict = f'<p id="verdict"><strong>Verdict</strong>{said}</p>'
        if guard.get("outlook"):
            verdict += f"<p><strong>Next:</strong> {_e(guard['outlook'])}</p>"
        if guard.get("error"):
            verdict += f'<p class="error">{_e(guard["error"])}</p>'
    return f'<h2 id="state">State</h2><dl class="facts">{dl}</dl>{split}<div class="verdict">{verdict}</div>'


def _traffic_section(r: dict[str, Any], window: float) -> str:
    rows = [
        (
            _e(variant),
            _count(v["requests"]),
            _count(v["errors"]),
            _rate(v["error_rate"]),
            _ms(v["p50"]),
            _ms(v["p95"]),
            _ms(v["p99"]),
        )
        for variant, v in r["variants"].items()
    ]
    variants = _table(
        f"Per variant, over the last {window:g} s.",
        ["Variant", "Requests#", "Errors#", "Error rate#", "p50#", "p95#", "p99#"],
        rows,
        "Traffic per variant",
    )
    success = r["success"]
    percent = r["state"]["percent"]
    lines = [
        f"<p><strong>Blended success estimate</strong> at {_pct(percent)} on new: "
        f'<span id="blended">{_rate(success["blended"])}</span> · '
        f"<strong>measured</strong> success rate: "
        f'<span id="measured">{_rate(success["measured"])}</span></p>',
        '<p class="muted">The blended estimate weighs each variant\'s success rate by the configured '
        "split; the measured rate is what the requests that arrived saw.</p>",
    ]
    blended = (r.get("guard") or {}).get("blended")
    if blended:
        confidence = f"{blended.get('confidence', 0.95) * 100:g}%"
        spans = [
            (label, _pct(b["percent"]), _rate(b["low"]), _rate(b["estimate"]), _rate(b["high"]))
            for label, key in (("now", "now"), ("at the next step", "next"), ("at 100%", "full"))
            if (b := blended.get(key)) is not None
        ]
        lines.append(
            _table(
                f"Blended success estimate with its {confidence} interval.",
                ["Split", "Percent on new#", "Low#", "Estimate#", "High#"],
                spans,
                "Blended success intervals",
            )
        )
    return (
        f'<h2 id="traffic">Traffic</h2>{variants}<h3>Success rate</h3>{"".join(lines)}'
        f"{_shadow_section(r.get('shadow'), window)}"
    )


def _shadow_section(shadow: dict[str, Any] | None, window: float) -> str:
    """Shadow comparisons: copies, never requests, so never in the variant table."""
    if shadow is None:
        return ""
    return (
        '<h3 id="shadow">Shadow traffic</h3>'
        "<p><strong>Mismatch rate:</strong> "
        f'<span id="mismatch-rate">{_rate(shadow["mismatch_rate"])}</span> '
        f"({_count(shadow['mismatches'])} of {_count(shadow['compared'])} compared copies differ from "
        f"the response the user got, over the last {window:g} s).</p>"
        f'<p class="muted">{_count(shadow["failures"])} copies failed or timed out and '
        f"{_count(shadow['dropped'])} were dropped (queue full); the shadow answered in "
        f"{_ms(shadow['p50'])} at the median and {_ms(shadow['p95'])} at p95. "
        "Which routes differ, and how, is in the serving process's <code>shadow.report()</code>.</p>"
    )


# -- charts -------------------------------------------------------------------------------
W, H, LEFT, RIGHT, TOP, BOTTOM = 640, 230, 64, 16, 26, 44


def _nice(value: float) -> float:
    """The smallest of 1, 2, 5 times a power of ten at or above ``value`` (axis tops)."""
    if value <= 0:
        return 1.0
    exp = 10.0 ** math.floor(math.log10(value))
    return next(m * exp for m in (1.0, 2.0, 5.0, 10.0) if value <= m * exp * (1 + 1e-9))


def _chart(
    cid: str,
    title: str,
    lines: dict[str, list[tuple[float, float | None]]],
    x0: float,
    x1: float,
    fmt: Callable[[float], str],
    marks: list[Change],
    summary: str,
    *,
    integer: bool = False,
) -> str:
    values = [v for points in lines.values() for _, v in points if v is not None]
    top = _nice(max(values, default=0.0))
    if integer:
        top = max(top, 2.0)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def sx(t: float) -> float:
        return LEFT + (t - x0) / (x1 - x0) * pw

    def sy(v: float) -> float:
        return TOP + ph - v / top * ph

    out = [
        f'<svg class="chart" id="{cid}" viewBox="0 0 {W} {H}" role="img" aria-label="{_e(title)}" '
        f'aria-describedby="{cid}-d"><title>{_e(title)}</title><desc id="{cid}-d">{_e(summary)}</desc>'
    ]
    for i in range(3):
        v = top * i / 2
        y = sy(v)
        out.append(
            f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#d5d5d5"/>'
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end">{_e(fmt(v))}</text>'
        )
    for i in range(4):
        t = x0 + (x1 - x0) * i / 3
        anchor = ("start", "middle", "middle", "end")[i]
        out.append(
            f'<line x1="{sx(t):.1f}" x2="{sx(t):.1f}" y1="{TOP + ph}" y2="{TOP + ph + 4}" stroke="#555"/>'
            f'<text x="{sx(t):.1f}" y="{TOP + ph + 17}" text-anchor="{anchor}">{_utc(t, "%H:%M:%S")}</text>'
        )
    out.append(
        f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{TOP + ph}" y2="{TOP + ph}" stroke="#555"/>'
        f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{TOP + ph}" stroke="#555"/>'
        f'<text x="{LEFT + pw / 2:.0f}" y="{H - 6}" text-anchor="middle">time (UTC)</text>'
    )
    # Labels are kept for the newest changes first; an older one too close to a label
    # already placed keeps its line and tooltip, not its (overlapping) word.
    xs = [sx(c.at) for c in marks]
    labelled: list[float] = []
    for x in reversed(xs):
        if all(abs(x - other) > 60 for other in labelled):
            labelled.append(x)
    for change, x in zip(marks, xs, strict=True):
        anchor = "end" if x > W - RIGHT - 30 else "start" if x < LEFT + 30 else "middle"
        label = (
            f'<text class="mark" x="{x:.1f}" y="{TOP - 6}" text-anchor="{anchor}">{_e(change.action)}</text>'
            if x in labelled
            else ""
        )
        out.append(
            f'<g class="change"><title>{_e(change.action)} by {_e(change.by)} '
            f"at {_utc(change.at)} UTC</title>"
            f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + ph}" stroke="#5a2a82" '
            f'stroke-dasharray="2 3"/>{label}</g>'
        )
    for n, (variant, points) in enumerate(lines.items()):
        colour = COLOURS.get(variant, "#333")
        dash = ' stroke-dasharray="7 4"' if variant != "old" else ""
        segments: list[list[tuple[float, float]]] = [[]]
        for t, value in points:
            if value is None:
                segments.append([])
            else:
                segments[-1].append((sx(t), sy(value)))
        out.append(f'<g class="series" data-variant="{_e(variant)}">')
        for seg in segments:
            if len(seg) == 1:
                out.append(f'<circle cx="{seg[0][0]:.1f}" cy="{seg[0][1]:.1f}" r="3" fill="{colour}"/>')
            elif seg:
                pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in seg)
                out.append(f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="2"{dash}/>')
        out.append("</g>")
        lx = LEFT + n * 75  # the legend, bottom left: clear of the change labels on top
        out.append(
            f'<line x1="{lx}" x2="{lx + 22}" y1="{H - 10}" y2="{H - 10}" stroke="{colour}" '
            f'stroke-width="2"{dash}/><text x="{lx + 27}" y="{H - 6}">{_e(variant)}</text>'
        )
    out.append("</svg>")
    return f"<figure>{''.join(out)}<figcaption>{_e(title)}: {_e(summary)}</figcaption></figure>"


def _charts_section(series: dict[str, Any], history: Sequence[Change], now: float) -> str:
    points: list[dict[str, Any]] = series.get("points") or []
    step = float(series.get("window_seconds") or 10)
    head = '<h2 id="charts">Last 60 minutes</h2>'
    if not points:
        return head + (
            "<p>No traffic recorded in the last 60 minutes: the charts appear once the app's "
            "processes report their outcomes to the store (a StoreSink, or a guarded rollout).</p>"
        )
    by_window = {int(p["window"]): p["variants"] for p in points}
    first, last = min(by_window), max(by_window)
    windows = list(range(first, last + 1, int(step)))
    x1 = max(last + step, now)
    x0 = min(first, x1 - 60)
    mid = step / 2
    variants = ("old", "new")

    def line(key: str, filled: bool) -> dict[str, list[tuple[float, float | None]]]:
        # A window without counters had no traffic (0 requests), but no latency either.
        gap = 0.0 if filled else None
        return {
            v: [(w + mid, by_window.get(w, {}).get(v, {}).get(key, gap)) for w in windows] for v in variants
        }

    marks = [c for c in history if x0 <= c.at <= x1]
    charts = []
    for key, title, fmt, filled in (
        ("requests", f"Requests per {step:g}-second window", _count, True),
        ("errors", f"Errors per {step:g}-second window", _count, True),
        ("p95", f"p95 latency per {step:g}-second window", _ms, False),
    ):
        lines = line(key, filled)
        summary = "; ".join(_summary(v, lines[v], key, fmt) for v in variants)
        if marks:
            summary += "; changes marked: " + ", ".join(
                f"{c.action} at {_utc(c.at, '%H:%M:%S')}" for c in marks
            )
        charts.append(_chart(f"chart-{key}", title, lines, x0, x1, fmt, marks, summary, integer=filled))
    rows = [
        (
            _utc(w, "%H:%M:%S"),
            *(
                fmt(by_window[w].get(v, {}).get(key))
                for key, fmt in (("requests", _count), ("errors", _count), ("p95", _ms))
                for v in variants
            ),
        )
        for w in reversed(windows)
        if w in by_window
    ]
    table = _table(
        f"Counters per {step:g}-second window (start time, UTC), newest first.",
        ["Window", "Requests old#", "Requests new#", "Errors old#", "Errors new#", "p95 old#", "p95 new#"],
        rows,
        "Chart data",
    )
    return (
        f"{head}{''.join(charts)}<details><summary>The charts' numbers as a table</summary>{table}</details>"
    )


def _summary(
    variant: str, points: list[tuple[float, float | None]], key: str, fmt: Callable[[float], str]
) -> str:
    values = [v for _, v in points if v is not None]
    if not values:
        return f"{variant}: no data"
    if key == "p95":
        return f"{variant}: latest {fmt(values[-1])}, highest {fmt(max(values))}"
    return f"{variant}: {fmt(sum(values))} in all, latest {fmt(values[-1])}, highest {fmt(max(values))}"


# -- controls and the audit log -------------------------------------------------------------
def _controls(name: str, state: dict[str, Any], csrf: str, root: str) -> str:
    version = int(state["version"])

    def form(action: str, heading: str, button: str, field: str = "", danger: bool = False) -> str:
        cls = ' class="danger"' if danger else ""
        hidden = "".join(
            f'<input type="hidden" name="{k}" value="{_e(v)}">'
            for k, v in (("name", name), ("action", action), ("expected_version", version), ("csrf", csrf))
        )
        return (
            f'<form method="post" action="{_href(root, "/action")}" aria-labelledby="do-{action}">'
            f'<h3 id="do-{action}">{heading}</h3>{hidden}{field}'
            f'<label for="{action}-reason">Reason (optional, kept in the audit log)</label>'
            f'<input id="{action}-reason" name="reason" type="text" maxlength="500">'
            f"<button{cls}>{button}</button></form>"
        )

    percent_field = (
        '<label for="set-percent">Percent on new (0 to 100)</label>'
        f'<input id="set-percent" name="percent" type="number" min="0" max="100" step="any" required '
        f'value="{float(state["percent"]):g}">'
    )
    forms = [
        form("set", "Set the percent", "Set percent", percent_field),
        form("promote", "Promote", "Promote to 100%"),
        form("rollback", "Roll back", "Roll back to 0%", danger=True),
        form("pause", "Pause", "Pause"),
        form("resume", "Resume", "Resume"),
        form("reset", "Reset assignments", "Start a new assignment epoch"),
    ]
    return (
        '<h2 id="controls">Controls</h2><p class="muted">Every change is made against version '
        f"{version} of this rollout, the one shown above: if someone changed it since, nothing is "
        "overwritten and you are asked to reload.</p>"
        f'<div class="controls">{"".join(forms)}</div>'
    )


def _audit(history: Sequence[Change], now: float) -> str:
    if not history:
        return '<h2 id="audit">Audit log</h2><p>No changes recorded.</p>'

    def arrow(before: Any, after: Any, fmt: Callable[[Any], str]) -> str:
        if before is None or before == after:
            return fmt(after)
        return f"{fmt(before)} → {fmt(after)}"

    def yes(value: bool) -> str:
        return "yes" if value else "no"

    rows = [
        (
            f'{_time(c.at)}<br><span class="muted">{_ago(now - c.at)}</span>',
            _e(c.by),
            _e(c.action),
            arrow(c.percent_before, c.percent_after, _pct),
            arrow(c.paused_before, c.paused_after, yes),
            str(c.version),
            _e(c.reason),
        )
        for c in reversed(history)
    ]
    return '<h2 id="audit">Audit log</h2>' + _table(
        f"The last {len(rows)} change{'s' * (len(rows) != 1)}, newest first.",
        ["When", "By", "Action", "Percent on new", "Paused", "Version#", "Reason"],
        rows,
        "Audit log",
    )


# -- errors -------------------------------------------------------------------------------
def problem(status: int, message: str, extra: dict[str, Any], root: str) -> str:
    title = _TITLES.get(status, "Error")
    rollout = extra.get("rollout")
    parts = [f"<h1>{status} {_e(title)}</h1>", f'<p class="error" role="alert">{_e(message)}</p>']
    if status == 409:
        current = extra.get("current_version")
        now = "" if current is None else f" It is now at version {_e(current)}."
        parts.append(
            "<p>The page you acted from was stale: the rollout changed after it was loaded, so "
            f"nothing was changed.{now} Reload it, check the new state, and try again if you still "
            "want to.</p>"
        )
    links = []
    if isinstance(rollout, str) and status != 404:
        label = "Reload" if status == 409 else "Back to"
        links.append(f'<a href="{_rollout_href(root, rollout)}">{label} {_e(rollout)}</a>')
    if status != 401:
        links.append(f'<a href="{_href(root)}">All rollouts</a>')
    if links:
        parts.append("<p>" + " · ".join(links) + "</p>")
    return _page(f"{status} {title}", "".join(parts), root, None)
