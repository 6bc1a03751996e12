"""Through real ASGI servers with 2 workers each (uvicorn, hypercorn, granian): every worker,
and the WSGI adapter, agree on each user; streams, disconnects and errors are recorded.

The three servers implement ``send`` and ``receive`` in different ways (Python
coroutines on asyncio; granian's are awaitables from Rust), which the compiled request
path drives directly.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any
from wsgiref.util import setup_testing_defaults

import httpx
import pytest
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from canarymw import Rollout, WSGICanaryMiddleware
from canarymw.asgi import ASGICanaryMiddleware

from ..harness import build
from ..servers import free_port, serve

NAME = "servers-v2"
KEY = "servers-secret-key-0123456789abcdef"
PERCENT = 30
USERS = 200
REQUESTS_PER_USER = 4


SERVERS = ["uvicorn", "hypercorn", "granian"]
STREAM_EVENTS = 50
STREAM_PAUSE = 0.2  # the whole stream would take 10 s


def server_argv(server: str, factory: str, port: int) -> list[str]:
    """The command line (after ``python -m``) serving ``factory()`` from this module."""
    target = f"tests.real_servers.test_asgi_servers:{factory}"
    if server == "uvicorn":
        return ["uvicorn", "--factory", target, "--workers", "2", "--host", "127.0.0.1", "--port", str(port)]
    if server == "hypercorn":
        return ["hypercorn", "--workers", "2", "--bind", f"127.0.0.1:{port}", f"{target}()"]
    host = ["--host", "127.0.0.1", "--port", str(port)]
    return ["granian", "--interface", "asgi", "--factory", "--workers", "2", *host, target]


def make_app() -> Any:
    """The served app (a factory): Starlette blue (old) and FastAPI green (new).

    Both have a lifespan that stores a value in the lifespan state, so each response
    also shows that both apps were started in that worker.
    """

    @contextlib.asynccontextmanager
    async def blue_lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        yield {"started": "blue-started"}

    async def blue(request: Request) -> Response:
        return PlainTextResponse(f"old {request.state.started}", headers=served_by())

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    @contextlib.asynccontextmanager
    async def green_lifespan(app: FastAPI) -> AsyncIterator[dict[str, Any]]:
        yield {"started": "green-started"}

    green = FastAPI(lifespan=green_lifespan)

    @green.get("/")
    async def green_index(request: Request) -> Response:
        return PlainTextResponse(f"new {request.state.started}", headers=served_by())

    old = Starlette(routes=[Route("/", blue), Route("/healthz", healthz)], lifespan=blue_lifespan)
    rollout = Rollout(NAME, percent=PERCENT, secret_key=KEY, exclude=["/healthz"])
    mw = ASGICanaryMiddleware(old, new=green, rollout=rollout, on_new_startup_failure="fail")

    def served_by() -> dict[str, str]:
        # Which worker, and which implementation of the request path, served a response.
        return {"x-pid": str(os.getpid()), "x-path": build()}

    return mw


def wsgi_variant(cookie: str) -> str:
    """What the WSGI adapter, in this process, decides for the same cookie."""

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "text/plain")])
        return [environ["canarymw.decision"].variant.encode()]

    mw = WSGICanaryMiddleware(app, new=app, rollout=Rollout(NAME, percent=PERCENT, secret_key=KEY))
    environ: dict[str, Any] = {"HTTP_COOKIE": cookie}
    setup_testing_defaults(environ)

    def start_response(
        status: str, headers: list[tuple[str, str]], exc_info: Any = None
    ) -> Callable[[bytes], object]:
        return lambda data: None

    return b"".join(mw(environ, start_response)).decode()


User = tuple[list[str], list[str], list[bool], str, set[str]]


async def one_user(base: str, gate: asyncio.Semaphore) -> User:
    """One user's requests: bodies, worker pids, Set-Cookie seen, cookie, request paths."""
    bodies: list[str] = []
    pids: list[str] = []
    set_cookie: list[bool] = []
    paths: set[str] = set()
    # A fresh connection per request, so one user's requests spread over both workers;
    # verify=False: plain HTTP on loopback, and it skips loading a CA bundle per client.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with gate, httpx.AsyncClient(base_url=base, limits=limits, timeout=10, verify=False) as client:
        for _ in range(REQUESTS_PER_USER):
            response = await client.get("/")
            assert response.status_code == 200, response.text
            bodies.append(response.text)
            pids.append(response.headers["x-pid"])
            paths.add(response.headers["x-path"])
            set_cookie.append("set-cookie" in response.headers)
        cookie = f"canarymw={client.cookies['canarymw']}"
    return bodies, pids, set_cookie, cookie, paths


@pytest.mark.server
@pytest.mark.parametrize("server", SERVERS)
def test_two_workers_agree_with_each_other_and_with_wsgi(server: str) -> None:
    port = free_port()
    with serve(server_argv(server, "make_app", port), port, ready_path="/healthz", timeout=40) as base:

        async def main() -> list[User]:
            gate = asyncio.Semaphore(16)
            return list(await asyncio.gather(*(one_user(base, gate) for _ in range(USERS))))

        users = asyncio.run(main())

    all_pids: set[str] = set()
    both_workers = 0
    variants = []
    for bodies, pids, set_cookie, cookie, paths in users:
        assert paths == {build()}  # the servers ran the build under test
        assert len(set(bodies)) == 1, bodies  # sticky, whichever worker answered
        variant, started = bodies[0].split()
        assert started == ("green-started" if variant == "new" else "blue-started")  # both lifespans ran
        assert set_cookie == [True, False, False, False]
        assert wsgi_variant(cookie) == variant
        all_pids.update(pids)
        both_workers += len(set(pids)) > 1
        variants.append(variant)
    assert len(all_pids) == 2, all_pids
    assert both_workers > 0  # some users were served by both workers, and kept their variant
    assert 0.15 * USERS < variants.count("new") < 0.45 * USERS


def make_streaming_app() -> Any:
    """The served app for the streaming test (a factory): a slow event stream,
    a failing view and a plain one, outcomes appended to ``$OUTCOMES`` (JSON lines)."""
    from starlette.responses import StreamingResponse

    from canarymw.sinks.jsonl import JSONLinesSink

    async def stream(request: Request) -> Response:
        async def events() -> AsyncIterator[bytes]:
            for i in range(STREAM_EVENTS):
                yield f"data: {i}\n\n".encode()
                await asyncio.sleep(STREAM_PAUSE)

        return StreamingResponse(events(), media_type="text/event-stream")

    async def boom(request: Request) -> Response:
        raise RuntimeError("the view failed")

    async def plain(request: Request) -> Response:
        return PlainTextResponse("plain", headers={"x-path": build()})

    routes = [Route("/stream", stream), Route("/boom", boom), Route("/", plain), Route("/healthz", plain)]
    rollout = Rollout(NAME, percent=50, secret_key=KEY, exclude=["/healthz"])
    return ASGICanaryMiddleware(
        Starlette(routes=routes),
        new=Starlette(routes=routes),
        rollout=rollout,
        sink=JSONLinesSink(os.environ["OUTCOMES"]),
    )


@pytest.mark.server
@pytest.mark.parametrize("server", SERVERS)
def test_streams_disconnects_and_errors(server: str, tmp_path: Any) -> None:
    """Through a real server: an event stream reaches the client event by event, a client
    that leaves mid-stream is recorded as a disconnect, a failing view as its exception,
    and every request gives exactly one outcome."""
    from canarymw.sinks.jsonl import read_outcomes

    outcomes_dir = f"{tmp_path}/"
    port = free_port()
    argv = server_argv(server, "make_streaming_app", port)
    leavers, failures, plains = 6, 4, 10
    with serve(argv, port, env={"OUTCOMES": outcomes_dir}, ready_path="/healthz", timeout=40) as base:

        async def leave_mid_stream(client: httpx.AsyncClient) -> float:
            started = asyncio.get_running_loop().time()
            async with client.stream("GET", "/stream") as response:
                assert response.status_code == 200
                assert response.headers["vary"] == "Cookie"
                async for chunk in response.aiter_bytes():
                    assert chunk.startswith(b"data: 0")
                    return asyncio.get_running_loop().time() - started  # and close the connection
            raise AssertionError("the stream ended without an event")

        async def main() -> tuple[list[float], list[httpx.Response], list[httpx.Response]]:
            limits = httpx.Limits(max_keepalive_connections=0)
            async with httpx.AsyncClient(base_url=base, limits=limits, timeout=10) as client:
                firsts = await asyncio.gather(*(leave_mid_stream(client) for _ in range(leavers)))
                booms = await asyncio.gather(*(client.get("/boom") for _ in range(failures)))
                oks = await asyncio.gather(*(client.get("/") for _ in range(plains)))
                await asyncio.sleep(2 * STREAM_PAUSE)  # the servers notice the streams' clients left
                return list(firsts), list(booms), list(oks)

        firsts, booms, oks = asyncio.run(main())
    assert max(firsts) < STREAM_EVENTS * STREAM_PAUSE / 4  # unbuffered: the first event came at once
    assert [r.status_code for r in booms] == [500] * failures
    assert {r.headers["x-path"] for r in oks} == {build()}
    got = list(read_outcomes(outcomes_dir, strict=True))
    by_route: dict[str | None, list[Any]] = {}
    for o in got:
        by_route.setdefault(o.route, []).append(o)
    assert sorted(by_route, key=str) == ["/", "/boom", "/stream"]
    assert len(got) == leavers + failures + plains  # exactly one outcome per request
    assert all(o.disconnected and o.status == 200 and o.error is None for o in by_route["/stream"])
    assert all(o.duration < STREAM_EVENTS * STREAM_PAUSE / 2 for o in by_route["/stream"])
    assert all(o.status == 500 and o.error == "RuntimeError" for o in by_route["/boom"])
    assert all(o.status == 200 and not o.disconnected and o.error is None for o in by_route["/"])


def _raw_get(port: int, headers: list[bytes]) -> bytes:
    """The status line uvicorn answers to a GET with these raw header lines."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"".join(headers) + b"Connection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data.split(b"\r\n", 1)[0]


@pytest.mark.server
def test_hostile_cookie_headers_through_uvicorn() -> None:
    """Cookie headers no browser sends, as raw bytes on the wire: every one is answered
    200 (a new cohort where ours is unusable), and the server keeps serving."""
    rnd = random.Random(7)
    cases = [
        [b"Cookie: canarymw=\xe9\xe8\x80\xff; a=\xfe\r\n"],  # latin-1 bytes, not UTF-8
        [b"Cookie: c%d=v\r\n" % i for i in range(200)],  # 200 cookie headers
        [b"Cookie: canarymw=x%d\r\n" % i for i in range(200)],  # 200 of ours, all bad
        [b"Cookie: canarymw=" + b"A" * 7000 + b"\r\n"],
        [b"Cookie: \r\n"],
        [b"Cookie: ;;;;;;=;=;canarymw\r\n"],
        [b'Cookie: canarymw="1.abc"; x="\\""\r\n'],
    ]
    alphabet = b'!#A;= .1"\\\x80\xff'
    cases += [
        [b"Cookie: " + bytes(rnd.choices(alphabet, k=rnd.randint(1, 300))) + b"\r\n"] for _ in range(30)
    ]
    port = free_port()
    with serve(server_argv("uvicorn", "make_app", port), port, ready_path="/healthz", timeout=30):
        answers = [_raw_get(port, headers) for headers in cases]
        after = _raw_get(port, [])
    assert answers == [b"HTTP/1.1 200 OK"] * len(cases)
    assert after == b"HTTP/1.1 200 OK"
