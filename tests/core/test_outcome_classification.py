"""Outcome classification: which requests count as failed, and the bounded ``outcome`` label.

Both rules are read by dashboards and alerts that compare old and new, so their edges are
pinned here: status 499 is a success and 500 a failure; an exception or a missing response
is always a failure; the label is one of a closed set whatever the status.
"""

from __future__ import annotations

from typing import Any

import pytest

from canarymw.sinks import OUTCOME_CLASSES, Outcome, default_classifier, outcome_class


def outcome(status: int | None = 200, error: str | None = None, disconnected: bool = False) -> Outcome:
    return Outcome("r", "new", status, 0.01, error, disconnected, "GET", None, 1.0)


@pytest.mark.parametrize(
    ("kw", "ok"),
    [
        pytest.param({"status": 200}, True, id="200"),
        pytest.param({"status": 101}, True, id="101 websocket accepted"),
        pytest.param({"status": 404}, True, id="404 is the client's error"),
        pytest.param({"status": 499}, True, id="499 last success"),
        pytest.param({"status": 500}, False, id="500 first failure"),
        pytest.param({"status": 503}, False, id="503"),
        pytest.param({"status": None}, False, id="no response started"),
        pytest.param({"status": 200, "error": "KeyError"}, False, id="raised after a 200 started"),
        pytest.param({"status": None, "error": "KeyError"}, False, id="raised before start"),
        pytest.param({"status": 200, "disconnected": True}, True, id="client left: not the app's failure"),
    ],
)
def test_success_rule(kw: dict[str, Any], ok: bool) -> None:
    o = outcome(**kw)
    assert o.ok is ok
    assert default_classifier(o) is ok  # the sinks' default is exactly Outcome.ok


@pytest.mark.parametrize(
    ("kw", "label"),
    [
        pytest.param({"status": 100}, "1xx", id="100"),
        pytest.param({"status": 199}, "1xx", id="199"),
        pytest.param({"status": 200}, "2xx", id="200"),
        pytest.param({"status": 204}, "2xx", id="204"),
        pytest.param({"status": 299}, "2xx", id="299"),
        pytest.param({"status": 301}, "3xx", id="301"),
        pytest.param({"status": 404}, "4xx", id="404"),
        pytest.param({"status": 499}, "4xx", id="499"),
        pytest.param({"status": 500}, "5xx", id="500"),
        pytest.param({"status": 599}, "5xx", id="599"),
        pytest.param({"status": None}, "5xx", id="no response: the server sends a 500"),
        pytest.param({"status": 99}, "5xx", id="impossible low status"),
        pytest.param({"status": 600}, "5xx", id="impossible high status"),
        pytest.param({"status": 0}, "5xx", id="zero"),
        pytest.param({"status": 200, "error": "KeyError"}, "exception", id="exception after start"),
        pytest.param({"status": None, "error": "KeyError"}, "exception", id="exception before start"),
        pytest.param({"status": 200, "disconnected": True}, "disconnect", id="client left"),
        pytest.param(
            {"status": 200, "error": "CancelledError", "disconnected": True},
            "exception",
            id="exception beats disconnect",
        ),
        pytest.param({"status": 503, "disconnected": True}, "disconnect", id="disconnect beats status"),
    ],
)
def test_outcome_label(kw: dict[str, Any], label: str) -> None:
    assert outcome_class(outcome(**kw)) == label
    assert label in OUTCOME_CLASSES


def test_every_label_is_reachable_and_the_set_is_closed() -> None:
    statuses = [None, *range(1000)]
    seen = {outcome_class(outcome(s)) for s in statuses}
    seen |= {outcome_class(outcome(200, error="E")), outcome_class(outcome(200, disconnected=True))}
    assert seen == set(OUTCOME_CLASSES)
