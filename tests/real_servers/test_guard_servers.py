"""Guarded rollouts under real servers: gunicorn workers share a store, one controller
leads, a healthy canary reaches 100%, an injected regression is rolled back, and a
controller killed mid-step is replaced.

Each test serves ``tests/apps/guard_app.py`` with gunicorn (2 sync workers, each with a
controller of its own) on a free 127.0.0.1 port, drives traffic of fresh visitors at
it, and reads the outcome from the store: the state, the audit log, the lease.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from canarymw.store import RolloutState, Store

from .test_store_servers import gunicorn, no_jar_client, opened, redis_prefix_url  # noqa: F401

pytestmark = pytest.mark.server

NAME = "guard-servers-v2"
APP = "tests.apps.guard_app:app"


def env(**kw: object) -> dict[str, str]:
    return {"CANARYMW_TEST_NAME": NAME, **{f"CANARYMW_TEST_{k.upper()}": str(v) for k, v in kw.items()}}


@contextmanager
def traffic(base: str, threads: int = 4) -> Iterator[dict[str, int]]:
    """Fresh visitors (no cookies) hitting ``base`` from ``threads`` threads until the block
    ends; yields the running tally of answers per variant and status."""
    tally: dict[str, int] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def run() -> None:
        with no_jar_client() as client:
            while not stop.is_set():
                try:
                    r = client.get(base + "/")
                except httpx.TransportError:
                    continue  # a worker being replaced
                key = f"{r.headers.get('x-variant', '?')} {r.status_code}"
                with lock:
                    tally[key] = tally.get(key, 0) + 1

    pool = [threading.Thread(target=run, daemon=True) for _ in range(threads)]
    for t in pool:
        t.start()
    try:
        yield tally
    finally:
        stop.set()
        for t in pool:
            t.join(15)


def wait_for(store: Store, ok: Callable[[RolloutState], bool], timeout: float) -> RolloutState:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = store.read([NAME]).get(NAME)
        if last is not None and ok(last):
            return last
        time.sleep(0.1)
    history = [(c.action, c.percent_after, c.reason) for c in store.history(NAME)]
    raise AssertionError(f"not reached within {timeout}s: {last}\n{history}")


def test_a_healthy_canary_reaches_100_percent(tmp_path: Path, opened: Callable[[str], Store]) -> None:  # noqa: F811
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = opened(url)
    with gunicorn(url, workers=2, app=APP, extra_env=env(steps="50,100", bake=1, min_requests=100)) as server:
        with traffic(server.base) as tally:
            final = wait_for(store, lambda s: s.stage == "done", timeout=75)
        assert final.percent == 100 and not final.paused
        log = store.history(NAME)
        assert [c.action for c in log] == ["seed", "guard", "advance"]  # one controller acted at a time
        assert [c.percent_after for c in log] == [0, 50, 100]
        assert log[-1].by == "canarymw-guard" and log[-1].reason.startswith("advance to 100%: pass: canary ")
        assert tally.get("new 200", 0) > 100 and not any(k.endswith(" 500") for k in tally)
        # The middleware added the StoreSink: the whole service's counters are in the store.
        counted = sum(c.requests for c in store.read_counts([NAME], 0.0) if c.variant == "new")
        assert counted >= 100
        # Everyone new now gets new.
        time.sleep(0.5)
        with no_jar_client() as client:
            assert {client.get(server.base + "/").headers["x-variant"] for _ in range(20)} == {"new"}


def test_an_injected_regression_is_rolled_back(
    redis_prefix_url: str,  # noqa: F811
    opened: Callable[[str], Store],  # noqa: F811
) -> None:
    store = opened(redis_prefix_url)
    extra = env(steps="20,50,100", bake=1, min_requests=100, error_rate=0.3)
    with gunicorn(redis_prefix_url, workers=2, app=APP, extra_env=extra) as server:
        with traffic(server.base) as tally:
            final = wait_for(store, lambda s: s.stage == "rolled-back", timeout=75)
        assert (final.percent, final.paused, final.held) == (0, True, True)
        assert final.verdict is not None and final.verdict.startswith("rollback: canary ")
        assert "harm is certain at alpha 0.05" in final.verdict
        log = store.history(NAME)
        assert [c.action for c in log] == ["seed", "guard", "auto-rollback"]
        assert log[-1].percent_before == 20 and log[-1].extra["decision"] == "rollback"
        assert tally.get("new 500", 0) > 0
        # Every worker follows within moments: fresh visitors all get old.
        time.sleep(1.0)
        with no_jar_client() as client:
            assert {client.get(server.base + "/").headers["x-variant"] for _ in range(30)} == {"old"}


def test_a_controller_killed_mid_step_is_replaced(tmp_path: Path, opened: Callable[[str], Store]) -> None:  # noqa: F811
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = opened(url)
    # No traffic and a short deadline: whoever leads pauses the step when the deadline passes.
    extra = env(steps="10,100", bake=1, min_requests=100, deadline=8, lease=1.0)
    with gunicorn(url, workers=2, app=APP, extra_env=extra):
        wait_for(store, lambda s: s.stage == "ramping", timeout=20)
        lease = store.lease_info(NAME)
        assert lease is not None
        first_pid = int(lease.holder.split(":")[1])
        os.kill(first_pid, signal.SIGKILL)  # mid-step: no release, no goodbye
        killed = time.monotonic()
        while True:
            now = store.lease_info(NAME)
            if now is not None and now.holder != lease.holder:
                break
            assert time.monotonic() - killed < 2 * 1.0 + 0.5, "no takeover within two lease periods"
            time.sleep(0.05)
        assert now.token > lease.token and int(now.holder.split(":")[1]) != first_pid
        final = wait_for(store, lambda s: s.stage == "paused", timeout=20)
        assert final.paused and final.percent == 10
        assert [c.action for c in store.history(NAME)] == ["seed", "guard", "auto-pause"]
