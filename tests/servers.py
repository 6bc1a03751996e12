"""Start real servers (gunicorn, uvicorn) on free loopback ports, and always stop them.

Also what the tests of the examples under gunicorn share: many users, each with a cookie
jar of its own, and the check that every one of them kept one colour in every worker.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import httpx

from canarymw import Rollout

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def serve(
    argv: Sequence[str],
    port: int,
    *,
    env: dict[str, str] | None = None,
    ready_path: str = "/",
    timeout: float = 20,
    tls: bool = False,
) -> Iterator[str]:
    """Run ``argv`` (a server bound to 127.0.0.1:``port``) until the block ends.

    ``tls``: the server answers https (readiness is checked without verifying it).
    """
    full_env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    full_env.update(env or {})
    # stderr goes to a file, not a pipe: a chatty server must never block on a full pipe.
    log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in the finally below, after the server
    proc = subprocess.Popen(
        [sys.executable, "-m", *argv],
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=log,
        start_new_session=True,
    )
    base = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                log.seek(0)
                err = log.read().decode(errors="replace")
                raise RuntimeError(f"server exited early ({proc.returncode}):\n{err[-3000:]}")
            try:
                httpx.get(base + ready_path, timeout=1.0, verify=not tls)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"server on port {port} not ready after {timeout}s") from None
                time.sleep(0.1)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def gunicorn(app: str, port: int, workers: int = 2) -> list[str]:
    return ["gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}", "--log-level", "warning", app]


# The examples under gunicorn: every user keeps one colour in every worker --------------


@contextlib.contextmanager
def gunicorn_example(
    example: Path, app: str, key: str, *, workers: int = 2, env: Mapping[str, str] | None = None
) -> Iterator[str]:
    """The example app ``app`` in the folder ``example`` under gunicorn with ``workers``
    workers, its ``CANARY_KEY`` set to ``key`` (and ``env`` set too); its base URL."""
    port = free_port()
    argv = [
        "gunicorn", "-w", str(workers), "-b", f"127.0.0.1:{port}", "--chdir", str(example),
        "--log-level", "warning", app,
    ]  # fmt: skip
    with serve(argv, port, env={"CANARY_KEY": key, **(env or {})}, ready_path="/healthz") as base:
        yield base


@dataclass
class Seen:
    """What one user saw over its requests to an example."""

    cookie: str = ""
    bodies: set[str] = field(default_factory=set)
    variants: set[str] = field(default_factory=set)
    pids: set[str] = field(default_factory=set)
    cookies_set: int = 0


class _SharedPool(httpx.BaseTransport):
    """One connection pool for all users; closing a user's client must not close it."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.inner.handle_request(request)

    def close(self) -> None:
        pass


def each_user(
    base_url: str,
    count: int,
    visit: Callable[[httpx.Client, int], T],
    *,
    headers: Mapping[str, str] | None = None,
    threads: int = 8,
) -> list[T]:
    """``visit(client, i)`` for ``count`` users, ``threads`` at a time, each with a client of
    its own (so a cookie jar of its own: one browser per user) over one connection pool;
    what each returned, in order. ``headers`` go with every request."""

    def one(pool: httpx.BaseTransport, i: int) -> T:
        with httpx.Client(
            transport=pool, base_url=base_url, timeout=10, trust_env=False, headers=headers
        ) as client:
            return visit(client, i)

    with httpx.HTTPTransport() as transport:
        pool = _SharedPool(transport)
        with ThreadPoolExecutor(threads) as executor:
            return list(executor.map(lambda i: one(pool, i), range(count)))


def visit_as_users(base_url: str, *, headers: Mapping[str, str] | None = None) -> list[Seen]:
    """200 users, 8 at a time, each asking for ``/`` 4 times (each answer a 200), through one
    connection pool: what each saw. ``headers`` go with every request."""

    def visit(client: httpx.Client, _: int) -> Seen:
        seen = Seen()
        for _ in range(4):
            response = client.get("/")
            assert response.status_code == 200
            seen.bodies.add(response.text)
            seen.variants.add(response.headers["x-canary-variant"])
            seen.pids.add(response.headers["x-worker-pid"])
            seen.cookies_set += "set-cookie" in response.headers
        seen.cookie = client.cookies["canarymw"]
        return seen

    return each_user(base_url, 200, visit, headers=headers)


def assert_one_colour_per_user(users: Sequence[Seen], rollout: Rollout, colour: Mapping[str, str]) -> None:
    """The 200 ``users`` of :func:`visit_as_users` each kept one colour (``colour`` names it
    per variant) over their requests and both workers, and got their cookie once; the cookie
    alone gives the same answer here with ``rollout`` (the example's: 10%, the same key).
    Both workers served, some users crossed between them, and about 10% got green."""
    greens = crossed = 0
    all_pids: set[str] = set()
    for seen in users:
        assert len(seen.bodies) == 1 and len(seen.variants) == 1, seen  # sticky over requests and workers
        assert seen.cookies_set == 1  # set on the first visit, never again
        (variant,) = seen.variants
        assert seen.bodies == {f"Hello, {colour[variant]} World!\n"}  # the header tells the truth
        # The same answer computed here, from the cookie alone: no state shared with the server.
        decision = rollout.decide(f"canarymw={seen.cookie}")
        assert decision.set_cookie is None  # the cookie verifies with the shared key
        assert rollout.variant_for(decision.cohort) == variant
        greens += variant == "new"
        crossed += len(seen.pids) > 1
        all_pids |= seen.pids
    assert len(all_pids) == 2  # both workers served traffic
    assert crossed > 0  # and users moved between them without changing colour
    assert 3 <= greens <= 37  # 10% of 200, +-4 sigma
