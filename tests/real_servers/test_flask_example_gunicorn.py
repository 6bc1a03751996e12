"""examples/flask_app under real gunicorn: every user keeps one colour in every worker."""

from __future__ import annotations

import os
import runpy

import pytest

from canarymw import Rollout

from ..servers import ROOT, assert_one_colour_per_user, gunicorn_example, visit_as_users

EXAMPLE = ROOT / "examples" / "flask_app"
KEY = "example-test-key-0123456789abcdef"
COLOUR = {"old": "Blue", "new": "Green"}


@pytest.mark.server
def test_every_user_keeps_one_colour_across_gunicorn_workers() -> None:
    with gunicorn_example(EXAMPLE, "app:app", KEY) as base:
        users = visit_as_users(base)
    assert_one_colour_per_user(users, Rollout("hello-v2", percent=10, secret_key=KEY), COLOUR)


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
