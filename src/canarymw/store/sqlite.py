"""``SQLiteStore``: shared rollout state in one SQLite file, for every process of one host."""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from .._runtime import reset_after_fork
from ._model import (
    HISTORY,
    PROCESS_KEEP,
    RETENTION,
    WINDOW,
    Assignment,
    Change,
    Counts,
    Lease,
    ProcessReport,
    RolloutState,
    StoreUnavailable,
    check_assignment,
    check_fence,
    check_holder,
    check_name,
    check_report,
    check_ttl,
    check_write,
    conflict,
    lease_lost,
    user_digest,
)

T = TypeVar("T")

_CHUNK = 500  # names per ``IN (...)``: well under SQLite's limit of bound parameters

SCHEMA_VERSION = 4
"""Kept in the file's ``PRAGMA user_version``; a later release migrates from it."""

_SCHEMA_1 = (
    """CREATE TABLE IF NOT EXISTS state (
        name TEXT PRIMARY KEY,
        version INTEGER NOT NULL,
        json TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS audit (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        name TEXT NOT NULL,
        version INTEGER NOT NULL,
        json TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS audit_by_name ON audit (name, id)",
    """CREATE TABLE IF NOT EXISTS counts (
        rollout TEXT NOT NULL,
        window_start INTEGER NOT NULL,
        variant TEXT NOT NULL,
        requests INTEGER NOT NULL DEFAULT 0,
        errors INTEGER NOT NULL DEFAULT 0,
        exceptions INTEGER NOT NULL DEFAULT 0,
        disconnects INTEGER NOT NULL DEFAULT 0,
        latency_sum REAL NOT NULL DEFAULT 0,
        PRIMARY KEY (rollout, window_start, variant)
    )""",
    """CREATE TABLE IF NOT EXISTS buckets (
        rollout TEXT NOT NULL,
        window_start INTEGER NOT NULL,
        variant TEXT NOT NULL,
        bucket INTEGER NOT NULL,
        count INTEGER NOT NULL,
        PRIMARY KEY (rollout, window_start, variant, bucket)
    )""",
)

_SCHEMA_2 = (
    # A released or expired lease keeps its row (holder NULL or expires_at passed): the
    # next holder's token must be larger than every one given before.
    """CREATE TABLE IF NOT EXISTS lease (
        name TEXT PRIMARY KEY,
        holder TEXT,
        token INTEGER NOT NULL,
        expires_at REAL NOT NULL
    )""",
)

_SCHEMA_3 = (
    # The ledger of the processes that add counters: one row per process, its report as
    # JSON; rows silent for more than PROCESS_KEEP go when any process reports.
    """CREATE TABLE IF NOT EXISTS processes (
        process TEXT PRIMARY KEY,
        last_flush_at REAL NOT NULL,
        json TEXT NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS processes_by_time ON processes (last_flush_at)",
)

_SCHEMA_4 = (
    # Users' assignments (one variant on every device): keyed by a digest of the user
    # id; expired rows go when a claim finds one (and in the pruning of counters).
    """CREATE TABLE IF NOT EXISTS users (
        rollout TEXT NOT NULL,
        user TEXT NOT NULL,
        expires_at REAL NOT NULL,
        json TEXT NOT NULL,
        PRIMARY KEY (rollout, user)
    )""",
)

_MIGRATIONS = (_SCHEMA_1, _SCHEMA_2, _SCHEMA_3, _SCHEMA_4)
"""The statements that take a file from version ``i`` to ``i + 1``, at index ``i``."""
assert len(_MIGRATIONS) == SCHEMA_VERSION

_ADD_COUNTS = """
INSERT INTO counts (rollout, window_start, variant, requests, errors, exceptions, disconnects, latency_sum)
VALUES (?, ?, ?, ?, ?, ?, ?, ?)
ON CONFLICT (rollout, window_start, variant) DO UPDATE SET
    requests = requests + excluded.requests,
    errors = errors + excluded.errors,
    exceptions = exceptions + excluded.exceptions,
    disconnects = disconnects + excluded.disconnects,
    latency_sum = latency_sum + excluded.latency_sum
"""

_PUT_USER = """
INSERT INTO users (rollout, user, expires_at, json) VALUES (?, ?, ?, ?)
ON CONFLICT (rollout, user) DO UPDATE SET expires_at = excluded.expires_at, json = excluded.json
"""

_ADD_BUCKETS = """
INSERT INTO buckets (rollout, window_start, variant, bucket, count) VALUES (?, ?, ?, ?, ?)
ON CONFLICT (rollout, window_start, variant, bucket) DO UPDATE SET count = count + excluded.count
"""

# Connections a forked child inherited from its parent. SQLite must never use (nor
# close: that can drop the parent's file locks) a connection opened by another process,
# so the child keeps them here, untouched, for its whole life.
_INHERITED: list[sqlite3.Connection] = []


_PRUNE_EVERY = 900.0  # seconds between two prunings of old counter windows by one process


class SQLiteStore:
    """Rollout state, audit log and outcome counters in one SQLite file.

    For one host running several processes (gunicorn or uvicorn workers, a CLI): every
    process that opens the same file sees the same rollouts, and a change made by any
    of them (``canarymw set``, a deploy) reaches the others within about
    :attr:`poll_interval` seconds. For several hosts use :class:`RedisStore`; never put
    the file on a network file system (SQLite's locks do not hold there).

    :param path: the database file; it is created (with its tables) on first use, but
        its directory must exist. ``sqlite:///path`` in :func:`open_store` gives one.
        A relative path is taken relative to the working directory at construction.
    :param timeout: seconds to wait for another process's write to finish before
        giving up with :class:`StoreUnavailable` (SQLite's ``busy_timeout``).

    Safe across processes and threads. The file is in WAL mode, so readers never wait
    for a writer; writes take SQLite's write lock (``BEGIN IMMEDIATE``), which makes
    the compare-and-set of :meth:`write` atomic across processes. Within a process the
    calls of all threads share one connection under a lock (none is on the request
    path), and :meth:`wait` uses a second one of its own. A forked child never uses
    its parent's connections: it opens its own on first use.

    Changes are detected without reading the tables: :meth:`wait` asks SQLite every
    :attr:`poll_interval` seconds (50 ms) whether anyone committed to the file
    (``PRAGMA data_version``, one cheap query), and only then whether a rollout's state
    changed (counter updates by other processes do not wake it). Changes made through
    this object wake it at once.

    Controller leases (:meth:`lease`) are rows of the same file, taken and renewed under
    the write lock; they expire by ``time.time()``, the clock every process of the host
    shares. A fenced :meth:`write` checks the lease in its own transaction.

    Tables (schema version 4, in the file's ``PRAGMA user_version``): ``state`` and
    ``audit``; ``counts`` and ``buckets`` (the outcome counters); ``lease``;
    ``processes``, the ledger of the processes that add counters (one row per process:
    its :class:`~canarymw.store.ProcessReport` as JSON, kept a day after its last report);
    and ``users``, users' assignments keyed by a digest of the user id.
    A file of an older version gains what it lacks when first opened.

    Every SQLite error (a lock held longer than ``timeout``, a full disk, a file that is
    not a database) is raised as :class:`StoreUnavailable`, with a sentence naming the
    file and the cause; no transaction is left open after one.
    """

    poll_interval = 0.05
    """Seconds between two looks for changes by other processes in :meth:`wait`."""

    def __init__(self, path: str | os.PathLike[str], *, timeout: float = 5.0) -> None:
        raw = os.fspath(path)
        if not isinstance(raw, str):
            raise TypeError(f"SQLiteStore needs a str or os.PathLike[str] path, not {type(raw).__name__}.")
        if raw in ("", ":memory:") or raw.startswith("file:"):
            raise ValueError(
                f"SQLiteStore needs the path of a file that processes share, not {raw!r}; "
                "use MemoryStore for state private to one process."
            )
        if (
            isinstance(timeout, bool)
            or not isinstance(timeout, int | float)
            or not math.isfinite(timeout)
            or timeout < 0
        ):
            raise ValueError(f"SQLiteStore needs timeout to be a number of seconds >= 0, got {timeout!r}.")
        self.path = Path(raw).absolute()
        self.timeout = float(timeout)
        self._conn: sqlite3.Connection | None = None
        self._wait_conn: sqlite3.Connection | None = None
        self._data_version = -1  # of _wait_conn, as last seen
        self._marker = -1  # newest audit id as last seen by wait(); -1: not looked yet
        self._seq = 0  # changes written through this object
        self._seen = 0  # ... as of the previous wait()
        self._prune_at = 0.0  # monotonic time of the next pruning of old counter windows
        self._after_fork()
        reset_after_fork(self, SQLiteStore._after_fork)

    def _after_fork(self) -> None:
        # In a forked child (and at construction): new locks (another parent thread may
        # have held one), no connection (the parent's stay with it), no baseline for wait().
        for conn in (self._conn, self._wait_conn):
            if conn is not None:
                _INHERITED.append(conn)
        self._conn = self._wait_conn = None
        self._lock = threading.Lock()
        self._wait_lock = threading.Lock()
        self._cond = threading.Condition(threading.Lock())
        self._data_version = self._marker = -1
        self._pid = os.getpid()

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r}, timeout={self.timeout:g})"

    # -- the Store protocol --------------------------------------------------------
    def read(self, names: list[str]) -> dict[str, RolloutState]:
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return {}

        def run(conn: sqlite3.Connection) -> dict[str, RolloutState]:
            out: dict[str, RolloutState] = {}
            for chunk, marks in _chunks(wanted):
                for name, text in conn.execute(
                    f"SELECT name, json FROM state WHERE name IN ({marks})", chunk
                ):
                    out[name] = RolloutState.from_json(text)
            return {n: out[n] for n in wanted if n in out}

        return self._run("reading rollout states", run)

    def write(
        self, name: str, expected_version: int, state: RolloutState, change: Change, fence: int | None = None
    ) -> None:
        """Store ``state`` and log ``change`` if the version is still ``expected_version``
        (and, with ``fence``, the lease still carries that token); see :class:`Store`."""
        check_write(name, expected_version, state, change)
        check_fence(fence)

        def run(conn: sqlite3.Connection) -> None:
            if fence is not None:
                # Under the write lock: no lease can change hands until this commits.
                current = _current_lease(conn, name, time.time())
                if current is None or current.token != fence:
                    raise lease_lost(name, None if current is None else current.token, fence)
            row = conn.execute("SELECT version FROM state WHERE name = ?", (name,)).fetchone()
            have = 0 if row is None else int(row[0])
            if have != expected_version:
                raise conflict(name, have, expected_version)
            if row is None:
                conn.execute(
                    "INSERT INTO state (name, version, json) VALUES (?, ?, ?)",
                    (name, state.version, state.to_json()),
                )
            else:
                conn.execute(
                    "UPDATE state SET version = ?, json = ? WHERE name = ?",
                    (state.version, state.to_json(), name),
                )
            conn.execute(
                "INSERT INTO audit (name, version, json) VALUES (?, ?, ?)",
                (name, change.version, change.to_json()),
            )
            # Keep the newest HISTORY entries: one walk of at most HISTORY index entries.
            conn.execute(
                "DELETE FROM audit WHERE name = ? AND id <= "
                "(SELECT id FROM audit WHERE name = ? ORDER BY id DESC LIMIT 1 OFFSET ?)",
                (name, name, HISTORY),
            )

        self._run(f"writing rollout {name!r}", run, transaction="IMMEDIATE")
        with self._cond:
            self._seq += 1
            self._cond.notify_all()

    def lease(self, name: str, holder: str, ttl: float) -> int | None:
        """Take or renew the controller lease of ``name`` for ``ttl`` seconds; the fencing
        token, or None while another holder's lease is unexpired. See :class:`Store`.

        Expiry is by ``time.time()``, which every process of the host shares."""
        check_name(name)
        check_holder(holder)
        seconds = check_ttl(ttl)

        def run(conn: sqlite3.Connection) -> int | None:
            now = time.time()  # read under the write lock, so takers see it in order
            current = _current_lease(conn, name, now)
            if current is not None:
                if current.holder != holder:
                    return None
                conn.execute("UPDATE lease SET expires_at = ? WHERE name = ?", (now + seconds, name))
                return current.token
            row = conn.execute("SELECT token FROM lease WHERE name = ?", (name,)).fetchone()
            token = 1 if row is None else int(row[0]) + 1
            conn.execute(
                "INSERT INTO lease (name, holder, token, expires_at) VALUES (?, ?, ?, ?) "
                "ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, token = excluded.token, "
                "expires_at = excluded.expires_at",
                (name, holder, token, now + seconds),
            )
            return token

        return self._run(f"taking the controller lease of rollout {name!r}", run, transaction="IMMEDIATE")

    def release(self, name: str, holder: str) -> None:
        """Give up ``holder``'s lease of ``name`` now (nothing if it holds none)."""
        check_name(name)
        check_holder(holder)

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                "UPDATE lease SET holder = NULL, expires_at = 0 WHERE name = ? AND holder = ?", (name, holder)
            )

        self._run(f"releasing the controller lease of rollout {name!r}", run)

    def lease_info(self, name: str) -> Lease | None:
        """Who holds the unexpired lease of ``name``, its token and seconds left; or None."""
        check_name(name)
        return self._run(
            f"reading the controller lease of rollout {name!r}",
            lambda conn: _current_lease(conn, name, time.time()),
        )

    def history(self, name: str, limit: int = 50) -> list[Change]:
        if limit <= 0:
            return []

        def run(conn: sqlite3.Connection) -> list[Change]:
            rows = conn.execute(
                "SELECT json FROM audit WHERE name = ? ORDER BY id DESC LIMIT ?", (name, limit)
            ).fetchall()
            return [Change.from_json(text) for (text,) in reversed(rows)]

        return self._run(f"reading the audit log of {name!r}", run)

    def names(self) -> list[str]:
        def run(conn: sqlite3.Connection) -> list[str]:
            return sorted(name for (name,) in conn.execute("SELECT name FROM state"))

        return self._run("listing rollouts", run)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            with self._cond:
                seq = self._seq
            if self._poll() or seq != self._seen:
                self._seen = seq
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            with self._cond:
                if self._seq == seq:
                    self._cond.wait(min(self.poll_interval, left))

    def add_counts(self, counts: list[Counts], report: ProcessReport | None = None) -> bool:
        """Add the counters and, with ``report``, keep it in the ledger, in one
        transaction (both or neither). See :class:`Store`."""
        if not counts:
            if report is not None:
                self.report_process(report)
            return True
        ledger = None
        if report is not None:
            check_report(report)
            ledger = _ledger_writer(report)
        rows = [
            (c.rollout, c.window, c.variant, c.requests, c.errors, c.exceptions, c.disconnects, c.latency_sum)
            for c in counts
        ]
        buckets = [(c.rollout, c.window, c.variant, i, n) for c in counts for i, n in c.buckets.items()]

        prune = time.monotonic() >= self._prune_at
        if prune:
            self._prune_at = time.monotonic() + _PRUNE_EVERY
        oldest = max(c.window for c in counts) - RETENTION

        def run(conn: sqlite3.Connection) -> None:
            conn.executemany(_ADD_COUNTS, rows)
            conn.executemany(_ADD_BUCKETS, buckets)
            if prune:  # windows past the retention go, a few times an hour per process
                conn.execute("DELETE FROM counts WHERE window_start < ?", (oldest,))
                conn.execute("DELETE FROM users WHERE expires_at < ?", (time.time(),))
                conn.execute("DELETE FROM buckets WHERE window_start < ?", (oldest,))
            if ledger is not None:
                ledger(conn)

        self._run("adding outcome counters", run, transaction="IMMEDIATE")
        return True

    def read_counts(self, names: list[str], since: float) -> list[Counts]:
        wanted = list(dict.fromkeys(names))
        if not wanted:
            return []
        after = since - WINDOW  # window + WINDOW > since

        def run(conn: sqlite3.Connection) -> list[Counts]:
            found: dict[tuple[str, str, int], Counts] = {}
            for chunk, marks in _chunks(wanted):
                for row in conn.execute(
                    "SELECT rollout, variant, window_start, requests, errors, exceptions, disconnects, "
                    f"latency_sum FROM counts WHERE rollout IN ({marks}) AND window_start > ?",
                    (*chunk, after),
                ):
                    rollout, variant, window = row[0], row[1], int(row[2])
                    found[(rollout, variant, window)] = Counts(
                        rollout, variant, window, int(row[3]), int(row[4]), int(row[5]), int(row[6]), row[7]
                    )
                for rollout, variant, window, bucket, n in conn.execute(
                    "SELECT rollout, variant, window_start, bucket, count FROM buckets "
                    f"WHERE rollout IN ({marks}) AND window_start > ?",
                    (*chunk, after),
                ):
                    key = (rollout, variant, int(window))
                    held = found.get(key)
                    if held is None:
                        held = found[key] = Counts(rollout, variant, int(window))
                    held.buckets[int(bucket)] = int(n)
            return [found[key] for key in sorted(found)]

        # One read transaction: the counters and their histograms are of one moment.
        return self._run("reading outcome counters", run, transaction="DEFERRED")

    def report_process(self, report: ProcessReport) -> None:
        """Keep ``report`` as its process's ledger entry (one row, replaced), and drop the
        rows silent for more than :data:`PROCESS_KEEP` seconds (an index range, usually
        empty), in one transaction. See :class:`Store`."""
        check_report(report)
        self._run("reporting a process to the ledger", _ledger_writer(report), transaction="IMMEDIATE")

    def processes(self, since: float = 0.0) -> list[ProcessReport]:
        def run(conn: sqlite3.Connection) -> list[ProcessReport]:
            rows = conn.execute(
                "SELECT json FROM processes WHERE last_flush_at >= ? ORDER BY process", (float(since),)
            ).fetchall()
            return [ProcessReport.from_json(text) for (text,) in rows]

        return self._run("reading the ledger of processes", run)

    def claim(self, name: str, user: str, assignment: Assignment, ttl: float) -> Assignment:
        """Keep ``assignment`` for ``user`` unless an unexpired one is held (one
        transaction under the write lock); the one kept. See :class:`Store`."""
        check_name(name)
        check_assignment(assignment)
        seconds = check_ttl(ttl)
        key = user_digest(user)

        def run(conn: sqlite3.Connection) -> Assignment:
            now = time.time()
            row = conn.execute(
                "SELECT json FROM users WHERE rollout = ? AND user = ? AND expires_at > ?", (name, key, now)
            ).fetchone()
            kept = assignment if row is None else Assignment.from_json(row[0])
            conn.execute(
                _PUT_USER,
                (name, key, now + seconds, kept.to_json()),
            )
            return kept

        return self._run(f"claiming a user of rollout {name!r}", run, transaction="IMMEDIATE")

    def remember(self, name: str, user: str, assignment: Assignment, ttl: float) -> None:
        """Replace ``user``'s assignment for ``ttl`` seconds. See :class:`Store`."""
        check_name(name)
        check_assignment(assignment)
        seconds = check_ttl(ttl)
        row = (name, user_digest(user), time.time() + seconds, assignment.to_json())

        def run(conn: sqlite3.Connection) -> None:
            conn.execute(
                _PUT_USER,
                row,
            )

        self._run(f"remembering a user of rollout {name!r}", run, transaction="IMMEDIATE")

    def close(self) -> None:
        """Close this process's connections; the next call opens new ones."""
        self._check_pid()
        with self._lock:
            _close(self._conn)
            self._conn = None
        with self._wait_lock:
            _close(self._wait_conn)
            self._wait_conn = None
            self._data_version = self._marker = -1

    # -- connections ---------------------------------------------------------------
    def _check_pid(self) -> None:
        # The fork hook already did this; this covers a fork that bypassed it.
        if self._pid != os.getpid():
            self._after_fork()

    def _run(self, doing: str, fn: Callable[[sqlite3.Connection], T], *, transaction: str | None = None) -> T:
        """``fn(conn)`` on this process's connection, in a transaction if asked; every
        SQLite error becomes StoreUnavailable and drops the connection (and with it any
        transaction), any other exception rolls the transaction back."""
        self._check_pid()
        with self._lock:
            if self._conn is None:
                self._conn = self._open()
            conn = self._conn
            try:
                if transaction is None:
                    return fn(conn)
                conn.execute(f"BEGIN {transaction}")
                try:
                    result = fn(conn)
                except BaseException:
                    conn.rollback()
                    raise
                conn.execute("COMMIT")
                return result
            except sqlite3.Error as exc:
                self._conn = None
                _close(conn)
                raise self._unavailable(exc, doing) from exc

    def _poll(self) -> bool:
        """Whether a rollout's state may have changed since the last poll (True if this
        is the first one on this connection)."""
        self._check_pid()
        with self._wait_lock:
            conn = self._wait_conn
            try:
                if conn is None:
                    conn = self._wait_conn = self._open()
                    self._data_version = self._marker = -1
                data_version = int(conn.execute("PRAGMA data_version").fetchone()[0])
                if data_version == self._data_version:
                    return False
                self._data_version = data_version
                (marker,) = conn.execute("SELECT coalesce(max(id), 0) FROM audit").fetchone()
            except sqlite3.Error as exc:
                self._wait_conn = None
                self._data_version = self._marker = -1
                _close(conn)
                raise self._unavailable(exc, "waiting for changes") from exc
            changed: bool = int(marker) != self._marker
            self._marker = int(marker)
            return changed

    def _open(self) -> sqlite3.Connection:
        if sqlite3.sqlite_version_info < (3, 24, 0):
            raise StoreUnavailable(
                f"SQLiteStore needs SQLite 3.24 or later, and this Python has {sqlite3.sqlite_version}."
            )
        try:
            conn = sqlite3.connect(
                self.path, timeout=self.timeout, isolation_level=None, check_same_thread=False
            )
        except sqlite3.Error as exc:
            raise self._unavailable(exc, "opening it") from exc
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self.timeout * 1000)}")
            # Switching a new file to WAL while another connection does the same can fail
            # with "database is locked" at once, without SQLite's busy wait: wait here.
            deadline = time.monotonic() + self.timeout
            while True:
                try:
                    conn.execute("PRAGMA journal_mode = WAL").fetchone()
                    break
                except sqlite3.OperationalError as exc:
                    if "locked" not in str(exc) or time.monotonic() > deadline:
                        raise
                    time.sleep(0.01)
            conn.execute("PRAGMA synchronous = NORMAL")
            self._migrate(conn)
        except BaseException as exc:
            _close(conn)
            if isinstance(exc, sqlite3.Error):
                raise self._unavailable(exc, "opening it") from exc
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Create the tables of a new file, or add what a file of an older version lacks,
        once per file (every step is idempotent: ``IF NOT EXISTS``)."""
        if _user_version(conn) == SCHEMA_VERSION:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = _user_version(conn)  # another process may have done it meanwhile
            if found > SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"SQLite store {self.path} has schema version {found}, newer than the {SCHEMA_VERSION} "
                    "this canarymw knows; upgrade canarymw in every process that uses it."
                )
            if found < SCHEMA_VERSION:
                for step in _MIGRATIONS[found:]:
                    for statement in step:
                        conn.execute(statement)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except BaseException:
            conn.rollback()
            raise
        conn.execute("COMMIT")

    def _unavailable(self, exc: sqlite3.Error, doing: str) -> StoreUnavailable:
        cause = str(exc).rstrip(".") or type(exc).__name__
        where = f"SQLite store {self.path}"
        lowered = cause.lower()
        if "locked" in lowered or "busy" in lowered:
            return StoreUnavailable(
                f"{where} stayed locked by another connection for more than {self.timeout:g} s while "
                f"{doing} ({cause}); retry later, or give the store a longer timeout."
            )
        if "unable to open" in lowered:
            parent = self.path.parent
            if not parent.is_dir():
                return StoreUnavailable(
                    f"{where} cannot be opened: its directory {parent} does not exist; "
                    "create it first (the store creates only the file)."
                )
            if self.path.is_dir():
                return StoreUnavailable(f"{where} cannot be opened: it is a directory, not a file.")
            return StoreUnavailable(
                f"{where} cannot be opened ({cause}); check that this process may read and write "
                f"the file and its directory {parent}."
            )
        if "not a database" in lowered:
            return StoreUnavailable(
                f"{where} is not an SQLite database ({cause}); point the store elsewhere."
            )
        return StoreUnavailable(f"{where} failed while {doing}: {cause}.")


def _chunks(names: list[str]) -> Iterator[tuple[list[str], str]]:
    for start in range(0, len(names), _CHUNK):
        chunk = names[start : start + _CHUNK]
        yield chunk, ", ".join("?" * len(chunk))


def _current_lease(conn: sqlite3.Connection, name: str, now: float) -> Lease | None:
    row = conn.execute(
        "SELECT holder, token, expires_at FROM lease "
        "WHERE name = ? AND holder IS NOT NULL AND expires_at > ?",
        (name, now),
    ).fetchone()
    return None if row is None else Lease(row[0], int(row[1]), float(row[2]) - now)


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _ledger_writer(report: ProcessReport) -> Callable[[sqlite3.Connection], None]:
    row = (report.process, float(report.last_flush_at), report.to_json())
    oldest = time.time() - PROCESS_KEEP

    def run(conn: sqlite3.Connection) -> None:
        conn.execute(
            "INSERT INTO processes (process, last_flush_at, json) VALUES (?, ?, ?) "
            "ON CONFLICT (process) DO UPDATE SET last_flush_at = excluded.last_flush_at, "
            "json = excluded.json",
            row,
        )
        conn.execute("DELETE FROM processes WHERE last_flush_at < ?", (oldest,))

    return run


def _close(conn: sqlite3.Connection | None) -> None:
    if conn is not None:
        try:
            conn.close()
        except sqlite3.Error:
            pass
