from __future__ import annotations

import math
import os
import re
import threading
import time
import warnings
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


# -- edges pinned for mutation testing (docs/contributing.md) ------------------------------


def key_in_bucket(rollout: Rollout, bucket: int) -> str:
    """A user key that ``rollout`` puts in exactly ``bucket`` (found by search, deterministic)."""
    return next(k for k in (f"user{i}" for i in range(1_000_000)) if rollout.bucket_of(k) == bucket)


@pytest.mark.parametrize("percent", [0.01, 12.5, 25, 50, 99.99])
def test_bucket_boundary_is_frozen(percent: float) -> None:
    # The frozen rule that a JavaScript or nginx twin must match: new iff bucket < percent x 100.
    # So the bucket equal to percent x 100 is the first old one. (These percents are exact in
    # binary floating point, so percent x 100 is a whole number of buckets.)
    r = Rollout("boundary", percent=percent, secret_key=KEY, key=lambda env: env["user"])
    threshold = int(percent * 100)
    assert threshold == percent * 100
    last_new, first_old = key_in_bucket(r, threshold - 1), key_in_bucket(r, threshold)
    assert (r.variant_for(last_new), r.variant_for(first_old)) == ("new", "old")
    for user, variant in ((last_new, "new"), (first_old, "old")):
        d = r.decide(None, request={"user": user})
        assert (d.variant, d.reason, d.bucket) == (variant, "bucket", r.bucket_of(user))


def test_the_edges_of_the_bucket_range() -> None:
    r = Rollout("edges", percent=0.01, secret_key=KEY)
    bottom, top = key_in_bucket(r, 0), key_in_bucket(r, 9999)
    assert (r.variant_for(bottom), r.variant_for(top)) == ("new", "old")
    r.percent = 99.99
    assert (r.variant_for(bottom), r.variant_for(top)) == ("new", "old")
    r.percent = 100
    assert r.variant_for(top) == "new"
    r.percent = 0
    assert r.variant_for(bottom) == "old"


def test_lists_beat_the_bucket_both_ways() -> None:
    # The denylist test above could pass without the denylist: its user may sit in the old
    # bucket anyway. Here each listed user sits in the bucket the list must override.
    probe = Rollout("lists", percent=50, secret_key=KEY)
    in_new, in_old = key_in_bucket(probe, 0), key_in_bucket(probe, 9999)
    both = key_in_bucket(probe, 1)
    r = Rollout(
        "lists",
        percent=50,
        secret_key=KEY,
        allow=[in_old, both],
        deny=[in_new, both],
        key=lambda env: env["user"],
    )
    decide = lambda user: r.decide(None, request={"user": user})  # noqa: E731
    assert decide(in_new)[1:3] == ("old", "denylist")
    assert decide(in_old)[1:3] == ("new", "allowlist")
    assert decide(both)[1:3] == ("old", "denylist")  # the denylist is checked first
    assert (r.variant_for(in_new), r.variant_for(in_old)) == ("old", "new")
    r.percent = 0  # the kill switch is the bucket rule, not a list
    assert decide(in_old)[1:3] == ("old", "bucket")
    r.percent = 100  # and so is the blue/green switch
    assert decide(in_new)[1:3] == ("new", "bucket")


def test_lists_take_user_ids_of_any_type() -> None:
    # A key callable may return an int (a database id); the lists hold the same ids.
    probe = Rollout("ids", percent=50, secret_key=KEY)
    new_id = next(i for i in range(10_000) if probe.bucket_of(str(i)) < 5000)
    old_id = next(i for i in range(10_000) if probe.bucket_of(str(i)) >= 5000)
    r = Rollout("ids", percent=50, secret_key=KEY, key=lambda env: env["user"], allow=[old_id], deny=[new_id])
    assert r.decide(None, request={"user": old_id})[1:4] == ("new", "allowlist", str(old_id))
    assert r.decide(None, request={"user": new_id})[1:4] == ("old", "denylist", str(new_id))


def test_reasons_of_the_plain_split() -> None:
    for percent in (0, 37.5, 100):
        r = Rollout("reasons", percent=percent, secret_key=KEY)
        first = r.decide(None)
        assert first.reason == "bucket"
        assert r.decide(cookie_of(first)).reason == "bucket"


def test_user_keys_decide_without_cookies_and_cache_only_their_bucket() -> None:
    seen: list[Any] = []
    r = Rollout("users", percent=50, secret_key=KEY, key=lambda env: env.get("user"), on_exposure=seen.append)
    first = r.decide(None, request={"user": "ann"})
    assert first == ("users", first.variant, "bucket", "ann", r.bucket_of("ann"), None, False)
    assert r.decide("canarymw=junk", request={"user": "ann"}) == first  # the cookie is not read
    r.percent = 100 if first.variant == "old" else 0
    moved = r.decide(None, request={"user": "ann"})
    assert moved.variant != first.variant and moved.cohort == "ann"  # the percent applies at once
    assert [d.cohort for d in seen] == ["ann"]  # exposed once
    anonymous = [r.decide(None, request={"user": u}) for u in (None, "")]
    assert all(d.first_visit and d.set_cookie for d in anonymous)  # "" is no user either
    assert r.counters["exposure_errors"] == 0 and r.counters["key_errors"] == 0
    plain = Rollout("users", percent=50, secret_key=KEY, key=lambda env: env["user"])
    plain.decide(None, request={"user": "bob"})
    assert plain.counters["exposure_errors"] == 0  # no hook is not a failing hook


def test_cookie_only_says_when_cached_decisions_may_be_used() -> None:
    assert Rollout("r", percent=5, secret_key=KEY).cookie_only
    assert not Rollout("r", percent=5, secret_key=KEY, key=lambda env: None).cookie_only
    assert not Rollout("r", percent=5, secret_key=KEY, force_token=TOKEN).cookie_only


def test_cached_returns_exactly_what_decide_returned() -> None:
    r = Rollout("cached", percent=50, secret_key=KEY)
    header = f"a=1; {cookie_of(r.decide(None))}"
    assert r.cached(header) is None  # never seen
    d = r.decide(header)
    assert r.cached(header) == d and d.set_cookie is None
    assert r.cached(header + " ") is None  # exact header only
    r.percent = 60
    assert r.cached(header) is None  # a percent change retires it
    assert r.decide(header).cohort == d.cohort
    keyed = Rollout("cached", percent=50, secret_key=KEY, key=lambda env: None)
    h = cookie_of(keyed.decide(None, request={}))
    keyed.decide(h, request={})
    assert keyed.cached(h) is None  # with a key callable nothing is cached by header


def test_forcing_applies_to_a_returning_visitor_and_never_sticks() -> None:
    r = Rollout("r", percent=0, secret_key=KEY, force_token=TOKEN)
    cookie = cookie_of(r.decide(None))
    plain = r.decide(cookie)
    assert r.decide(cookie) == plain
    for force, query in ((f"new:{TOKEN}", ""), (f" new:{TOKEN} ", "a=1")):
        forced = r.decide(cookie, False, force, query)
        assert (forced.variant, forced.reason, forced.cohort) == ("new", "forced", plain.cohort)
        assert forced.set_cookie is None
        assert r.decide(cookie) == plain  # the next request is not forced
    assert r.counters["forced"] == 2
    assert r.decide(cookie, False, None, f"canarymw_force=new:{TOKEN}") == plain  # query form off


def test_forcing_by_query_checks_two_values_and_the_header_first() -> None:
    r = Rollout("r", percent=0, secret_key=KEY, force_token=TOKEN, force_query=True)
    cookie = cookie_of(r.decide(None))
    q = lambda *vals: "&".join(f"canarymw_force={v}" for v in vals)  # noqa: E731
    assert r.decide(cookie, False, None, q("x", f"new:{TOKEN}")).variant == "new"
    assert r.decide(cookie, False, None, q("x", "y", f"new:{TOKEN}")).reason == "bucket"  # two checked
    assert r.decide(cookie, False, f"old:{TOKEN}", q(f"new:{TOKEN}")).variant == "old"
    assert r.decide(cookie, False, "junk", q(f"new:{TOKEN}")).variant == "new"
    assert r.decide(cookie, False, None, "other=1").reason == "bucket"


def test_force_token_length_and_flag_types() -> None:
    Rollout("r", percent=5, secret_key=KEY, force_token="x" * 16)
    with pytest.raises(
        ValueError, match=r"at least 16 characters, so that nobody can guess their way into a variant\.$"
    ):
        Rollout("r", percent=5, secret_key=KEY, force_token="x" * 15)
    with pytest.raises(ValueError, match="at least 16"):
        Rollout("r", percent=5, secret_key=KEY, force_token=b"x" * 20)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match=r"force_query=1; pass True or False\.$"):
        Rollout("r", percent=5, secret_key=KEY, force_token=TOKEN, force_query=1)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        pytest.param({"name": ""}, ValueError, r"^Rollout needs a non-empty name", id="empty name"),
        pytest.param({"name": 5}, ValueError, r"non-empty name", id="name not str"),
        pytest.param(
            {"salt": "a\x00b"}, ValueError, r"^Rollout 'r' got salt 'a\\x00b'; use a", id="NUL salt"
        ),
        pytest.param({"salt": 5}, ValueError, r"got salt 5", id="salt not str"),
        pytest.param({"key": "user"}, TypeError, r"^Rollout 'r' got key='user'; pass a callable", id="key"),
        pytest.param({"exclude": [b"/x"]}, ValueError, r"exclude rule b'/x'", id="bytes exclude"),
        pytest.param({"cookie_path": 5}, ValueError, r"cookie_path 5", id="path not str"),
        pytest.param({"percent": 100.01}, ValueError, r"percent 100\.01", id="just over 100"),
        pytest.param(
            {"cookie_name": "a b"}, ValueError, r"^Rollout 'r' got cookie_name 'a b'", id="cookie owner"
        ),
        pytest.param({"secret_key": ""}, ValueError, r"^Rollout 'r' got an empty secret key", id="key owner"),
        pytest.param(
            {"percent": "10"}, ValueError, r"percent '10' of type str; use a number", id="str percent"
        ),
        pytest.param(
            {"exclude": ["health"]},
            ValueError,
            r"^Rollout 'r' got exclude rule 'health'; use a path starting with '/' "
            r"\(it also covers everything below it\) or a compiled regular expression\.$",
            id="relative exclude",
        ),
    ],
)
def test_more_invalid_configuration(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    kwargs = {"name": "r", "percent": 10, "secret_key": KEY, **kwargs}
    with pytest.raises(error, match=match):
        Rollout(**kwargs)


def test_percent_edges_and_salt() -> None:
    for percent in (0, 0.0, 100, 100.0, 0.01, 1):
        assert Rollout("r", percent=percent, secret_key=KEY).percent == float(percent)
    salted = Rollout("renamed", percent=5, secret_key=KEY, salt="original")
    assert salted.bucket_of("x") == Rollout("original", percent=5, secret_key=KEY).bucket_of("x")
    assert salted.salt == "original" and Rollout("plain", percent=5, secret_key=KEY).salt == "plain"


@pytest.mark.parametrize(
    ("rules", "path", "excluded"),
    [
        pytest.param(["/"], "/", True, id="root rule: the root"),
        pytest.param(["/"], "/x", False, id="root rule: nothing below"),
        pytest.param(["/a/"], "/a", True, id="trailing slash"),
        pytest.param(["/a"], "/a/b/c", True, id="deep"),
        pytest.param(["/a"], "/ab", False, id="prefix of a name"),
        pytest.param(["/docX/"], "/docX/y", True, id="only slashes are trimmed"),
        pytest.param(["/docX"], "/doc", False, id="only slashes are trimmed, not letters"),
        pytest.param([re.compile(r"/x")], "/x/y", True, id="regex matches at the start"),
        pytest.param([re.compile(r"x")], "/x", False, id="regex is anchored at the start"),
        pytest.param([re.compile(r"/x"), "/y"], "/y/z", True, id="regex and prefix"),
        pytest.param([], "/", False, id="none"),
    ],
)
def test_exclusion_rules(rules: list[Any], path: str, excluded: bool) -> None:
    r = Rollout("r", percent=10, secret_key=KEY, exclude=rules)
    assert r.is_excluded(path) is excluded
    assert bool(r.is_excluded) is bool(rules)  # adapters skip the check when there are none


def test_counters_count_each_event() -> None:
    old = Rollout("r", percent=50, secret_key="old-key-0123456789")
    values = [cookie_of(old.decide(None)) for _ in range(3)]
    r = Rollout("r", percent=50, secret_key=["old-key-0123456789", "new-key-0123456789"])
    for v in values:
        r.decide(v)  # re-issued with the newest key
    r.decide("canarymw=forged1; canarymw=forged2")  # one rejection per request, two values checked
    r.decide("canarymw=forged3")
    assert r.counters == {
        "assigned": 2,
        "cookie_rejected": 2,
        "cookie_reissued": 3,
        "key_errors": 0,
        "forced": 0,
        "exposure_errors": 0,
        "store_errors": 0,  # a rollout without a store never fails to read one
        "recorded": 0,  # monotone records nothing
        "users_dropped": 0,
    }


def test_at_most_two_cookie_values_are_checked() -> None:
    r = Rollout("r", percent=50, secret_key=KEY)
    good = cookie_of(r.decide(None))
    cohort = r.decide(good).cohort
    assert r.decide(f"canarymw=x; {good}").cohort == cohort
    third = r.decide(f"canarymw=x; canarymw=y; {good}")
    assert third.first_visit and third.cohort != cohort  # browsers send the most specific first
    assert r.decide(f"{good}; canarymw=x; canarymw=y").cohort == cohort


def test_refresh_happens_at_half_the_lifetime_exactly(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1_000_000.0]
    monkeypatch.setattr("canarymw._rollout._time", lambda: clock[0])
    r = Rollout("r", percent=50, secret_key=KEY, cookie_max_age=100)
    first = r.decide(None)
    cookie = cookie_of(first)
    clock[0] += 49.5
    assert r.decide(cookie).set_cookie is None and r.cached(cookie) is not None
    clock[0] = 1_000_000.0 + 50  # issued + max_age / 2
    assert r.cached(cookie) is None
    refreshed = r.decide(cookie)
    assert refreshed.set_cookie is not None and refreshed.cohort == first.cohort
    assert "Max-Age=100" in refreshed.set_cookie and not refreshed.first_visit
    assert r.counters["cookie_reissued"] == 1
    # the refreshed cookie carries the new issue time, so it is good for another half lifetime
    clock[0] += 49.5
    assert r.decide(cookie_of(refreshed)).set_cookie is None


def test_session_cookie_is_never_refreshed(monkeypatch: pytest.MonkeyPatch) -> None:
    r = Rollout("r", percent=50, secret_key=KEY, cookie_max_age=None)
    first = r.decide(None)
    assert "Max-Age" not in (first.set_cookie or "x")
    real = time.time
    monkeypatch.setattr("canarymw._rollout._time", lambda: real() + 10 * 365 * 86400)
    assert r.decide(cookie_of(first)).set_cookie is None


@pytest.mark.parametrize(("max_age", "ttl"), [(30 * 86400, 60.0), (800, 50.0)])
def test_ids_made_ahead_are_used_only_while_recent(
    monkeypatch: pytest.MonkeyPatch, max_age: int, ttl: float
) -> None:
    # A first visit's cookie carries its issue time, and that time decides the refresh: ids
    # made ahead are handed out for at most min(60 s, max_age / 16) after they were signed.
    clock = [2_000_000.0]
    monkeypatch.setattr("canarymw._rollout._time", lambda: clock[0])
    r = Rollout("r", percent=50, secret_key=KEY, cookie_max_age=max_age)

    def issued() -> int:
        value = cookie_of(r.decide(None)).split("=", 1)[1]
        return int(value.split(".")[2], 16)

    assert issued() == 2_000_000
    clock[0] += ttl - 1
    assert issued() == 2_000_000  # from the batch made at the first visit
    clock[0] = 2_000_000.0 + ttl
    assert issued() == int(clock[0])  # a new batch


def test_ids_are_made_in_batches_and_forgotten_after_a_fork() -> None:
    import canarymw._rollout as module

    r = Rollout("r", percent=50, secret_key=KEY)
    first = r.decide(None).cohort
    held = {cid for cid, _, _ in r._fresh}
    assert len(held) == module._FRESH_BATCH - 1 and first not in held  # made ahead, in one batch
    read, write = os.pipe()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
        pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.write(write, r.decide(None).cohort.encode())
        finally:
            os._exit(0)
    os.close(write)
    child = os.read(read, 1000).decode()
    os.close(read)
    os.waitpid(pid, 0)
    assert child and child not in held and child != first  # never an id its parent made
    assert r.decide(None).cohort in held  # the parent goes on with its batch


def test_lists_hold_on_every_path() -> None:
    # First and later decisions of a user (the bucket is cached per user), a cookie that is
    # refreshed, and a cookie seen again: the lists apply on each.
    probe = Rollout("lists", percent=50, secret_key=KEY)
    in_new = key_in_bucket(probe, 0)
    r = Rollout("lists", percent=50, secret_key=KEY, deny=[in_new], key=lambda env: env.get("user"))
    for _ in range(2):
        assert r.decide(None, request={"user": in_new})[1:3] == ("old", "denylist")
    cookie_rollout = Rollout("lists", percent=100, secret_key=KEY, cookie_max_age=100)
    first = cookie_rollout.decide(None)
    listed = Rollout(
        "lists", percent=50, secret_key=KEY, deny=[first.cohort], allow=["x"], cookie_max_age=100
    )
    assert listed.decide(cookie_of(first))[1:3] == ("old", "denylist")
    assert listed.decide(cookie_of(first))[1:3] == ("old", "denylist")  # from the cache


def test_refresh_keeps_the_whole_decision(monkeypatch: pytest.MonkeyPatch) -> None:
    probe = Rollout("r", percent=100, secret_key=KEY)
    first = probe.decide(None, True)
    r = Rollout("r", percent=50, secret_key=KEY, cookie_max_age=100, allow=[first.cohort])
    real = time.time
    monkeypatch.setattr("canarymw._rollout._time", lambda: real() + 60)
    d = r.decide(cookie_of(first), True)
    assert d[:5] == ("r", "new", "allowlist", first.cohort, first.bucket)
    assert d.set_cookie is not None and "Secure" in d.set_cookie  # still https
    assert not d.first_visit
    assert "Secure" not in (r.decide(cookie_of(first), False).set_cookie or "x")


def test_a_cookie_value_is_verified_once(monkeypatch: pytest.MonkeyPatch) -> None:
    # The HMAC check is the costly part of a returning visit: each value is checked once,
    # whatever header it comes in, and only the first two values of a header are checked.
    from canarymw._cookie import CookieCodec

    r = Rollout("r", percent=50, secret_key=KEY)
    good = cookie_of(r.decide(None))
    checked: list[str] = []
    real = CookieCodec.verify

    def counting(self: CookieCodec, value: str) -> Any:
        checked.append(value)
        return real(self, value)

    monkeypatch.setattr(CookieCodec, "verify", counting)
    cohort = r.decide(good).cohort
    for header in (f"a=1; {good}", f"{good}; b=2", f"x=1, {good}"):
        assert r.decide(header).cohort == cohort
    assert len(checked) == 1
    r.decide("canarymw=f1; canarymw=f2; canarymw=f3; canarymw=f4")
    assert len(checked) == 3


def test_headers_without_our_cookie_are_first_visits() -> None:
    r = Rollout("r", percent=50, secret_key=KEY)
    for header in ("a=1", "canarymw_x=1; xcanarymw=2", "Canarymw=1"):
        d = r.decide(header)
        assert d.first_visit and d.set_cookie
    assert r.counters["cookie_rejected"] == 0 and r.counters["assigned"] == 3


def test_force_token_may_hold_a_colon_and_the_query_form_stays_off() -> None:
    token = "team:0123456789abcdef"
    r = Rollout("r", percent=0, secret_key=KEY, force_token=token)
    cookie = cookie_of(r.decide(None))
    assert r.decide(cookie, False, f"new:{token}").variant == "new"
    # query form off: a valid query token does not count even next to a header
    assert r.decide(cookie, False, "junk", f"canarymw_force=new:{token}").reason == "bucket"


@pytest.mark.parametrize(
    ("max_items", "max_chars", "keys", "kept"),
    [
        pytest.param(8, 1000, 8, list(range(8)), id="full is not over"),
        pytest.param(8, 1000, 9, list(range(1, 9)), id="one over: the oldest goes (at least one)"),
        pytest.param(16, 1000, 17, list(range(2, 17)), id="oldest eighth goes"),
        pytest.param(100, 40, 10, list(range(10)), id="at the character bound"),
        pytest.param(100, 40, 11, list(range(1, 11)), id="over the character bound"),
        pytest.param(100, 40, 13, list(range(3, 13)), id="each later key pushes one out"),
    ],
)
def test_bounded_cache_evicts_its_oldest(max_items: int, max_chars: int, keys: int, kept: list[int]) -> None:
    from canarymw._runtime import BoundedCache

    cache: BoundedCache[int] = BoundedCache(max_items, max_chars, 10)
    for i in range(keys):
        cache.put(f"key{i:04d}"[-4:], i)  # four characters each
    assert sorted(cache.values()) == kept


def test_bounded_cache_counts_each_key_once_and_skips_long_keys() -> None:
    from canarymw._runtime import BoundedCache

    cache: BoundedCache[int] = BoundedCache(100, 12, 4)
    cache.put("aaaa", 1)
    for _ in range(5):
        cache.put("bbbb", 2)  # re-putting replaces; its characters count once
    cache.put("cccc", 3)
    assert cache == {"aaaa": 1, "bbbb": 2, "cccc": 3}
    cache.put("aaaa", 4)  # a hit moves to the end: now the newest
    cache.put("dddd", 5)
    assert list(cache) == ["cccc", "aaaa", "dddd"]
    cache.put("eeeee", 6)  # longer than max_key: never cached
    assert "eeeee" not in cache and len(cache) == 3
    cache.clear()
    for k in ("ffff", "gggg", "hhhh"):
        cache.put(k, 7)
    assert len(cache) == 3  # clearing forgot the characters too


def test_cookie_headers_up_to_the_key_bound_are_cached() -> None:
    from canarymw._rollout import _HEADER_KEY_MAX

    r = Rollout("r", percent=50, secret_key=KEY)
    cookie = cookie_of(r.decide(None))
    for pad, cached in ((_HEADER_KEY_MAX, True), (_HEADER_KEY_MAX + 1, False)):
        header = f"{cookie}; p={'x' * (pad - len(cookie) - 4)}"
        assert len(header) == pad
        d = r.decide(header)
        assert (r.cached(header) == d) is cached


def test_cookie_attributes_are_all_rendered() -> None:
    r = Rollout(
        "r",
        percent=5,
        secret_key=KEY,
        cookie_name="cm",
        cookie_domain="example.com",
        cookie_path="/app",
        cookie_max_age=60,
        cookie_samesite="Strict",
        cookie_httponly=False,
    )
    for https in (True, False, True):
        attrs = (r.decide(None, https).set_cookie or "").split("; ")[1:]
        assert attrs == [
            "Max-Age=60",
            "Domain=example.com",
            "Path=/app",
            *(["Secure"] * https),
            "SameSite=Strict",
        ]


def test_configuration_is_fixed_after_construction() -> None:
    r = Rollout("r", percent=5, secret_key=KEY)
    with pytest.raises(AttributeError, match=r"^Rollout 'r' has key fixed at construction"):
        r.key = lambda env: None
    with pytest.raises(AttributeError, match=r"^Rollout 'r' cannot lose its deny\.$"):
        del r.deny
    r.percent = 7  # the one live setting
    r.note = "mine"  # type: ignore[attr-defined]
    del r.note  # type: ignore[attr-defined]
    assert not hasattr(r, "note") and r.percent == 7 and r.deny == frozenset()


@pytest.mark.parametrize("percent", [0.07, 1.1, 0.29, 57.7, 99.99])
def test_two_decimal_percents_take_exactly_their_buckets(percent: float) -> None:
    # Float rounding once let one extra bucket in (0.07 * 100 = 7.000000000000001).
    r = Rollout("boundary", percent=percent, secret_key=KEY)
    edge = round(percent * 100)
    assert r._choose("x", edge)[0] == "old"
    assert r._choose("x", edge - 1)[0] == "new"
