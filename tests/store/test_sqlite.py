"""SQLiteStore on real files: many processes, waiting across processes, faults, fork, the audit cap."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

import pytest

from canarymw.store import Counts, RolloutState, StoreUnavailable, VersionConflict, on_start, operate
from canarymw.store.sqlite import SCHEMA_VERSION, SQLiteStore

from .forking import exit_code, fork


@pytest.fixture
def new_store() -> Iterator[Callable[..., SQLiteStore]]:
    """``SQLiteStore(...)``, closed after the test (Python 3.13 warns of unclosed connections)."""
    made: list[SQLiteStore] = []

    def make(path: Path, **kw: float) -> SQLiteStore:
        store = SQLiteStore(path, **kw)
        made.append(store)
        return store

    yield make
    for store in made:
        store.close()


def seed(store: SQLiteStore, name: str = "r", percent: float = 0) -> RolloutState:
    made = on_start(name, None, percent, now=1000.0)
    assert made is not None
    store.write(name, 0, *made)
    return made[0]


def run_python(code: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


INCREMENT = """
    import sys, time
    from pathlib import Path
    from canarymw.store import VersionConflict, operate
    from canarymw.store.sqlite import SQLiteStore

    path, me, each, go = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    store = SQLiteStore(path)
    store.read(["r"])  # connected before the start
    Path(f"{go}.{me}").touch()
    while not go.exists():
        time.sleep(0.002)
    conflicts = 0
    for _ in range(each):
        while True:
            current = store.read(["r"])["r"]
            new, change = operate("r", current, "set", percent=current.percent + 1, by=me)
            try:
                store.write("r", current.version, new, change)
                break
            except VersionConflict:
                conflicts += 1
    store.close()
    print(conflicts)
"""


def test_processes_incrementing_one_file_lose_no_update(
    tmp_path: Path, new_store: Callable[..., SQLiteStore]
) -> None:
    path, go = tmp_path / "state.db", tmp_path / "go"
    store = new_store(path)
    seed(store)
    workers, each = 3, 20
    procs = [run_python(INCREMENT, str(path), f"p{i}", str(each), str(go)) for i in range(workers)]
    deadline = time.monotonic() + 30
    while not all(Path(f"{go}.p{i}").exists() for i in range(workers)):
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        assert time.monotonic() < deadline
        time.sleep(0.005)
    go.touch()  # every worker starts writing at once
    for p in procs:
        _, err = p.communicate(timeout=30)
        assert p.returncode == 0, err
    final = store.read(["r"])["r"]
    assert final.percent == workers * each  # each increment read the one before it
    assert final.version == 1 + workers * each
    log = store.history("r", limit=1000)
    assert [c.version for c in log] == list(range(1, 2 + workers * each))  # each change audited once
    assert [c.percent_after for c in log] == [float(v) for v in range(workers * each + 1)]
    assert sorted(c.by for c in log[1:]) == sorted(f"p{i}" for i in range(workers) for _ in range(each))


def test_forked_workers_sharing_an_open_store_lose_no_update(
    tmp_path: Path, new_store: Callable[..., SQLiteStore]
) -> None:
    # As gunicorn with a preloaded app: the parent has the file open when it forks.
    store = new_store(tmp_path / "state.db", timeout=10)
    seed(store)
    store.wait(0)
    workers, each = 4, 25
    go = tmp_path / "go"

    def work(me: str) -> None:
        while not go.exists():
            time.sleep(0.001)
        for _ in range(each):
            while True:
                current = store.read(["r"])["r"]
                new, change = operate("r", current, "set", percent=current.percent + 1, by=me)
                try:
                    store.write("r", current.version, new, change)
                    break
                except VersionConflict:
                    continue
            store.add_counts([Counts("r", "new", 1000, requests=1, buckets={7: 1})])

    pids = [fork(partial(work, f"w{i}")) for i in range(workers)]
    go.touch()
    assert [exit_code(pid) for pid in pids] == [0] * workers
    final = store.read(["r"])["r"]
    assert (final.percent, final.version) == (workers * each, 1 + workers * each)
    assert [c.version for c in store.history("r", limit=1000)] == list(range(1, 2 + workers * each))
    (counts,) = store.read_counts(["r"], since=0)
    assert counts.requests == workers * each and counts.buckets == {7: workers * each}


WRITE_ONCE = """
    import sys, time
    from canarymw.store import operate
    from canarymw.store.sqlite import SQLiteStore

    store = SQLiteStore(sys.argv[1])
    current = store.read(["r"])["r"]
    time.sleep(0.3)  # the watcher is waiting by now
    new, change = operate("r", current, "pause", by="other-process")
    store.write("r", current.version, new, change)
    print(time.time())
    store.close()
"""


def test_wait_wakes_soon_after_a_write_in_another_process(
    tmp_path: Path, new_store: Callable[..., SQLiteStore]
) -> None:
    path = tmp_path / "state.db"
    watcher = new_store(path)
    seed(watcher)
    watcher.wait(0)  # forget what happened before
    proc = run_python(WRITE_ONCE, str(path))
    try:
        assert watcher.wait(30.0) is True
        woke = time.time()
    finally:
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    written = float(out)
    assert 0 <= woke - written < 0.5
    assert watcher.read(["r"])["r"].paused
    assert watcher.wait(0.1) is False  # that change was reported once


def test_wait_reports_state_changes_not_counter_updates(
    tmp_path: Path, new_store: Callable[..., SQLiteStore]
) -> None:
    watcher, other = new_store(tmp_path / "state.db"), new_store(tmp_path / "state.db")
    assert watcher.wait(0) is True  # no baseline yet: a change may have happened
    assert watcher.wait(0) is False
    other.add_counts([Counts("r", "new", 1000, requests=1)])
    assert watcher.wait(0.15) is False
    state = seed(other)
    assert watcher.wait(0) is True
    new, change = operate("r", state, "set", percent=5, by="me")
    watcher.write("r", state.version, new, change)  # its own write wakes it at once
    started = time.monotonic()
    assert watcher.wait(5.0) is True
    assert time.monotonic() - started < 0.05
    assert watcher.wait(0.1) is False


def test_a_missing_directory_is_a_sentence_at_first_use(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "missing" / "state.db")  # no I/O yet
    with pytest.raises(StoreUnavailable, match=r"directory .*missing does not exist") as info:
        store.read(["r"])
    message = str(info.value)
    assert str(tmp_path / "missing" / "state.db") in message and message.endswith(".")
    assert isinstance(info.value.__cause__, sqlite3.Error)
    with pytest.raises(StoreUnavailable, match="does not exist"):
        store.wait(0)


def test_other_unusable_paths_are_sentences(tmp_path: Path) -> None:
    with pytest.raises(StoreUnavailable, match="is a directory"):
        SQLiteStore(tmp_path).names()
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database, just some bytes" * 100)
    with pytest.raises(StoreUnavailable, match=r"junk\.db is not an SQLite database") as info:
        SQLiteStore(junk).read(["r"])
    assert str(info.value).endswith(".")
    newer = tmp_path / "newer.db"
    with sqlite3.connect(newer) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(StoreUnavailable, match="newer than"):
        SQLiteStore(newer).names()
    for bad in ("", ":memory:"):
        with pytest.raises(ValueError, match="file that processes share"):
            SQLiteStore(bad)
    for timeout in (-1, float("nan"), True):
        with pytest.raises(ValueError, match="timeout"):
            SQLiteStore(tmp_path / "x.db", timeout=timeout)


def test_a_lock_held_too_long_is_unavailable_then_the_store_recovers(
    tmp_path: Path, new_store: Callable[..., SQLiteStore]
) -> None:
    path = tmp_path / "state.db"
    store = new_store(path, timeout=0.2)
    state = seed(store)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        new, change = operate("r", state, "set", percent=50, by="me")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match=r"locked by another connection for more than 0\.2 s"):
            store.write("r", state.version, new, change)
        assert time.monotonic() - started >= 0.15
        with pytest.raises(StoreUnavailable, match="locked"):
            store.add_counts([Counts("r", "new", 1000, requests=1)])
        assert store.read(["r"]) == {"r": state}  # WAL: readers never wait for a writer
    finally:
        holder.execute("ROLLBACK")
    store.write("r", state.version, new, change)
    assert store.read(["r"])["r"].percent == 50
    # A lost compare-and-set leaves no transaction open either: the write lock is free.
    with pytest.raises(VersionConflict):
        store.write("r", state.version, new, change)
    holder.execute("PRAGMA busy_timeout = 0")
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("ROLLBACK")
    holder.close()


def test_a_forked_child_opens_its_own_connection(
    tmp_path: Path, new_store: Callable[..., SQLiteStore]
) -> None:
    store = new_store(tmp_path / "state.db")
    state = seed(store)
    store.wait(0)
    inherited = store._conn
    assert inherited is not None

    def child() -> None:
        assert store._conn is None  # the parent's connection is not used here
        got = store.read(["r"])["r"]
        assert store._conn is not inherited
        new, change = operate("r", got, "set", percent=42, by="child")
        store.write("r", got.version, new, change)
        store.add_counts([Counts("r", "new", 1000, requests=2)])
        assert store.wait(0) is True  # no baseline in the child

    assert exit_code(fork(child)) == 0
    assert store._conn is inherited  # the parent keeps its own
    assert store.wait(1.0) is True  # the child's change reaches the parent
    got = store.read(["r"])["r"]
    assert (got.percent, got.version, got.updated_by) == (42, 2, "child")
    new, change = operate("r", got, "pause", by="parent")
    store.write("r", got.version, new, change)
    assert [c.by for c in store.history("r")] == ["code", "child", "parent"]
    assert [c.requests for c in store.read_counts(["r"], since=0)] == [2]
    assert state.version == 1


def test_the_audit_log_keeps_the_newest_thousand(
    tmp_path: Path, new_store: Callable[..., SQLiteStore]
) -> None:
    store = new_store(tmp_path / "state.db")
    state = seed(store)
    seed(store, "other")
    for i in range(1029):
        new, change = operate("r", state, "set", percent=i % 100, by="me", now=2000.0 + i)
        store.write("r", state.version, new, change)
        state = new
    log = store.history("r", limit=5000)
    assert [c.version for c in log] == list(range(31, 1031))
    assert [c.version for c in store.history("r", limit=3)] == [1028, 1029, 1030]
    assert len(store.history("other")) == 1
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("SELECT count(*) FROM audit WHERE name = 'r'").fetchone() == (1000,)
    conn.close()


def test_the_file_is_wal_versioned_and_reopens_after_close(
    tmp_path: Path, new_store: Callable[..., SQLiteStore]
) -> None:
    store = new_store(tmp_path / "state.db", timeout=1.5)
    assert repr(store) == f"SQLiteStore({str(tmp_path / 'state.db')!r}, timeout=1.5)"
    state = seed(store)
    store.close()
    store.close()  # twice is fine
    assert store.read(["r", "s"]) == {"r": state} and store.names() == ["r"]
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    conn.close()
    many = [f"n{i:04d}" for i in range(1200)]  # more names than one query binds
    for name in many[:3] + many[-2:]:
        seed(store, name)
    assert sorted(store.read(many)) == many[:3] + many[-2:]
    store.add_counts([Counts(n, "new", 1000, requests=1, buckets={3: 1}) for n in many])
    assert len(store.read_counts(many, since=1000)) == len(many)
    store.close()


def test_many_processes_opening_a_new_file_at_once_all_get_in(tmp_path: Path) -> None:
    """Switching a new file to WAL while another connection does the same can fail at
    once ("database is locked", no busy wait): every opener must get in, every time."""
    import threading

    from canarymw.store import on_start

    failures: list[BaseException] = []
    for round_ in range(60):
        path = tmp_path / f"fresh-{round_}.db"

        def open_and_read(path: Path = path) -> None:
            store = SQLiteStore(path)
            try:
                store.read(["r"])
            except BaseException as exc:  # reported below, with the round
                failures.append(exc)
            finally:
                store.close()

        threads = [threading.Thread(target=open_and_read) for _ in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not failures, f"round {round_}: {failures}"
    made = on_start("r", None, 5)
    assert made is not None
    SQLiteStore(tmp_path / "fresh-0.db").write("r", 0, *made)  # and the file works
