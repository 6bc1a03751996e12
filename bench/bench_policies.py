"""What a ramp policy and login continuity cost per request, in one process, interleaved.

    python bench/bench_policies.py             # microseconds per request, this build
    python bench/bench_policies.py --both      # and again with the Python sources

Every contender serves the same WSGI "hello" request through WSGICanaryMiddleware. Each
round runs every contender once, in a new random order; a contender's added cost is the
median over rounds of (its time - bare's time in the same round). Contenders:

- bare: the app alone;
- monotone / drain / pin returning: a visitor whose cookie is current (for drain and pin
  a format-2 cookie carrying the record): the cached path, one dict lookup;
- monotone / pin first visit: no cookie (pin signs the record into the new cookie, where
  monotone takes a value signed ahead in a batch);
- key= user returning: a logged-in user (``key=`` reads a header) with a cookie that
  agrees with what the process knows: the login-continuity path;
- naive per-request lookup: what keeping users' assignments "by hand" costs, a dict of
  user -> variant consulted and a signed cookie verified with itsdangerous per request.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from itsdangerous import URLSafeSerializer
from loadgen import paired_added, run_both  # type: ignore[import-not-found]  # bench/, next to this file

from canarymw import Rollout, WSGICanaryMiddleware

KEY = "bench-secret-key-0123456789abcdef"
OTHER = "session=eyJ1c2VyIjoiYWxpY2UifQ.ZmFrZQ.c2lnbmF0dXJl; theme=dark"


def hello(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", "5")])
    return [b"hello"]


def environ(cookie: str | None = None, user: str | None = None) -> dict[str, Any]:
    env: dict[str, Any] = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/",
        "QUERY_STRING": "",
        "wsgi.url_scheme": "http",
    }
    if cookie:
        env["HTTP_COOKIE"] = cookie
    if user:
        env["HTTP_X_USER"] = user
    return env


def _start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Callable[[bytes], None]:
    return lambda data: None


def serve(app: Any, env: dict[str, Any]) -> None:
    result = app(dict(env), _start)
    for _ in result:
        pass
    close = getattr(result, "close", None)
    if close is not None:
        close()


def returning_cookie(rollout: Rollout, app: Any, user: str | None = None) -> str:
    """A cookie the rollout gave an ``old`` visitor, after it settled (no Set-Cookie)."""
    while True:
        d = rollout.decide(None, request=environ())
        cookie = f"{OTHER}; {(d.set_cookie or '').split(';')[0]}"
        if d.variant != "old":
            continue
        for _ in range(3):  # let a record or a user's assignment settle into the cookie
            again = rollout.decide(cookie, request=environ(cookie, user))
            if again.set_cookie is None:
                return cookie
            cookie = f"{OTHER}; {again.set_cookie.split(';')[0]}"


def by_header(env: dict[str, Any]) -> str | None:
    value = env.get("HTTP_X_USER")
    return None if value is None else str(value)


class NaiveUsers:
    """Users' assignments by hand: verify a signed cookie, look the user up, route."""

    def __init__(self) -> None:
        self.signer = URLSafeSerializer(KEY, salt="naive-users")
        self.users: dict[str, str] = {}

    def __call__(self, env: dict[str, Any], start_response: Any) -> Any:
        raw = env.get("HTTP_COOKIE", "")
        value = raw.rpartition("naive=")[2]
        try:
            self.signer.loads(value)
        except Exception:
            pass
        self.users.setdefault(env.get("HTTP_X_USER", ""), "old")
        return hello(env, start_response)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--per-round", type=int, default=2000)
    parser.add_argument("--both", action="store_true", help="again with the Python sources")
    args = parser.parse_args()
    import canarymw._compat

    print(f"canarymw build: {canarymw._compat.BUILD}")
    contenders: dict[str, Callable[[], None]] = {"bare": lambda: serve(hello, environ(f"{OTHER}; x=1"))}
    for policy in ("monotone", "drain", "pin"):
        rollout = Rollout("bench", percent=10, secret_key=KEY, policy=policy)  # type: ignore[arg-type]
        app = WSGICanaryMiddleware(hello, new=hello, rollout=rollout)
        env = environ(returning_cookie(rollout, app))
        contenders[f"{policy} returning"] = lambda app=app, env=env: serve(app, env)
        if policy != "drain":
            first = environ(OTHER)
            contenders[f"{policy} first visit"] = lambda app=app, env=first: serve(app, env)
    keyed = Rollout("bench-key", percent=10, secret_key=KEY, key=by_header)
    keyed_app = WSGICanaryMiddleware(hello, new=hello, rollout=keyed)
    user_env = environ(returning_cookie(keyed, keyed_app, "alice"), "alice")
    contenders["key= user returning"] = lambda: serve(keyed_app, user_env)
    naive = NaiveUsers()
    naive_env = environ(f"{OTHER}; naive={naive.signer.dumps('a1b2c3')}", "alice")
    contenders["naive per-request lookup"] = lambda: serve(naive, naive_env)

    for fn in contenders.values():
        for _ in range(300):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    order = list(contenders)
    shuffle = random.Random(0).shuffle
    for _ in range(args.rounds):
        shuffle(order)
        for name in order:
            fn = contenders[name]
            t0 = time.perf_counter()
            for _ in range(args.per_round):
                fn()
            samples[name].append((time.perf_counter() - t0) / args.per_round * 1e6)
    added = paired_added(samples)
    naive_over = added["naive per-request lookup"]
    print(f"in-process, {args.rounds} rounds (random order) x {args.per_round} requests; medians over rounds")
    print(f"{'contender':28} {'us/req':>8} {'added us':>9} {'naive/this':>10}")
    for name, v in samples.items():
        ratio = f"{naive_over / added[name]:10.1f}" if name != "bare" and added[name] > 0 else ""
        print(f"{name:28} {statistics.median(v):8.2f} {added[name]:9.2f} {ratio}")
    if args.both:
        run_both(__file__)


if __name__ == "__main__":
    main()
