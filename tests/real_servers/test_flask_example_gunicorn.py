"""examples/flask_app under real gunicorn: every user keeps one colour in every worker."""

from __future__ import annotations

import os
import runpy
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import pytest

from canarymw import Rollout

from ..servers import ROOT, free_port, serve

EXAMPLE = ROOT / "examples" / "flask_app"
KEY = "example-test-key-0123456789abcdef"
COLOUR = {"old": "Blue", "new": "Green"}


class _SharedPool(httpx.BaseTransport):
    """One connection pool for all users; closing a user's client must not close it."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.inner.handle_request(request)

    def close(self) -> None:
        pass


@dataclass
class Seen:
    cookie: str = ""
    bodies: set[str] = field(default_factory=set)
    variants: set[str] = field(default_factory=set)
    pids: set[str] = field(default_factory=set)
    cookies_set: int = 0


@pytest.fixture
def example_url() -> Iterator[str]:
    port = free_port()
    argv = [
        "gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "--chdir", str(EXAMPLE),
        "--log-level", "warning", "app:app",
    ]  # fmt: skip
    with serve(argv, port, env={"CANARY_KEY": KEY}, ready_path="/healthz") as base:
        yield base


@pytest.mark.server
def test_every_user_keeps_one_colour_across_gunicorn_workers(example_url: str) -> None:
    def visit(pool: httpx.BaseTransport) -> Seen:
        seen = Seen()
        # Its own client, so its own cookie jar: one browser per user.
        with httpx.Client(transport=pool, base_url=example_url, timeout=10, trust_env=False) as client:
            for _ in range(4):
                response = client.get("/")
                assert response.status_code == 200
                seen.bodies.add(response.text)
                seen.variants.add(response.headers["x-canary-variant"])
                seen.pids.add(response.headers["x-worker-pid"])
                seen.cookies_set += "set-cookie" in response.headers
            seen.cookie = client.cookies["canarymw"]
        return seen

    with httpx.HTTPTransport() as transport:
        pool = _SharedPool(transport)
        with ThreadPoolExecutor(8) as executor:
            users = list(executor.map(lambda _: visit(pool), range(200)))

    rollout = Rollout("hello-v2", percent=10, secret_key=KEY)
    greens = crossed = 0
    all_pids: set[str] = set()
    for seen in users:
        assert len(seen.bodies) == 1 and len(seen.variants) == 1, seen  # sticky over requests and workers
        assert seen.cookies_set == 1  # set on the first visit, never again
        (variant,) = seen.variants
        assert seen.bodies == {f"Hello, {COLOUR[variant]} World!\n"}  # the header tells the truth
        # The same answer computed here, from the cookie alone: no state shared with the server.
        decision = rollout.decide(f"canarymw={seen.cookie}")
        assert decision.set_cookie is None  # the cookie verifies with the shared key
        assert rollout.variant_for(decision.cohort) == variant
        greens += variant == "new"
        crossed += len(seen.pids) > 1
        all_pids |= seen.pids
    assert len(all_pids) == 2  # both workers served traffic
    assert crossed > 0  # and users moved between them without changing colour
    assert 3 <= greens <= 37  # 10% of 200, +-4 sigma


def test_example_refuses_to_start_without_a_shared_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CANARY_KEY", raising=False)
    with pytest.raises(RuntimeError, match="CANARY_KEY"):
        runpy.run_path(str(EXAMPLE / "app.py"))


def test_example_in_process(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANARY_KEY", KEY)
    monkeypatch.setenv("CANARY_PERCENT", "100")
    app = runpy.run_path(str(EXAMPLE / "app.py"))["app"]
    client = app.test_client()
    response = client.get("/")
    assert response.status_code == 200
    assert response.text == "Hello, Green World!\n"
    assert response.headers["X-Canary-Variant"] == "new"
    assert response.headers["X-Worker-Pid"] == str(os.getpid())
    assert "canarymw=" in response.headers["Set-Cookie"]
    health = client.get("/healthz")
    assert health.text == "ok\n" and "Set-Cookie" not in health.headers  # excluded from the rollout
    response.close()
    health.close()
