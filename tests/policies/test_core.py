"""Ramp policies and login continuity, on the sans-IO core (Rollout.decide)."""

from __future__ import annotations

from typing import Any

import pytest

from canarymw import Rollout
from canarymw._cookie import decode_record
from canarymw.store import MemoryStore

from ..conftest import KEY


def value_of(set_cookie: str | None) -> str | None:
    return None if set_cookie is None else set_cookie.split(";", 1)[0].split("=", 1)[1]


class Visitor:
    """A browser: keeps the cohort cookie the responses set."""

    def __init__(self, rollout: Rollout, user: str | None = None) -> None:
        self.rollout = rollout
        self.cookie: str | None = None
        self.user = user

    def visit(self) -> Any:
        header = None if self.cookie is None else f"canarymw={self.cookie}"
        d = self.rollout.decide(header, request={"user": self.user})
        if d.set_cookie is not None:
            self.cookie = value_of(d.set_cookie)
        return d


def crowd(rollout: Rollout, n: int = 600) -> list[Visitor]:
    people = [Visitor(rollout) for _ in range(n)]
    for p in people:
        p.visit()
    return people


def variants(people: list[Visitor]) -> list[str]:
    return [p.visit().variant for p in people]


def moved(before: list[str], after: list[str], a: str, b: str) -> int:
    return sum(x == a and y == b for x, y in zip(before, after, strict=True))


def test_monotone_moves_the_latest_cohorts_back_when_lowered() -> None:
    r = Rollout("p", percent=25, secret_key=KEY)
    people = crowd(r)
    at25 = variants(people)
    r.percent = 10
    at10 = variants(people)
    assert moved(at25, at10, "new", "old") > 50  # about 15% of 600
    assert moved(at25, at10, "old", "new") == 0
    # The cookie records nothing under monotone: format 1, as before.
    assert all(p.cookie is not None and p.cookie.startswith("1.") for p in people)


def test_drain_keeps_new_visitors_on_new_when_lowered_and_sends_new_ones_by_the_percent() -> None:
    r = Rollout("p", percent=25, secret_key=KEY, policy="drain")
    people = crowd(r)
    at25 = variants(people)
    r.percent = 10
    at10 = variants(people)
    assert moved(at25, at10, "new", "old") == 0
    assert at10 == at25
    newcomers = crowd(r, 2000)
    share = variants(newcomers).count("new") / 2000
    assert 0.07 < share < 0.13
    # Raising moves old visitors to new by their bucket, as monotone does.
    r.percent = 60
    at60 = variants(people)
    assert moved(at10, at60, "old", "new") > 100
    assert moved(at10, at60, "new", "old") == 0
    # Kept visitors are "sticky", and carry the record "new" in format 2.
    kept = [
        p
        for p, v in zip(people, at25, strict=True)
        if v == "new" and p.rollout.bucket_of(p.cookie.split(".")[1]) >= 1000
    ]  # type: ignore[union-attr]
    assert kept and all(p.visit().reason in ("sticky", "bucket") for p in kept)
    r.percent = 10
    assert all(p.visit().reason == "sticky" for p in kept)
    assert all(decode_record(p.cookie.split(".")[3])[0] == "new" for p in kept)  # type: ignore[index,union-attr]


def test_drain_rollback_sends_everyone_back_and_forgets() -> None:
    r = Rollout("p", percent=50, secret_key=KEY, policy="drain")
    people = crowd(r)
    at50 = variants(people)
    r.percent = 0
    assert set(variants(people)) == {"old"}
    assert r.epoch == 1
    r.percent = 10
    at10 = variants(people)
    # A new attempt: only the percent decides, records of the last attempt are void.
    assert at10 == [r.variant_for(p.cookie.split(".")[1]) for p in people]  # type: ignore[union-attr]
    assert at10.count("new") < at50.count("new") / 2


def test_pin_keeps_the_first_variant_both_ways_until_reset() -> None:
    r = Rollout("p", percent=30, secret_key=KEY, policy="pin")
    people = crowd(r)
    first = variants(people)
    for pct in (10, 80, 5, 95):
        r.percent = pct
        assert variants(people) == first, pct
    r.percent = 100  # the blue/green switch: everyone new, pins kept underneath
    assert set(variants(people)) == {"new"}
    r.percent = 30
    assert variants(people) == first
    r.reset()
    assert r.epoch == 1
    r.percent = 80
    after = variants(people)
    assert after == [r.variant_for(p.cookie.split(".")[1]) for p in people]  # type: ignore[union-attr]
    assert after != first


def test_pin_records_first_visits_at_100_as_new_and_nothing_at_0() -> None:
    r = Rollout("p", percent=0, secret_key=KEY, policy="pin")
    at_zero = crowd(r, 200)
    assert all(p.cookie is not None and p.cookie.startswith("1.") for p in at_zero)
    r.percent = 100
    at_hundred = crowd(r, 200)
    r.percent = 1
    assert set(variants(at_hundred)) == {"new"}
    # Those first seen at 0 were not pinned to old: at 1% they go by the bucket.
    seen = variants(at_zero)
    assert seen == [r.variant_for(p.cookie.split(".")[1]) for p in at_zero]  # type: ignore[union-attr]


def test_old_cookies_keep_working_and_are_recorded_on_their_next_visit() -> None:
    monotone = Rollout("p", percent=40, secret_key=KEY)
    people = crowd(monotone, 300)
    before = variants(people)
    pinned = Rollout("p", percent=40, secret_key=KEY, policy="pin")
    for p in people:
        p.rollout = pinned
    assert variants(people) == before  # same id, same bucket, same variant
    assert all(p.cookie.startswith("2.") for p in people)  # type: ignore[union-attr]
    assert pinned.counters["recorded"] == 300
    pinned.percent = 5
    assert variants(people) == before


def test_the_cookie_stays_small() -> None:
    r = Rollout("p", percent=50, secret_key=KEY, policy="pin")
    r.reset()
    for _ in range(300):
        r.reset()  # a large epoch
    p = Visitor(r)
    p.visit()
    assert p.cookie is not None and p.cookie.startswith("2.")
    header = r.decide(None).set_cookie
    assert header is not None and len(value_of(header) or "") < 120
    assert len(header.split(";", 1)[0]) < 200


@pytest.mark.parametrize("policy", ["monotone", "drain", "pin"])
def test_a_tampered_record_reassigns_silently(policy: str) -> None:
    r = Rollout("p", percent=50, secret_key=KEY, policy=policy)
    p = Visitor(r)
    p.visit()
    assert p.cookie is not None
    cid = p.cookie.split(".")[1]
    forged = f"2.{cid}.1.n0-0.{p.cookie.rsplit('.', 1)[1]}"
    d = r.decide(f"canarymw={forged}")
    assert d.first_visit and d.cohort != cid
    assert r.counters["cookie_rejected"] == 1


def test_invalid_policy_settings_fail_at_construction() -> None:
    with pytest.raises(ValueError, match="policy='sticky'; use 'monotone', 'drain' or 'pin'"):
        Rollout("p", percent=1, secret_key=KEY, policy="sticky")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="on_login='first'; use 'keep' or 'switch'"):
        Rollout("p", percent=1, secret_key=KEY, on_login="first")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="user_memory=0"):
        Rollout("p", percent=1, secret_key=KEY, user_memory=0)
    r = Rollout("p", percent=1, secret_key=KEY, policy="pin")
    with pytest.raises(AttributeError, match="policy fixed at construction"):
        r.policy = "drain"  # type: ignore[assignment]


# -- login ---------------------------------------------------------------------------


def by_user(scope: Any) -> str | None:
    return scope.get("user")


@pytest.mark.parametrize("policy", ["monotone", "drain", "pin"])
def test_nobody_flips_at_login(policy: str) -> None:
    r = Rollout("p", percent=50, secret_key=KEY, key=by_user, policy=policy)
    people = [Visitor(r) for _ in range(1000)]
    before = [p.visit().variant for p in people]
    for i, p in enumerate(people):
        p.user = f"user-{i}"
    after = [p.visit().variant for p in people]
    assert after == before
    # ... and logging out changes nothing either.
    for p in people:
        p.user = None
    assert [p.visit().variant for p in people] == before


def test_switch_gives_the_user_keys_bucket_at_login() -> None:
    r = Rollout("p", percent=50, secret_key=KEY, key=by_user, on_login="switch")
    people = [Visitor(r) for _ in range(1000)]
    before = [p.visit().variant for p in people]
    for i, p in enumerate(people):
        p.user = f"user-{i}"
    after = [p.visit().variant for p in people]
    assert after == [r.variant_for(f"user-{i}") for i in range(1000)]
    assert 400 < sum(a != b for a, b in zip(before, after, strict=True)) < 600


def test_a_user_first_seen_without_a_cookie_gets_the_user_keys_bucket() -> None:
    r = Rollout("p", percent=50, secret_key=KEY, key=by_user)
    d = r.decide(None, request={"user": "api-client"})
    assert d.bucket == r.bucket_of("api-client") and d.set_cookie is None and d.cohort == "api-client"


def test_with_a_store_one_user_sees_one_variant_on_every_device() -> None:
    store = MemoryStore()
    r = Rollout("p", percent=50, secret_key=KEY, key=by_user, store=store)
    flips = 0
    for i in range(200):
        phone, laptop = Visitor(r), Visitor(r)
        phone.visit(), laptop.visit()
        phone.user = laptop.user = f"u{i}"
        first = phone.visit()
        assert r._identities is not None and r._identities.join()
        # The laptop's first request after login may still show its own assignment
        # (the store answers off the request path); from then on it shows the phone's.
        laptop.visit()
        assert r._identities.join()
        assert laptop.visit().variant == first.variant
        assert laptop.visit().bucket == first.bucket
        # The laptop's cookie now carries the user's anchor: logging out keeps it.
        laptop.user = None
        flips += laptop.visit().variant != first.variant
    assert flips == 0


def test_a_second_process_follows_the_users_first_assignment() -> None:
    store = MemoryStore()
    one = Rollout("p", percent=50, secret_key=KEY, key=by_user, store=store)
    two = Rollout("p", percent=50, secret_key=KEY, key=by_user, store=store)
    same = 0
    for i in range(100):
        a, b = Visitor(one), Visitor(two)
        a.visit(), b.visit()
        a.user = b.user = f"u{i}"
        first = a.visit()
        assert one._identities is not None and one._identities.join()
        b.visit()
        assert two._identities is not None and two._identities.join()
        same += b.visit().bucket == first.bucket
    assert same == 100


def test_pin_with_a_store_pins_the_user_across_devices() -> None:
    store = MemoryStore()
    r = Rollout("p", percent=50, secret_key=KEY, key=by_user, store=store, policy="pin")
    phone = Visitor(r, "alice")
    first = phone.visit().variant
    assert r._identities is not None and r._identities.join()
    for pct in (10, 90):
        r.percent = pct
        laptop = Visitor(r, "alice")
        laptop.visit()
        r._identities.join()
        assert laptop.visit().variant == first
        assert phone.visit().variant == first


class DownStore(MemoryStore):
    def claim(self, *args: Any) -> Any:
        raise RuntimeError("down")

    def remember(self, *args: Any) -> None:
        raise RuntimeError("down")


def test_a_failing_store_leaves_the_cookies_assignment_in_force(caplog: pytest.LogCaptureFixture) -> None:
    r = Rollout("p", percent=50, secret_key=KEY, key=by_user, store=DownStore(), policy="pin")
    people = [Visitor(r) for _ in range(100)]
    before = [p.visit().variant for p in people]
    for i, p in enumerate(people):
        p.user = f"u{i}"
    assert [p.visit().variant for p in people] == before
    assert r._identities is not None and r._identities.join()
    assert [p.visit().variant for p in people] == before
    assert r.counters["store_errors"] >= 100
    assert sum("cannot keep users" in m for m in caplog.messages) == 1  # rate limited


def test_reset_and_rollback_through_a_store_reach_every_process() -> None:
    import time

    store = MemoryStore()
    a = Rollout("p", percent=30, secret_key=KEY, store=store, policy="pin", store_interval=0.1)
    b = Rollout("p", percent=30, secret_key=KEY, store=store, policy="pin", store_interval=0.1)
    people = crowd(a, 100)
    pinned = variants(people)
    for p in people:
        p.rollout = b
    assert variants(people) == pinned  # the record travels in the cookie
    a.reset()
    assert a.epoch == 1
    deadline = time.monotonic() + 5
    while b.epoch != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert b.epoch == 1
    a.percent = 0
    while b.epoch != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert (b.epoch, b.percent) == (2, 0)
    assert [c.action for c in store.history("p")] == ["seed", "reset", "set"]


def test_a_forked_child_asks_again_for_the_users_its_parent_had_asked_about() -> None:
    from canarymw._rollout import _ASKED, _CONFIRMED, _UNASKED
    from canarymw.store._identity import Identities

    store = MemoryStore()
    r = Rollout("p", percent=50, secret_key=KEY, key=by_user, store=store)
    r.decide(None, request={"user": "alice"})
    assert r._identities is not None and r._identities.join()
    r.decide(None, request={"user": "bob"})
    r._users["bob"].state = _ASKED  # a claim still queued at the fork
    Identities._forget(r._identities)  # what the after-fork hook runs in the child
    assert r._users["alice"].state == _CONFIRMED  # answered before the fork: kept
    assert r._users["bob"].state == _UNASKED
    r.decide(None, request={"user": "bob"})
    assert r._identities.join() and r._users["bob"].state == _CONFIRMED
