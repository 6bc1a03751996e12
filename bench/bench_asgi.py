"""ASGI overhead of canarymw on a Starlette hello app, in one process and under uvicorn.

    python bench/bench_asgi.py                 # in-process, microseconds per request
    python bench/bench_asgi.py --uvicorn       # requests/second under uvicorn --workers 2 (needs wrk)

In-process, every contender serves the same Starlette "hello" request through the
same minimal server loop (a fresh scope copy per request, as a server builds one).
Each round runs every contender once, in a new random order, so drift (CPU frequency,
other load) and position effects hit all of them alike. A contender's added cost is
the median over rounds of (its time - bare's time in the same round). Contenders:

- bare: the Starlette app alone;
- canarymw returning: ASGICanaryMiddleware with a MemorySink, a visitor with a valid
  cohort cookie that the rollout keeps on old (so bare and wrapped run the same view);
- canarymw first visit: no cohort cookie (new id, signing, Set-Cookie);
- canarymw returning, no sink: the adapter alone, without recording outcomes;
- naive pure ASGI: what many teams write by hand: find the Cookie header, parse it
  with SimpleCookie, verify an itsdangerous URLSafeSerializer value on every request,
  route by hash, add ``Vary: Cookie`` with Starlette's MutableHeaders;
- naive BaseHTTPMiddleware: the same logic as a ``BaseHTTPMiddleware.dispatch``.

Under uvicorn (``--uvicorn``) the same apps are served by uvicorn with 2 workers on
127.0.0.1 (canarymw twice: as installed, and on the pure-Python path), all started up
front, and wrk (``apt-get install -y wrk`` on Debian) loads them in interleaved rounds
with the matching returning-visitor cookie. The
listening socket is bound by this script so that TCP_NODELAY applies (see
:func:`serve_uvicorn`); ``--stock-uvicorn`` uses the plain ``uvicorn --workers 2`` CLI.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from itsdangerous import BadData, URLSafeSerializer
from loadgen import Run, paired_added, wrk  # type: ignore[import-not-found]  # bench/, next to this file
from starlette.applications import Starlette
from starlette.datastructures import MutableHeaders
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from canarymw import MemorySink, Rollout
from canarymw.asgi import ASGICanaryMiddleware

KEY = "bench-secret-key-0123456789abcdef"
NAME = "hello-v2"
PERCENT = 10
OTHER_COOKIES = "session=eyJ1c2VyIjoiYWxpY2UifQ.ZmFrZQ.c2lnbmF0dXJl; theme=dark; _ga=GA1.2.12345.67890"
NAIVE_SALT = "naive-canary"
App = Callable[[Any, Any, Any], Awaitable[None]]


def hello(label: str) -> Starlette:
    async def index(request: Request) -> Response:
        return PlainTextResponse(f"Hello, {label} World!")

    return Starlette(routes=[Route("/", index)])


def _naive_variant(serializer: URLSafeSerializer, cookie_header: str) -> str:
    jar: SimpleCookie = SimpleCookie()
    jar.load(cookie_header)
    uid = None
    if "canary" in jar:
        try:
            uid = serializer.loads(jar["canary"].value)
        except BadData:
            uid = None
    h = int.from_bytes(hashlib.sha256(f"naive:{uid}".encode()).digest()[:8], "big") % 10000
    return "new" if h < PERCENT * 100 else "old"


class NaiveASGICanary:
    """The straightforward pure-ASGI middleware: SimpleCookie + serializer verify per request."""

    def __init__(self, old: App, new: App) -> None:
        self.old, self.new = old, new
        self.serializer = URLSafeSerializer(KEY, salt=NAIVE_SALT)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.old(scope, receive, send)
            return
        cookie = ""
        for name, value in scope["headers"]:
            if name == b"cookie":
                cookie = value.decode("latin-1")
        app = self.new if _naive_variant(self.serializer, cookie) == "new" else self.old

        async def send_wrapper(message: Any) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                MutableHeaders(scope=message).add_vary_header("Cookie")
            await send(message)

        await app(scope, receive, send_wrapper)


class NaiveBaseHTTP(BaseHTTPMiddleware):
    """The same logic as a BaseHTTPMiddleware (routing through a scope flag and a switch app)."""

    def __init__(self, app: App) -> None:
        super().__init__(app)
        self.serializer = URLSafeSerializer(KEY, salt=NAIVE_SALT)

    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        request.scope["naive.variant"] = _naive_variant(self.serializer, request.headers.get("cookie", ""))
        response = await call_next(request)
        response.headers.add_vary_header("Cookie")
        return response


def switch(old: App, new: App) -> App:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await (new if scope.get("naive.variant") == "new" else old)(scope, receive, send)

    return app


def make_app(kind: str | None = None) -> App:
    """One contender: ``bare``, ``canarymw``, ``canarymw-nosink``, ``naive`` or ``basehttp``
    (``canarymw-py`` is ``canarymw``, run in a server with CANARYMW_NO_EXTENSIONS=1).

    Under uvicorn the contender comes from the environment variable BENCH_APP.
    """
    kind = kind or os.environ["BENCH_APP"]
    blue, green = hello("Blue"), hello("Green")
    if kind == "bare":
        return blue
    if kind in ("canarymw", "canarymw-nosink", "canarymw-py"):
        rollout = Rollout(NAME, percent=PERCENT, secret_key=KEY)
        sink = MemorySink() if kind == "canarymw" else None
        return ASGICanaryMiddleware(blue, new=green, rollout=rollout, sink=sink)
    if kind == "naive":
        return NaiveASGICanary(blue, green)
    if kind == "basehttp":
        return NaiveBaseHTTP(switch(blue, green))
    raise ValueError(f"unknown contender {kind!r}")


def returning_cookie() -> str:
    """A valid cohort cookie (``name=value``) that the benchmark rollout keeps on old."""
    rollout = Rollout(NAME, percent=PERCENT, secret_key=KEY)
    while True:
        cookie = (rollout.decide(None).set_cookie or "").split(";")[0]
        if rollout.decide(cookie).variant == "old":
            return cookie


def naive_cookie() -> str:
    serializer = URLSafeSerializer(KEY, salt=NAIVE_SALT)
    uid = 0
    while _naive_variant(serializer, f"canary={serializer.dumps(f'user-{uid}')}") != "old":
        uid += 1
    return f"canary={serializer.dumps(f'user-{uid}')}"


def _scope(cookie: str) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": "/",
        "raw_path": b"/",
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"bench/1.0"),
            (b"accept", b"*/*"),
            (b"accept-encoding", b"gzip, deflate"),
            (b"cookie", cookie.encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
        "state": {},
    }


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": b"", "more_body": False}


async def _send(message: Any) -> None:
    return None


async def _serve(app: App, scope: dict[str, Any], n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
        await app(dict(scope), _receive, _send)
    return (time.perf_counter() - t0) / n * 1e6


def in_process(rounds: int, per_round: int) -> None:
    returning = _scope(f"{OTHER_COOKIES}; {returning_cookie()}")
    first = _scope(OTHER_COOKIES)
    naive = _scope(f"{OTHER_COOKIES}; {naive_cookie()}")
    import canarymw.asgi

    if canarymw.asgi._router is None:
        print("note: canarymw._speedups is not built; every canarymw row uses the pure-Python path")
    compiled, canarymw.asgi._router = canarymw.asgi._router, None
    python_path = make_app("canarymw")  # built without the compiled request path
    canarymw.asgi._router = compiled
    wrapped = make_app("canarymw")
    contenders: dict[str, tuple[App, dict[str, Any]]] = {
        "bare": (make_app("bare"), returning),
        "canarymw returning": (wrapped, returning),
        "canarymw first visit": (wrapped, first),
        "canarymw returning, no sink": (make_app("canarymw-nosink"), returning),
        "canarymw returning, Python path": (python_path, returning),
        "naive pure ASGI": (make_app("naive"), naive),
        "naive BaseHTTPMiddleware": (make_app("basehttp"), naive),
    }

    async def measure() -> dict[str, list[float]]:
        for app, scope in contenders.values():  # warm caches and code paths
            await _serve(app, scope, 300)
        samples: dict[str, list[float]] = {name: [] for name in contenders}
        order = list(contenders)
        shuffle = random.Random(0).shuffle
        for _ in range(rounds):
            shuffle(order)
            for name in order:
                app, scope = contenders[name]
                samples[name].append(await _serve(app, scope, per_round))
        return samples

    samples = asyncio.run(measure())
    base = statistics.median(samples["bare"])
    added = paired_added(samples)
    ours = added["canarymw returning"]
    print(f"in-process, Starlette hello, {rounds} rounds (random order) x {per_round} requests; medians")
    print(
        f"{'contender':30} {'us/req':>8} {'added us':>9} {'% of bare':>9} {'added / canarymw returning':>27}"
    )
    for name, v in samples.items():
        ratio = f"{added[name] / ours:27.1f}" if name != "bare" and ours > 0 else f"{'':>27}"
        us, pct = statistics.median(v), 100 * added[name] / base
        print(f"{name:30} {us:8.2f} {added[name]:9.2f} {pct:8.1f}% {ratio}")


def serve_uvicorn(kind: str, port: int) -> None:
    """``uvicorn --workers 2`` through uvicorn's own supervisor, on a listener made as TCP.

    uvicorn's ``--workers N`` binds its listener with ``proto`` 0, so asyncio never sets
    TCP_NODELAY on accepted connections and every keep-alive response after the first
    waits ~40 ms for the client's delayed ACK (https://github.com/Kludex/uvicorn/issues/3149).
    That stall would hide every difference between contenders, so the benchmark binds
    the socket itself; ``--stock-uvicorn`` measures the plain CLI instead.
    """
    import socket

    import uvicorn
    from uvicorn.supervisors import Multiprocess

    os.environ["BENCH_APP"] = kind
    config = uvicorn.Config(
        "bench_asgi:make_app",
        factory=True,
        host="127.0.0.1",
        port=port,
        workers=2,
        log_level="warning",
        access_log=False,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.set_inheritable(True)
    Multiprocess(config, sockets=[sock]).run()


def under_uvicorn(rounds: int, seconds: int, stock: bool) -> None:
    if shutil.which("wrk") is None:
        sys.exit(
            "wrk is not installed, and it generates the load for --uvicorn.\n"
            "Install it (Debian/Ubuntu: apt-get install -y wrk) and run again."
        )
    import contextlib

    here = Path(__file__).resolve().parent
    sys.path.insert(0, str(here.parent / "tests"))
    from servers import free_port, serve  # type: ignore[import-not-found]

    cookies = {
        "bare": f"{OTHER_COOKIES}; {returning_cookie()}",
        "canarymw": f"{OTHER_COOKIES}; {returning_cookie()}",
        "canarymw-py": f"{OTHER_COOKIES}; {returning_cookie()}",
        "naive": f"{OTHER_COOKIES}; {naive_cookie()}",
        "basehttp": f"{OTHER_COOKIES}; {naive_cookie()}",
    }

    runs: dict[str, list[Run]] = {kind: [] for kind in cookies}
    ports: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        bases = {}
        for kind in cookies:
            port = ports[kind] = free_port()
            if stock:
                argv = [
                    "uvicorn",
                    "--factory",
                    "bench_asgi:make_app",
                    "--workers",
                    "2",
                    "--host",
                    "127.0.0.1",
                ]
                argv += ["--port", str(port), "--log-level", "warning", "--no-access-log"]
            else:
                argv = ["bench_asgi", "--serve", kind, "--port", str(port)]
            path = os.pathsep.join([str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])
            env = {**os.environ, "BENCH_APP": kind, "PYTHONPATH": path}
            if kind == "canarymw-py":
                env["CANARYMW_NO_EXTENSIONS"] = "1"  # the pure-Python request path
            bases[kind] = stack.enter_context(serve(argv, port, env=env, timeout=60))
            wrk(bases[kind] + "/", 1, cookies[kind], port)  # warm-up
        order = list(cookies)
        shuffle = random.Random(0).shuffle
        for _ in range(rounds):
            shuffle(order)
            for kind in order:
                runs[kind].append(wrk(bases[kind] + "/", seconds, cookies[kind], ports[kind]))
    how = "stock uvicorn CLI" if stock else "uvicorn supervisor, TCP_NODELAY listener"
    print(f"uvicorn --workers 2 ({how}), wrk -t2 -c32, {rounds} rounds (random order) x {seconds}s")
    print("req/s: median; ratio: median over rounds of req/s / bare's req/s in the same round, then each")
    print("round's; cpu: server CPU per request, median; cpu ratio: bare's cpu/request / this one's")
    bare_cpu = statistics.median(r.cpu_per_request for r in runs["bare"])
    for kind, kind_runs in runs.items():
        ratios = [r.rps / b.rps for r, b in zip(kind_runs, runs["bare"], strict=True)]
        each = " ".join(f"{x:.3f}" for x in ratios)
        rps, ratio = statistics.median(r.rps for r in kind_runs), statistics.median(ratios)
        cpu = statistics.median(r.cpu_per_request for r in kind_runs)
        cpu_ratio = bare_cpu / cpu
        print(f"{kind:10} {rps:8,.0f} req/s {ratio:.3f}x [{each}]  cpu {cpu * 1e6:6.1f} us {cpu_ratio:.3f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=1000)
    parser.add_argument("--uvicorn", action="store_true", help="measure requests/second under uvicorn")
    parser.add_argument(
        "--stock-uvicorn", action="store_true", help="with --uvicorn: use the plain uvicorn CLI"
    )
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--server-rounds", type=int, default=10, help="rounds under uvicorn")
    parser.add_argument("--serve", metavar="KIND", help=argparse.SUPPRESS)  # a server for --uvicorn
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_uvicorn(args.serve, args.port)
    elif args.uvicorn:
        under_uvicorn(args.server_rounds, args.seconds, args.stock_uvicorn)
    else:
        in_process(args.rounds, args.per_round)


if __name__ == "__main__":
    main()
