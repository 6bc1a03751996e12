"""How the adapters hand an outcome to the sink they were given (one function for both)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from ._base import CallableSink, FanoutSink, Outcome, Sink, SinkGuard
from .memory import _BATCH, MemorySink

_new_tuple = tuple.__new__


class Outlet:
    """Where one adapter's outcomes go, resolved once at construction (compiled, so the
    request path reads its fields directly).

    ``pending`` is the queue of a plain ``MemorySink`` behind ``guard``: :func:`record`
    then appends a plain field tuple to it and folds at ``_BATCH``, the work of
    ``record()`` without building an ``Outcome``. Any other sink (subclasses included,
    which may override ``record()``) gets an ``Outcome`` through ``sink_record``.
    """

    def __init__(self, guard: SinkGuard) -> None:
        self.guard = guard
        inner = guard.sink
        self.memory: MemorySink | None = inner if type(inner) is MemorySink else None
        # A MemorySink keeps its queue for life (reset() folds it, never replaces it).
        self.pending: deque[Any] | None = None if self.memory is None else self.memory._pending
        self.sink_record: Callable[[Outcome], None] = inner.record


def record(
    outlet: Outlet,
    decision: Any,
    status: int | None,
    duration: float,
    error: str | None,
    disconnected: bool,
    method: str,
    route: str | None,
    wall: float,
    close_code: int | None = None,
) -> None:
    """Build one request's outcome from its :class:`~canarymw.Decision` and hand it to
    the adapter's sink through its :class:`Outlet`.

    The one place the adapters' Python paths put the fields in ``Outcome`` order.
    Straight into a MemorySink's queue, else as an ``Outcome`` to the sink's
    ``record()``. A sink that raises is counted, never raised.
    """
    # One function, not a builder and a deliverer: a Python frame less per request.
    fields = (
        decision.rollout,
        decision.variant,
        status,
        duration,
        error,
        disconnected,
        method,
        route,
        wall,
        close_code,
    )
    try:
        pending = outlet.pending
        if pending is None:
            # tuple.__new__ skips _make's length check: all the fields are here.
            outlet.sink_record(_new_tuple(Outcome, fields))
        else:
            pending.append(fields)
            if len(pending) >= _BATCH:
                outlet.memory._fold(blocking=False)  # type: ignore[union-attr]
    except Exception:
        outlet.guard.failed()


def as_sink(sink: Sink | Sequence[Sink] | None) -> SinkGuard | None:
    """Normalise the ``sink=`` argument of the middlewares (one sink, a list, or None)."""
    if sink is None:
        return None
    if isinstance(sink, (list, tuple)):
        if not sink:
            return None
        inner: Sink = sink[0] if len(sink) == 1 else FanoutSink(*sink)
    else:
        inner = sink  # type: ignore[assignment]
    if not callable(getattr(inner, "record", None)):
        if not callable(inner):
            raise TypeError(
                f"sink {inner!r} has no record(outcome) method and is not callable; see canarymw.Sink."
            )
        inner = CallableSink(inner)
    return SinkGuard(inner)
