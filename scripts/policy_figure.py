"""Draw docs/img/policies.svg: who moves when the percent changes, under each ramp policy.

The picture is computed, not drawn by hand: 48 visitors (fixed ids, so the output is
stable) visit a real Rollout at every step of one schedule, under each policy, and
each cell shows the variant the rollout gave. tests/docs/test_policy_figure.py checks
that the committed file is what this script draws. Run: python scripts/policy_figure.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from canarymw import Rollout

STEPS = (25.0, 10.0, 60.0, 0.0, 20.0)
POLICIES = ("monotone", "drain", "pin")
VISITORS = 48
OUT = Path(__file__).resolve().parent.parent / "docs" / "img" / "policies.svg"

_CELL_W, _CELL_H, _GAP = 34, 7, 1
_PANEL_W = len(STEPS) * _CELL_W + 30
_TOP, _LEFT = 58, 14
_OLD, _NEW = "#2f6db5", "#2e9e5b"


def simulate(policy: str) -> tuple[list[int], list[list[str]]]:
    """Anchor buckets (sorted) and, per visitor, the variant at each step."""
    rollout = Rollout("checkout-v2", percent=STEPS[0], secret_key="figure-key-0123456789", policy=policy)  # type: ignore[arg-type]
    ids = [f"visitor{n:03d}".ljust(22, "x") for n in range(VISITORS)]
    # Format-1 values made by the rollout's own codec: first visits with known ids.
    cookies = {cid: rollout._codec.issue(cid, 1_800_000_000) for cid in ids}
    rows: dict[str, list[str]] = {cid: [] for cid in ids}
    for pct in STEPS:
        rollout.percent = pct
        for cid in ids:
            d = rollout.decide(f"canarymw={cookies[cid]}")
            if d.set_cookie is not None:
                cookies[cid] = d.set_cookie.split(";", 1)[0].split("=", 1)[1]
            rows[cid].append(d.variant)
    order = sorted(ids, key=rollout.bucket_of)
    return [rollout.bucket_of(c) for c in order], [rows[c] for c in order]


def _panel(x0: int, policy: str) -> list[str]:
    _, rows = simulate(policy)
    out = [f'<text x="{x0 + _PANEL_W / 2 - 15:.0f}" y="18" class="h" text-anchor="middle">{policy}</text>']
    for j, pct in enumerate(STEPS):
        x = x0 + j * _CELL_W
        out.append(f'<text x="{x + _CELL_W / 2:.0f}" y="36" text-anchor="middle">{pct:g}%</text>')
        if j:
            moved = sum(r[j] != r[j - 1] for r in rows)
            out.append(f'<text x="{x:.0f}" y="50" text-anchor="middle" class="m">{moved}</text>')
    for i, row in enumerate(rows):
        y = _TOP + i * (_CELL_H + _GAP)
        for j, variant in enumerate(row):
            x = x0 + j * _CELL_W
            colour = _NEW if variant == "new" else _OLD
            out.append(
                f'<rect x="{x + 2}" y="{y}" width="{_CELL_W - 4}" height="{_CELL_H}" fill="{colour}"/>'
            )
            if j and variant != row[j - 1]:
                cx, cy = x + _CELL_W / 2, y + _CELL_H / 2
                out.append(f'<circle cx="{cx:.0f}" cy="{cy:.1f}" r="2" fill="#fff"/>')
    return out


def draw() -> str:
    """The SVG text."""
    width = _LEFT + len(POLICIES) * _PANEL_W
    height = _TOP + VISITORS * (_CELL_H + _GAP) + 34
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" aria-labelledby="t d" '
        'font-family="sans-serif" font-size="10">',
        '<title id="t">Who moves when the percent changes, under each ramp policy</title>',
        f'<desc id="d">{VISITORS} visitors, one row each, sorted by bucket (lowest at the top); '
        f"one column per step of the schedule {', '.join(f'{p:g}%' for p in STEPS)}. Green: new, "
        "blue: old. A white dot marks a visitor whose variant changed at that step; the number "
        "above a column counts them.</desc>",
        "<style>.h{font-weight:bold;font-size:12px}.m{fill:#b5452f}text{fill:#222}</style>",
    ]
    for k, policy in enumerate(POLICIES):
        parts += _panel(_LEFT + k * _PANEL_W, policy)
    y = height - 14
    parts += [
        f'<rect x="{_LEFT}" y="{y - 8}" width="10" height="8" fill="{_NEW}"/>',
        f'<text x="{_LEFT + 14}" y="{y}">new</text>',
        f'<rect x="{_LEFT + 44}" y="{y - 8}" width="10" height="8" fill="{_OLD}"/>',
        f'<text x="{_LEFT + 58}" y="{y}">old</text>',
        f'<text x="{_LEFT + 90}" y="{y}">red numbers: visitors who changed variant at that step</text>',
        "</svg>",
    ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(draw(), encoding="utf-8")
    sys.stdout.write(f"wrote {OUT}\n")
