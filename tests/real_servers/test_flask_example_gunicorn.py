"""examples/flask_app under real gunicorn: every user keeps one colour in every worker,
and when they sign in and out through the example's login form."""

from __future__ import annotations

import os
import runpy
from dataclasses import dataclass, field

import httpx
import pytest

from canarymw import Rollout

from ..servers import ROOT, assert_one_colour_per_user, each_user, gunicorn_example, visit_as_users

EXAMPLE = ROOT / "examples" / "flask_app"
KEY = "example-test-key-0123456789abcdef"
COLOUR = {"old": "Blue", "new": "Green"}
USERS = 1000


@pytest.mark.server
def test_every_user_keeps_one_colour_across_gunicorn_workers() -> None:
    with gunicorn_example(EXAMPLE, "app:app", KEY) as base:
        users = visit_as_users(base)
    assert_one_colour_per_user(users, Rollout("hello-v2", percent=10, secret_key=KEY), COLOUR)


# -- signing in and out ------------------------------------------------------------------


@dataclass
class Login:
    """What one visitor saw: anonymous, signed in (twice), signed out again."""

    user: str
    anonymous: str = ""
    signed_in: list[str] = field(default_factory=list)
    signed_out: str = ""
    cookies: set[str] = field(default_factory=set)  # the cohort cookie's values, step by step
    pids: set[str] = field(default_factory=set)


def page(client: httpx.Client, login: Login, user: str | None) -> str:
    """``/``, as ``user`` (None: signed out): its variant, after checking the page says it."""
    r = client.get("/")
    assert r.status_code == 200, r.text
    variant = r.headers["x-canary-variant"]
    signed = f"Signed in as {user}.\n" if user else ""
    assert r.text == f"Hello, {COLOUR[variant]} World!\n{signed}"
    login.pids.add(r.headers["x-worker-pid"])
    login.cookies.add(client.cookies["canarymw"])
    return variant


def sign_in_and_out(client: httpx.Client, i: int) -> Login:
    """A visitor's page anonymously (which gives it a cohort cookie), the login form, a
    sign-in as ``user-<i>``, the page twice, a sign-out, and the page again."""
    login = Login(f"user-{i}")
    login.anonymous = page(client, login, None)
    form = client.get("/login")
    assert form.status_code == 200 and '<form method="post" action="/login">' in form.text
    assert "set-cookie" not in form.headers  # excluded from the rollout; no session yet
    r = client.post("/login", data={"user": login.user})
    assert (r.status_code, r.headers["location"]) == (303, "/"), r.text
    assert "session" in client.cookies
    login.signed_in = [page(client, login, login.user) for _ in range(2)]
    r = client.post("/logout")
    assert (r.status_code, r.headers["location"]) == (303, "/"), r.text
    assert "session" not in client.cookies  # Flask deleted it
    login.signed_out = page(client, login, None)
    return login


@pytest.mark.server
def test_nobody_changes_colour_at_login_under_gunicorn() -> None:
    """1,000 visitors at 50% sign in through the form and out again, under 4 workers:
    0 of 1,000 change colour at login, none at logout, and no cookie is re-issued."""
    env = {"CANARY_PERCENT": "50"}
    with gunicorn_example(EXAMPLE, "app:app", KEY, workers=4, env=env) as base:
        logins = each_user(base, USERS, sign_in_and_out)
    at_login = sum(set(v.signed_in) != {v.anonymous} for v in logins)
    at_logout = sum(v.signed_out != v.anonymous for v in logins)
    greens = sum(v.anonymous == "new" for v in logins)
    crossed = sum(len(v.pids) > 1 for v in logins)
    print(f"gunicorn, on_login=keep: {at_login} of {USERS} changed colour at login, {at_logout} at logout")
    assert (at_login, at_logout) == (0, 0)
    assert all(len(v.cookies) == 1 for v in logins)  # one cohort cookie, never re-issued
    # The colour computed here from the cookie alone: signing in left the assignment alone.
    rollout = Rollout("hello-v2", percent=50, secret_key=KEY)
    for v in logins:
        (cookie,) = v.cookies
        assert rollout.decide(f"canarymw={cookie}").variant == v.anonymous
    assert 400 <= greens <= 600  # about half green: a flip would have shown
    assert len(set().union(*(v.pids for v in logins))) == 4  # every worker served
    assert crossed >= USERS * 0.9  # and visitors crossed between them


def test_with_on_login_switch_about_half_change_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    """The same journeys in process with ``CANARY_ON_LOGIN=switch``: the user id's bucket
    decides once signed in, so about half of the visitors change colour at login (the
    check above can fail), and signing out keeps the signed-in colour (the cookie follows)."""
    monkeypatch.setenv("CANARY_KEY", KEY)
    monkeypatch.setenv("CANARY_PERCENT", "50")
    monkeypatch.setenv("CANARY_ON_LOGIN", "switch")
    app = runpy.run_path(str(EXAMPLE / "app.py"))["app"]
    logins = []
    for i in range(USERS):
        transport = httpx.WSGITransport(app=app)
        with httpx.Client(transport=transport, base_url="http://127.0.0.1") as client:
            logins.append(sign_in_and_out(client, i))
    rollout = Rollout("hello-v2", percent=50, secret_key=KEY)
    at_login = sum(set(v.signed_in) != {v.anonymous} for v in logins)
    print(f"in process, on_login=switch: {at_login} of {USERS} changed colour at login")
    assert 400 <= at_login <= 600
    for v in logins:
        assert v.signed_in == [rollout.variant_for(v.user)] * 2
        assert v.signed_out == v.signed_in[0]


def test_the_login_form_refuses_an_empty_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANARY_KEY", KEY)
    app = runpy.run_path(str(EXAMPLE / "app.py"))["app"]
    with httpx.Client(transport=httpx.WSGITransport(app=app), base_url="http://127.0.0.1") as client:
        r = client.post("/login", data={"user": "  "})
        assert r.status_code == 400 and "1 to 64 characters" in r.text
        assert "session" not in client.cookies
        r = client.post("/login", data={"user": "<b>ada</b>"})
        assert r.status_code == 303
        assert "Signed in as &lt;b&gt;ada&lt;/b&gt;." in client.get("/login").text  # escaped


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
