"""One user, one variant on every device: two gunicorn masters ("hosts") on one Redis.

Each of 120 users has a phone that only ever talks to host A and a laptop that only ever
talks to host B, each with its own cohort cookie. Both browse anonymously, then the
phone logs in (``X-User``), then the laptop. Nobody's variant flips when the phone logs
in; the laptop follows the user's first assignment (the phone's) from the moment the
store has answered its host's claim, and keeps it after logging out, because its cookie
was rewritten.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from canarymw.store import Store

from .test_store_servers import (
    NAME,
    at_version,
    gunicorn,
    no_jar_client,
    opened,
    redis_prefix_url,
    workers_until,
)

pytestmark = pytest.mark.server

USERS = 120
__all__ = ["opened", "redis_prefix_url"]  # fixtures used here


class Device:
    def __init__(self, client: httpx.Client, base: str) -> None:
        self.client, self.base = client, base
        self.cookie: str | None = None
        self.user: str | None = None

    def visit(self) -> tuple[str, int]:
        headers = {"Connection": "close"}
        if self.cookie:
            headers["Cookie"] = self.cookie
        if self.user:
            headers["X-User"] = self.user
        r = self.client.get(self.base + "/", headers=headers)
        assert r.status_code == 200
        got = r.headers.get("set-cookie")
        if got:
            self.cookie = got.split(";", 1)[0]
        return r.headers["x-variant"], int(r.headers["x-bucket"])


def test_a_user_sees_one_variant_on_every_device(
    redis_prefix_url: str, opened: Callable[[str], Store]
) -> None:
    store = opened(redis_prefix_url)
    env = {"CANARYMW_TEST_USERS": "1", "CANARYMW_TEST_POLICY": "pin"}
    with (
        gunicorn(redis_prefix_url, workers=2, extra_env=env) as a,
        gunicorn(redis_prefix_url, workers=2, extra_env=env) as b,
        no_jar_client() as client,
    ):
        workers_until(a, 2, at_version(1), timeout=20)
        workers_until(b, 2, at_version(1), timeout=20)
        assert [c.action for c in store.history(NAME)] == ["seed"]  # logins change no state

        def journey(i: int) -> dict[str, object]:
            phone, laptop = Device(client, a.base), Device(client, b.base)
            anon_phone, anon_laptop = phone.visit(), laptop.visit()
            phone.user = laptop.user = f"user-{i}"
            at_login = phone.visit()
            time.sleep(0.3)  # host A's claim reaches the store off the request path
            laptop_first = laptop.visit()
            # From its host's answer on, the laptop shows the user's assignment: allow each
            # of host B's 2 workers one request to ask the store, and the store time to answer.
            deadline = time.monotonic() + 5
            seen = laptop.visit()
            while seen != at_login and time.monotonic() < deadline:
                time.sleep(0.05)
                seen = laptop.visit()
            settled = [laptop.visit() for _ in range(4)]
            laptop.user = None
            after_logout = [laptop.visit() for _ in range(3)]
            phone_again = [phone.visit() for _ in range(3)]
            return {
                "anon_phone": anon_phone,
                "anon_laptop": anon_laptop,
                "at_login": at_login,
                "laptop_first": laptop_first,
                "settled": settled,
                "after_logout": after_logout,
                "phone_again": phone_again,
            }

        with ThreadPoolExecutor(6) as pool:
            runs = list(pool.map(journey, range(USERS)))

    flips_at_login = sum(r["anon_phone"] != r["at_login"] for r in runs)
    assert flips_at_login == 0
    # (variant, anchor bucket) pairs: a laptop's own bucket always differs from the phone's;
    # about half of them also had the other variant.
    differed = sum(r["anon_laptop"][0] != r["at_login"][0] for r in runs)  # type: ignore[index]
    assert USERS // 5 < differed < USERS * 4 // 5
    for r in runs:
        assert r["settled"] == [r["at_login"]] * 4, r
        assert r["after_logout"] == [r["at_login"]] * 3, r
        assert r["phone_again"] == [r["at_login"]] * 3, r
    immediate = sum(r["laptop_first"] == r["at_login"] for r in runs)
    own = sum(r["laptop_first"] == r["anon_laptop"] for r in runs)
    assert immediate + own == USERS  # the first request after login: the user's, or the laptop's own
    print(
        f"two hosts on Redis: {differed} of {USERS} laptops had the other variant before login; on "
        f"the first request after login {immediate} showed the user's assignment and {own} their "
        "own; all the user's from then on; 0 flips at login on the phone"
    )
    # Users are kept under a digest of their id, never the id itself.
    import redis

    client_r = redis.Redis.from_url(redis_prefix_url.split("?")[0])
    prefix = redis_prefix_url.split("prefix=", 1)[1]
    keys = [k.decode() for k in client_r.scan_iter(match=f"{prefix}*user:*")]
    client_r.close()
    assert len(keys) == USERS and not any("user-" in k.split(":user:")[1] for k in keys)
    assert NAME in keys[0]
