"""WSGI overhead of canarymw on a Flask hello app, measured in one process, interleaved.

    python bench/bench_wsgi.py                 # in-process, microseconds per request
    python bench/bench_wsgi.py --gunicorn      # requests/second under gunicorn (needs wrk)

In-process, every contender serves the same Flask "hello" request. Each round runs
every contender once, in a new random order, so drift (CPU frequency, other load)
and position effects hit all of them alike. A contender's added cost is the median
over rounds of (its time - bare's time in the same round); the median time per
request over rounds is shown beside it. Contenders:

- bare: the Flask app alone;
- canarymw returning: a visitor with a valid cohort cookie (the common case);
- canarymw first visit: no cookie (new id, signing, Set-Cookie);
- the same two with the pure-Python response path (what runs where the optional C
  extension canarymw._speedups could not be built);
- naive: what many teams write by hand: parse the Cookie header with SimpleCookie,
  verify an itsdangerous URLSafeSerializer value on every request, route by hash.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from flask import Flask
from itsdangerous import BadData, URLSafeSerializer
from loadgen import Run, paired_added, wrk  # type: ignore[import-not-found]  # bench/, next to this file
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

    import canarymw.wsgi

    compiled, python = canarymw.wsgi._respond, canarymw.wsgi._respond_py
    if compiled is python:
        print("note: canarymw._speedups is not built; both canarymw rows use the Python path")
    # name -> (response path, request): the path is chosen before each timed round.
    contenders: dict[str, tuple[Any, Callable[[], None]]] = {
        "bare": (compiled, lambda: _serve(blue.wsgi_app, back_env)),
        "canarymw returning": (compiled, lambda: _serve(wrapped, back_env)),
        "canarymw first visit": (compiled, lambda: _serve(wrapped, first_env)),
        "canarymw returning (Python path)": (python, lambda: _serve(wrapped, back_env)),
        "canarymw first visit (Python path)": (python, lambda: _serve(wrapped, first_env)),
        "naive SimpleCookie+itsdangerous": (compiled, lambda: _serve(naive, naive_env)),
    }
    try:
        from growthbook import GrowthBook  # type: ignore[import-not-found, unused-ignore]

        features = {"hello-v2": {"defaultValue": False, "rules": [{"force": True, "coverage": 0.1}]}}

        def growthbook() -> None:
            gb = GrowthBook(attributes={"id": "a1b2c3d4e5f6"}, features=features)
            app = green.wsgi_app if gb.is_on("hello-v2") else blue.wsgi_app
            _serve(app, naive_env)

        contenders["GrowthBook SDK per request"] = (compiled, growthbook)
    except ImportError:
        pass

    for path, fn in contenders.values():  # warm caches and code paths
        canarymw.wsgi._respond = path
        for _ in range(200):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            path, fn = contenders[name]
            canarymw.wsgi._respond = path
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            samples[name].append((time.perf_counter() - t0) / per_round * 1e6)
    canarymw.wsgi._respond = compiled
    bare = statistics.median(samples["bare"])
    added = paired_added(samples)
    naive_over = added["naive SimpleCookie+itsdangerous"]
    print(f"in-process, {rounds} rounds (random order) x {per_round} requests; medians over rounds")
    print(f"{'contender':36} {'us/req':>8} {'added us':>9} {'% of bare':>9} {'naive/this':>10}")
    for name, v in samples.items():
        ratio = f"{naive_over / added[name]:10.1f}" if name.startswith("canarymw") and added[name] > 0 else ""
        us, pct = statistics.median(v), 100 * added[name] / bare
        print(f"{name:36} {us:8.2f} {added[name]:9.2f} {pct:8.1f}% {ratio}")


def under_gunicorn(rounds: int, seconds: int) -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk); it generates the load.")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from servers import free_port, serve  # type: ignore[import-not-found]

    rollout = Rollout("hello-v2", percent=10, secret_key=KEY)
    cookie = (rollout.decide(None).set_cookie or "").split(";")[0]
    env = {"BENCH_KEY": KEY, "PYTHONPATH": str(Path(__file__).resolve().parent)}

    runs: dict[str, list[Run]] = {"bare": [], "wrapped": []}
    order = list(runs)
    with contextlib.ExitStack() as stack:
        # Both servers run all along (idle while the other is loaded): a fresh pair of
        # processes per round would add the noise of where the OS places them.
        bases, ports = {}, {}
        for mode in order:
            port = ports[mode] = free_port()
            argv = ["gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "--log-level", "warning"]
            bases[mode] = stack.enter_context(
                serve([*argv, f"wsgi_apps:{mode}"], port, env={**os.environ, **env})
            )
            wrk(bases[mode] + "/", 1, cookie, port)  # warm-up
        for _ in range(rounds):
            random.shuffle(order)
            for mode in order:
                runs[mode].append(wrk(bases[mode] + "/", seconds, cookie, ports[mode]))
    bare, wrapped = runs["bare"], runs["wrapped"]
    ratios = [w.rps / b.rps for w, b in zip(wrapped, bare, strict=True)]
    cpu_b = statistics.median(r.cpu_per_request for r in bare)
    cpu_w = statistics.median(r.cpu_per_request for r in wrapped)
    print(f"gunicorn -w 2 (sync), wrk -t2 -c32, {rounds} rounds (random order) x {seconds}s, median")
    rps_b, rps_w = statistics.median(r.rps for r in bare), statistics.median(r.rps for r in wrapped)
    print(f"bare {rps_b:,.0f} req/s   wrapped {rps_w:,.0f} req/s")
    each = " ".join(f"{r:.3f}" for r in ratios)
    print(f"ratio (median of per-round wrapped/bare) {statistics.median(ratios):.3f}   [{each}]")
    print(f"server CPU per request: bare {cpu_b * 1e6:.1f} us, wrapped {cpu_w * 1e6:.1f} us", end="")
    print(f", ratio bare/wrapped {cpu_b / cpu_w:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=500)
    parser.add_argument("--gunicorn", action="store_true", help="measure requests/second under gunicorn")
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--server-rounds", type=int, default=10, help="rounds under gunicorn")
    args = parser.parse_args()
    if args.gunicorn:
        under_gunicorn(args.server_rounds, args.seconds)
    else:
        in_process(args.rounds, args.per_round)


if __name__ == "__main__":
    main()
