"""Instructions per request (valgrind callgrind): a load-independent view of the overhead.

    python bench/bench_instructions.py          # needs valgrind (Debian: apt-get install valgrind)

Wall-clock figures on a shared two-core machine move with whatever else runs; counted
instructions do not. Each contender serves the same Flask hello request N and N + 5000
times under callgrind; the difference divided by 5000 is the cost of one request,
start-up excluded. Instructions are not time (a cache miss costs more than an add), so
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
# *-py: the same request with the pure-Python response path (CANARYMW_NO_EXTENSIONS=1).


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


def _count(name: str, n: int) -> int:
    tool = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    env = dict(os.environ)
    if name.endswith("-py"):
        env["CANARYMW_NO_EXTENSIONS"] = "1"
    out = subprocess.run(
        [*tool, sys.executable, __file__, name.removesuffix("-py"), str(n)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    ).stderr
    match = re.search(r"Collected : (\d+)", out)
    if match is None:
        raise RuntimeError(out[-2000:])
    return int(match.group(1))


def main() -> None:
    if len(sys.argv) == 3:
        _workload(sys.argv[1], int(sys.argv[2]))
        return
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed (Debian: apt-get install valgrind).")
    per = {name: (_count(name, 5500) - _count(name, 500)) / 5000 for name in CONTENDERS}
    bare = per["bare"]
    naive = per["naive"] - bare
    print("instructions per Flask hello request (callgrind, 5000 requests after 500 warm-up)")
    print(f"{'contender':14} {'instr/req':>10} {'added':>8} {'% of bare':>9} {'naive/this':>10}")
    for name, count in per.items():
        added = count - bare
        ratio = f"{naive / added:10.1f}" if name not in ("bare", "naive") else ""
        print(f"{name:14} {count:10.0f} {added:8.0f} {100 * added / bare:8.1f}% {ratio}")


if __name__ == "__main__":
    main()
