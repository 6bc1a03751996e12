"""Hostile input against the upstream proxy: the force token never reaches an upstream, and
repeated header fields are joined once, through both adapters and a real gunicorn upstream.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest

from canarymw import Rollout, Upstream

from ..attacks import KEY, TOKEN, Kit, Request, seeing_app, serve_all
from ..harness import ASGIKit, http_scope
from ..servers import free_port, serve


@pytest.fixture(scope="module")
def echo_upstream() -> Iterator[str]:
    """A gunicorn upstream that answers JSON describing the request it received."""
    port = free_port()
    argv = ["gunicorn", "-k", "gthread", "--threads", "4", "-w", "1", "-b", f"127.0.0.1:{port}"]
    with serve(
        [*argv, "--log-level", "warning", "tests.apps.upstream_wsgi:app"], port, ready_path="/healthz"
    ) as base:
        yield base


# -- 4. the force token never travels ---------------------------------------------------
def test_the_force_token_never_reaches_an_upstream(kit: Kit, echo_upstream: str) -> None:
    rollout = Rollout("hostile", percent=0, secret_key=KEY, force_token=TOKEN, force_query=True)
    upstream = Upstream(echo_upstream)
    app = kit.raw_wrap(upstream, seeing_app(kit, []), rollout)
    requests = [
        Request(path="/echo", query="a=1", headers=[("x-canarymw-force", f"old:{TOKEN}")]),
        Request(path="/echo", query=f"canarymw_force=old:{TOKEN}&b=2"),
    ]
    served = serve_all(kit, app, requests, upstream=upstream)
    for one in served:
        assert one.status == 200, one
        echoed = json.loads(one.body)
        assert "x-canarymw-force" not in echoed["headers"] and TOKEN not in one.body.decode()
    assert [json.loads(one.body)["query"] for one in served] == ["a=1", "b=2"]
    assert rollout.counters["forced"] == 2


# -- 7. many separate cookie headers (ASGI) ---------------------------------------------
def test_the_asgi_proxy_joins_thousands_of_cookie_headers_once(echo_upstream: str) -> None:
    rollout = Rollout("hostile", percent=100, secret_key=KEY)
    upstream = Upstream(echo_upstream)
    kit = ASGIKit()
    app = kit.raw_wrap(seeing_app(kit, []), upstream, rollout)
    headers = [("cookie", f"c{i}=v{i}") for i in range(600)]  # gunicorn takes 8 KB a field
    [served] = serve_all(kit, app, [Request(path="/echo", headers=headers)], upstream=upstream)
    assert served.status == 200
    sent = json.loads(served.body)["headers"]["cookie"]
    assert sent.startswith("c0=v0; c1=v1; ") and sent.count("; ") == 599


def test_the_asgi_proxy_header_rules_are_linear() -> None:
    """A complexity check, as for the adapter: repeated Cookie, Via, X-Forwarded-For and
    Connection fields are joined once."""
    proxy = Upstream("http://127.0.0.1:9").asgi_app()

    def cost(count: int) -> float:
        names = [b"cookie", b"via", b"x-forwarded-for", b"connection"]
        scope = http_scope("/", headers=[(names[i % 4], b"value-%08d" % i) for i in range(count)])
        best = float("inf")
        for _ in range(5):
            started = time.process_time()
            proxy._headers(scope)  # type: ignore[attr-defined]
            best = min(best, time.process_time() - started)
        return best

    small, large = cost(2_000), cost(32_000)
    assert large < 64 * small, f"2,000 headers: {small * 1e3:.2f} ms; 32,000: {large * 1e3:.2f} ms"
