"""What shadow traffic costs the primary: in process, and under real servers.

    python bench/bench_shadow.py              # in process, then gunicorn and uvicorn (~1 min)
    python bench/bench_shadow.py --quick      # fewer rounds, for a smoke run
    python bench/bench_shadow.py --in-process # skip the servers

In process (WSGI, a plain hello app behind WSGICanaryMiddleware; ASGI the same on a fake
server): microseconds per request for the middleware without a shadow, with a shadow
configured that does not copy this request (a POST), and with one that copies it (a GET
to a shadow answering the same, drained at the end of each round so the comparison work
done by the worker thread or task is part of the time: the whole CPU a copy costs the
process). Each round runs every contender once in a new random order; the added cost is
the median over rounds of the difference to "no shadow" in the same round.

Under real servers (one gunicorn sync worker, one uvicorn worker; tests/apps/shadow_servers.py),
sequential requests from one client: the primary's latency p50 and p99 with no shadow and
with a slow shadow (0.2 s per copy, 0.1 s timeout, queue of 8, 4 at a time: most copies
are dropped, the rest time out), in interleaved rounds against both servers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.servers import free_port, gunicorn, serve  # noqa: E402

from canarymw import Rollout, Shadow, WSGICanaryMiddleware  # noqa: E402
from canarymw._compat import BUILD  # noqa: E402
from canarymw.asgi import ASGICanaryMiddleware  # noqa: E402

KEY = "bench-secret-key-0123456789abcdef"


def wsgi_hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


async def asgi_hello(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


def wsgi_contenders() -> dict[str, tuple[Callable[[], None], Shadow | None]]:
    def one(shadow: Shadow | None, method: str) -> tuple[Callable[[], None], Shadow | None]:
        rollout = Rollout("bench", percent=0, secret_key=KEY)
        mw = WSGICanaryMiddleware(wsgi_hello, new=None, rollout=rollout, shadow=shadow)
        cookie = rollout.decide(None).set_cookie.split(";")[0]  # type: ignore[union-attr]
        environ = {
            "REQUEST_METHOD": method, "PATH_INFO": "/", "QUERY_STRING": "", "HTTP_COOKIE": cookie,
            "wsgi.url_scheme": "http", "SERVER_NAME": "b", "SERVER_PORT": "80", "CONTENT_LENGTH": "",
        }  # fmt: skip

        def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
            return None

        def call() -> None:
            result = mw(dict(environ), start_response)
            for _ in result:
                pass
            result.close()  # type: ignore[attr-defined]

        return call, shadow

    return {
        "no shadow": one(None, "GET"),
        "shadow, not copied (POST)": one(Shadow(wsgi_hello, queue_size=10_000), "POST"),
        "shadow, copied (GET)": one(Shadow(wsgi_hello, queue_size=10_000), "GET"),
    }


def asgi_contenders(loop: asyncio.AbstractEventLoop) -> dict[str, tuple[Callable[[], None], Shadow | None]]:
    def one(shadow: Shadow | None, method: str) -> tuple[Callable[[], None], Shadow | None]:
        rollout = Rollout("bench", percent=0, secret_key=KEY)
        mw = ASGICanaryMiddleware(asgi_hello, new=None, rollout=rollout, shadow=shadow)
        cookie = rollout.decide(None).set_cookie.split(";")[0].encode()  # type: ignore[union-attr]
        scope = {
            "type": "http", "method": method, "path": "/", "root_path": "", "query_string": b"",
            "scheme": "http", "headers": [(b"host", b"b"), (b"cookie", cookie)],
        }  # fmt: skip

        async def receive() -> dict[str, Any]:
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message: Any) -> None:
            pass

        def call() -> None:
            loop.run_until_complete(mw(scope, receive, send))

        return call, shadow

    return {
        "no shadow": one(None, "GET"),
        "shadow, not copied (POST)": one(Shadow(asgi_hello, queue_size=10_000), "POST"),
        "shadow, copied (GET)": one(Shadow(asgi_hello, queue_size=10_000), "GET"),
    }


def in_process(
    name: str,
    contenders: dict[str, tuple[Callable[[], None], Shadow | None]],
    rounds: int,
    n: int,
    settle: Callable[[], None],
) -> None:
    times: dict[str, list[float]] = {k: [] for k in contenders}
    for _ in range(rounds):
        order = list(contenders)
        random.shuffle(order)
        for key in order:
            call, shadow = contenders[key]
            started = time.perf_counter()
            for _ in range(n):
                call()
            if shadow is not None:
                settle()
                assert shadow.drain(30)
            times[key].append((time.perf_counter() - started) / n * 1e6)
    base = times["no shadow"]
    print(f"\n{name} in process ({BUILD}), us per request, median of {rounds} rounds of {n}:")
    print(f"  {'contender':<28} {'us':>8} {'added':>8}")
    for key, values in times.items():
        added = statistics.median(v - b for v, b in zip(values, base, strict=True))
        print(f"  {key:<28} {statistics.median(values):8.2f} {added:+8.2f}")
    for key, (_, shadow) in contenders.items():
        if shadow is not None:
            counts = {k: v for k, v in shadow.report().total.counts.items() if v}
            print(f"  ({key}: {counts})")


@contextlib.contextmanager
def server(kind: str, mode: str) -> Iterator[str]:
    port = free_port()
    if kind == "gunicorn":
        argv = gunicorn("tests.apps.shadow_servers:wsgi_app", port, workers=1)
    else:
        argv = ["uvicorn", "tests.apps.shadow_servers:asgi_app", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--log-level", "warning", "--no-access-log"]
    with serve(argv, port, env={"CANARYMW_SHADOW_MODE": mode}, ready_path="/_shadow") as base:
        yield base


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def under_servers(rounds: int, n: int) -> None:
    print(f"\nUnder real servers, sequential requests, {rounds} interleaved rounds of {n} per server:")
    print(f"  {'server':<9} {'shadow':<7} {'p50 ms':>7} {'p99 ms':>7}   p99 ratio   shadow results")
    for kind in ("gunicorn", "uvicorn"):
        with server(kind, "none") as plain, server(kind, "slow") as slow:
            clients = {"none": httpx.Client(base_url=plain), "slow": httpx.Client(base_url=slow)}
            took: dict[str, list[float]] = {"none": [], "slow": []}
            for c in clients.values():
                for _ in range(50):
                    c.get("/warm")
            for r in range(rounds):
                for mode in random.sample(list(clients), 2):
                    for i in range(n):
                        started = time.perf_counter()
                        clients[mode].get(f"/p/{r}/{i}").raise_for_status()
                        took[mode].append(time.perf_counter() - started)
            time.sleep(0.5)
            report = clients["slow"].get("/_shadow").json()["report"]["total"]["counts"]
            for c in clients.values():
                c.close()
        ratio = quantile(took["slow"], 0.99) / quantile(took["none"], 0.99)
        for mode in ("none", "slow"):
            p50, p99 = quantile(took[mode], 0.5) * 1e3, quantile(took[mode], 0.99) * 1e3
            extra = f"{ratio:9.2f}   { ({k: v for k, v in report.items() if v}) }" if mode == "slow" else ""
            print(f"  {kind:<9} {mode:<7} {p50:7.2f} {p99:7.2f}   {extra}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--in-process", action="store_true", help="skip the real servers")
    args = parser.parse_args()
    rounds, n = (3, 2000) if args.quick else (9, 10_000)
    in_process("WSGI", wsgi_contenders(), rounds, n, lambda: None)
    loop = asyncio.new_event_loop()

    def settle() -> None:
        # The copies are tasks on this loop: let them run before draining.
        while loop.run_until_complete(asyncio.sleep(0, result=True)) and asyncio.all_tasks(loop):
            loop.run_until_complete(asyncio.gather(*asyncio.all_tasks(loop)))

    in_process("ASGI", asgi_contenders(loop), rounds, n, settle)
    loop.close()
    if not args.in_process:
        under_servers(3 if args.quick else 6, 100 if args.quick else 300)


if __name__ == "__main__":
    os.chdir(ROOT)
    main()
