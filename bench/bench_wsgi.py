"""WSGI overhead of canarymw on a Flask hello app, measured in one process, interleaved.

    python bench/bench_wsgi.py                 # in-process, microseconds per request
    python bench/bench_wsgi.py --both          # and again with the Python sources
    python bench/bench_wsgi.py --gunicorn      # requests/second under gunicorn (needs wrk)

In-process, every contender serves the same Flask "hello" request. Each round runs
every contender once, in a new random order, so drift (CPU frequency, other load)
and position effects hit all of them alike. A contender's added cost is the median
over rounds of (its time - bare's time in the same round); the median time per
request over rounds is shown beside it. Contenders:

- bare: the Flask app alone;
- canarymw returning: a visitor with a valid cohort cookie (the common case);
- canarymw first visit: no cookie (new id, signing, Set-Cookie);
- naive: what many teams write by hand: parse the Cookie header with SimpleCookie,
  verify an itsdangerous URLSafeSerializer value on every request, route by hash.

The canarymw rows measure the build this process runs, printed first
(``canarymw._compat.BUILD``: compiled by mypyc where it was built). One process runs one
build, so ``--both`` runs the same measurement again in a subprocess with
``CANARYMW_NO_EXTENSIONS=1`` for the Python sources (what runs where no C compiler was
there at install time); each table has its own bare and naive rows to compare against.

Under gunicorn (``--gunicorn``: ``-w 2`` sync workers, wrk ``-t2 -c32``, every 10th
request a new visitor's unless ``--new-visitors`` says otherwise), the servers run bare,
canarymw as built, canarymw on the Python sources and, with ``--compare PYTHON``,
canarymw as another interpreter imports it (another checkout's venv), all started up
front and loaded in interleaved rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
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
from loadgen import Run, build_of, free_port, paired_added, run_both, serve, wrk  # type: ignore[import-not-found]  # bench/, next to this file
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
    order = list(contenders)
    shuffle = random.Random(0).shuffle
    for _ in range(rounds):
        shuffle(order)
        for name in order:
            fn = contenders[name]
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            samples[name].append((time.perf_counter() - t0) / per_round * 1e6)
    bare = statistics.median(samples["bare"])
    added = paired_added(samples)
    naive_over = added["naive SimpleCookie+itsdangerous"]
    print(f"in-process, {rounds} rounds (random order) x {per_round} requests; medians over rounds")
    print(f"{'contender':36} {'us/req':>8} {'added us':>9} {'% of bare':>9} {'naive/this':>10}")
    for name, v in samples.items():
        ratio = f"{naive_over / added[name]:10.1f}" if name.startswith("canarymw") and added[name] > 0 else ""
        us, pct = statistics.median(v), 100 * added[name] / bare
        print(f"{name:36} {us:8.2f} {added[name]:9.2f} {pct:8.1f}% {ratio}")


def under_gunicorn(rounds: int, seconds: int, new_pct: float, compare: str | None) -> None:
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk); it generates the load.")
    rollout = Rollout("hello-v2", percent=10, secret_key=KEY)
    cookie = (rollout.decide(None).set_cookie or "").split(";")[0]
    while rollout.decide(cookie).variant != "old":
        cookie = (rollout.decide(None).set_cookie or "").split(";")[0]
    returning = f"{OTHER_COOKIES}; {cookie}"
    every = round(100 / new_pct) if new_pct > 0 else 0
    env = {"BENCH_KEY": KEY, "PYTHONPATH": str(Path(__file__).resolve().parent)}
    # contender -> (interpreter, app in wsgi_apps, extra environment)
    servers = {
        "bare": (sys.executable, "bare", {}),
        "canarymw": (sys.executable, "wrapped", {}),
        "canarymw-py": (sys.executable, "wrapped", {"CANARYMW_NO_EXTENSIONS": "1"}),
    }
    if compare:
        servers["canarymw@other"] = (compare, "wrapped", {})

    runs: dict[str, list[Run]] = {name: [] for name in servers}
    order = list(runs)
    with contextlib.ExitStack() as stack:
        # All servers run all along (idle while another is loaded): a fresh set of
        # processes per round would add the noise of where the OS places them.
        bases, ports, groups = {}, {}, {}
        for name, (python, app, extra) in servers.items():
            port = ports[name] = free_port()
            argv = ["gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "--log-level", "warning"]
            server = serve([*argv, f"wsgi_apps:{app}"], port, env={**env, **extra}, python=python)
            groups[name] = stack.enter_context(server).pid
            bases[name] = f"http://127.0.0.1:{port}/"
            wrk(bases[name], 1, returning, port, group=groups[name])  # warm-up
        shuffle = random.Random(0).shuffle
        for _ in range(rounds):
            shuffle(order)
            for name in order:
                run = wrk(
                    bases[name], seconds, returning, ports[name],
                    new_cookie=OTHER_COOKIES, new_every=every, group=groups[name],
                )  # fmt: skip
                runs[name].append(run)
    mix = f"every {every}th request a new visitor's" if every else "returning visitors only"
    print(f"gunicorn -w 2 (sync), wrk -t2 -c32 ({mix}), {rounds} rounds (random order) x {seconds}s")
    print("req/s: median; ratio: median over rounds of req/s / bare's req/s in the same round, then each")
    print("round's; cpu: server CPU per request, median, and the median of its per-round difference")
    print("to bare's; cpu ratio: bare's cpu/request / this one's")
    report(runs)


def report(runs: dict[str, list[Run]]) -> None:
    """The server table of bench_wsgi.py and bench_asgi.py (bare first)."""
    bare_cpu = statistics.median(r.cpu_per_request for r in runs["bare"])
    for name, name_runs in runs.items():
        ratios = [r.rps / b.rps for r, b in zip(name_runs, runs["bare"], strict=True)]
        each = " ".join(f"{x:.3f}" for x in ratios)
        rps, ratio = statistics.median(r.rps for r in name_runs), statistics.median(ratios)
        cpu = statistics.median(r.cpu_per_request for r in name_runs)
        added = statistics.median(
            r.cpu_per_request - b.cpu_per_request for r, b in zip(name_runs, runs["bare"], strict=True)
        )
        print(
            f"{name:15} {rps:8,.0f} req/s {ratio:.3f}x [{each}]  cpu {cpu * 1e6:6.1f} us"
            f" (+{added * 1e6:.1f} us paired) {bare_cpu / cpu:.3f}x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=100)
    parser.add_argument("--per-round", type=int, default=500)
    parser.add_argument("--gunicorn", action="store_true", help="measure requests/second under gunicorn")
    parser.add_argument("--seconds", type=int, default=3)
    parser.add_argument("--server-rounds", type=int, default=10, help="rounds under gunicorn")
    parser.add_argument("--new-visitors", type=float, default=10, help="under gunicorn: %% of requests")
    parser.add_argument(
        "--compare", metavar="PYTHON", help="under gunicorn: add canarymw as PYTHON imports it"
    )
    parser.add_argument("--both", action="store_true", help="in process: again with the Python sources")
    args = parser.parse_args()
    import canarymw._compat

    print(f"canarymw build: {canarymw._compat.BUILD}")
    if args.gunicorn and args.compare:
        print(f"canarymw@other: {args.compare}: {build_of(args.compare)}")
    if args.gunicorn:
        under_gunicorn(args.server_rounds, args.seconds, args.new_visitors, args.compare)
        return
    in_process(args.rounds, args.per_round)
    if args.both:
        run_both(__file__)


if __name__ == "__main__":
    main()
