"""Users' assignments in every store: the first claim wins, expiry, records, races."""

from __future__ import annotations

import threading
import time

import pytest

from canarymw import Rollout
from canarymw.store import Assignment
from canarymw.store._model import user_digest

from ..conftest import KEY
from .conftest import Backend


def test_the_first_claim_wins_and_a_record_replaces(backend: Backend) -> None:
    store = backend()
    first = Assignment(1234, None, 0)
    assert store.claim("r", "alice", first, 60) == first
    assert backend().claim("r", "alice", Assignment(9, "old", 3), 60) == first
    assert store.claim("r", "bob", Assignment(9, "old", 3), 60) == Assignment(9, "old", 3)
    assert store.claim("other", "alice", Assignment(5), 60) == Assignment(5)  # per rollout
    store.remember("r", "alice", Assignment(1234, "new", 2), 60)
    assert backend().claim("r", "alice", Assignment(1), 60) == Assignment(1234, "new", 2)


def test_an_expired_assignment_is_claimed_anew(backend: Backend) -> None:
    store = backend()
    store.claim("r", "carol", Assignment(10), 0.2)
    time.sleep(0.35)
    assert store.claim("r", "carol", Assignment(20), 60) == Assignment(20)


def test_a_claim_extends_the_expiry(backend: Backend) -> None:
    store = backend()
    store.claim("r", "dave", Assignment(10), 0.5)
    time.sleep(0.3)
    store.claim("r", "dave", Assignment(20), 0.5)  # kept 10, and 0.5 s more
    time.sleep(0.3)
    assert store.claim("r", "dave", Assignment(30), 60) == Assignment(10)


def test_concurrent_claims_agree(backend: Backend) -> None:
    stores = [backend() for _ in range(4)]
    results: list[Assignment] = []
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def claim(i: int) -> None:
        barrier.wait()
        for n in range(20):
            kept = stores[i].claim("r", f"u{n}", Assignment(i), 60)
            with lock:
                results.append(kept)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    by_user = {n: {stores[0].claim("r", f"u{n}", Assignment(99), 60)} for n in range(20)}
    assert all(len(v) == 1 and next(iter(v)).bucket in range(4) for v in by_user.values())
    assert len(results) == 80


@pytest.mark.parametrize(
    "bad",
    [Assignment(10_000), Assignment(-1), Assignment(1, "both"), Assignment(1, None, -1), "x"],
)
def test_what_a_store_refuses(backend: Backend, bad: object) -> None:
    with pytest.raises(ValueError, match="is not an assignment a store can keep"):
        backend().claim("r", "u", bad, 60)  # type: ignore[arg-type]


def test_user_ids_never_reach_the_store() -> None:
    assert user_digest("alice@example.com") != "alice@example.com"
    assert len(user_digest("x" * 10_000)) == 32


def test_rollouts_on_one_store_share_users(backend: Backend) -> None:
    # Two processes of one service (two store objects on one backend): the user's
    # first assignment, from either, is the one both follow.
    def by_user(scope: dict[str, str]) -> str | None:
        return scope.get("user")

    one = Rollout("ident", percent=50, secret_key=KEY, key=by_user, store=backend())
    two = Rollout("ident", percent=50, secret_key=KEY, key=by_user, store=backend())
    d1 = one.decide(None, request={"user": "erin"})
    assert one._identities is not None and one._identities.join()
    two.decide("canarymw=junk", request={"user": "erin"})
    assert two._identities is not None and two._identities.join()
    assert two.decide(None, request={"user": "erin"}).bucket == d1.bucket
