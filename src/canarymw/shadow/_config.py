"""``Shadow``: what to copy, where to, how to compare, and how much to hold."""

from __future__ import annotations

import math
import sys
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from .._runtime import reset_after_fork
from ._compare import Normaliser
from ._record import Recorder, ShadowReport

if TYPE_CHECKING:
    from ..upstream import Upstream

Primary = Literal["old", "new", "both"]

DEFAULT_HEADERS = ("content-type", "location", "cache-control")
"""Headers compared by default: what a client acts on. ``Date``, ``Server``, ``ETag``,
``Set-Cookie`` and ``Content-Length`` differ between two healthy servers by nature (the
body comparison covers the length)."""


@dataclass(frozen=True, slots=True)
class ShadowRequest:
    """A request as the ``when=`` predicate sees it, the same for WSGI and ASGI."""

    method: str
    path: str
    """The path below the mount point (WSGI ``PATH_INFO``)."""
    query: str
    headers: Mapping[str, str]
    """Lower-case names; repeated headers joined with ``", "`` (cookies with ``"; "``)."""


class Shadow:
    """Send a copy of requests to a second app after the primary answered, and compare.

    Pass it (or just the app, for the defaults) as ``shadow=`` to
    :class:`~canarymw.WSGICanaryMiddleware` or :class:`~canarymw.ASGICanaryMiddleware`.
    The user always gets the primary's response; the copy is sent after that response
    has finished, from a bounded queue, and whatever the shadow does (fail, hang, answer
    differently) is only counted. See docs/shadow.md.

    Args:
        target: The app that gets the copies: a WSGI app (for the WSGI middleware), an
            ASGI app (for the ASGI one) or an :class:`~canarymw.Upstream` (either).
        methods: Methods copied. GET and HEAD by default: a copy of a request that
            changes something would change it twice. Add others only for a shadow that
            writes nowhere shared.
        when: Optional predicate given a :class:`ShadowRequest`; a request is copied
            only if its method is in ``methods`` and ``when`` returns true. It runs on
            the request path (keep it quick); if it raises, the request is not copied.
        primary: Which primary variant's requests are copied: ``"old"`` (default: a
            dark launch sends every user to old and shadows the new code),
            ``"new"`` or ``"both"``.
        queue_size: Copies that may wait for a free slot. When it is full, a new copy
            is dropped and counted as ``dropped``: the shadow never holds memory or
            threads in proportion to traffic.
        concurrency: Copies sent at once (WSGI: worker threads per process; ASGI:
            tasks per event loop).
        timeout: Seconds a copy may take, from its start to the end of the shadow's
            response; longer counts as ``timeout``. An ASGI shadow is cancelled at the
            deadline; a WSGI app cannot be interrupted, so its body is abandoned at the
            first chunk after it and a call that blocks holds its worker until it
            returns (the queue then fills and copies are dropped, never delayed).
        max_body: Response bytes kept per side for the body comparison. A longer body
            (on either side) is not buffered further: status and headers are still
            compared, the body is counted as ``not-compared``.
        max_request_body: Request bodies up to this size (with a ``Content-Length``) are
            replayed to the shadow; a larger or unsized body means the request is not
            copied (counted as ``not-compared``). Only matters when ``methods`` allows
            bodies.
        headers: Response headers compared (case-insensitive). Default:
            ``Content-Type``, ``Location``, ``Cache-Control``.
        normalize: Optional function applied to each side before comparing: it takes
            and returns a :class:`ShadowResponse` (status, the compared headers, body),
            to mask what legitimately differs (timestamps, generated ids). If it raises,
            the copy counts as ``error``.
        send_cohort_cookie: False (default): the cohort cookie is removed from the
            copy's ``Cookie`` header, so a shadow never sees (or logs) the cohort id.
        samples: Newest mismatches (and failures) kept per route for
            :meth:`report`; 0 keeps none.
    """

    def __init__(
        self,
        target: Any | Upstream,
        *,
        methods: Iterable[str] = ("GET", "HEAD"),
        when: Callable[[ShadowRequest], object] | None = None,
        primary: Primary = "old",
        queue_size: int = 100,
        concurrency: int = 4,
        timeout: float = 10.0,
        max_body: int = 1 << 20,
        max_request_body: int = 64 * 1024,
        headers: Iterable[str] = DEFAULT_HEADERS,
        normalize: Normaliser | None = None,
        send_cohort_cookie: bool = False,
        samples: int = 20,
    ) -> None:
        if isinstance(target, Shadow):
            raise TypeError("Shadow got another Shadow as its target; pass the app or Upstream itself.")
        if not callable(target) and not _is_upstream(target):
            raise TypeError(f"Shadow needs a WSGI or ASGI app or a canarymw.Upstream, got {target!r}.")
        if isinstance(methods, str):
            raise TypeError(f"Shadow got methods={methods!r}; pass a list such as ['GET', 'HEAD'].")
        self.methods = frozenset(_method(m) for m in methods)
        if not self.methods:
            raise ValueError("Shadow got no methods; copy at least one, such as 'GET'.")
        if when is not None and not callable(when):
            raise TypeError(f"Shadow got when={when!r}; pass a function of a ShadowRequest, or None.")
        if primary not in ("old", "new", "both"):
            raise ValueError(f"Shadow got primary={primary!r}; use 'old', 'new' or 'both'.")
        if normalize is not None and not callable(normalize):
            raise TypeError(
                f"Shadow got normalize={normalize!r}; pass a function of a ShadowResponse, or None."
            )
        if not isinstance(send_cohort_cookie, bool):
            raise TypeError(f"Shadow got send_cohort_cookie={send_cohort_cookie!r}; use True or False.")
        if isinstance(headers, str):
            raise TypeError(f"Shadow got headers={headers!r}; pass a list of names such as ['Content-Type'].")
        names = []
        for name in headers:
            if not isinstance(name, str) or not name or not name.isascii() or not name.isprintable():
                raise ValueError(
                    f"Shadow got the header name {name!r}; use ASCII names such as 'Content-Type'."
                )
            names.append(name.strip().lower())
        self.target = target
        self.when = when
        self.primary: Primary = primary
        self.queue_size = _count("queue_size", queue_size, 0)
        self.concurrency = _count("concurrency", concurrency, 1)
        self.timeout = _seconds("timeout", timeout)
        self.max_body = _count("max_body", max_body, 0)
        self.max_request_body = _count("max_request_body", max_request_body, 0)
        self.headers: frozenset[str] = frozenset(names)
        self.normalize = normalize
        self.send_cohort_cookie = send_cohort_cookie
        self.samples = _count("samples", samples, 0)
        self.variants = frozenset(("old", "new") if primary == "both" else (primary,))
        self._protocol: str | None = None
        self._pool: Any = None  # the WSGI worker threads, made by the first WSGI middleware
        self._recorder = Recorder(self.samples)
        self._reset()
        reset_after_fork(self, Shadow._reset)

    def _reset(self) -> None:
        # Also in a forked child: the parent's queue, workers and counts are not its own.
        self._cond = threading.Condition(threading.Lock())
        self._pending = 0  # copies queued or running, in this process
        self._running = 0
        self._recorder.reset()

    def __repr__(self) -> str:
        return f"Shadow({self.target!r})"

    def report(self) -> ShadowReport:
        """Counts per route and in total, with each route's newest samples, in this process."""
        with self._cond:
            pending, running = self._pending, self._running
        return self._recorder.report(pending - running, running)

    def drain(self, timeout: float | None = 5.0) -> bool:
        """Wait until every copy queued so far has been sent and compared; True if none
        is left. For tests and graceful shutdown (never on the request path). An ASGI
        shadow's copies run on the event loop: call this from another thread."""
        with self._cond:
            return self._cond.wait_for(lambda: self._pending == 0, timeout)

    # -- used by the runners -------------------------------------------------------
    def _admit(self) -> bool:
        """Take a place for one copy, or False when the queue is full."""
        with self._cond:
            if self._pending >= self.queue_size + self.concurrency:
                return False
            self._pending += 1
            return True

    def _begin(self) -> None:
        with self._cond:
            self._running += 1

    def _end(self, ran: bool) -> None:
        with self._cond:
            self._pending -= 1
            self._running -= ran
            if self._pending == 0:
                self._cond.notify_all()


def _is_upstream(target: object) -> bool:
    module = sys.modules.get("canarymw.upstream")
    return module is not None and isinstance(target, module.Upstream)


def _method(value: object) -> str:
    if not isinstance(value, str) or not value.isascii() or not value.isalpha():
        raise ValueError(f"Shadow got the method {value!r}; use names such as 'GET'.")
    return value.upper()


def _count(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"Shadow got {name}={value!r}; use a whole number of at least {low}.")
    return value


def _seconds(name: str, value: object) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"Shadow got {name}={value!r}; use a finite number of seconds above 0.")
    return float(value)
