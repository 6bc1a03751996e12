"""The demo's mid-run change: set the percent in the store, then see every worker follow.

The runner changes the percent the way an operator would (``change(store, name, "set",
...)``), then polls the stats endpoint until every worker reports the new store
version. The switch time of each worker is the one the worker itself noted (see
:mod:`canarymw._demo.watch`), so the delays do not depend on when a poll happened to
reach it; polling only collects them.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from ..store import Store, change
from .settings import STATS_PATH

BY = "canarymw demo"
"""Who the change is attributed to in the store's audit log."""

POLL_INTERVAL = 0.01
"""Seconds between two polls of the stats endpoint (see :func:`worker_stats`)."""


@dataclass(slots=True)
class WorkerSwitch:
    """When one worker took the new state."""

    pid: int
    version: int | None
    """The store version the worker followed when last polled."""
    percent: float | None
    """The percent in force in the worker when last polled."""
    switched_at: float | None = None
    """Unix time the worker was first seen with the new version and percent (None: not yet)."""
    delay_ms: float | None = None
    """Milliseconds from the change (its time in the store) to ``switched_at``."""


@dataclass(slots=True)
class RampRecord:
    """The change the demo made and how every worker followed it, as reported."""

    store: str
    from_percent: float
    to_percent: float
    version_before: int | None = None
    version: int | None = None
    """The store version the change made."""
    at: float | None = None
    """Unix time of the change, as the store recorded it."""
    at_s: float | None = None
    """Seconds from the start of the load to the change."""
    requested_at: float | None = None
    """Unix time the runner asked for the change: a request that ended before it was
    certainly served before the change."""
    write_ms: float | None = None
    """How long writing the change to the store took."""
    by: str = BY
    reason: str = ""
    error: str | None = None
    """Why the change could not be made, or None."""
    workers: list[WorkerSwitch] = field(default_factory=list)
    max_delay_ms: float | None = None
    all_switched: bool = False
    switched_at: float | None = None
    """Unix time the last worker switched: requests that started after it are all on
    the new percent."""


class Ramp:
    """Makes the change once :meth:`trigger` is called, in a thread of its own, and records it.

    Args:
        store: The store the workers follow (a client of the runner's own).
        name: The rollout's name in the store.
        from_percent: The percent the run started with.
        to_percent: The percent to set.
        host: Where the demo server listens.
        port: Its port.
        pids: Worker pids known so far; workers found while polling are added.
        workers: How many workers the server runs: polling goes on until that many
            have switched (or ``timeout``).
        started: Unix time the load started.
        timeout: Seconds to wait for every worker to switch.
    """

    def __init__(
        self,
        store: Store,
        name: str,
        *,
        from_percent: float,
        to_percent: float,
        host: str,
        port: int,
        pids: set[int],
        workers: int,
        started: float,
        timeout: float = 10.0,
    ) -> None:
        self.store = store
        self.name = name
        self.host = host
        self.port = port
        self.pids = set(pids)
        self.workers = workers
        self.started = started
        self.timeout = timeout
        direction = (
            "raised" if to_percent > from_percent else "lowered" if to_percent < from_percent else "set"
        )
        self.record = RampRecord(
            store=repr(store),
            from_percent=from_percent,
            to_percent=to_percent,
            reason=f"canarymw demo: {direction} from {from_percent:g}% to {to_percent:g}% halfway "
            "through the load",
        )
        self._thread: threading.Thread | None = None
        self._then: Callable[[], None] | None = None
        self._stop = threading.Event()

    @property
    def triggered(self) -> bool:
        """Whether the change has been started."""
        return self._thread is not None

    def trigger(self, then: Callable[[], None] | None = None) -> None:
        """Make the change now, in the background; later calls do nothing. ``then`` is
        called once every worker switched (or the change failed, or timed out)."""
        if self._thread is None:
            self._then = then
            self._thread = threading.Thread(target=self._run, name="canarymw-demo-ramp", daemon=True)
            self._thread.start()

    def finish(self) -> RampRecord:
        """Wait for the change and the polling to end (at most ``timeout`` more); the record."""
        if self._thread is None:
            self.trigger()  # the load ended before halfway was seen (a tiny run): change now
        assert self._thread is not None
        self._thread.join(self.timeout + 5.0)
        self._stop.set()
        return self.record

    def _run(self) -> None:
        try:
            self._change()
        finally:
            if self._then is not None:
                self._then()

    def _change(self) -> None:
        rec = self.record
        rec.requested_at = time.time()
        began = time.perf_counter()
        try:
            state = change(self.store, self.name, "set", percent=rec.to_percent, by=rec.by, reason=rec.reason)
        except Exception as exc:  # reported as a failed check, never a crash of the demo
            rec.error = f"{type(exc).__name__}: {exc}"
            return
        rec.write_ms = round((time.perf_counter() - began) * 1000.0, 3)
        rec.version, rec.version_before, rec.at = state.version, state.version - 1, state.updated_at
        rec.at_s = round(state.updated_at - self.started, 3)
        self._collect(state.version, state.percent, state.updated_at)

    def _collect(self, version: int, percent: float, at: float) -> None:
        rec = self.record
        seen: dict[int, WorkerSwitch] = {}
        for stats in worker_stats(self.host, self.port, self.timeout, self._stop):
            pid = int(stats["pid"])
            self.pids.add(pid)
            status = stats.get("store") or {}
            worker = seen.setdefault(pid, WorkerSwitch(pid, None, None))
            worker.version, worker.percent = status.get("version"), status.get("percent")
            if worker.switched_at is None:
                worker.switched_at = took_at(stats.get("switches", []), version, percent)
                if worker.switched_at is not None:
                    worker.delay_ms = round((worker.switched_at - at) * 1000.0, 1)
            done = [w for w in seen.values() if w.switched_at is not None]
            if len(done) >= self.workers and self.pids <= {w.pid for w in done}:
                break
        for pid in self.pids - seen.keys():
            seen[pid] = WorkerSwitch(pid, None, None)  # answered earlier, never reached by a poll
        rec.workers = sorted(seen.values(), key=lambda w: w.pid)
        delays = [w.delay_ms for w in rec.workers if w.delay_ms is not None]
        rec.all_switched = bool(rec.workers) and len(delays) == len(rec.workers) >= self.workers
        rec.max_delay_ms = max(delays) if delays else None
        times = [w.switched_at for w in rec.workers if w.switched_at is not None]
        rec.switched_at = max(times) if rec.all_switched and times else None


def took_at(
    switches: Iterable[Mapping[str, Any]], version: int, percent: float | None = None
) -> float | None:
    """When a worker took store ``version`` or a later one (at ``percent``, if given), by
    its switch log (``[{"version", "percent", "at"}, ...]``, oldest first): the Unix time
    it noted, or None if it has not."""
    for entry in switches:
        if (entry["version"] or 0) >= version and (percent is None or entry["percent"] == percent):
            return float(entry["at"])
    return None


def worker_stats(
    host: str, port: int, timeout: float, stop: threading.Event | None = None
) -> Iterator[dict[str, Any]]:
    """The stats of whichever worker answers each poll, until ``timeout`` seconds have
    passed or ``stop`` is set; the caller stops iterating once it has heard enough."""
    deadline = time.monotonic() + timeout
    while not (stop is not None and stop.is_set()) and time.monotonic() < deadline:
        stats = poll_stats(host, port)
        if stats is not None:
            yield stats
        time.sleep(POLL_INTERVAL)


def poll_stats(host: str, port: int) -> dict[str, Any] | None:
    """One worker's stats (``/_canarymw/stats``), or None if the poll failed."""
    # A fresh connection per poll, like the simulated users: each lands on whichever
    # worker accepts it, so repeated polls reach every worker.
    conn = http.client.HTTPConnection(host, port, timeout=2.0)
    try:
        conn.request("GET", STATS_PATH, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
        if response.status != 200:
            return None
        data: dict[str, Any] = json.loads(body)
        return data
    except (OSError, http.client.HTTPException, ValueError):
        return None
    finally:
        conn.close()
