"""Instructions per request (valgrind callgrind): a load-independent view of the overhead.

    python bench/bench_instructions.py          # needs valgrind (Debian: apt-get install valgrind)
    python bench/bench_instructions.py wsgi     # or asgi: one adapter only
    python bench/bench_instructions.py --compare /other/checkout/.venv/bin/python
    python bench/bench_instructions.py --server uvicorn    # or gunicorn: a real server's worker

Wall-clock figures on a shared two-core machine move with whatever else runs; counted
instructions do not. In process, each contender serves the same Flask (WSGI) or
Starlette (ASGI) hello request N and N + 5000 times under callgrind, with the requests
of bench_wsgi.py and bench_asgi.py; the difference divided by 5000 is the cost of one
request, start-up excluded. Every contender runs in a process of its own, so the rows
without a suffix measure the build this interpreter picks (``canarymw._compat.BUILD``,
printed first: compiled by mypyc where it was built), the ``-py`` rows the Python
sources (``CANARYMW_NO_EXTENSIONS=1``), and with ``--compare PYTHON`` the ``@other``
rows the canarymw that another interpreter imports (another checkout's venv, say the
one from before ac4eb6c with the hand-written C twin), on the same workload.

``--server uvicorn`` runs ``uvicorn`` (one worker, uvloop and httptools; with a
``bare-headers`` row, the bare app sending the ``Vary`` and ``Cache-Control`` headers
canarymw adds, to tell the server's work on them from the adapter's) and
``--server gunicorn`` runs ``gunicorn -w 1`` (sync worker) under callgrind, serving the
apps of bench_asgi.py and bench/wsgi_apps.py; a client in this process sends exactly
W + N and then W + N + K requests (32 keep-alive connections for uvicorn, 2 for
gunicorn's one-request-per-connection worker; every 10th request a new visitor's, the
others a returning visitor's), each count to a server of its own, and the difference of
the worker process's instructions divided by K is the cost of one request, server
included: parsing, the event loop or the accept loop, writing the answer.

Instructions are not time (a cache miss costs more than an add), so docs/benchmarks.md
reports both.
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from loadgen import build_of, free_port, serve  # type: ignore[import-not-found]

HERE = Path(__file__).resolve().parent
KEY = "bench-secret-key-0123456789abcdef"
CONTENDERS = ("bare", "returning", "first-visit", "returning-py", "first-visit-py", "naive")
ASGI_CONTENDERS = (*CONTENDERS[:3], "returning-no-sink", *CONTENDERS[3:])
# *-py: the same request with the Python sources (CANARYMW_NO_EXTENSIONS=1).
OTHER = ("returning@other", "first-visit@other")  # with --compare PYTHON
CALLGRIND = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]


def _asgi_workload(name: str, n: int) -> None:
    import asyncio

    from bench_asgi import OTHER_COOKIES, _scope, _serve, make_app, naive_cookie, returning_cookie

    kind = {"returning": "canarymw", "first-visit": "canarymw", "returning-no-sink": "canarymw-nosink"}
    scope = _scope(f"{OTHER_COOKIES}; {returning_cookie()}")
    if name == "first-visit":
        scope = _scope(OTHER_COOKIES)
    elif name == "naive":
        scope = _scope(f"{OTHER_COOKIES}; {naive_cookie()}")
    asyncio.run(_serve(make_app(kind.get(name, name)), scope, n))


def _workload(name: str, n: int) -> None:
    from bench_wsgi import OTHER_COOKIES, NaiveCanary, _serve, hello
    from itsdangerous import URLSafeSerializer
    from werkzeug.test import EnvironBuilder

    from canarymw import MemorySink, Rollout, WSGICanaryMiddleware

    blue, green = hello("Blue"), hello("Green")
    rollout = Rollout("hello-v2", percent=10, secret_key=KEY)
    app: Any = WSGICanaryMiddleware(blue.wsgi_app, new=green.wsgi_app, rollout=rollout, sink=MemorySink())
    cookie = (rollout.decide(None).set_cookie or "").split(";")[0]
    while rollout.decide(cookie).variant != "old":
        cookie = (rollout.decide(None).set_cookie or "").split(";")[0]
    headers = {"Cookie": f"{OTHER_COOKIES}; {cookie}"}
    if name == "bare":
        app = blue.wsgi_app
    elif name == "first-visit":
        headers = {"Cookie": OTHER_COOKIES}
    elif name == "naive":
        app = NaiveCanary(blue.wsgi_app, green.wsgi_app, 10)
        token = URLSafeSerializer(KEY, salt="naive-canary").dumps("a1b2c3d4e5f6")
        headers = {"Cookie": f"{OTHER_COOKIES}; canary={token}"}
    environ = EnvironBuilder(path="/", headers=headers).get_environ()
    for _ in range(n):
        _serve(app, environ)


def _collected(stderr: str) -> dict[int, int]:
    """valgrind's "Collected" line of each process, by pid."""
    return {int(p): int(n) for p, n in re.findall(r"==(\d+)== Collected : (\d+)", stderr)}


def _count(adapter: str, name: str, n: int, other: str | None) -> int:
    env = dict(os.environ)
    python = sys.executable
    if name.endswith("-py"):
        env["CANARYMW_NO_EXTENSIONS"] = "1"
    elif name.endswith("@other"):
        assert other is not None
        python = other
    base = name.removesuffix("-py").removesuffix("@other")
    out = subprocess.run(
        [*CALLGRIND, python, __file__, "--workload", adapter, base, str(n)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stderr
    counts = _collected(out)
    if len(counts) != 1:
        raise RuntimeError(out[-2000:])
    return next(iter(counts.values()))


def _table(adapter: str, contenders: tuple[str, ...], what: str, other: str | None) -> None:
    per = {
        name: (_count(adapter, name, 5500, other) - _count(adapter, name, 500, other)) / 5000
        for name in contenders
    }
    bare = per["bare"]
    naive = per["naive"] - bare
    print(f"instructions per {what} hello request (callgrind, 5000 requests after 500 warm-up)")
    print(f"{'contender':22} {'instr/req':>10} {'added':>8} {'% of bare':>9} {'naive/this':>10}")
    for name, count in per.items():
        added = count - bare
        ratio = f"{naive / added:10.1f}" if name not in ("bare", "naive") else ""
        print(f"{name:22} {count:10.0f} {added:8.0f} {100 * added / bare:8.1f}% {ratio}")


# --server: a real server's worker under callgrind, driven by an exact number of requests.


def _drive(port: int, n: int, connections: int, returning: str, new: str) -> None:
    """Send ``n`` GET / requests over ``connections`` connections (kept alive where the
    server allows it); request i is a new visitor's when i % 10 == 0."""
    errors: list[BaseException] = []

    def worker(first: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
        try:
            for i in range(first, n, connections):
                conn.request("GET", "/", headers={"Cookie": new if i % 10 == 0 else returning})
                response = conn.getresponse()
                response.read()
                if response.status != 200:
                    raise RuntimeError(f"status {response.status}")
        except BaseException as exc:  # reported by the caller
            errors.append(exc)
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(c,)) for c in range(connections)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _server_argv(server: str, kind: str, port: int) -> tuple[list[str], dict[str, str]]:
    env = {"PYTHONPATH": str(HERE), "PYTHONHASHSEED": "0", "BENCH_KEY": KEY}
    if server == "uvicorn":
        env["BENCH_APP"] = kind
        argv = ["uvicorn", "--factory", "bench_asgi:make_app", "--host", "127.0.0.1", "--port", str(port)]
        argv += ["--loop", "uvloop", "--http", "httptools", "--log-level", "warning", "--no-access-log"]
        return argv, env
    app = "bare" if kind == "bare" else "wrapped"
    argv = ["gunicorn", "-w", "1", "-b", f"127.0.0.1:{port}", "--timeout", "600", "--log-level", "warning"]
    return [*argv, f"wsgi_apps:{app}"], env


def _server_count(server: str, kind: str, python: str, requests: int, connections: int) -> int:
    from bench_asgi import OTHER_COOKIES, returning_cookie

    returning = f"{OTHER_COOKIES}; {returning_cookie()}"
    port = free_port()
    argv, env = _server_argv(server, kind, port)
    if kind == "canarymw-py":
        env["CANARYMW_NO_EXTENSIONS"] = "1"
    with serve(argv, port, env=env, python=python, prefix=CALLGRIND, timeout=300, stop_timeout=300) as proc:
        _drive(port, requests, connections, returning, OTHER_COOKIES)
    counts = _collected(proc.stderr_text())
    workers = {pid: n for pid, n in counts.items() if pid != proc.pid} if server == "gunicorn" else counts
    if len(workers) != 1:
        raise RuntimeError(f"expected one worker's count, got {counts}:\n{proc.stderr_text()[-2000:]}")
    return next(iter(workers.values()))


def server_table(server: str, other: str | None, warm: int, extra: int) -> None:
    connections = 32 if server == "uvicorn" else 2
    kinds = [("bare", sys.executable), ("canarymw", sys.executable), ("canarymw-py", sys.executable)]
    if server == "uvicorn":  # the server's own work on the two headers canarymw adds
        kinds.insert(1, ("bare-headers", sys.executable))
    if other:
        kinds.append(("canarymw@other", other))
    per: dict[str, float] = {}
    for label, python in kinds:
        kind = label.removesuffix("@other")
        counts = [_server_count(server, kind, python, n, connections) for n in (warm, warm + extra)]
        per[label] = (counts[1] - counts[0]) / extra
        print(f"  {label}: {counts[0]:,} and {counts[1]:,} instructions", flush=True)
    how = "1 worker, uvloop + httptools" if server == "uvicorn" else "-w 1, sync worker"
    print(f"instructions per request of the {server} worker ({how}; {connections} connections;")
    print(
        f"every 10th request a new visitor's; {warm} + {extra} requests against {warm}, difference / {extra})"
    )
    bare = per["bare"]
    print(f"{'contender':16} {'instr/req':>10} {'added':>8} {'% of bare':>9} {'bare/this':>9}")
    for name, count in per.items():
        added = count - bare
        print(f"{name:16} {count:10.0f} {added:8.0f} {100 * added / bare:8.1f}% {bare / count:9.3f}")


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--workload":
        sys.path.insert(0, str(HERE))
        (_asgi_workload if sys.argv[2] == "asgi" else _workload)(sys.argv[3], int(sys.argv[4]))
        return
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("adapters", nargs="*", metavar="wsgi|asgi", help="default: both")
    parser.add_argument("--compare", metavar="PYTHON", help="add rows for the canarymw PYTHON imports")
    parser.add_argument("--server", choices=["uvicorn", "gunicorn"], help="count a real server's worker")
    parser.add_argument("--warm", type=int, default=500, help="with --server: the first count's requests")
    parser.add_argument("--extra", type=int, default=4000, help="with --server: the requests added")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind).")
    print(f"this interpreter: canarymw {build_of()}")
    print(f"  -py rows: canarymw {build_of(env={'CANARYMW_NO_EXTENSIONS': '1'})}")
    if args.compare:
        print(f"  @other rows: {args.compare}: canarymw {build_of(args.compare)}")
    if args.server:
        server_table(args.server, args.compare, args.warm, args.extra)
        return
    adapters = args.adapters or ["wsgi", "asgi"]
    if not set(adapters) <= {"wsgi", "asgi"}:
        parser.error("adapters: wsgi, asgi or both")
    extra = OTHER if args.compare else ()
    if "wsgi" in adapters:
        _table("wsgi", (*CONTENDERS, *extra), "Flask", args.compare)
    if "asgi" in adapters:
        _table("asgi", (*ASGI_CONTENDERS, *extra), "Starlette", args.compare)


if __name__ == "__main__":
    main()
