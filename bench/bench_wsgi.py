"""WSGI overhead of canarymw on a Flask hello app, measured in one process, interleaved.

    python bench/bench_wsgi.py                 # in-process, microseconds per request
    python bench/bench_wsgi.py --gunicorn      # requests/second under gunicorn (needs wrk)

In-process, every contender serves the same Flask "hello" request; rounds alternate
between contenders so drift (CPU frequency, other load) hits all of them alike, and
the median over rounds is reported. Contenders:

- bare: the Flask app alone;
- canarymw returning: a visitor with a valid cohort cookie (the common case);
- canarymw first visit: no cookie (new id, signing, Set-Cookie);
- naive: what many teams write by hand: parse the Cookie header with SimpleCookie,
  verify an itsdangerous URLSafeSerializer value on every request, route by hash.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from flask import Flask
from itsdangerous import BadData, URLSafeSerializer
from werkzeug.test import EnvironBuilder

from canarymw import MemorySink, Rollout, WSGICanaryMiddleware

KEY = "bench-secret-key-0123456789abcdef"
OTHER_COOKIES = "session=eyJ1c2VyIjoiYWxpY2UifQ.ZmFrZQ.c2lnbmF0dXJl; theme=dark; _ga=GA1.2.12345.67890"


def hello(label: str) -> Flask:
    app = Flask(label)

    @app.route("/")
    def index() -> str:
        return f"Hello, {label} World!"

    return app


class NaiveCanary:
    """The straightforward middleware: SimpleCookie + serializer verify per request."""

    def __init__(self, old: Any, new: Any, percent: float) -> None:
        self.old, self.new, self.percent = old, new, percent
        self.serializer = URLSafeSerializer(KEY, salt="naive-canary")

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        jar: SimpleCookie = SimpleCookie()
        jar.load(environ.get("HTTP_COOKIE", ""))
        uid = None
        if "canary" in jar:
            try:
                uid = self.serializer.loads(jar["canary"].value)
            except BadData:
                uid = None
        h = int.from_bytes(hashlib.sha256(f"naive:{uid}".encode()).digest()[:8], "big") % 10000
        app = self.new if h < self.percent * 100 else self.old
        return app(environ, start_response)  # type: ignore[no-any-return]


def _start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
    return None


def _serve(app: Any, environ: dict[str, Any]) -> None:
    result = app(dict(environ), _start_response)
    for _ in result:
        pass
    close = getattr(result, "close", None)
    if close is not None:
        close()


def in_process(rounds: int, per_round: int) -> None:
    blue, green = hello("Blue"), hello("Green")
    rollout = Rollout("hello-v2", percent=10, secret_key=KEY)
    wrapped = WSGICanaryMiddleware(blue.wsgi_app, new=green.wsgi_app, rollout=rollout, sink=MemorySink())
    naive = NaiveCanary(blue.wsgi_app, green.wsgi_app, 10)

    first_env = EnvironBuilder(path="/", headers={"Cookie": OTHER_COOKIES}).get_environ()
    cookie = (rollout.decide(None).set_cookie or "").split(";")[0]
    # A returning visitor that the rollout puts on "old", so bare and wrapped run the same view.
    while rollout.decide(cookie).variant != "old":
        cookie = (rollout.decide(None).set_cookie or "").split(";")[0]
    back_env = EnvironBuilder(path="/", headers={"Cookie": f"{OTHER_COOKIES}; {cookie}"}).get_environ()
    naive_cookie = URLSafeSerializer(KEY, salt="naive-canary").dumps("a1b2c3d4e5f6")
    naive_env = EnvironBuilder(
        path="/", headers={"Cookie": f"{OTHER_COOKIES}; canary={naive_cookie}"}
    ).get_environ()

    contenders: dict[str, Callable[[], None]] = {
        "bare": lambda: _serve(blue.wsgi_app, back_env),
        "canarymw returning": lambda: _serve(wrapped, back_env),
        "canarymw first visit": lambda: _serve(wrapped, first_env),
        "naive SimpleCookie+itsdangerous": lambda: _serve(naive, naive_env),
    }
    try:
        from growthbook import GrowthBook  # type: ignore[import-not-found, unused-ignore]

        features = {"hello-v2": {"defaultValue": False, "rules": [{"force": True, "coverage": 0.1}]}}

        def growthbook() -> None:
            gb = GrowthBook(attributes={"id": "a1b2c3d4e5f6"}, features=features)
            app = green.wsgi_app if gb.is_on("hello-v2") else blue.wsgi_app
            _serve(app, naive_env)

        contenders["GrowthBook SDK per request"] = growthbook
    except ImportError:
        pass

    for fn in contenders.values():  # warm caches and code paths
        for _ in range(200):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            samples[name].append((time.perf_counter() - t0) / per_round * 1e6)
    print(f"in-process, {rounds} interleaved rounds x {per_round} requests")
    for label, pick in (("median of rounds", statistics.median), ("best round (least disturbed)", min)):
        per = {name: pick(v) for name, v in samples.items()}
        bare = per["bare"]
        naive_over = per["naive SimpleCookie+itsdangerous"] - bare
        print(f"\n{label}")
        print(f"{'contender':34} {'us/req':>8} {'added us':>9} {'% of bare':>9} {'naive/this':>10}")
        for name, us in per.items():
            added = us - bare
            ratio = f"{naive_over / added:10.1f}" if name.startswith("canarymw") and added > 0 else ""
            print(f"{name:34} {us:8.2f} {added:9.2f} {100 * added / bare:8.1f}% {ratio}")


def _wrk(url: str, seconds: int, cookie: str | None) -> float:
    cmd = ["wrk", "-t2", "-c32", f"-d{seconds}s", url]
    if cookie:
        cmd[1:1] = ["-H", f"Cookie: {cookie}"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        if line.startswith("Requests/sec:"):
            return float(line.split()[1])
    raise RuntimeError(out)


def under_gunicorn(rounds: int, seconds: int) -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk); it generates the load.")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from servers import free_port, serve  # type: ignore[import-not-found]

    rollout = Rollout("hello-v2", percent=10, secret_key=KEY)
    cookie = (rollout.decide(None).set_cookie or "").split(";")[0]
    env = {"BENCH_KEY": KEY, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    rps: dict[str, list[float]] = {"bare": [], "wrapped": []}
    for _ in range(rounds):
        for mode in rps:
            port = free_port()
            argv = ["gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "--log-level", "warning"]
            with serve([*argv, f"wsgi_apps:{mode}"], port, env={**os.environ, **env}) as base:
                _wrk(base + "/", 1, cookie)  # warm-up
                rps[mode].append(_wrk(base + "/", seconds, cookie))
    bare, wrapped = statistics.median(rps["bare"]), statistics.median(rps["wrapped"])
    print(f"gunicorn -w 2 (sync), wrk -t2 -c32, {rounds} interleaved rounds x {seconds}s, median")
    print(f"bare {bare:,.0f} req/s   wrapped {wrapped:,.0f} req/s   ratio {wrapped / bare:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--per-round", type=int, default=2000)
    parser.add_argument("--gunicorn", action="store_true", help="measure requests/second under gunicorn")
    parser.add_argument("--seconds", type=int, default=5)
    args = parser.parse_args()
    if args.gunicorn:
        under_gunicorn(max(1, args.rounds // 10), args.seconds)
    else:
        in_process(args.rounds, args.per_round)


if __name__ == "__main__":
    main()
