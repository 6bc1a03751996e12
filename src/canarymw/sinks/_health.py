"""canarymw's own health counters, as the metrics sinks read them."""

from __future__ import annotations

import threading
import weakref
from typing import Any, NamedTuple

from .._rollout import Rollout
from .background import BackgroundSink, _unwrap

# -- health sources ------------------------------------------------------------------
# What PrometheusSink and OpenTelemetrySink report about canarymw itself. The values
# live in the objects that count them (Rollout.counters, BackgroundSink, the
# middleware's sink guard); the metrics sinks read them through this registry.

_STAGES = ("request", "background")


class HealthSnapshot(NamedTuple):
    """canarymw's own counters, summed over the watched objects of this process."""

    events: dict[tuple[str, str], int]
    """``(rollout, event) -> count`` from ``Rollout.counters`` (assigned, cookie_rejected, ...)."""
    percent: dict[str, float]
    """``rollout -> percent`` currently configured."""
    sink_errors: dict[str, int]
    """``stage -> failures``: ``"request"`` (a sink called by the middleware raised) and
    ``"background"`` (a sink fed by a BackgroundSink raised)."""
    dropped: int
    """Outcomes BackgroundSinks dropped because their queue was full or closed."""
    queue_depth: int
    """Outcomes waiting in BackgroundSink queues."""


class HealthSources:
    """The objects whose health counters a metrics sink reports (see ``watch``).

    Accepts :class:`~canarymw.Rollout`, :class:`~canarymw.sinks.BackgroundSink` and the
    middlewares (anything with ``sink_errors`` and ``rollout``, whose rollout and
    background sinks are watched too). Watching an object twice counts it once.
    Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._rollouts: dict[int, Rollout] = {}
        self._background: dict[int, BackgroundSink] = {}
        self._guards: dict[int, Any] = {}

    def __bool__(self) -> bool:
        return bool(self._rollouts or self._background or self._guards)

    def add(self, source: object) -> None:
        """Watch ``source``; raises TypeError for an object of another kind."""
        with self._lock:
            self._add(source)

    def _add(self, source: object) -> None:
        if isinstance(source, Rollout):
            self._rollouts[id(source)] = source
        elif isinstance(source, BackgroundSink):
            self._background[id(source)] = source
        elif hasattr(source, "sink_errors") and isinstance(getattr(source, "rollout", None), Rollout):
            self._guards[id(source)] = source
            self._add(source.rollout)  # type: ignore[attr-defined]
            for inner in _unwrap(getattr(source, "_guard", None)):
                self._add(inner)
        else:
            raise TypeError(
                f"cannot watch {source!r}: pass a Rollout, a BackgroundSink or a canary middleware."
            )

    def rollout_names(self) -> list[str]:
        """Names of the watched rollouts."""
        with self._lock:
            return sorted({r.name for r in self._rollouts.values()})

    def snapshot(self) -> HealthSnapshot:
        """Read every watched counter now."""
        with self._lock:
            rollouts = list(self._rollouts.values())
            background = list(self._background.values())
            guards = list(self._guards.values())
        events: dict[tuple[str, str], int] = {}
        percent: dict[str, float] = {}
        for r in rollouts:
            for event, count in list(r.counters.items()):
                key = (r.name, event)
                events[key] = events.get(key, 0) + count
            percent[r.name] = r.percent
        errors = dict.fromkeys(_STAGES, 0)
        for g in guards:
            errors["request"] += int(g.sink_errors)
        dropped = depth = 0
        for b in background:
            errors["background"] += b.errors
            dropped += b.dropped
            depth += b.depth
        return HealthSnapshot(events, percent, errors, dropped, depth)


def guarded(source: object) -> Rollout:
    """The guarded :class:`~canarymw.Rollout` that ``source`` is or runs (a canary
    middleware has ``.rollout``); TypeError or ValueError for anything else."""
    rollout = source if isinstance(source, Rollout) else getattr(source, "rollout", None)
    if not isinstance(rollout, Rollout):
        raise TypeError(f"cannot report the guard of {source!r}: pass a Rollout or a canary middleware.")
    if rollout.guard is None or rollout.controller is None:
        raise ValueError(
            f"rollout {rollout.name!r} has no guard; pass rollouts made with guard=canarymw.guard.Guard(...)."
        )
    return rollout


class GuardedRollouts:
    """The guarded rollouts a metrics exporter reports, held weakly (a rollout that is
    dropped stops being reported), in name order."""

    def __init__(self, *rollouts: object) -> None:
        self._lock = threading.Lock()
        self._rollouts: dict[int, weakref.ref[Rollout]] = {}
        self.add(*rollouts)

    def add(self, *rollouts: object) -> None:
        """Report these guarded rollouts too (once each, however often added)."""
        found = [guarded(r) for r in rollouts]  # all checked before any is added
        with self._lock:
            for rollout in found:
                self._rollouts[id(rollout)] = weakref.ref(rollout, self._forget(id(rollout)))

    def _forget(self, key: int) -> Any:
        def forget(ref: weakref.ref[Rollout]) -> None:
            with self._lock:
                if self._rollouts.get(key) is ref:
                    del self._rollouts[key]

        return forget

    def rollouts(self) -> list[Rollout]:
        """The rollouts reported, by name."""
        with self._lock:
            refs = list(self._rollouts.values())
        alive = [r for r in (ref() for ref in refs) if r is not None]
        return sorted(alive, key=lambda r: r.name)
