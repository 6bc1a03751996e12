"""Simulated users: each has its own cookie jar and makes a few requests in a row.

The client is the standard library's ``http.client``: on two shared cores a heavier
client spends more time than the server under test, and the demo would measure itself.
Every request opens a fresh connection (``Connection: close``), as a browser behind a
load balancer would land anywhere, so one user's consecutive requests are spread over
the server's workers and stickiness is checked across them.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field

from .settings import PERCENT_HEADER, PID_HEADER, TAG_PARAM, VARIANT_HEADER, VERSION_HEADER

TIMEOUT = 10.0
"""Seconds a request may take before it counts as a transport error."""


class CookieJar:
    """One user's cookies for one host and path: what the server set, sent back as it was.

    Deliberately small: the demo talks to a single host on ``/`` only, so domain and
    path matching reduce to "always"; a cookie is dropped when the server expires it
    (``Max-Age=0`` or less). See: RFC 6265 §5.2 (parsing), §5.3 (storage).
    """

    __slots__ = ("_cookies",)

    def __init__(self) -> None:
        self._cookies: dict[str, str] = {}

    def get(self, name: str) -> str | None:
        """The value of cookie ``name``, or None."""
        return self._cookies.get(name)

    def header(self) -> str | None:
        """The ``Cookie`` request header, or None when the jar is empty."""
        if not self._cookies:
            return None
        return "; ".join(f"{k}={v}" for k, v in self._cookies.items())

    def store(self, set_cookie: str) -> str | None:
        """Apply one ``Set-Cookie`` value; return the cookie name it set or expired."""
        pair, _, attributes = set_cookie.partition(";")
        name, eq, value = pair.partition("=")
        name = name.strip()
        if not eq or not name:
            return None  # RFC 6265 §5.2 step 2-3: ignore a pair without "=" or a name
        value = value.strip()
        expired = False
        for attribute in attributes.split(";"):
            key, _, arg = attribute.partition("=")
            if key.strip().lower() == "max-age":
                try:
                    expired = int(arg.strip()) <= 0
                except ValueError:
                    pass
        if expired:
            self._cookies.pop(name, None)
        else:
            self._cookies[name] = value
        return name


@dataclass(slots=True)
class Hit:
    """One request as the client saw it."""

    status: int | None
    """HTTP status, or None when the request failed at the transport level."""
    variant: str | None
    """The ``X-Canary-Variant`` the answering app set (``old``/``new``), if any."""
    pid: int | None
    """The ``X-Worker-Pid`` of the worker process that answered, if any."""
    latency: float
    """Seconds from connecting to the end of the response body."""
    cookie: str | None
    """The cohort cookie value the user held after this response."""
    set_cookie: bool
    """Whether this response set the cohort cookie."""
    error: str | None = None
    """Exception type name of a transport failure."""
    at: float = 0.0
    """Wall-clock time (``time.time()``) the request started: the phases of a ramp are
    told apart by comparing it with the times the workers report."""
    version: int | None = None
    """The store version the answering worker followed (``X-Canary-Store-Version``)."""
    percent: float | None = None
    """The percent in force in the answering worker (``X-Canary-Percent``)."""


@dataclass(slots=True)
class UserRun:
    """Everything one simulated user saw, in order."""

    index: int
    hits: list[Hit] = field(default_factory=list)


def run_user(
    host: str,
    port: int,
    index: int,
    requests: int,
    cookie_name: str,
    stop: threading.Event,
    on_hit: Callable[[], None],
    admit: Callable[[], None] | None = None,
) -> UserRun:
    """Make ``requests`` sequential requests as one new visitor with an empty jar; each
    first calls ``admit``, if given (which may hold it back)."""
    jar = CookieJar()
    run = UserRun(index)
    for n in range(requests):
        if admit is not None:
            admit()
        if stop.is_set():
            break
        headers = {"Connection": "close"}
        cookie = jar.header()
        if cookie is not None:
            headers["Cookie"] = cookie
        at = time.time()
        started = time.perf_counter()
        conn = http.client.HTTPConnection(host, port, timeout=TIMEOUT)
        try:
            conn.request("GET", f"/?{TAG_PARAM}={n}", headers=headers)
            response = conn.getresponse()
            response.read()
        except (OSError, http.client.HTTPException) as exc:
            run.hits.append(
                Hit(
                    None,
                    None,
                    None,
                    time.perf_counter() - started,
                    jar.get(cookie_name),
                    False,
                    type(exc).__name__,
                    at,
                )
            )
            on_hit()
            continue
        finally:
            conn.close()
        latency = time.perf_counter() - started
        set_names = [jar.store(value) for value in response.headers.get_all("Set-Cookie", [])]
        pid = response.getheader(PID_HEADER)
        version = response.getheader(VERSION_HEADER)
        run.hits.append(
            Hit(
                response.status,
                response.getheader(VARIANT_HEADER),
                int(pid) if pid and pid.isdigit() else None,
                latency,
                jar.get(cookie_name),
                cookie_name in set_names,
                at=at,
                version=int(version) if version and version.isdigit() else None,
                percent=_float(response.getheader(PERCENT_HEADER)),
            )
        )
        on_hit()
    return run


def _float(text: str | None) -> float | None:
    try:
        return None if text is None else float(text)
    except ValueError:
        return None


def drive(
    host: str,
    port: int,
    *,
    users: int | None,
    requests: int,
    concurrency: int,
    cookie_name: str,
    on_progress: Callable[[int], None],
    at_half: Callable[[threading.Event], None] | None = None,
    stop: threading.Event | None = None,
) -> list[UserRun]:
    """Run ``users`` simulated users, ``concurrency`` at a time; return what each saw, in order.

    ``on_progress`` is called from this thread with the number of finished requests,
    ten times a second. ``at_half``, if given, is called by the user about to start the
    request half way through the run, with a gate that is closed then: new requests wait
    until the callee opens it (requests in flight go on). With ``users=None`` new users
    keep coming until ``stop`` is set (``canarymw demo --guard``: until the guard is
    done); setting ``stop`` ends any run after the users' current requests, and a user
    cut short keeps the requests it made. On ``KeyboardInterrupt`` the users stop after
    their current request, the others never start, and the interrupt propagates.
    """
    if users is None and stop is None:
        raise ValueError("drive() without a number of users needs a stop event.")
    stop = threading.Event() if stop is None else stop
    lock = threading.Lock()
    runs: dict[int, UserRun] = {}
    state = {"next": 0, "requests": 0, "started": 0}
    half = None if users is None else max(1, users * requests // 2)
    gate = threading.Event()
    gate.set()

    def hit() -> None:
        with lock:
            state["requests"] += 1

    def admit() -> None:
        with lock:
            state["started"] += 1
            now_half = state["started"] == half
        if now_half and at_half is not None:
            gate.clear()
            at_half(gate)
        gate.wait()

    def worker() -> None:
        # Each thread takes the next user until none is left: memory stays flat in the
        # number of users, unlike one queued task per user.
        while not stop.is_set():
            with lock:
                index = state["next"]
                state["next"] += 1
            if users is not None and index >= users:
                return
            run = run_user(host, port, index, requests, cookie_name, stop, hit, admit)
            with lock:
                runs[index] = run

    threads = concurrency if users is None else min(concurrency, users)
    pool = ThreadPoolExecutor(max_workers=concurrency, thread_name_prefix="canarymw-demo-user")
    try:
        pending: set[Future[None]] = {pool.submit(worker) for _ in range(threads)}
        while pending:
            finished, pending = wait(pending, timeout=0.1)
            for future in finished:
                future.result()  # a bug in a worker thread surfaces here
            on_progress(state["requests"])
    finally:
        stop.set()
        pool.shutdown(wait=True)
    return [runs[index] for index in sorted(runs)]
