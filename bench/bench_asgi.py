"""ASGI overhead of canarymw on a Starlette hello app, in one process and under uvicorn.

    python bench/bench_asgi.py                 # in-process, microseconds per request
    python bench/bench_asgi.py --uvicorn       # requests/second under uvicorn --workers 2 (needs wrk)

In-process, every contender serves the same Starlette "hello" request through the
same minimal server loop (a fresh scope copy per request, as a server builds one);
``--cold MIB`` writes that many MiB before each request and times the requests alone,
so that each starts with the caches a server's own work between requests leaves.
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

The canarymw rows measure the build this process runs, printed first
(``canarymw._compat.BUILD``: compiled by mypyc where it was built). One process runs one
build, so ``--both`` runs the same measurement again in a subprocess with
``CANARYMW_NO_EXTENSIONS=1`` for the Python sources (what runs where no C compiler was
there at install time); each table has its own bare and naive rows to compare against.

Under uvicorn (``--uvicorn``) the same apps are served by uvicorn on 127.0.0.1 (by
default one worker with uvloop and httptools; ``--workers 2`` runs uvicorn's own
supervisor), canarymw three times: as built, on the Python sources
(``CANARYMW_NO_EXTENSIONS=1``) and, with ``--compare PYTHON``, as another interpreter
imports it (another checkout's venv). All servers start up front, and wrk (``apt-get
install -y wrk`` on Debian; ``-t1 -c32`` for one worker, ``-t2 -c32`` for more) loads
them in interleaved rounds with a returning visitor's cookie, every 10th request a new
visitor's unless ``--new-visitors`` says otherwise. The listening socket is bound by this
script so that TCP_NODELAY applies (see :func:`serve_uvicorn`); ``--stock-uvicorn`` uses
the plain ``uvicorn`` CLI. ``--probe`` also times, from inside the worker, each
contender's call and the server's ``send`` within it (see :class:`Probe`), to tell the
contender's own work from what the server does with its answer.
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
from loadgen import Run, build_of, free_port, paired_added, run_both, serve, wrk  # type: ignore[import-not-found]  # bench/, next to this file
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


def hello(label: str, extra: list[tuple[bytes, bytes]] | None = None) -> Starlette:
    async def index(request: Request) -> Response:
        response = PlainTextResponse(f"Hello, {label} World!")
        if extra:
            response.raw_headers.extend(extra)  # as sent, without Starlette's own header work
        return response

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


class Probe:
    """Wraps a contender under uvicorn (``--probe``): sums the time spent inside it and
    inside the server's ``send``, per request; ``GET /_probe`` answers the sums (seconds)
    as ``requests inside send`` and starts them afresh. The app never waits here (no
    body, nothing to await but the server's send), so these times are CPU times."""

    def __init__(self, app: App) -> None:
        self.app = app
        self.requests, self.inside, self.sending = 0, 0.0, 0.0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["path"] == "/_probe":
            body = f"{self.requests} {self.inside!r} {self.sending!r}".encode()
            self.requests, self.inside, self.sending = 0, 0.0, 0.0
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": body})
            return

        async def timed_send(message: Any) -> None:
            t = time.perf_counter()
            await send(message)
            self.sending += time.perf_counter() - t

        self.requests += 1
        t = time.perf_counter()
        await self.app(scope, receive, timed_send)
        self.inside += time.perf_counter() - t


def make_app(kind: str | None = None) -> App:
    """One contender: ``bare``, ``bare-headers``, ``canarymw``, ``canarymw-nosink``, ``naive``
    or ``basehttp`` (``canarymw-py`` is ``canarymw``, run in a server with
    CANARYMW_NO_EXTENSIONS=1). ``bare-headers`` is the bare app sending the two headers
    canarymw adds to every response (``Vary: Cookie``, ``Cache-Control: private``): what
    the server itself spends on them.

    Under uvicorn the contender comes from the environment variable BENCH_APP.
    """
    if kind is None and os.environ.get("BENCH_PROBE"):
        return Probe(make_app(os.environ["BENCH_APP"]))
    kind = kind or os.environ["BENCH_APP"]
    blue, green = hello("Blue"), hello("Green")
    if kind == "bare":
        return blue
    if kind == "bare-headers":
        return hello("Blue", [(b"vary", b"Cookie"), (b"cache-control", b"private")])
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


async def _serve(app: App, scope: dict[str, Any], n: int, cold: bytearray | None = None) -> float:
    if cold is None:
        t0 = time.perf_counter()
        for _ in range(n):
            await app(dict(scope), _receive, _send)
        return (time.perf_counter() - t0) / n * 1e6
    # --cold: before each request, write one byte per cache line of `cold`, evicting what
    # the caches held (as a server's own work between requests does); only the calls are timed.
    spent, ones = 0.0, b"\x01" * len(cold[::64])
    for _ in range(n):
        cold[::64] = ones
        t0 = time.perf_counter()
        await app(dict(scope), _receive, _send)
        spent += time.perf_counter() - t0
    return spent / n * 1e6


def in_process(rounds: int, per_round: int, cold_mb: float = 0.0) -> None:
    returning = _scope(f"{OTHER_COOKIES}; {returning_cookie()}")
    first = _scope(OTHER_COOKIES)
    naive = _scope(f"{OTHER_COOKIES}; {naive_cookie()}")
    wrapped = make_app("canarymw")
    contenders: dict[str, tuple[App, dict[str, Any]]] = {
        "bare": (make_app("bare"), returning),
        "canarymw returning": (wrapped, returning),
        "canarymw first visit": (wrapped, first),
        "canarymw returning, no sink": (make_app("canarymw-nosink"), returning),
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
                samples[name].append(await _serve(app, scope, per_round, cold))
        return samples

    cold = bytearray(int(cold_mb * 2**20)) if cold_mb > 0 else None
    samples = asyncio.run(measure())
    base = statistics.median(samples["bare"])
    added = paired_added(samples)
    ours = added["canarymw returning"]
    print(f"in-process, Starlette hello, {rounds} rounds (random order) x {per_round} requests; medians")
    if cold is not None:
        print(f"--cold {cold_mb:g}: {cold_mb:g} MiB written before each request (caches evicted)")
    print(
        f"{'contender':30} {'us/req':>8} {'added us':>9} {'% of bare':>9} {'added / canarymw returning':>27}"
    )
    for name, v in samples.items():
        ratio = f"{added[name] / ours:27.1f}" if name != "bare" and ours > 0 else f"{'':>27}"
        us, pct = statistics.median(v), 100 * added[name] / base
        print(f"{name:30} {us:8.2f} {added[name]:9.2f} {pct:8.1f}% {ratio}")


def serve_uvicorn(kind: str, port: int, workers: int, loop: str, http: str) -> None:
    """uvicorn on a listener made as TCP: one worker in this process, or ``workers``
    under uvicorn's own supervisor.

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
        workers=workers,
        loop=loop,
        http=http,
        log_level="warning",
        access_log=False,
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.set_inheritable(True)
    if workers == 1:
        uvicorn.Server(config).run(sockets=[sock])
    else:
        Multiprocess(config, sockets=[sock]).run()


def under_uvicorn(args: argparse.Namespace) -> None:
    if shutil.which("wrk") is None:
        sys.exit(
            "wrk is not installed, and it generates the load for --uvicorn.\n"
            "Install it (Debian/Ubuntu: apt-get install -y wrk) and run again."
        )
    import contextlib

    from bench_wsgi import report

    here = Path(__file__).resolve().parent
    returning, naive = f"{OTHER_COOKIES}; {returning_cookie()}", f"{OTHER_COOKIES}; {naive_cookie()}"
    kinds = args.contenders.split(",")
    if args.compare:
        kinds.append("canarymw@other")
    cookies = {kind: naive if kind in ("naive", "basehttp") else returning for kind in kinds}
    every = round(100 / args.new_visitors) if args.new_visitors > 0 else 0
    threads = 1 if args.workers == 1 else 2

    runs: dict[str, list[Run]] = {kind: [] for kind in kinds}
    ports: dict[str, int] = {}
    groups: dict[str, int] = {}
    with contextlib.ExitStack() as stack:
        for kind in kinds:
            port = ports[kind] = free_port()
            app = kind.removesuffix("@other")
            if args.stock_uvicorn:
                argv = ["uvicorn", "--factory", "bench_asgi:make_app", "--workers", str(args.workers)]
                argv += ["--host", "127.0.0.1", "--port", str(port), "--loop", args.loop, "--http", args.http]
                argv += ["--log-level", "warning", "--no-access-log"]
            else:
                argv = ["bench_asgi", "--serve", app, "--port", str(port), "--workers", str(args.workers)]
                argv += ["--loop", args.loop, "--http", args.http]
            env = {"BENCH_APP": app, "PYTHONPATH": str(here)}
            if args.probe:
                env["BENCH_PROBE"] = "1"
            if kind == "canarymw-py":
                env["CANARYMW_NO_EXTENSIONS"] = "1"  # the Python sources
            python = args.compare if kind.endswith("@other") else sys.executable
            groups[kind] = stack.enter_context(serve(argv, port, env=env, python=python)).pid
            wrk(f"http://127.0.0.1:{port}/", 1, cookies[kind], port, threads=threads, group=groups[kind])
            if args.probe:
                _probe(port)  # the warm-up's sums are thrown away
        order = list(kinds)
        shuffle = random.Random(0).shuffle
        for _ in range(args.server_rounds):
            shuffle(order)
            for kind in order:
                url = f"http://127.0.0.1:{ports[kind]}/"
                run = wrk(
                    url, args.seconds, cookies[kind], ports[kind], threads=threads,
                    new_cookie=OTHER_COOKIES, new_every=every, group=groups[kind],
                )  # fmt: skip
                runs[kind].append(run)
        probed = {kind: _probe(ports[kind]) for kind in kinds} if args.probe else {}
    how = "stock uvicorn CLI" if args.stock_uvicorn else "TCP_NODELAY listener"
    mix = f"every {every}th request a new visitor's" if every else "returning visitors only"
    print(f"uvicorn --workers {args.workers} --loop {args.loop} --http {args.http} ({how}),")
    print(f"wrk -t{threads} -c32 ({mix}), {args.server_rounds} rounds (random order) x {args.seconds}s")
    print("req/s: median; ratio: median over rounds of req/s / bare's req/s in the same round, then each")
    print("round's; cpu: server CPU per request, median, and the median of its per-round difference")
    print("to bare's; cpu ratio: bare's cpu/request / this one's")
    report(runs)
    if probed:
        print("--probe: per request, time inside the contender, of it inside the server's send, and the rest")
        print("(the contender's own work; for bare, Starlette's), all rounds together:")
        for kind, (n, inside, sending) in probed.items():
            per = 1e6 / max(n, 1)
            print(
                f"{kind:16} inside {inside * per:6.2f} us  send {sending * per:6.2f} us  "
                f"own {(inside - sending) * per:6.2f} us  ({n:,} requests)"
            )


def _probe(port: int) -> tuple[int, float, float]:
    """The sums a ``Probe`` server has kept since it was last asked (and now starts again)."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_probe", timeout=10) as response:
        n, inside, sending = response.read().split()
    return int(n), float(inside), float(sending)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=1000)
    parser.add_argument("--uvicorn", action="store_true", help="measure requests/second under uvicorn")
    parser.add_argument(
        "--cold", type=float, default=0.0, metavar="MIB", help="in process: evict caches before each request"
    )
    parser.add_argument(
        "--stock-uvicorn", action="store_true", help="with --uvicorn: use the plain uvicorn CLI"
    )
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--server-rounds", type=int, default=10, help="rounds under uvicorn")
    parser.add_argument("--workers", type=int, default=1, help="uvicorn workers (wrk -t1 for 1, else -t2)")
    parser.add_argument("--loop", default="uvloop", help="uvicorn --loop")
    parser.add_argument("--http", default="httptools", help="uvicorn --http")
    parser.add_argument("--new-visitors", type=float, default=10, help="under uvicorn: %% of requests")
    parser.add_argument(
        "--probe",
        action="store_true",
        help="under uvicorn: also time each contender, and the server's send, from inside the worker",
    )
    parser.add_argument(
        "--contenders", default="bare,canarymw,canarymw-py,naive,basehttp", help="under uvicorn"
    )
    parser.add_argument(
        "--compare", metavar="PYTHON", help="under uvicorn: add canarymw as PYTHON imports it"
    )
    parser.add_argument("--both", action="store_true", help="in process: again with the Python sources")
    parser.add_argument("--serve", metavar="KIND", help=argparse.SUPPRESS)  # a server for --uvicorn
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve_uvicorn(args.serve, args.port, args.workers, args.loop, args.http)
        return
    import canarymw._compat

    print(f"canarymw build: {canarymw._compat.BUILD}")
    if args.uvicorn:
        if args.compare:
            print(f"canarymw@other: {args.compare}: {build_of(args.compare)}")
        under_uvicorn(args)
        return
    in_process(args.rounds, args.per_round, args.cold)
    if args.both:
        run_both(__file__)


if __name__ == "__main__":
    main()
