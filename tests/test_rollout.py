from __future__ import annotations

import math
import os
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from canarymw import Rollout
from canarymw._cookie import find_values
from canarymw._rollout import split_force_query

KEY = "test-secret-key-0123456789abcdef"
TOKEN = "force-token-0123456789"


def cookie_of(decision: Any) -> str:
    assert decision.set_cookie is not None
    return decision.set_cookie.split(";", 1)[0]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(math.nan, id="nan"),
        pytest.param(math.inf, id="inf"),
        pytest.param(-math.inf, id="-inf"),
        pytest.param(True, id="bool"),
        pytest.param("10", id="str"),
        pytest.param(None, id="None"),
        pytest.param(-0.01, id="negative"),
        pytest.param(100.5, id="over 100"),
    ],
)
def test_invalid_percent_is_rejected_with_a_sentence(bad: object) -> None:
    with pytest.raises(ValueError, match=r"percent .*number from 0 to 100\.$"):
        Rollout("r", percent=bad, secret_key=KEY)  # type: ignore[arg-type]
    rollout = Rollout("r", percent=5, secret_key=KEY)
    with pytest.raises(ValueError, match="percent"):
        rollout.percent = bad  # type: ignore[assignment]
    assert rollout.percent == 5  # a rejected value leaves the live one alone


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        pytest.param({"secret_key": ""}, "empty secret key", id="empty key"),
        pytest.param({"secret_key": []}, "needs a secret_key", id="no keys"),
        pytest.param({"force_token": "short"}, "at least 16", id="short token"),
        pytest.param({"cookie_name": "a;b"}, "cookie_name", id="bad cookie name"),
        pytest.param({"cookie_samesite": "lax"}, "cookie_samesite", id="bad samesite"),
        pytest.param({"cookie_samesite": "None", "cookie_secure": False}, "Secure", id="none without secure"),
        pytest.param({"cookie_max_age": 0}, "cookie_max_age", id="zero max age"),
        pytest.param({"exclude": ["health"]}, "exclude rule", id="relative exclude"),
        pytest.param({"cookie_path": "x"}, "cookie_path", id="bad path"),
        pytest.param({"force_query": True}, "without a force_token", id="query form without token"),
    ],
)
def test_invalid_configuration_fails_at_construction(kwargs: dict[str, Any], match: str) -> None:
    kwargs.setdefault("secret_key", KEY)
    with pytest.raises(ValueError, match=match):
        Rollout("r", percent=10, **kwargs)


def test_missing_secret_key_and_name() -> None:
    with pytest.raises(TypeError):
        Rollout("r", percent=10)  # type: ignore[call-arg]
    with pytest.raises(ValueError, match="non-empty name"):
        Rollout(" ", percent=10, secret_key=KEY)


def test_first_visit_assigns_and_sets_cookie_once() -> None:
    r = Rollout("r", percent=50, secret_key=KEY)
    first = r.decide(None)
    assert first.first_visit and first.set_cookie
    assert "HttpOnly" in first.set_cookie and "SameSite=Lax" in first.set_cookie
    assert "Secure" not in first.set_cookie
    again = r.decide(cookie_of(first))
    assert again.set_cookie is None and not again.first_visit
    assert (again.cohort, again.variant, again.bucket) == (first.cohort, first.variant, first.bucket)
    assert r.counters["assigned"] == 1


def test_secure_on_https_only_when_auto() -> None:
    assert "Secure" in (Rollout("r", percent=1, secret_key=KEY).decide(None, True).set_cookie or "")
    forced = Rollout("r", percent=1, secret_key=KEY, cookie_secure=True)
    assert "Secure" in (forced.decide(None, False).set_cookie or "")


@given(st.text(max_size=100))
def test_tampered_cookie_never_yields_a_chosen_variant(garbage: str) -> None:
    r = Rollout("r", percent=50, secret_key=KEY)
    d = r.decide(f"canarymw={garbage}")
    # Whatever was sent, the visitor is reassigned to a fresh random id.
    assert d.first_visit and d.set_cookie and d.cohort != garbage


def test_percent_change_applies_to_cached_visitors() -> None:
    r = Rollout("r", percent=0, secret_key=KEY)
    cookies = [cookie_of(r.decide(None)) for _ in range(200)]
    assert all(r.decide(c).variant == "old" for c in cookies)
    r.percent = 100
    assert all(r.decide(c).variant == "new" for c in cookies)
    r.percent = 30
    new_at_30 = {c for c in cookies if r.decide(c).variant == "new"}
    r.percent = 60
    assert new_at_30 <= {c for c in cookies if r.decide(c).variant == "new"}


def test_rotation_reissues_with_the_same_id() -> None:
    old = Rollout("r", percent=50, secret_key="old-key-0123456789")
    first = old.decide(None)
    rotated = Rollout("r", percent=50, secret_key=["old-key-0123456789", "new-key-0123456789"])
    d = rotated.decide(cookie_of(first))
    assert d.cohort == first.cohort and d.variant == first.variant
    assert d.set_cookie is not None and not d.first_visit  # re-issued with the newest key
    after = rotated.decide(cookie_of(d))
    assert after.set_cookie is None and after.cohort == first.cohort
    retired = Rollout("r", percent=50, secret_key="new-key-0123456789")
    assert retired.decide(cookie_of(first)).first_visit  # old key retired: reassigned
    assert retired.decide(cookie_of(d)).cohort == first.cohort


def test_cookie_refreshed_after_half_its_lifetime(monkeypatch: pytest.MonkeyPatch) -> None:
    r = Rollout("r", percent=50, secret_key=KEY, cookie_max_age=100)
    first = r.decide(None)
    assert r.decide(cookie_of(first)).set_cookie is None
    real = time.time
    monkeypatch.setattr("canarymw._rollout._time", lambda: real() + 60)
    refreshed = r.decide(cookie_of(first))
    assert refreshed.set_cookie is not None and refreshed.cohort == first.cohort


def test_duplicated_cookie_first_valid_value_wins() -> None:
    r = Rollout("r", percent=50, secret_key=KEY)
    a, b = cookie_of(r.decide(None)), cookie_of(r.decide(None))
    assert r.decide(f"{a}; {b}").cohort == r.decide(a).cohort
    assert r.decide(f"canarymw=forged; {b}").cohort == r.decide(b).cohort


def test_key_callable_gives_one_variant_per_user_without_cookie() -> None:
    r = Rollout("r", percent=50, secret_key=KEY, key=lambda env: env.get("user"))
    d = r.decide(None, request={"user": 42})
    assert d.cohort == "42" and d.set_cookie is None and d.bucket == r.bucket_of("42")
    anonymous = r.decide(None, request={})
    assert anonymous.set_cookie is not None


def test_failing_key_callable_falls_back_to_cookie(caplog: pytest.LogCaptureFixture) -> None:
    def broken(env: object) -> str:
        raise LookupError("no user store")

    r = Rollout("r", percent=50, secret_key=KEY, key=broken)
    assert r.decide(None, request={}).first_visit
    assert r.counters["key_errors"] == 1


def test_allow_and_deny_lists() -> None:
    r = Rollout("r", percent=50, secret_key=KEY, allow=["vip"], deny=["acme"])
    ids = [f"user{i}" for i in range(200)]
    assert r.variant_for("vip") == "new" and r.variant_for("acme") == "old"
    r.percent = 0  # kill switch beats the allowlist
    assert r.variant_for("vip") == "old"
    r.percent = 100  # blue/green switch beats the denylist
    assert r.variant_for("acme") == "new"
    assert all(r.variant_for(i) == "new" for i in ids)


@pytest.mark.parametrize(
    ("force", "query", "force_query", "expected"),
    [
        pytest.param(f"new:{TOKEN}", "", False, "new", id="header new"),
        pytest.param(f"old:{TOKEN}", "", False, "old", id="header old"),
        pytest.param(None, f"canarymw_force=new:{TOKEN}", True, "new", id="query"),
        pytest.param(None, f"a=1&canarymw_force=new%3A{TOKEN}&b=2", True, "new", id="encoded query"),
        pytest.param(None, f"canarymw_force=new:{TOKEN}", False, None, id="query form off"),
        pytest.param(None, f"canarymw%5Fforce=new:{TOKEN}", True, None, id="encoded name"),
        pytest.param("new", "", False, None, id="no token"),
        pytest.param("new:wrong-token-0123456", "", False, None, id="wrong token"),
        pytest.param(None, "canarymw_force=new", True, None, id="plain query"),
        pytest.param(None, "canarymw=new", True, None, id="guessable query"),
        pytest.param(f"blue:{TOKEN}", "", False, None, id="unknown variant"),
    ],
)
def test_forcing_needs_the_token(
    force: str | None, query: str, force_query: bool, expected: str | None
) -> None:
    r = Rollout("r", percent=0, secret_key=KEY, force_token=TOKEN, force_query=force_query)
    base = r.decide(None)
    d = r.decide(cookie_of(base), False, force, query)
    if expected is None:
        assert d.variant == "old" and d.reason == "bucket"
    else:
        assert d.variant == expected and d.reason == "forced"


@pytest.mark.parametrize(
    ("query", "values", "rest"),
    [
        pytest.param("", [], "", id="empty"),
        pytest.param("a=1&b=2", [], "a=1&b=2", id="none"),
        pytest.param("canarymw_force=new:x", ["new:x"], "", id="alone"),
        pytest.param(
            "a=1&canarymw_force=new%3Ax&b=%20&a=3", ["new:x"], "a=1&b=%20&a=3", id="kept byte for byte"
        ),
        pytest.param("canarymw_force=a&canarymw_force=b+c", ["a", "b c"], "", id="twice"),
        pytest.param(
            "xcanarymw_force=1&canarymw_forced=2", [], "xcanarymw_force=1&canarymw_forced=2", id="lookalikes"
        ),
    ],
)
def test_split_force_query(query: str, values: list[str], rest: str) -> None:
    assert split_force_query(query) == (values, rest)


def test_forcing_is_ignored_without_configured_token() -> None:
    r = Rollout("r", percent=0, secret_key=KEY)
    assert r.decide(None, False, f"new:{TOKEN}", f"canarymw_force=new:{TOKEN}").variant == "old"


@pytest.mark.parametrize(
    ("path", "excluded"),
    [
        ("/healthz", True),
        ("/static/app.js", True),
        ("/static", True),
        ("/statics", False),
        ("/metrics", True),
        ("/metrics/x", True),
        ("/", False),
        ("/api/v1/x.png", True),
    ],
)
def test_exclusions(path: str, excluded: bool) -> None:
    r = Rollout(
        "r", percent=10, secret_key=KEY, exclude=["/healthz", "/static/", "/metrics", re.compile(r".*\.png$")]
    )
    assert r.is_excluded(path) is excluded


def test_percent_is_safe_to_change_from_another_thread() -> None:
    r = Rollout("r", percent=0, secret_key=KEY)
    cookies = [cookie_of(r.decide(None)) for _ in range(50)]
    stop = threading.Event()
    errors: list[BaseException] = []

    def flip() -> None:
        while not stop.is_set():
            for p in (0, 100, 37.5):
                r.percent = p

    def read() -> None:
        try:
            for _ in range(3000):
                for c in cookies:
                    assert r.decide(c).variant in ("old", "new")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=flip), *(threading.Thread(target=read) for _ in range(2))]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert not errors
    r.percent = 100
    assert all(r.decide(c).variant == "new" for c in cookies)  # no stale decision survives


def test_cache_stays_bounded_under_forged_flood(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("canarymw._rollout._CACHE_SIZE", 100)
    r = Rollout("r", percent=50, secret_key=KEY)
    valid = [cookie_of(r.decide(None)) for _ in range(300)]
    for c in valid:
        r.decide(c)
    assert len(r._seen) <= 100 and len(r._by_header) <= 100
    assert r.decide(valid[0]).set_cookie is None


def test_cookie_value_is_small_and_never_holds_the_variant() -> None:
    r = Rollout("r", percent=100, secret_key=KEY)
    value = find_values(cookie_of(r.decide(None)), "canarymw")[0]
    assert len(value) < 200
    assert "new" not in value.split(".")[:3]


def test_decision_exposes_is_new() -> None:
    r: Callable[[float], Rollout] = lambda p: Rollout("r", percent=p, secret_key=KEY)  # noqa: E731
    assert r(100).decide(None).is_new and not r(0).decide(None).is_new


@given(st.floats(min_value=0, max_value=100), st.integers(min_value=1, max_value=20))
def test_stickiness_property(percent: float, visits: int) -> None:
    r = Rollout("sticky", percent=percent, secret_key=KEY)
    first = r.decide(None)
    cookie = cookie_of(first)
    for _ in range(visits):
        d = r.decide(f"other=1; {cookie}; x=y")
        assert (d.cohort, d.variant, d.set_cookie) == (first.cohort, first.variant, None)


@given(
    st.lists(st.text(alphabet="abcdefghij0123456789", min_size=8, max_size=20), min_size=1, max_size=4),
    st.text(alphabet="abcdefghij0123456789", min_size=8, max_size=20),
)
def test_rotation_property(old_keys: list[str], new_key: str) -> None:
    before = Rollout("rot", percent=50, secret_key=old_keys)
    first = before.decide(None)
    after = Rollout("rot", percent=50, secret_key=[*old_keys, new_key])
    d = after.decide(cookie_of(first))
    assert d.cohort == first.cohort and d.variant == first.variant
    if new_key != old_keys[-1]:
        assert d.set_cookie is not None  # re-issued with the newest key


def test_exposure_hook_once_per_new_assignment() -> None:
    seen: list[Any] = []
    r = Rollout("r", percent=50, secret_key=KEY, on_exposure=seen.append)
    first = r.decide(None)
    for _ in range(3):
        r.decide(cookie_of(first))
    assert seen == [first]
    users = Rollout("u", percent=50, secret_key=KEY, key=lambda env: env["user"], on_exposure=seen.append)
    for _ in range(3):
        users.decide(None, request={"user": "ann"})
    assert [d.cohort for d in seen[1:]] == ["ann"]


def test_failing_exposure_hook_is_counted_not_raised() -> None:
    def broken(decision: Any) -> None:
        raise RuntimeError("analytics down")

    r = Rollout("r", percent=50, secret_key=KEY, on_exposure=broken)
    assert r.decide(None).first_visit
    assert r.counters["exposure_errors"] == 1
    with pytest.raises(TypeError, match="on_exposure"):
        Rollout("r", percent=5, secret_key=KEY, on_exposure="nope")  # type: ignore[arg-type]


def _ids(rollout: Rollout, n: int) -> list[str]:
    return [rollout.decide(None).cohort for _ in range(n)]


def test_first_visits_get_distinct_ids_across_threads() -> None:
    rollout = Rollout("hello-v2", percent=50, secret_key=KEY)
    found: list[list[str]] = []
    barrier = threading.Barrier(8)

    def visit() -> None:
        barrier.wait()
        found.append(_ids(rollout, 3000))

    threads = [threading.Thread(target=visit) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ids = [cid for chunk in found for cid in chunk]
    assert len(ids) == 24_000
    assert len(set(ids)) == len(ids)
    assert all(len(cid) == 22 and re.fullmatch(r"[A-Za-z0-9_-]{22}", cid) for cid in ids)
    assert rollout.counters["assigned"] == 24_000


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_workers_never_share_ids() -> None:
    # A preloading server (gunicorn --preload) may have assigned ids before it forks.
    rollout = Rollout("hello-v2", percent=50, secret_key=KEY)
    parent_first = _ids(rollout, 3)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.write(write, " ".join(_ids(rollout, 100)).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        child = pipe.read().split()
    os.waitpid(pid, 0)
    parent = parent_first + _ids(rollout, 100)
    assert len(child) == 100
    assert not set(child) & set(parent)


def test_first_visit_cookie_carries_a_recent_issue_time(monkeypatch: pytest.MonkeyPatch) -> None:
    import canarymw._rollout as module

    rollout = Rollout("hello-v2", percent=50, secret_key=KEY, cookie_max_age=3600)
    clock = [1_000_000.0]
    monkeypatch.setattr(module, "_time", lambda: clock[0])
    _ids(rollout, 2)
    clock[0] += 10 * 60  # the ids made ahead are now too old to hand out
    value = cookie_of(rollout.decide(None)).split("=", 1)[1]
    issued = int(value.split(".")[2], 16)
    assert clock[0] - issued <= rollout._fresh_ttl
    # and a visitor returning with it is not due for a refresh yet
    assert rollout.decide(f"canarymw={value}").set_cookie is None
