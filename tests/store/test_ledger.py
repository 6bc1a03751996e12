"""The ledger of the processes that add outcome counters: every store keeps one entry per
process (upserted, listed, pruned a day after its last report), :func:`lost` finds the
ones that stopped without their final flush, and :class:`StoreSink` reports to it after
flushes, while idle, at a graceful stop and from a forked child, without ever losing
counts to a report that fails."""

from __future__ import annotations

import os
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from itertools import pairwise
from pathlib import Path

import pytest

from canarymw.sinks.store import StoreSink
from canarymw.store import Counts, MemoryStore, ProcessReport, Store, StoreUnavailable, lost
from canarymw.store._model import IDLE_REPORT, PROCESS_KEEP, PROCESS_ROLLOUTS

from ..harness import make_outcome
from .conftest import REDIS_URL, Backend
from .forking import exit_code, fork
from .redis_server import RedisServer


def report(process: str = "web-1:101:aa", at: float = 1_000_000.0, **kw: object) -> ProcessReport:
    fields: dict[str, object] = {"started_at": at - 60, "last_flush_at": at, "flushed": 10, "last_batch": 2}
    fields.update(kw)
    return ProcessReport(process, **fields)  # type: ignore[arg-type]


def outcomes(sink: StoreSink, n: int, rollout: str = "r") -> None:
    now = time.time()
    for _ in range(n):
        sink.record(make_outcome("new", 200, 0.01, rollout=rollout, timestamp=now))


def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


# -- the contract ----------------------------------------------------------------------------


def test_an_empty_ledger(backend: Backend) -> None:
    store = backend()
    assert isinstance(store, Store)
    assert store.processes() == [] and store.processes(since=time.time()) == []


def test_report_upsert_list_and_since(backend: Backend) -> None:
    store, other = backend(), backend()
    now = time.time()
    b = report("web-2:202:bb", now - 1, rollouts=("checkout", "search"), closed=True, interval=0.5)
    a = report("web-1:101:aa", now - 30)
    store.report_process(b)
    store.report_process(a)
    assert store.processes() == [a, b]  # sorted by process id, every field kept
    assert other.processes() == [a, b]  # the same ledger through another store object
    assert store.processes(since=now - 1) == [b] and store.processes(since=now + 1) == []
    newer = replace(a, last_flush_at=now, flushed=25, last_batch=15, next_within=1.0)
    other.report_process(newer)  # upsert: one entry per process
    assert store.processes() == [newer, b] and store.processes(since=now - 1) == [newer, b]
    got = store.processes()[1]
    assert got.rollouts == ("checkout", "search") and got.closed and got.interval == 0.5


def test_entries_silent_for_a_day_are_pruned(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    import canarymw.store.memory
    import canarymw.store.sqlite

    store = backend()
    now = time.time()
    kept = report("kept:1:aa", now - PROCESS_KEEP + 120)  # within the day: kept
    store.report_process(kept)
    store.report_process(report("gone:2:bb", now - PROCESS_KEEP - 120))  # past it: dropped at once
    assert store.processes() == [kept]
    # With a shorter keep, the next report (of another process) drops the silent entry.
    modules = [canarymw.store.memory, canarymw.store.sqlite]
    if "redis" in type(store).__module__:
        import canarymw.store.redis

        modules.append(canarymw.store.redis)
    for module in modules:
        monkeypatch.setattr(module, "PROCESS_KEEP", 3600)
    fresh = report("fresh:3:cc", now)
    backend().report_process(fresh)
    assert store.processes() == [fresh]


def test_a_report_must_be_a_report(backend: Backend) -> None:
    store = backend()
    with pytest.raises(TypeError, match="needs a ProcessReport"):
        store.report_process({"process": "x"})  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot be stored"):
        store.report_process(report(""))
    with pytest.raises(ValueError, match="finite"):
        store.report_process(report(at=float("nan")))
    assert store.processes() == []


def test_reports_survive_json_and_ignore_unknown_fields() -> None:
    r = report(rollouts=("a", "b"), closed=True, next_within=11.0)
    assert ProcessReport.from_json(r.to_json()) == r
    newer = r.to_json()[:-1] + ',"from_a_later_version":1}'
    assert ProcessReport.from_json(newer) == r
    assert (r.host, r.pid) == ("web-1", 101)
    assert ProcessReport("h:with:colons:7:ff", 0, 0).host == "h:with:colons"
    assert ProcessReport("odd", 0, 0).pid is None


# -- lost() ----------------------------------------------------------------------------------


def test_lost_names_the_silent_processes_that_did_not_close() -> None:
    now = 1_000_000.0
    live = report("live:1:aa", now - 2.9)  # interval 1: silent for up to 3 s is fine
    stale = report("stale:2:bb", now - 3.1, last_batch=40)
    closed = report("closed:3:cc", now - 3600, closed=True)
    idle = report("idle:4:dd", now - 12, last_batch=0, next_within=IDLE_REPORT + 1)  # a heartbeat
    idle_gone = report("idle-gone:5:ee", now - 13.5, last_batch=0, next_within=IDLE_REPORT + 1)
    got = lost([live, stale, closed, idle, idle_gone], now)
    assert [r.process for r in got] == ["stale:2:bb", "idle-gone:5:ee"]
    assert got[0].last_batch == 40  # the estimate of what it took along
    assert lost([live], now + 0.2) == [live]
    assert lost([]) == []


@pytest.mark.parametrize(("interval", "silent"), [(0.2, 2.2), (1.0, 3.0), (2.0, 6.0), (5.0, 15.0)])
def test_silence_allowed_is_max_of_three_intervals_and_interval_plus_two(
    interval: float, silent: float
) -> None:
    r = report(interval=interval, next_within=interval)
    assert r.silent_after == pytest.approx(silent) == max(3 * interval, interval + 2)
    assert replace(r, next_within=0.0).silent_after == pytest.approx(silent)  # a report without it
    assert lost([r], r.last_flush_at + silent - 0.01) == []
    assert lost([r], r.last_flush_at + silent + 0.01) == [r]


# -- StoreSink -------------------------------------------------------------------------------


def test_the_sink_reports_after_each_flush_and_closed_at_close(backend: Backend) -> None:
    store = backend()
    sink = StoreSink(store, interval=60)
    host, pid, _ = sink.process.split(":")
    assert (host, int(pid)) == (socket.gethostname(), os.getpid())
    assert sink.flush() and store.processes() == []  # nothing counted yet: nothing to report
    outcomes(sink, 3)
    outcomes(sink, 2, rollout="s")
    before = time.time()
    assert sink.flush()
    (first,) = store.processes()
    assert first.process == sink.process and first.pid == os.getpid()
    assert (first.flushed, first.last_batch, first.closed, first.rollouts) == (5, 5, False, ("r", "s"))
    assert first.interval == 60 and first.next_within == 60
    assert first.started_at <= before <= first.last_flush_at <= time.time()
    outcomes(sink, 4)
    assert sink.flush()
    (second,) = store.processes()
    assert (second.flushed, second.last_batch, second.started_at) == (9, 4, first.started_at)
    # Nothing to add: one report says so (the next comes within 10 s, not one interval) ...
    assert sink.flush()
    (idle,) = store.processes()
    assert (idle.flushed, idle.last_batch, idle.closed) == (9, 0, False)
    assert idle.next_within == IDLE_REPORT + 60 and idle.last_flush_at >= second.last_flush_at
    assert sink.flush() and store.processes() == [idle]  # ... then nothing for 10 s
    assert sink.close()
    (last,) = store.processes()
    assert (last.flushed, last.last_batch, last.closed) == (9, 0, True)
    assert lost([last], time.time() + 3600) == []
    assert sum(c.requests for c in store.read_counts(["r", "s"], 0)) == 9 == sink.flushed
    assert sink.close() and store.processes() == [last]  # a second close reports nothing new


def test_the_rollouts_a_report_names_are_capped() -> None:
    store = MemoryStore()
    sink = StoreSink(store, interval=60)
    for i in range(PROCESS_ROLLOUTS + 10):
        outcomes(sink, 1, rollout=f"r{i:03d}")
    assert sink.flush()
    (got,) = store.processes()
    assert len(got.rollouts) == PROCESS_ROLLOUTS and list(got.rollouts) == sorted(got.rollouts)
    assert got.flushed == PROCESS_ROLLOUTS + 10
    sink.close()


def test_an_idle_sink_sends_heartbeats(backend: Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    import canarymw.sinks.store as module

    monkeypatch.setattr(module, "IDLE_REPORT", 0.2)
    store = backend()
    sink = StoreSink(store, interval=0.05)
    try:
        outcomes(sink, 3)  # starts the flushing thread
        until(lambda: [r.flushed for r in store.processes()] == [3])
        (busy,) = store.processes()
        assert busy.last_batch == 3 and busy.next_within == 0.05
        seen: list[ProcessReport] = []

        def beats() -> bool:
            now = time.time()
            reports = store.processes()
            assert lost(reports, now) == []  # idle, but alive: never taken for killed
            seen.extend(r for r in reports if r not in seen)
            return len([r for r in seen if r.last_batch == 0]) >= 3

        until(beats)
        heartbeats = [r for r in seen if r.last_batch == 0]
        assert all(r.flushed == 3 and not r.closed for r in heartbeats)
        assert heartbeats[0].next_within == pytest.approx(0.25)
        gaps = [b.last_flush_at - a.last_flush_at for a, b in pairwise(heartbeats)]
        assert all(0.15 < g < 1.5 for g in gaps), gaps
    finally:
        sink.close()
    assert store.processes()[0].closed


class FailingReports(MemoryStore):
    """A MemoryStore whose ledger refuses reports while ``down``."""

    def __init__(self, error: type[Exception] = StoreUnavailable) -> None:
        super().__init__()
        self.down = True
        self.error = error
        self.attempts = 0

    def report_process(self, report: ProcessReport) -> None:
        self.attempts += 1
        if self.down:
            raise self.error("the ledger is down.")
        super().report_process(report)


@pytest.mark.parametrize("error", [StoreUnavailable, RuntimeError])
def test_a_failing_report_never_loses_counts(
    error: type[Exception], caplog: pytest.LogCaptureFixture
) -> None:
    store = FailingReports(error)
    sink = StoreSink(store, interval=60)
    outcomes(sink, 5)
    assert sink.flush() is True  # the counts are in; only the ledger lags
    assert sum(c.requests for c in store.read_counts(["r"], 0)) == 5 == sink.flushed
    assert (sink.failures, sink.report_failures, store.processes()) == (0, 1, [])
    assert "could not report this process" in caplog.text
    assert sink.flush() is True and sink.report_failures == 2  # retried with the next flush
    store.down = False
    assert sink.flush() is True  # nothing to add, but a report is owed
    (got,) = store.processes()
    assert (got.flushed, got.last_batch, got.closed) == (5, 0, False)
    attempts = store.attempts
    assert sink.flush() and store.attempts == attempts  # and then idle again
    store.down = True
    outcomes(sink, 2)
    assert sink.close() is True  # the final report fails: the ledger cannot say closed
    assert sum(c.requests for c in store.read_counts(["r"], 0)) == 7
    # The thread's last flush added the 2 and failed to report; close() tried once more.
    assert store.processes() == [got] and sink.report_failures == 4


def test_a_failing_final_flush_is_not_reported_closed() -> None:
    from .test_follow import FlakyStore

    store = FlakyStore()
    sink = StoreSink(store, interval=60)
    outcomes(sink, 4)
    assert sink.flush()
    store.down = True
    outcomes(sink, 1)
    assert sink.close() is False
    (got,) = store.processes()
    assert (got.flushed, got.closed) == (4, False)  # so lost() names it once it is silent


def test_a_forked_child_reports_as_a_process_of_its_own(backend: Backend) -> None:
    store = backend()
    if isinstance(store, MemoryStore):
        pytest.skip("a MemoryStore is not shared with a child")
    sink = StoreSink(store, interval=60)
    outcomes(sink, 2)
    assert sink.flush()
    parent = sink.process

    def child() -> None:
        assert sink.process != parent and sink.flushed == 0
        assert sink.process.split(":")[1] == str(os.getpid())
        outcomes(sink, 3)
        assert sink.close()

    pid = fork(child)
    assert exit_code(pid) == 0
    got = {r.pid: r for r in backend().processes()}
    assert set(got) == {os.getpid(), pid}
    assert (got[pid].flushed, got[pid].closed) == (3, True)
    assert (got[os.getpid()].flushed, got[os.getpid()].closed) == (2, False)
    assert sink.process == parent
    sink.close()


def test_reports_from_many_threads_and_objects_keep_one_entry_each(backend: Backend) -> None:
    now = time.time()
    errors: list[BaseException] = []

    def work(i: int) -> None:
        store = backend()
        try:
            for n in range(20):
                store.report_process(report(f"p:{i}:x", now + n * 0.001, flushed=n))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    got = backend().processes()
    assert [r.process for r in got] == [f"p:{i}:x" for i in range(4)] and {r.flushed for r in got} == {19}


# -- backend specifics -----------------------------------------------------------------------


def test_an_sqlite_file_of_schema_2_gains_the_ledger(tmp_path: Path) -> None:
    from canarymw.store.sqlite import _MIGRATIONS, SCHEMA_VERSION, SQLiteStore

    path = tmp_path / "v2.db"
    conn = sqlite3.connect(path, isolation_level=None)
    for step in _MIGRATIONS[:2]:  # a file as the release with leases left it
        for statement in step:
            conn.execute(statement)
    conn.execute("PRAGMA user_version = 2")
    conn.close()
    store = SQLiteStore(path)
    try:
        r = report(at=time.time())
        store.report_process(r)
        assert store.processes() == [r]
    finally:
        store.close()
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    assert SCHEMA_VERSION >= 3  # the version that brought the ledger
    assert conn.execute("SELECT process FROM processes").fetchall() == [("web-1:101:aa",)]
    conn.close()


def test_sqlite_and_redis_errors_are_unavailable(tmp_path: Path) -> None:
    from canarymw.store.sqlite import SQLiteStore

    broken = SQLiteStore(tmp_path / "missing" / "state.db")
    with pytest.raises(StoreUnavailable, match="does not exist"):
        broken.report_process(report())
    with pytest.raises(StoreUnavailable, match="does not exist"):
        broken.processes()
    pytest.importorskip("redis")
    from canarymw.store.redis import RedisStore

    down = RedisStore("redis://:secret@127.0.0.1:1/0", connect_timeout=0.2, timeout=0.2)
    for call in (lambda: down.report_process(report()), down.processes):
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            call()
        assert time.monotonic() - started < 2.0
        assert "127.0.0.1:1" in str(caught.value) and "secret" not in str(caught.value)
    down.close()


def test_redis_ledger_keys_share_a_slot_and_expire(redis_prefix: str) -> None:
    import redis
    from redis.crc import key_slot

    from canarymw.store.redis import RedisStore

    store = RedisStore(REDIS_URL, prefix=redis_prefix)
    raw = redis.Redis.from_url(REDIS_URL)
    try:
        r = report(at=time.time())
        store.report_process(r)
        hash_key, at_key = f"{redis_prefix}{{ledger}}:processes", f"{redis_prefix}{{ledger}}:at"
        assert ProcessReport.from_json(raw.hget(hash_key, r.process)) == r  # type: ignore[arg-type]
        assert raw.zscore(at_key, r.process) == pytest.approx(r.last_flush_at)
        assert key_slot(hash_key.encode()) == key_slot(at_key.encode())
        for key in (hash_key, at_key):
            assert PROCESS_KEEP - 60 < raw.ttl(key) <= PROCESS_KEEP
        raw.hdel(hash_key, r.process)  # an index entry without its report: skipped
        assert store.processes() == []
    finally:
        store.close()
        raw.close()


def test_redis_cluster_keeps_the_ledger(cluster_redis: RedisServer) -> None:
    pytest.importorskip("redis")
    from redis.cluster import RedisCluster

    from canarymw.store.redis import RedisStore

    client = RedisCluster(host="127.0.0.1", port=cluster_redis.port, socket_timeout=1)
    store = RedisStore(client, prefix="c:")
    try:
        a, b = report("a:1:x", time.time()), report("b:2:y", time.time(), closed=True)
        store.report_process(b)
        store.report_process(a)
        assert store.processes() == [a, b]
        # Counters of two rollouts (two hash slots) and a report (a third), in one call.
        later = replace(a, last_flush_at=a.last_flush_at + 1)
        counts = [Counts("r", "new", 1000, requests=2), Counts("s", "old", 1000, requests=4)]
        assert store.add_counts(counts, later) is True
        assert store.processes() == [later, b]
        assert {c.rollout: c.requests for c in store.read_counts(["r", "s"], 0)} == {"r": 2, "s": 4}
    finally:
        client.close()


# -- counters and report in one write ----------------------------------------------------------


def test_counters_and_the_report_go_in_one_call(backend: Backend) -> None:
    store = backend()
    first = report("web-1:101:aa", time.time(), last_batch=3, flushed=3)
    assert store.add_counts([Counts("r", "new", 1000, requests=3, buckets={4: 3})], first) is True
    assert store.processes() == [first]
    assert [c.requests for c in store.read_counts(["r"], 0)] == [3]
    idle = replace(first, last_flush_at=first.last_flush_at + 1, last_batch=0)
    assert store.add_counts([], idle) is True  # nothing to add: the report alone
    assert store.processes() == [idle]
    assert [c.requests for c in store.read_counts(["r"], 0)] == [3]
    with pytest.raises(ValueError, match="cannot be stored"):  # refused before anything is added
        store.add_counts([Counts("r", "new", 1000, requests=5)], replace(first, process=""))
    assert [c.requests for c in store.read_counts(["r"], 0)] == [3] and store.processes() == [idle]


class ReportsApart(MemoryStore):
    """A store written before ``add_counts`` took the report (a third party's, say)."""

    def __init__(self) -> None:
        super().__init__()
        self.reports = 0

    def add_counts(self, counts: list[Counts]) -> None:  # type: ignore[override]
        super().add_counts(counts)

    def report_process(self, report: ProcessReport) -> None:
        self.reports += 1
        super().report_process(report)


def test_a_store_without_the_report_argument_gets_the_report_apart() -> None:
    store = ReportsApart()
    sink = StoreSink(store, interval=60)
    outcomes(sink, 4)
    assert sink.flush() is True and store.reports == 1
    assert [p.flushed for p in store.processes()] == [4]
    sink.close()


def _commands(server: RedisServer) -> dict[str, int]:
    stats = server.command("INFO", "commandstats").decode()
    return {
        line.split(":")[0].removeprefix("cmdstat_"): int(line.split("calls=")[1].split(",")[0])
        for line in stats.splitlines()
        if line.startswith("cmdstat_")
    }


def test_redis_adds_a_flush_in_one_transaction_without_asking_for_scripts(private_redis: RedisServer) -> None:
    pytest.importorskip("redis")
    from canarymw.store.redis import RedisStore

    store = RedisStore(private_redis.url, prefix="t:")
    sink = StoreSink(store, interval=60)
    try:
        for variant in ("new", "old"):
            outcomes(sink, 3)
            sink.record(make_outcome(variant, 200, 0.01, timestamp=time.time()))
        assert sink.flush()  # loads the scripts
        before = _commands(private_redis)
        outcomes(sink, 5)
        sink.record(make_outcome("old", 200, 0.01, timestamp=time.time()))
        assert sink.flush()
        after = _commands(private_redis)
        used = {name: n - before.get(name, 0) for name, n in after.items() if n != before.get(name, 0)}
        sent = {name: used.get(name, 0) for name in ("multi", "evalsha", "exec", "script", "eval")}
        assert sent == {"multi": 1, "evalsha": 3, "exec": 1, "script": 0, "eval": 0}  # 2 counters, 1 report
        assert [p.flushed for p in store.processes()] == [14]
    finally:
        sink.close()
        store.close()


@pytest.mark.parametrize("held", ["none", "report only", "counters only"])
def test_redis_loads_missing_scripts_and_adds_nothing_twice(private_redis: RedisServer, held: str) -> None:
    pytest.importorskip("redis")
    import redis

    from canarymw.store.redis import _ADD_LUA, _REPORT_LUA, RedisStore

    store = RedisStore(private_redis.url, prefix="t:")
    raw = redis.Redis.from_url(private_redis.url)
    try:
        r = report("web-1:101:aa", time.time())
        assert store.add_counts([Counts("r", "new", 1000, requests=2)], r)
        raw.script_flush()
        if held != "none":
            raw.script_load(_REPORT_LUA if held == "report only" else _ADD_LUA)
        later = replace(r, last_flush_at=r.last_flush_at + 1, flushed=12)
        assert store.add_counts(
            [Counts("r", "new", 1000, requests=3), Counts("r", "old", 1000, requests=5)], later
        )
        got = {c.variant: c.requests for c in store.read_counts(["r"], 0)}
        assert got == {"new": 5, "old": 5} and store.processes() == [later]
    finally:
        raw.close()
        store.close()


def test_a_report_redis_refuses_leaves_the_counters_added_once(
    redis_prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    redis = pytest.importorskip("redis")
    from canarymw.store.redis import RedisStore

    store = RedisStore(REDIS_URL, prefix=redis_prefix)
    raw = redis.Redis.from_url(REDIS_URL)
    ledger = f"{redis_prefix}{{ledger}}:processes"
    sink = StoreSink(store, interval=60)
    try:
        raw.set(ledger, "not a hash")  # the report's HSET fails with WRONGTYPE; the counters' do not
        window = int(time.time()) // 10 * 10
        assert store.add_counts([Counts("r", "new", window, requests=2)], report(at=time.time())) is False
        assert [c.requests for c in store.read_counts(["r"], 0)] == [2]
        outcomes(sink, 3)
        with caplog.at_level("WARNING", logger="canarymw"):
            assert sink.flush() is True  # the counts are in; only the ledger lags
        assert sink.report_failures == 1 and sink.flushed == 3 and "its counts were added" in caplog.text
        assert sum(c.requests for c in store.read_counts(["r"], 0)) == 5
        raw.delete(ledger)
        assert sink.flush() is True  # nothing to add, but a report is due
        assert [p.flushed for p in store.processes()] == [3]
    finally:
        sink.close()
        raw.close()
        store.close()
