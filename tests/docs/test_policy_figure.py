"""docs/img/policies.svg is what scripts/policy_figure.py draws from the library today."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_policy_figure_is_current() -> None:
    spec = importlib.util.spec_from_file_location("policy_figure", ROOT / "scripts" / "policy_figure.py")
    assert spec is not None and spec.loader is not None
    figure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figure)
    drawn = figure.draw()
    assert (ROOT / "docs" / "img" / "policies.svg").read_text(encoding="utf-8") == drawn, (
        "docs/img/policies.svg is stale: run python scripts/policy_figure.py"
    )
    # What the picture shows, in numbers: monotone moves visitors back at 25% -> 10%,
    # drain and pin move nobody back; pin moves nobody at 60% either.
    moved = {}
    for policy in figure.POLICIES:
        _, rows = figure.simulate(policy)
        moved[policy] = [sum(r[j] != r[j - 1] for r in rows) for j in range(1, len(figure.STEPS))]
    assert moved["monotone"][0] > 0 and moved["drain"][0] == 0 and moved["pin"][:2] == [0, 0]
