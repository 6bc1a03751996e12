"""examples/django_app: Django's test client, the whole WSGI stack in process, and gunicorn.

Under gunicorn with two workers every user keeps one colour in both workers, as
tests/real_servers/test_flask_example_gunicorn.py checks for the Flask example.
"""

from __future__ import annotations

import importlib
import runpy
import sys
from types import ModuleType

import pytest

from canarymw import CallableSink, Outcome, Rollout, WSGICanaryMiddleware

from ..servers import ROOT, assert_one_colour_per_user, gunicorn_example, visit_as_users
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


@pytest.mark.server
def test_every_user_keeps_one_colour_across_gunicorn_workers() -> None:
    with gunicorn_example(EXAMPLE, "hello_site.wsgi", KEY) as base:
        # Connection: close sends each request on a new connection, so either worker may answer it.
        users = visit_as_users(base, headers={"Connection": "close"})
    assert_one_colour_per_user(users, Rollout("hello-v2", percent=10, secret_key=KEY), COLOUR)
