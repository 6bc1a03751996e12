"""The compiled response path (canarymw._speedups) against the Python reference.

The rest of the WSGI suite runs once per implementation; here, generated apps and
clients (odd status lines and header lists, exceptions at every stage, abandoned
bodies, failing sinks) go through both, and everything a server or a sink can
observe must be the same. Plus: the extension is built where a compiler exists, and
it leaks no references.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import canarymw.wsgi
from canarymw import MemorySink, Outcome, Rollout, WSGICanaryMiddleware

KEY = "test-secret-key-0123456789abcdef"

try:
    from canarymw import _speedups
except ImportError:  # checked by test_speedups_are_built
    _speedups = None  # type: ignore[assignment]

needs_speedups = pytest.mark.skipif(_speedups is None, reason="canarymw._speedups was not built")


def test_speedups_are_built() -> None:
    """Where a C compiler exists, installing the project builds the extension and the
    adapter uses it (a silent fallback would leave it untested)."""
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    if os.environ.get("CANARYMW_NO_EXTENSIONS") or shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler}) or CANARYMW_NO_EXTENSIONS set: pure Python is expected")
    assert _speedups is not None, "pip install did not build canarymw._speedups (see the build log)"
    assert canarymw.wsgi._respond is _speedups.respond


class Died(Exception):
    """Raised by generated apps."""


class Fatal(BaseException):
    """Not an Exception: must pass through untouched."""


@dataclass
class Script:
    status: Any
    headers: Any
    lazy: bool
    chunks: list[bytes]
    raise_at: str | None  # "call", "after_start", "iter:N", "close", "iter_fatal"
    exc_info_restart: bool
    read: int | None  # chunks the client reads before closing; None: all
    method: str
    env_error: Any
    route: Any
    sink: str  # "memory", "list", "raising", "none"
    returning: bool
    percent: float  # 0 or 100: a first visit's random id must not decide the variant


NAMES = ["Content-Type", "Vary", "vary", "VARY", "Cache-Control", "CACHE-CONTROL", "X-A", "Váry", "varY "]

header_item = st.one_of(
    st.tuples(st.sampled_from(NAMES), st.sampled_from(["text/plain", "Accept", "public", "no-store", ""])),
    st.builds(list, st.tuples(st.sampled_from(NAMES), st.just("x"))),  # a list, not a tuple
    st.just(("X-A", "b", "c")),  # three items
    st.just((b"X-B", b"y")),  # bytes names
)
headers_st = st.one_of(
    st.lists(header_item, max_size=4),
    st.lists(st.tuples(st.sampled_from(NAMES), st.just("v")), max_size=3).map(tuple),  # not a list
)
scripts = st.builds(
    Script,
    status=st.sampled_from(["200 OK", "404 Not Found", "503 Busy", "2xx Odd", "", "99", b"200 OK"]),
    headers=headers_st,
    lazy=st.booleans(),
    chunks=st.lists(st.sampled_from([b"a", b"", b"chunk"]), max_size=3),
    raise_at=st.sampled_from([None, None, "call", "after_start", "iter:0", "iter:1", "close", "iter_fatal"]),
    exc_info_restart=st.booleans(),
    read=st.one_of(st.none(), st.integers(0, 2)),
    method=st.sampled_from(["GET", "HEAD", "POST"]),
    env_error=st.sampled_from([None, "Handled", ""]),
    route=st.sampled_from([None, "/items/{id}"]),
    sink=st.sampled_from(["memory", "list", "raising", "none"]),
    returning=st.booleans(),
    percent=st.sampled_from([0, 100]),
)


COOKIE = (Rollout("parity", percent=50, secret_key=KEY).decide(None).set_cookie or "").split(";")[0]


class ListSink:
    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def record(self, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


class RaisingSink:
    def record(self, outcome: Outcome) -> None:
        raise ValueError("sink down")


def make_app(script: Script) -> Callable[..., Any]:
    def app(environ: dict[str, Any], start_response: Any) -> Any:
        if script.env_error is not None:
            environ["canarymw.error"] = script.env_error
        if script.route is not None:
            environ["canarymw.route"] = script.route
        if script.raise_at == "call":
            raise Died("in call")
        if not script.lazy:
            start_response(script.status, script.headers)
            if script.raise_at == "after_start":
                raise Died("after start")
        return Body(script, start_response)

    return app


class Body:
    def __init__(self, script: Script, start_response: Any) -> None:
        self.script = script
        self.start_response = start_response

    def __iter__(self) -> Iterator[bytes]:
        s = self.script
        if s.lazy:
            self.start_response(s.status, s.headers)
        for i, chunk in enumerate(s.chunks):
            if s.raise_at == f"iter:{i}":
                if s.exc_info_restart:
                    try:
                        raise Died("mid body")
                    except Died:
                        self.start_response("500 Oops", [("Content-Type", "text/plain")], sys.exc_info())
                raise Died("mid body")
            if s.raise_at == "iter_fatal":
                raise Fatal("fatal")
            yield chunk

    def close(self) -> None:
        if self.script.raise_at == "close":
            raise Died("in close")


def run(script: Script, impl: Callable[..., Any]) -> dict[str, Any]:
    """Serve one request like a WSGI server would; return what the server and sink saw."""
    seen: list[Any] = []
    rollout = Rollout("parity", percent=script.percent, secret_key=KEY)
    sink: Any = {"memory": MemorySink(), "list": ListSink(), "raising": RaisingSink(), "none": None}[
        script.sink
    ]
    mw = WSGICanaryMiddleware(make_app(script), new=make_app(script), rollout=rollout, sink=sink)
    environ: dict[str, Any] = {"REQUEST_METHOD": script.method, "PATH_INFO": "/", "wsgi.url_scheme": "http"}
    if script.returning:
        environ["HTTP_COOKIE"] = f"theme=dark; {COOKIE}"

    def start_response(status: Any, headers: Any, exc_info: Any = None) -> Any:
        # A first visit's cookie holds a random id: compare that it is there, not its value.
        shown = [(h[0], "<cookie>") if h[0] == "Set-Cookie" else h for h in headers]
        seen.append(("start", status, shown, exc_info is not None, type(headers).__name__))
        return seen.append

    saved = canarymw.wsgi._respond
    canarymw.wsgi._respond = impl
    try:
        try:
            result = mw(environ, start_response)
        except BaseException as exc:
            seen.append(("raised in call", type(exc).__name__))
        else:
            try:
                for i, chunk in enumerate(result):
                    if script.read is not None and i >= script.read:
                        break
                    seen.append(("chunk", chunk))
            except BaseException as exc:
                seen.append(("raised in iter", type(exc).__name__))
            try:
                result.close()  # type: ignore[attr-defined]
                result.close()  # type: ignore[attr-defined]  # a second close is a no-op
            except BaseException as exc:
                seen.append(("raised in close", type(exc).__name__))
    finally:
        canarymw.wsgi._respond = saved
    recorded: Any = None
    if isinstance(sink, ListSink):
        recorded = [o._replace(duration=0.0, timestamp=0.0) for o in sink.outcomes]
    elif isinstance(sink, MemorySink):
        recorded = {
            v: (s.requests, s.errors, s.exceptions, s.disconnects, s.statuses)
            for v, s in sink.snapshot().items()
        }
    return {"seen": seen, "recorded": recorded, "sink_errors": mw.sink_errors}


@needs_speedups
@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(script=scripts)
def test_compiled_and_python_paths_are_indistinguishable(script: Script) -> None:
    assert run(script, _speedups.respond) == run(script, canarymw.wsgi._respond_py)


def test_parity_check_can_fail() -> None:
    """The comparison above sees a difference when there is one."""
    script = Script("200 OK", [("Content-Type", "text/plain")], False, [b"a"], None, False, None, "GET",
                    None, None, "list", True, 100)  # fmt: skip

    def dropping(*args: Any) -> Any:
        result = canarymw.wsgi._respond_py(*args)
        result.mw = args[0]
        result.error = "Different"
        return result

    assert run(script, dropping) != run(script, canarymw.wsgi._respond_py)


def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


def failing(environ: dict[str, Any], start_response: Any) -> Iterator[bytes]:
    start_response("200 OK", [("Vary", "Accept")])
    yield b"x"
    raise Died("late")


@needs_speedups
def test_compiled_path_keeps_no_references() -> None:
    """Every object handed to the compiled path is released once the response is closed
    and dropped, whatever way the request ended."""
    rollout = Rollout("refs", percent=50, secret_key=KEY)
    sink = MemorySink()
    mw = WSGICanaryMiddleware(hello, new=failing, rollout=rollout, sink=sink)
    environ: dict[str, Any] = {"REQUEST_METHOD": "GET", "PATH_INFO": "/"}

    def start_response(status: str, headers: list[Any], exc_info: Any = None) -> Any:
        return None

    def once(app: Any, abandon: bool) -> None:
        decision = rollout.decide(None)
        result = _speedups.respond(mw, app, decision, environ, start_response, 1.0)
        try:
            for _ in result:
                if abandon:
                    break
        except Died:
            pass
        result.close()  # type: ignore[attr-defined]

    for _ in range(50):  # warm up caches that legitimately hold references
        for app in (hello, failing):
            once(app, False)
            once(app, True)
    gc.collect()
    before = [sys.getrefcount(o) for o in (mw, environ, start_response, hello, failing)]
    for _ in range(2000):
        for app in (hello, failing):
            once(app, False)
            once(app, True)
    sink.snapshot()
    gc.collect()
    after = [sys.getrefcount(o) for o in (mw, environ, start_response, hello, failing)]
    assert after == before
    assert not [o for o in gc.get_objects() if type(o) is _speedups.Response]


SUBINTERPRETER = """
import importlib, sys
# A legacy sub-interpreter, sharing the GIL, as mod_wsgi makes them.
if sys.version_info >= (3, 13):
    interpreters = importlib.import_module("_interpreters")
    interp = interpreters.create("legacy")
elif sys.version_info >= (3, 12):
    interpreters = importlib.import_module("_xxsubinterpreters")
    interp = interpreters.create(isolated=False)
else:
    interpreters = importlib.import_module("_xxsubinterpreters")
    interp = interpreters.create()
interpreters.run_string(interp, "import canarymw.wsgi as w; assert w._respond is w._respond_py")
import canarymw.wsgi as w
print(w._respond.__name__)
"""


@needs_speedups
def test_sub_interpreters_use_the_python_path() -> None:
    """The extension keeps one interpreter's objects, so it loads only in the main one
    (mod_wsgi runs apps in sub-interpreters by default); the others fall back."""
    pytest.importorskip("_xxsubinterpreters" if sys.version_info < (3, 13) else "_interpreters")
    done = subprocess.run([sys.executable, "-c", SUBINTERPRETER], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "respond"
