"""Shared stores under real servers: gunicorn workers and hosts following SQLite and Redis.

Every test starts real gunicorn masters (``tests/apps/store_app.py``) on free 127.0.0.1
ports and real stores (a SQLite file, the shared Redis under a key prefix of its own, or
a private ``redis-server`` that is killed and restarted), and always stops them.

What is measured: how long a change takes to reach every worker (``applied_at`` of
each worker minus the change's ``updated_at``), that a graceful stop leaves exactly the
routed requests in the store's counters, what a SIGKILLed worker loses, that two hosts
agree on every user, and that requests never notice a store that dies or is not there.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from http.cookiejar import CookieJar, DefaultCookiePolicy
from pathlib import Path
from typing import IO, Any

import httpx
import pytest

from canarymw._bucketing import bucket
from canarymw.store import ProcessReport, Store, change, lost, open_store

from ..harness import by_bucket
from ..servers import ROOT, free_port
from ..store.conftest import REDIS_URL, delete_redis_keys
from ..store.redis_server import RedisServer

pytestmark = pytest.mark.server

NAME = "store-servers-v2"
KEY = "store-servers-secret-0123456789abcdef"
CODE_PERCENT = 30.0
APP = "tests.apps.store_app:app"
COOKIE = "canarymw"


# -- servers -----------------------------------------------------------------------------


@dataclass
class Server:
    """One gunicorn master (and its workers) serving ``tests/apps/store_app.py``."""

    proc: subprocess.Popen[bytes]
    base: str
    log: IO[bytes]
    client: httpx.Client = field(default_factory=lambda: httpx.Client(timeout=10))

    def stats(self) -> dict[str, Any]:
        """``/stats`` of whichever worker takes the connection (never routed, never counted)."""
        r = self.client.get(self.base + "/stats", headers={"Connection": "close"})
        assert r.status_code == 200, r.text
        result: dict[str, Any] = r.json()
        return result

    def stop(self, timeout: float = 25) -> int:
        """A graceful stop: SIGTERM to the master only, and wait for it (and its workers)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"gunicorn did not stop within {timeout}s of SIGTERM:\n{self.output()}"
            ) from None

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")[-4000:]


@contextlib.contextmanager
def gunicorn(
    store_url: str,
    *,
    workers: int,
    sink_interval: float | None = None,
    app: str = APP,
    extra_env: dict[str, str] | None = None,
) -> Iterator[Server]:
    """Serve ``app`` (the store app by default) with ``workers`` sync workers; ready once
    ``/stats`` answers."""
    port = free_port()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "CANARYMW_TEST_STORE": store_url,
        "CANARYMW_TEST_NAME": NAME,
        "CANARYMW_TEST_KEY": KEY,
        "CANARYMW_TEST_PERCENT": str(CODE_PERCENT),
        "CANARYMW_TEST_STORE_INTERVAL": "0.2",
        "CANARYMW_TEST_SINK_INTERVAL": "" if sink_interval is None else str(sink_interval),
        **(extra_env or {}),
    }
    argv = [sys.executable, "-m", "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}"]
    argv += ["--log-level", "warning", "--graceful-timeout", "15", app]
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed below, after the server
    proc = subprocess.Popen(
        argv, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
    )
    server = Server(proc, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + 30
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited early ({proc.returncode}):\n{server.output()}")
            try:
                server.stats()
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"gunicorn on port {port} not ready after 30s") from None
                time.sleep(0.1)
        yield server
    finally:
        server.client.close()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)  # a worker the master left behind
        log.close()


def workers_until(
    server: Server, count: int, ok: Callable[[dict[str, Any]], bool], timeout: float
) -> dict[int, dict[str, Any]]:
    """Poll ``/stats`` until ``count`` distinct workers have answered ``ok`` (the latest
    answer of each), within ``timeout`` seconds; the latest answer per worker."""
    latest: dict[int, dict[str, Any]] = {}
    deadline = time.monotonic() + timeout
    while True:
        stats = server.stats()
        latest[stats["pid"]] = stats
        good = {pid: s for pid, s in latest.items() if ok(s)}
        if len(good) >= count:
            return good
        if time.monotonic() > deadline:
            raise AssertionError(f"after {timeout}s only {len(good)} of {count} workers are ready: {latest}")
        time.sleep(0.02)


def at_version(version: int) -> Callable[[dict[str, Any]], bool]:
    return lambda s: s["version"] is not None and s["version"] >= version and s["error"] is None


def switch_times(stats: dict[int, dict[str, Any]], updated_at: float) -> list[float]:
    """Seconds from a change's write to each worker applying it."""
    return sorted(round(s["applied_at"] - updated_at, 3) for s in stats.values())


# -- clients -----------------------------------------------------------------------------


@dataclass
class Hit:
    status: int
    variant: str
    pid: int
    cohort: str
    bucket: int
    started: float
    done: float
    cookie: str | None  # the cohort cookie set on this response, if any


def no_jar_client() -> httpx.Client:
    """A client that keeps no cookies: every request sends exactly the Cookie header given."""
    return httpx.Client(timeout=15, cookies=CookieJar(DefaultCookiePolicy(allowed_domains=[])))


def hit(client: httpx.Client, base: str, cookie: str | None = None) -> Hit:
    headers = {"Connection": "close"}
    if cookie:
        headers["Cookie"] = cookie
    started = time.monotonic()
    r = client.get(base + "/", headers=headers)
    done = time.monotonic()
    set_cookie = r.headers.get("set-cookie")
    return Hit(
        r.status_code,
        r.headers.get("x-variant", ""),
        int(r.headers.get("x-pid", "0")),
        r.headers.get("x-cohort", ""),
        int(r.headers.get("x-bucket", "-1")),
        started,
        done,
        None if set_cookie is None else set_cookie.split(";", 1)[0],
    )


def user_session(base: str, visits: int) -> list[Hit]:
    """A fresh visitor, then ``visits - 1`` returns with the cookie it was given."""
    with no_jar_client() as client:
        first = hit(client, base)
        hits = [first]
        assert first.cookie is not None and first.cookie.startswith(COOKIE + "=")
        hits += [hit(client, base, first.cookie) for _ in range(visits - 1)]
    return hits


def sessions(base: str, users: int, visits: int, threads: int = 6) -> list[Hit]:
    with ThreadPoolExecutor(threads) as pool:
        return [h for hs in pool.map(lambda _: user_session(base, visits), range(users)) for h in hs]


def frozen(cohort: str, percent: float) -> str:
    """The frozen hash rule: ``new`` iff the cohort's bucket is under the percent's threshold."""
    return by_bucket(bucket(NAME, cohort), percent)


def counted(store: Store) -> dict[str, int]:
    """The store's summed request counters per variant (every window)."""
    total: dict[str, int] = {}
    for c in store.read_counts([NAME], 0.0):
        total[c.variant] = total.get(c.variant, 0) + c.requests
    return total


def by_pid(hits: list[Hit]) -> dict[int, int]:
    total: dict[int, int] = {}
    for h in hits:
        total[h.pid] = total.get(h.pid, 0) + 1
    return total


def ledger(store: Store) -> dict[int, ProcessReport]:
    """The store's ledger of processes, by pid (all of this host)."""
    reports = store.processes()
    assert all(r.host == socket.gethostname() and r.pid is not None for r in reports), reports
    by = {r.pid: r for r in reports if r.pid is not None}
    assert len(by) == len(reports), reports  # one entry per process
    return by


def by_variant(hits: list[Hit]) -> dict[str, int]:
    total: dict[str, int] = {}
    for h in hits:
        total[h.variant] = total.get(h.variant, 0) + 1
    return total


# -- fixtures ----------------------------------------------------------------------------


@pytest.fixture
def redis_prefix_url() -> Iterator[str]:
    """The shared Redis under a prefix of our own; its keys are deleted afterwards."""
    pytest.importorskip("redis")
    prefix = f"canarymw-test-{uuid.uuid4().hex[:12]}:"
    yield f"{REDIS_URL}?prefix={prefix}"
    delete_redis_keys(prefix)


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    """A private redis-server (no persistence), not started yet; killed afterwards."""
    pytest.importorskip("redis")
    server = RedisServer(tmp_path / "redis")
    yield server
    server.kill()


@pytest.fixture
def opened() -> Iterator[Callable[[str], Store]]:
    made: list[Store] = []

    def make(url: str) -> Store:
        store = open_store(url)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


# -- tests -------------------------------------------------------------------------------


def test_sqlite_shared_by_four_workers(tmp_path: Path, opened: Callable[[str], Store]) -> None:
    """A change reaches all 4 workers in < 2 s; a graceful stop leaves exactly the routed
    requests in the store's counters."""
    url = f"sqlite:///{tmp_path / 'state.db'}"
    store = opened(url)
    with gunicorn(url, workers=4, sink_interval=0.2) as server:
        seeded = workers_until(server, 4, at_version(1), timeout=20)
        assert {s["percent"] for s in seeded.values()} == {CODE_PERCENT}
        assert [c.action for c in store.history(NAME)] == ["seed"]  # one seed for 4 workers

        new = change(store, NAME, "set", percent=60, by="test", reason="raise")
        reached = workers_until(server, 4, at_version(new.version), timeout=10)
        assert set(reached) == set(seeded), "the same 4 workers"
        assert {s["percent"] for s in reached.values()} == {60.0}
        times = switch_times(reached, new.updated_at)
        print(f"sqlite: set 30 -> 60 reached the 4 workers after {times} s")
        assert times[-1] < 2.0, times

        hits = sessions(server.base, users=100, visits=4)
        assert len(hits) == 400 and all(h.status == 200 for h in hits)
        assert all(h.variant == frozen(h.cohort, 60) for h in hits)
        assert len({h.pid for h in hits}) >= 2  # spread over workers
        assert server.stop() == 0, server.output()
    got = counted(store)
    print(f"sqlite: sent {by_variant(hits)}, the store counted {got}")
    assert got == by_variant(hits)
    assert sum(got.values()) == 400
    # The ledger: every worker that served closed gracefully, having added exactly what it served.
    reports = ledger(store)
    assert all(r.closed for r in reports.values()), reports
    assert {pid: r.flushed for pid, r in reports.items()} == by_pid(hits)
    assert all(r.rollouts == (NAME,) and r.interval == 0.2 for r in reports.values())
    assert lost(reports.values(), time.time() + 3600) == []


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
def test_killed_worker_loses_at_most_one_interval(
    kind: str, tmp_path: Path, opened: Callable[[str], Store], request: pytest.FixtureRequest
) -> None:
    """SIGKILL a worker right after a burst: the store misses at most what that worker
    served in its last flush interval (1 s), and never counts more than was sent. The
    ledger names exactly that worker as lost, with an estimate that bounds the loss; every
    other worker closed, having added exactly what it served."""
    if kind == "sqlite":
        url = f"sqlite:///{tmp_path / 'state.db'}"
    else:
        url = request.getfixturevalue("redis_prefix_url")
    store = opened(url)
    interval = 1.0
    with gunicorn(url, workers=4, sink_interval=interval) as server:
        workers_until(server, 4, at_version(1), timeout=20)
        before = sessions(server.base, users=50, visits=4)  # ~spread over a few seconds
        burst = sessions(server.base, users=25, visits=4, threads=8)
        victim = max(burst, key=lambda h: h.done).pid  # it served the burst's last request
        os.kill(victim, signal.SIGKILL)
        killed_at, killed_wall = time.monotonic(), time.time()
        # The master replaces it; everyone else goes on.
        workers_until(server, 4, lambda s: s["pid"] != victim and s["version"] is not None, timeout=20)
        after = sessions(server.base, users=10, visits=4)
        assert server.stop() == 0, server.output()
    hits = before + burst + after
    assert all(h.status == 200 for h in hits)
    sent = len(hits)
    got = sum(counted(store).values())
    missing = sent - got
    # Requests the victim finished within interval + 0.5 s (flush time, scheduling) of its death.
    window = [h for h in before + burst if h.pid == victim and h.done >= killed_at - interval - 0.5]
    by_victim = sum(1 for h in hits if h.pid == victim)
    print(
        f"{kind}, killed worker: sent {sent}, the victim served {by_victim} "
        f"({len(window)} in its last {interval + 0.5} s); the store counted {got}, lost {missing}"
    )
    assert 0 <= missing <= len(window)

    reports = ledger(store)
    assert victim in reports, (victim, reports)
    dead = reports[victim]
    # Wait out the silence the ledger allows a live process (3 s for a 1 s interval).
    time.sleep(max(0.0, dead.last_flush_at + dead.silent_after + 0.1 - time.time()))
    gone = lost(store.processes())
    served = by_pid(hits)
    silent = killed_wall - dead.last_flush_at
    print(
        f"{kind}, ledger: {len(reports)} processes; lost {[r.process for r in gone]}: flushed "
        f"{dead.flushed} of {by_victim}, last batch {dead.last_batch}, missing {missing}; "
        f"last report {silent:.2f} s before the kill"
    )
    assert [r.process for r in gone] == [dead.process] and not dead.closed
    assert dead.host == socket.gethostname() and dead.interval == interval
    assert dead.last_batch > 0
    # Its last report came at most one interval (plus a flush's time on a busy machine)
    # before it died: what it took along was served within that span.
    assert 0 < silent <= interval + 1.0, silent
    # At a steady rate that is about last_batch. The traffic speeds up from 6 to 8 clients
    # for the burst it died in, and at ~10 requests/s a worker's share of the connections
    # swings from one second to the next (seen: a batch of 2, then 9 missing), so allow
    # twice the batch plus 10.
    assert missing <= 2 * dead.last_batch + 10, (missing, dead)
    assert dead.flushed + missing <= by_victim  # the ledger never claims more than was added
    others = {pid: r for pid, r in reports.items() if pid != victim}
    assert others and all(r.closed for r in others.values()), others
    assert {pid: r.flushed for pid, r in others.items()} == {p: n for p, n in served.items() if p != victim}


def test_two_hosts_on_one_redis_agree(redis_prefix_url: str, opened: Callable[[str], Store]) -> None:
    """Two masters on one Redis prefix: after a raise every user has one variant on both
    hosts, the frozen hash rule's, and nobody who had new lost it."""
    store = opened(redis_prefix_url)
    with gunicorn(redis_prefix_url, workers=2) as a, gunicorn(redis_prefix_url, workers=2) as b:
        workers_until(a, 2, at_version(1), timeout=20)
        workers_until(b, 2, at_version(1), timeout=20)
        assert [c.action for c in store.history(NAME)] == ["seed"]  # one seed for two hosts

        with no_jar_client() as client:
            with ThreadPoolExecutor(6) as pool:
                firsts = list(pool.map(lambda _: hit(client, a.base), range(200)))
            assert all(h.status == 200 and h.cookie for h in firsts)
            assert all(h.variant == frozen(h.cohort, CODE_PERCENT) for h in firsts)
            assert len({h.cohort for h in firsts}) == 200

            new = change(store, NAME, "set", percent=65, by="test", reason="raise on both hosts")
            reached = {
                "A": workers_until(a, 2, at_version(new.version), timeout=10),
                "B": workers_until(b, 2, at_version(new.version), timeout=10),
            }
            times = {host: switch_times(s, new.updated_at) for host, s in reached.items()}
            print(f"redis, two hosts: 30 -> 65 reached the workers after {times} s")
            assert max(t[-1] for t in times.values()) < 2.0, times

            def both(first: Hit) -> tuple[Hit, Hit]:
                return hit(client, a.base, first.cookie), hit(client, b.base, first.cookie)

            with ThreadPoolExecutor(6) as pool:
                pairs = list(pool.map(both, firsts))
    for first, (on_a, on_b) in zip(firsts, pairs, strict=True):
        assert on_a.status == on_b.status == 200
        assert on_a.cohort == on_b.cohort == first.cohort
        assert on_a.variant == on_b.variant == frozen(first.cohort, 65)
        if first.variant == "new":
            assert on_a.variant == "new"
    moved = sum(
        1 for f, (x, _) in zip(firsts, pairs, strict=True) if f.variant == "old" and x.variant == "new"
    )
    print(
        f"redis, two hosts: {sum(f.variant == 'new' for f in firsts)} new at 30%, {moved} moved to new at 65%"
    )


def test_private_redis_killed_and_restarted(
    private_redis: RedisServer, opened: Callable[[str], Store]
) -> None:
    """Requests flow at normal latency while Redis is dead; after a restart (empty, no
    persistence) the workers restore the operator's percent, not the code's, and follow
    changes again."""
    private_redis.start()
    url = f"{private_redis.url}?prefix=t:"
    store = opened(url)
    with gunicorn(url, workers=2, sink_interval=0.5) as server:
        workers_until(server, 2, at_version(1), timeout=20)
        before = change(store, NAME, "set", percent=55, by="ops", reason="before the outage")
        workers_until(server, 2, at_version(before.version), timeout=10)

        hits: list[Hit] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def traffic() -> None:
            with no_jar_client() as client:
                cookie = None
                while not stop.is_set():
                    try:
                        h = hit(client, server.base, cookie)
                    except Exception as exc:
                        errors.append(exc)
                        continue
                    hits.append(h)
                    cookie = None if len(hits) % 5 == 0 else (h.cookie or cookie)

        thread = threading.Thread(target=traffic, daemon=True)
        thread.start()
        try:
            time.sleep(1.0)
            private_redis.kill()
            killed = time.monotonic()
            # Every worker says the store is failing, and how stale its state is.
            failing = workers_until(
                server, 2, lambda s: s["error"] is not None and s["age"] > 1.5, timeout=15
            )
            assert {s["percent"] for s in failing.values()} == {55.0}
            ages = sorted(round(s["age"], 2) for s in failing.values())
            time.sleep(max(0.0, 3.0 - (time.monotonic() - killed)))  # at least 3 s of outage
            private_redis.start()
            restarted = time.monotonic()
            restored = workers_until(server, 2, at_version(before.version + 1), timeout=20)
            back = time.monotonic()
            time.sleep(0.5)
        finally:
            stop.set()
            thread.join(20)
        assert not errors, errors[:3]
        assert all(h.status == 200 for h in hits), [h.status for h in hits if h.status != 200][:5]
        outage = sorted(h.done - h.started for h in hits if killed <= h.started < restarted)
        normal = sorted(h.done - h.started for h in hits if h.started < killed)
        p99 = outage[int(len(outage) * 0.99) - 1] if outage else 0.0
        print(
            f"redis outage: {len(outage)} requests in {restarted - killed:.1f} s, p99 {p99 * 1000:.0f} ms, "
            f"max {outage[-1] * 1000:.0f} ms (before: {len(normal)} requests, "
            f"max {normal[-1] * 1000:.0f} ms); "
            f"ages seen {ages} s; restored {back - restarted:.1f} s after the restart"
        )
        assert len(outage) >= 10
        assert p99 <= 0.5

        state = store.read([NAME])[NAME]
        assert state.percent == 55.0 and state.version == before.version + 1
        assert {s["percent"] for s in restored.values()} == {55.0}
        assert [c.action for c in store.history(NAME)] == ["restore"]  # one restore, by one worker

        again = change(store, NAME, "set", percent=70, by="ops", reason="after the outage")
        reached = workers_until(server, 2, at_version(again.version), timeout=10)
        times = switch_times(reached, again.updated_at)
        print(f"redis after restart: 55 -> 70 reached the workers after {times} s")
        assert times[-1] < 1.0, times


def test_cold_start_with_redis_down(private_redis: RedisServer, opened: Callable[[str], Store]) -> None:
    """Started while Redis is down: serves at the code's percent and says why; once Redis
    is up the rollout is seeded (once) and follows changes."""
    url = f"{private_redis.url}?prefix=t:"
    with gunicorn(url, workers=2) as server:
        down = workers_until(server, 2, lambda s: s["error"] is not None, timeout=20)
        assert all(s["version"] is None and s["percent"] == CODE_PERCENT for s in down.values()), down
        hits = sessions(server.base, users=20, visits=2)
        assert all(h.status == 200 and h.variant == frozen(h.cohort, CODE_PERCENT) for h in hits)

        private_redis.start()
        started = time.monotonic()
        store = opened(url)
        seeded = workers_until(server, 2, at_version(1), timeout=20)
        print(f"cold start: seeded and followed {time.monotonic() - started:.1f} s after Redis started")
        assert [c.action for c in store.history(NAME)] == ["seed"]
        assert {s["percent"] for s in seeded.values()} == {CODE_PERCENT}

        new = change(store, NAME, "set", percent=80, by="ops")
        reached = workers_until(server, 2, at_version(new.version), timeout=10)
        times = switch_times(reached, new.updated_at)
        print(f"cold start: 30 -> 80 reached the workers after {times} s")
        assert times[-1] < 1.0, times
        hits = sessions(server.base, users=20, visits=2)
        assert all(h.status == 200 and h.variant == frozen(h.cohort, 80) for h in hits)
