"""examples/django_app: Django's test client, the whole WSGI stack in process, and gunicorn.

Under gunicorn with two workers every user keeps one colour in both workers, as
tests/real_servers/test_flask_example_gunicorn.py checks for the Flask example.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import httpx
import pytest

from canarymw import CallableSink, Outcome, Rollout, WSGICanaryMiddleware

from ..servers import ROOT, free_port, serve
from .snippets import configure_django

pytest.importorskip("django", reason="the Django example needs Django (in the dev extra)")

EXAMPLE = ROOT / "examples" / "django_app"
KEY = "django-example-key-0123456789abcdef"
COLOUR = {"old": "Blue", "new": "Green"}


@pytest.fixture(scope="module")
def django_project() -> None:
    """Django configured with the example's settings, in this process (see configure_django)."""
    configure_django()


def wsgi_module(monkeypatch: pytest.MonkeyPatch, percent: float) -> ModuleType:
    """A fresh import of hello_site/wsgi.py (its rollout reads the environment once)."""
    monkeypatch.setenv("CANARY_KEY", KEY)
    monkeypatch.setenv("CANARY_PERCENT", str(percent))
    sys.modules.pop("hello_site.wsgi", None)
    return importlib.import_module("hello_site.wsgi")


# Django's test client ----------------------------------------------------------------


@pytest.mark.usefixtures("django_project")
def test_the_test_client_gets_blue_without_a_decision() -> None:
    """Django's test client calls Django's handler, not wsgi.py: no middleware, no
    decision, so the old view serves (the FAQ's trap; pass a decision to test green)."""
    from django.test import Client

    response = Client().get("/")
    assert response.status_code == 200
    assert response.content == b"Hello, Blue World!\n"
    assert response["X-Canary-Variant"] == "-"
    assert "Set-Cookie" not in response


@pytest.mark.usefixtures("django_project")
@pytest.mark.parametrize(("percent", "variant"), [(0, "old"), (100, "new")])
def test_the_test_client_serves_the_view_the_decision_names(percent: float, variant: str) -> None:
    from django.test import Client

    decision = Rollout("hello-v2", percent=percent, secret_key=KEY).decide(None)
    assert decision.variant == variant
    response = Client().get("/", **{"canarymw.decision": decision})
    assert response.content == f"Hello, {COLOUR[variant]} World!\n".encode()
    assert response["X-Canary-Variant"] == variant
    assert response.wsgi_request.META["canarymw.route"] == "/"  # the URL pattern, for the outcome
    health = Client().get("/healthz")
    assert health.content == b"ok\n"


# The whole stack in process: wsgi.py's application, driven by a WSGI client -------------


@pytest.mark.usefixtures("django_project")
def test_the_wsgi_application_is_sticky_and_records_one_outcome_per_request(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from werkzeug.test import Client as WSGIClient

    module = wsgi_module(monkeypatch, 50)
    rollout = Rollout("hello-v2", percent=50, secret_key=KEY)
    seen: dict[str, int] = {"old": 0, "new": 0}
    for _ in range(40):
        client = WSGIClient(module.application)  # one cookie jar: one visitor
        variants = set()
        for _ in range(3):
            # buffered=True: the client closes the body, and the close records the outcome.
            response = client.get("/", buffered=True)
            assert response.status_code == 200
            variants.add(response.headers["X-Canary-Variant"])
            assert response.text == f"Hello, {COLOUR[response.headers['X-Canary-Variant']]} World!\n"
            assert "Cookie" in response.headers["Vary"]
            assert "private" in response.headers["Cache-Control"]
        (variant,) = variants  # sticky
        cookie = client.get_cookie("canarymw")
        assert cookie is not None
        assert rollout.variant_for(rollout.decide(f"canarymw={cookie.value}").cohort) == variant
        seen[variant] += 1
    assert seen["old"] and seen["new"]
    stats = module.sink.snapshot()  # one outcome per request, counted per variant
    assert stats["old"].requests == 3 * seen["old"] and stats["new"].requests == 3 * seen["new"]
    assert stats["old"].statuses == {2: 3 * seen["old"]}
    health = WSGIClient(module.application).get("/healthz", buffered=True)
    assert health.text == "ok\n" and "Set-Cookie" not in health.headers  # excluded: no cookie, no outcome
    assert sum(v.requests for v in module.sink.snapshot().values()) == 120


@pytest.mark.usefixtures("django_project")
def test_an_outcome_names_the_url_pattern_not_the_path() -> None:
    from django.core.wsgi import get_wsgi_application
    from werkzeug.test import Client as WSGIClient

    outcomes: list[Outcome] = []
    rollout = Rollout("hello-v2", percent=100, secret_key=KEY)
    app = WSGICanaryMiddleware(
        get_wsgi_application(), new=None, rollout=rollout, sink=CallableSink(outcomes.append)
    )
    assert WSGIClient(app).get("/?utm=x", buffered=True).text == "Hello, Green World!\n"
    (outcome,) = outcomes
    assert (outcome.variant, outcome.route, outcome.status, outcome.error) == ("new", "/", 200, None)


def test_the_example_refuses_to_start_without_a_shared_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CANARY_KEY", raising=False)
    with pytest.raises(RuntimeError, match="CANARY_KEY"):
        runpy.run_path(str(EXAMPLE / "hello_site" / "wsgi.py"))


# gunicorn, two workers ----------------------------------------------------------------


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
        "--log-level", "warning", "hello_site.wsgi",
    ]  # fmt: skip
    with serve(argv, port, env={"CANARY_KEY": KEY}, ready_path="/healthz") as base:
        yield base


@pytest.mark.server
def test_every_user_keeps_one_colour_across_gunicorn_workers(example_url: str) -> None:
    def visit(transport: httpx.BaseTransport) -> Seen:
        seen = Seen()
        # A client of its own, so a cookie jar of its own; Connection: close sends each
        # request on a new connection, so either worker may answer it.
        with httpx.Client(
            transport=transport, base_url=example_url, timeout=10, trust_env=False,
            headers={"Connection": "close"},
        ) as client:  # fmt: skip
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
        shared: Any = _Shared(transport)
        with ThreadPoolExecutor(8) as executor:
            users = list(executor.map(lambda _: visit(shared), range(200)))

    rollout = Rollout("hello-v2", percent=10, secret_key=KEY)
    greens = crossed = 0
    all_pids: set[str] = set()
    for seen in users:
        assert len(seen.bodies) == 1 and len(seen.variants) == 1, seen  # sticky over requests and workers
        assert seen.cookies_set == 1  # set on the first visit, never again
        (variant,) = seen.variants
        assert seen.bodies == {f"Hello, {COLOUR[variant]} World!\n"}
        decision = rollout.decide(f"canarymw={seen.cookie}")
        assert decision.set_cookie is None  # the cookie verifies with the shared key
        assert rollout.variant_for(decision.cohort) == variant  # the same answer, computed here
        greens += variant == "new"
        crossed += len(seen.pids) > 1
        all_pids |= seen.pids
    assert len(all_pids) == 2  # both workers served traffic
    assert crossed > 0  # and users moved between them without changing colour
    assert 3 <= greens <= 37  # 10% of 200, +-4 sigma


class _Shared(httpx.BaseTransport):
    """One transport for every user; closing a user's client must not close it."""

    def __init__(self, inner: httpx.BaseTransport) -> None:
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        return self.inner.handle_request(request)

    def close(self) -> None:
        pass
