"""When did this worker switch? A record of each store state the worker's rollout took.

A rollout that follows a store applies a change from a background thread of its own;
nothing on the request path says when. The demo wants the moment itself, measured in
the worker rather than when the runner's next poll happens to reach it, so a small
thread here looks at :meth:`~canarymw.Rollout.store_status` every few milliseconds and
notes the wall-clock time each new (version, percent) pair first appears. The runner
reads the notes from the stats endpoint and compares them with the time of the change.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from .._rollout import Rollout
from .settings import PERCENT_HEADER, VERSION_HEADER

INTERVAL = 0.005
"""Seconds between two looks: the resolution of the reported switch times."""


class SwitchLog:
    """The states one worker's rollout went through, each with the time it was first seen.

    Starts its thread at once when the rollout follows a store; otherwise it records
    nothing and only reports the percent.
    """

    def __init__(self, rollout: Rollout, interval: float = INTERVAL) -> None:
        self.rollout = rollout
        self.interval = interval
        self._lock = threading.Lock()
        self._switches: list[dict[str, Any]] = []
        self._last: tuple[int | None, float] | None = None
        if rollout.store is not None:
            self._look()
            threading.Thread(target=self._run, name="canarymw-demo-switches", daemon=True).start()

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            self._look()

    def _look(self) -> None:
        status = self.rollout.store_status()
        # The rollout stores the new state before it sets the percent from it, so a
        # look between the two sees the new version with the old percent: the pair
        # (not the version alone) marks the switch.
        now = (status["version"], status["percent"])
        with self._lock:
            if now != self._last:
                self._last = now
                self._switches.append({"version": now[0], "percent": now[1], "at": time.time()})

    def headers(self) -> dict[str, str]:
        """Response headers with the percent (and store version) in force right now."""
        status = self.rollout.store_status()
        out = {PERCENT_HEADER: f"{status['percent']:g}"}
        if status["version"] is not None:
            out[VERSION_HEADER] = str(status["version"])
        return out

    def snapshot(self) -> dict[str, Any]:
        """This worker's view of the store and its switches so far, for the stats endpoint."""
        if self.rollout.store is not None:
            self._look()  # up to date even if the thread has not looked since the switch
        with self._lock:
            switches = list(self._switches)
        return {"store": self.rollout.store_status(), "switches": switches}
