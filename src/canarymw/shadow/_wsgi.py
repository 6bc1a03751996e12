"""The WSGI side: capture the primary's response as it streams, then send the copy from
worker threads (a bounded queue per process, made again after a fork)."""

from __future__ import annotations

import inspect
import io
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from .._runtime import RateLimit, reset_after_fork
from .._types import StartResponse, WSGIApplication, WSGIEnvironment
from ._capture import Capture, Copy, skipped, status_code, strip_cookie, verdict
from ._compare import Comparison
from ._config import Shadow, ShadowRequest, _is_upstream
from ._record import comparison_sinks

log = logging.getLogger("canarymw")
_perf = time.perf_counter
_wall = time.time


class _Pool:
    """The worker threads of one Shadow in one process; started on the first copy."""

    def __init__(self, shadow: Shadow) -> None:
        self.shadow = shadow
        self._log_limit = RateLimit(60.0)
        self._reset()
        reset_after_fork(self, _Pool._reset)

    def _reset(self) -> None:
        # Bounded by Shadow._admit, so the queue itself need not be.
        self._jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._started = False

    def submit(self, job: Callable[[], None]) -> None:
        self._jobs.put(job)
        if not self._started:
            with self._lock:
                if not self._started:
                    for i in range(self.shadow.concurrency):
                        threading.Thread(target=self._work, name=f"canarymw-shadow-{i}", daemon=True).start()
                    self._started = True

    def _work(self) -> None:
        jobs = self._jobs
        while True:
            job = jobs.get()
            try:
                job()
            except Exception as exc:  # a worker must outlive any copy
                if self._log_limit.due():
                    log.warning(
                        "canarymw: a shadow copy failed unexpectedly (%s: %s).", type(exc).__name__, exc
                    )


class WSGITap:
    """Decides which requests are copied and wraps their primary (see :meth:`wrap`)."""

    def __init__(self, shadow: Shadow, mw: Any) -> None:
        target: Any = shadow.target
        if _is_upstream(target):
            target = target.wsgi_app()
        elif inspect.iscoroutinefunction(target) or inspect.iscoroutinefunction(type(target).__call__):
            raise TypeError(
                f"WSGICanaryMiddleware got shadow={shadow.target!r}, an ASGI app; shadow a WSGI app "
                "or an Upstream, or use ASGICanaryMiddleware."
            )
        self.shadow = shadow
        self.app: WSGIApplication = target
        self.rollout = mw.rollout
        self.sinks = comparison_sinks(mw._guard)
        if shadow._pool is None:
            shadow._pool = _Pool(shadow)
        self.pool: _Pool = shadow._pool

    def wrap(self, app: WSGIApplication, decision: Any, environ: WSGIEnvironment) -> WSGIApplication:
        """``app``, or ``app`` wrapped to capture its response when this request is copied."""
        s = self.shadow
        method = environ.get("REQUEST_METHOD", "GET")
        if method not in s.methods or decision.variant not in s.variants:
            return app
        if s.when is not None and not self._asked(environ, method):
            return app
        wall = _wall()
        copy = self._copy(environ)
        if isinstance(copy, str):
            self.record(skipped(self._meta(decision, environ, wall), "not-compared", copy))
            return app
        return _Primary(self, app, copy, decision, wall)

    def _asked(self, environ: WSGIEnvironment, method: str) -> bool:
        headers: dict[str, str] = {}
        for key, value in environ.items():
            if key.startswith("HTTP_") or key in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                headers[key.removeprefix("HTTP_").replace("_", "-").lower()] = value
        request = ShadowRequest(
            method, environ.get("PATH_INFO", ""), environ.get("QUERY_STRING", ""), headers
        )
        try:
            return bool(self.shadow.when(request))  # type: ignore[misc]
        except Exception:
            return False

    def _copy(self, environ: WSGIEnvironment) -> dict[str, Any] | str:
        """The environ for the copy, taken before the primary runs, or why there is none."""
        s = self.shadow
        body = b""
        length = environ.get("CONTENT_LENGTH") or "0"
        if environ.get("HTTP_TRANSFER_ENCODING") or not length.isdigit() or int(length) > s.max_request_body:
            return "the request body is over max_request_body or has no length"
        if int(length):
            # Read now (the primary reads the same bytes from a replay): the server's
            # input can be read once only.
            body = environ["wsgi.input"].read(int(length))
            environ["wsgi.input"] = io.BytesIO(body)
        # Strings only: server objects (its socket, its file wrapper) stay with the primary.
        copy: dict[str, Any] = {
            k: v for k, v in environ.items() if type(v) is str and not k.startswith("canarymw.")
        }
        cookie = copy.get("HTTP_COOKIE")
        if cookie and not s.send_cohort_cookie:
            cookie = strip_cookie(cookie, self.rollout.cookie_name)
            if cookie:
                copy["HTTP_COOKIE"] = cookie
            else:
                del copy["HTTP_COOKIE"]
        if body:
            copy["CONTENT_LENGTH"] = str(len(body))
        copy.update(
            {
                "wsgi.version": (1, 0),
                "wsgi.input": io.BytesIO(body),
                "wsgi.errors": sys.stderr,
                "wsgi.multithread": True,
                "wsgi.multiprocess": bool(environ.get("wsgi.multiprocess", False)),
                "wsgi.run_once": False,
                "canarymw.shadow": True,
            }
        )
        return copy

    def _meta(self, decision: Any, environ: WSGIEnvironment, wall: float) -> Copy:
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        return Copy(
            decision.rollout,
            decision.variant,
            environ.get("canarymw.route"),
            environ.get("REQUEST_METHOD", "GET"),
            f"{path}?{query}" if query else path,
            wall,
        )

    def finished(self, primary: _Primary) -> None:
        """The primary's response has finished: queue the copy, or say why not."""
        meta = self._meta(primary.decision, primary.environ, primary.wall)
        capture = primary.capture
        if not capture.complete or capture.status is None:
            self.record(skipped(meta, "not-compared", "the primary failed or its client left"))
        elif not self.shadow._admit():
            self.record(skipped(meta, "dropped", "the queue was full"))
        else:
            copy = primary.copy
            self.pool.submit(lambda: self.run(meta, copy, capture))

    def run(self, meta: Copy, environ: dict[str, Any], primary: Capture) -> None:
        """Send one copy and compare (in a worker thread)."""
        s = self.shadow
        s._begin()
        try:
            got = Capture(s.max_body)
            error: str | None = None
            started = _perf()

            def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
                got.status, got.headers = status_code(status), list(headers)
                got.chunks, got.size, got.over = [], 0, False  # an error page replaces what was said
                return got.take

            try:
                result = self.app(environ, start_response)
                try:
                    deadline = started + s.timeout
                    for chunk in result:
                        got.take(chunk)
                        if got.over:
                            break  # enough to know the body is not compared
                        if _perf() > deadline:
                            error = "timeout"
                            break
                    else:
                        got.complete = True
                    got.complete = got.complete or got.over
                finally:
                    close = getattr(result, "close", None)
                    if close is not None:
                        close()
            except Exception as exc:
                error = type(exc).__name__
            # The upstream proxy names a failure it answered with a 502 or 504.
            error = error or environ.get("canarymw.error")
            self.record(verdict(s, meta, primary, got, error, started))
        finally:
            s._end(True)

    def record(self, comparison: Comparison) -> None:
        self.shadow._recorder.record(comparison, self.sinks)


class _Primary:
    """The primary app of a copied request: its response passes through, captured."""

    inner: Iterable[bytes] | None = None

    def __init__(self, tap: WSGITap, app: WSGIApplication, copy: dict[str, Any], decision: Any, wall: float):
        self.tap = tap
        self.app = app
        self.copy = copy
        self.decision = decision
        self.wall = wall
        self.capture = Capture(tap.shadow.max_body)
        self.environ: WSGIEnvironment = {}

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> _Primary:
        capture = self.capture
        self.environ = environ

        def start(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], Any]:
            capture.status, capture.headers = status_code(status), list(headers)
            capture.chunks, capture.size, capture.over = [], 0, False
            write = (
                start_response(status, headers)
                if exc_info is None
                else start_response(status, headers, exc_info)
            )

            def write_(data: bytes) -> Any:
                capture.take(data)
                return write(data)

            return write_

        try:
            self.inner = self.app(environ, start)
        except BaseException:
            self.tap.finished(self)
            raise
        return self

    def __iter__(self) -> Iterator[bytes]:
        capture = self.capture
        for chunk in self.inner:  # type: ignore[union-attr]
            capture.take(chunk)
            yield chunk
        capture.complete = True

    def close(self) -> None:
        inner, self.inner = self.inner, None
        try:
            close = getattr(inner, "close", None)
            if close is not None:
                close()
        finally:
            self.tap.finished(self)
