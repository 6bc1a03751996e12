"""Rollout's configuration is fixed at construction; only the percent is live."""

from __future__ import annotations

import pytest

from canarymw import Rollout, WSGICanaryMiddleware

KEY = "config-secret-key-0123456789abcdef"
TOKEN = "config-force-token-0123456789"

FIXED = [
    ("name", "other"),
    ("salt", "other"),
    ("key", lambda request: "user"),
    ("allow", frozenset({"a"})),
    ("deny", frozenset({"a"})),
    ("force_token", TOKEN),
    ("force_query", True),
    ("is_excluded", lambda path: True),
    ("cookie_name", "other"),
    ("cookie_max_age", 10),
    ("cookie_path", "/x"),
    ("cookie_domain", "example.org"),
    ("cookie_secure", True),
    ("cookie_samesite", "Strict"),
    ("cookie_httponly", False),
    ("on_exposure", print),
    ("counters", {}),
    ("cookie_only", False),
]


@pytest.mark.parametrize(("name", "value"), FIXED, ids=[name for name, _ in FIXED])
def test_configuration_cannot_change_after_construction(name: str, value: object) -> None:
    rollout = Rollout("fixed", percent=10, secret_key=KEY)
    before = getattr(rollout, name)
    with pytest.raises(AttributeError, match=f"has {name} fixed at construction"):
        setattr(rollout, name, value)
    with pytest.raises(AttributeError, match=f"cannot lose its {name}"):
        delattr(rollout, name)
    assert getattr(rollout, name) is before


def test_the_percent_stays_live_and_the_middleware_follows_it() -> None:
    rollout = Rollout("fixed", percent=0, secret_key=KEY)

    def app(environ: dict[str, object], start_response: object) -> list[bytes]:
        return []

    WSGICanaryMiddleware(app, new=app, rollout=rollout)
    rollout.percent = 100
    assert rollout.percent == 100.0 and rollout.decide(None).variant == "new"


@pytest.mark.parametrize(
    ("kwargs", "cookie_only"),
    [({}, True), ({"key": lambda request: None}, False), ({"force_token": TOKEN}, False)],
)
def test_cookie_only_says_whether_the_cache_may_decide(kwargs: dict[str, object], cookie_only: bool) -> None:
    assert Rollout("fixed", percent=10, secret_key=KEY, **kwargs).cookie_only is cookie_only  # type: ignore[arg-type]


def test_counters_stay_mutable_for_the_adapters() -> None:
    rollout = Rollout("fixed", percent=0, secret_key=KEY)
    rollout.decide(None)
    assert rollout.counters["assigned"] == 1
