"""Instructions per request (valgrind callgrind): a load-independent view of the overhead.

    python bench/bench_instructions.py          # needs valgrind (Debian: apt-get install valgrind)
    python bench/bench_instructions.py wsgi     # or asgi: one adapter only

Wall-clock figures on a shared two-core machine move with whatever else runs; counted
instructions do not. Each contender serves the same Flask (WSGI) or Starlette (ASGI)
hello request N and N + 5000 times under callgrind, with the requests of
bench_wsgi.py and bench_asgi.py; the difference divided by 5000 is the cost of one
request, start-up excluded. Instructions are not time (a cache miss costs more than an add), so
docs/benchmarks.md reports both.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

KEY = "bench-secret-key-0123456789abcdef"
CONTENDERS = ("bare", "returning", "first-visit", "returning-py", "first-visit-py", "naive")
ASGI_CONTENDERS = (*CONTENDERS[:3], "returning-no-sink", *CONTENDERS[3:])
# *-py: the same request with the pure-Python path (CANARYMW_NO_EXTENSIONS=1).


def _asgi_workload(name: str, n: int) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
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
    sys.path.insert(0, str(Path(__file__).resolve().parent))
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


def _count(adapter: str, name: str, n: int) -> int:
    tool = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    env = dict(os.environ)
    if name.endswith("-py"):
        env["CANARYMW_NO_EXTENSIONS"] = "1"
    out = subprocess.run(
        [*tool, sys.executable, __file__, adapter, name.removesuffix("-py"), str(n)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stderr
    match = re.search(r"Collected : (\d+)", out)
    if match is None:
        raise RuntimeError(out[-2000:])
    return int(match.group(1))


def _table(adapter: str, contenders: tuple[str, ...], what: str) -> None:
    per = {name: (_count(adapter, name, 5500) - _count(adapter, name, 500)) / 5000 for name in contenders}
    bare = per["bare"]
    naive = per["naive"] - bare
    print(f"instructions per {what} hello request (callgrind, 5000 requests after 500 warm-up)")
    print(f"{'contender':18} {'instr/req':>10} {'added':>8} {'% of bare':>9} {'naive/this':>10}")
    for name, count in per.items():
        added = count - bare
        ratio = f"{naive / added:10.1f}" if name not in ("bare", "naive") else ""
        print(f"{name:18} {count:10.0f} {added:8.0f} {100 * added / bare:8.1f}% {ratio}")


def main() -> None:
    if len(sys.argv) == 4:
        (_asgi_workload if sys.argv[1] == "asgi" else _workload)(sys.argv[2], int(sys.argv[3]))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind).")
    adapters = sys.argv[1:] or ["wsgi", "asgi"]
    if "wsgi" in adapters:
        _table("wsgi", CONTENDERS, "Flask")
    if "asgi" in adapters:
        _table("asgi", ASGI_CONTENDERS, "Starlette")


if __name__ == "__main__":
    main()
