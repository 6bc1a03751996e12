"""What hostile requests cost canarymw, in one process, against a normal returning visitor.

    python bench/bench_hostile.py
    python bench/bench_hostile.py --both     # and again with the Python sources

Every contender is one request through the middleware around a bare app (WSGI: a plain
WSGI callable; ASGI: a plain ASGI callable), on the build this process runs (printed
first: ``canarymw._compat.BUILD``, compiled by mypyc where it was built). Rounds run
every contender once, in a new random order; a contender's cost is the median over
rounds of its time per request, printed beside its ratio to the normal returning
visitor of the same adapter. One process runs one build, so ``--both`` runs the script
again in a subprocess with ``CANARYMW_NO_EXTENSIONS=1`` for the Python sources.
Contenders:

- returning: a valid cohort cookie beside three ordinary cookies (the common case);
- stuffed, 1 key / 3 keys: an 8 KB Cookie header with 570 forged cohort values before a
  valid one (each value once cost an HMAC check per key);
- junk neighbour: the valid cookie beside a 7 KB junk cookie that is new on every
  request (once, one cache entry per request);
- 16,000 cookie headers (ASGI only): separate headers, as HTTP/2 may send them (once
  joined by repeated concatenation).

The memory line reports what 20,000 junk-neighbour requests leave held (tracemalloc).
"""

from __future__ import annotations

import gc
import io
import random
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import canarymw._compat
from canarymw import ASGICanaryMiddleware, Rollout, WSGICanaryMiddleware

KEY = "bench-secret-key-0123456789abcdef"
OTHER = "session=eyJ1c2VyIjoiYWxpY2UifQ.ZmFrZQ.c2lnbmF0dXJl; theme=dark; _ga=GA1.2.12345.67890"
FORGED = "; ".join(f"canarymw=1.{'A' * 22}.{i:x}.forged-signature-value" for i in range(570))


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello"]


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"hello"})


def valid_cookie(rollout: Rollout) -> str:
    set_cookie = rollout.decide(None).set_cookie
    assert set_cookie is not None
    return set_cookie.split(";", 1)[0]


def wsgi_call(mw: Any, cookie: Callable[[int], str]) -> Callable[[int], None]:
    base = {"REQUEST_METHOD": "GET", "PATH_INFO": "/", "QUERY_STRING": "", "wsgi.url_scheme": "http"}
    base["wsgi.input"] = io.BytesIO()

    def start_response(status: str, headers: Any, exc_info: Any = None) -> Any:
        return None

    def call(i: int) -> None:
        environ = dict(base)
        environ["HTTP_COOKIE"] = cookie(i)
        result = mw(environ, start_response)
        for _ in result:
            pass
        result.close()

    return call


def asgi_call(mw: Any, headers: Callable[[int], list[tuple[bytes, bytes]]]) -> Callable[[int], None]:
    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Any) -> None:
        return None

    base = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "scheme": "http",
        "query_string": b"",
        "root_path": "",
    }

    def call(i: int) -> None:
        coro = mw({**base, "headers": headers(i)}, receive, send)
        try:
            coro.send(None)
        except StopIteration:
            return
        raise RuntimeError("the request suspended")

    return call


def same(value: Any) -> Callable[[int], Any]:
    return lambda i: value


def contenders() -> dict[str, Callable[[int], None]]:
    out: dict[str, Callable[[int], None]] = {}
    for keys in (1, 3):
        rollout = Rollout("hostile", percent=50, secret_key=[f"{KEY}{k}" for k in range(keys)])
        valid = valid_cookie(rollout)
        stuffed = f"{FORGED}; {valid}"
        mw = WSGICanaryMiddleware(wsgi_app, new=wsgi_app, rollout=rollout)
        amw = ASGICanaryMiddleware(asgi_app, new=asgi_app, rollout=rollout)
        out[f"wsgi stuffed, {keys} key(s)"] = wsgi_call(mw, same(stuffed))
        out[f"asgi stuffed, {keys} key(s)"] = asgi_call(amw, same([(b"cookie", stuffed.encode())]))
        if keys > 1:
            continue
        normal = f"{OTHER}; {valid}"
        out["wsgi returning"] = wsgi_call(mw, same(normal))
        out["asgi returning"] = asgi_call(amw, same([(b"cookie", normal.encode())]))
        out["wsgi junk neighbour"] = wsgi_call(mw, lambda i, v=valid: f"junk{i}={'x' * 7000}; {v}")
        many = [(b"cookie", f"c{n}=value-{n:08d}".encode()) for n in range(16_000)]
        out["asgi 16,000 cookie headers"] = asgi_call(amw, same([*many, (b"cookie", valid.encode())]))
    return out


def measure(rounds: int = 30, per_round: int = 40) -> dict[str, list[float]]:
    calls = contenders()
    samples: dict[str, list[float]] = {name: [] for name in calls}
    counter = 0
    for _ in range(rounds):
        names = list(calls)
        random.shuffle(names)
        for name in names:
            fn = calls[name]
            started = time.perf_counter()
            for _ in range(per_round):
                fn(counter)
                counter += 1
            samples[name].append((time.perf_counter() - started) / per_round)
    return samples


def held_after_junk_flood(requests: int = 20_000) -> int:
    rollout = Rollout("hostile-memory", percent=50, secret_key=KEY)
    mw = WSGICanaryMiddleware(wsgi_app, new=wsgi_app, rollout=rollout)
    valid = valid_cookie(rollout)
    call = wsgi_call(mw, lambda i: f"j{i}={'x' * 3000}; {valid}")
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(requests):
        call(i)
    gc.collect()
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    return held


def main() -> None:
    print(f"canarymw hostile-input costs; build: {canarymw._compat.BUILD}")
    samples = measure()
    medians = {name: statistics.median(values) for name, values in samples.items()}
    for name, value in sorted(medians.items()):
        base = medians[f"{name.split(' ', 1)[0]} returning"]
        print(f"{name:40s} {value * 1e6:10.1f} us  {value / base:8.1f}x returning")
    held = held_after_junk_flood()
    print(f"memory held after 20,000 junk-neighbour requests (3 KB junk): {held / 2**20:.1f} MiB")
    if "--both" in sys.argv[1:]:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from loadgen import run_both  # type: ignore[import-not-found]  # bench/, next to this file

        run_both(__file__)


if __name__ == "__main__":
    main()
