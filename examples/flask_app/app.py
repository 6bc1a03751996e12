"""Hello, Blue World! / Hello, Green World!: a canary release of a Flask app with canarymw.

Blue is the current version, green the new one. 10% of visitors get green; each visitor
keeps their colour on every request and in every gunicorn worker, and when they sign in
(``/login``) or out. Run (see README.md)::

    export CANARY_KEY="$(python -c 'import secrets; print(secrets.token_hex(32))')"
    gunicorn -w 4 -b 127.0.0.1:8000 app:app
"""

from __future__ import annotations

import os
from typing import Any

from flask import Flask, Response, redirect, render_template_string, request, session

from canarymw import MemorySink, Rollout, WSGICanaryMiddleware

CANARY_KEY = os.environ.get("CANARY_KEY", "")
if not CANARY_KEY:
    # Not a random default: each worker would get its own key, reject the cookies the
    # others signed, and reshuffle visitors whenever a different worker answered.
    raise RuntimeError("Set CANARY_KEY to one secret shared by every worker (see README.md).")

blue = Flask("blue")
green = Flask("green")
# The session cookie needs a secret shared by every worker too. Flask signs it under a
# salt of its own and canarymw its cohort cookie under another, so neither cookie can
# pass for the other; an app of your own keeps the SECRET_KEY it has.
blue.secret_key = green.secret_key = CANARY_KEY


def signed_in_user(environ: dict[str, Any]) -> str | None:
    """The rollout's ``key=``: the user signed in to the Flask session, or None.

    The middleware calls it with the WSGI environ before either app runs (it chooses
    which one answers), so there is no request context and no ``flask.session`` yet.
    Flask's session interface opens the same signed cookie from the environ, as Flask
    itself does a moment later: one answer to "who is signed in", the session's.
    """
    req = blue.request_class(environ, populate_request=False)  # reads the environ, adds nothing
    opened = blue.session_interface.open_session(blue, req)
    user = None if opened is None else opened.get("user")
    return user if isinstance(user, str) else None


rollout = Rollout(
    "hello-v2",
    percent=float(os.environ.get("CANARY_PERCENT", "10")),
    secret_key=CANARY_KEY,
    key=signed_in_user,
    # "keep" (the default): signing in keeps the colour the visitor's cookie holds.
    # CANARY_ON_LOGIN=switch shows what it prevents: the user id's own bucket decides.
    on_login=os.environ.get("CANARY_ON_LOGIN", "keep"),  # type: ignore[arg-type]
    # Never routed, never counted: the health check, and signing in and out, which blue
    # serves for everyone.
    exclude=["/healthz", "/login", "/logout"],
)
sink = MemorySink()  # counts this worker's requests only


def hello(colour: str) -> Response:
    decision = request.environ["canarymw.decision"]
    user = session.get("user")
    text = f"Hello, {colour} World!\n" + (f"Signed in as {user}.\n" if user else "")
    return Response(
        text,
        mimetype="text/plain",
        # The pid shows which worker answered: the colour must not depend on it.
        headers={"X-Canary-Variant": decision.variant, "X-Worker-Pid": str(os.getpid())},
    )


@blue.get("/")
def blue_hello() -> Response:
    return hello("Blue")


@green.get("/")
def green_hello() -> Response:
    return hello("Green")


@blue.get("/healthz")
def healthz() -> str:
    return "ok\n"


LOGIN_PAGE = """<!doctype html>
<title>Sign in</title>
{% if user %}
<p>Signed in as {{ user }}.</p>
<form method="post" action="/logout"><button>Sign out</button></form>
{% else %}
{% if error %}<p>{{ error }}</p>{% endif %}
<form method="post" action="/login">
  <label>Name <input name="user" maxlength="64" required autofocus></label>
  <button>Sign in</button>
</form>
{% endif %}
"""


@blue.get("/login")
def login_form() -> str:
    return render_template_string(LOGIN_PAGE, user=session.get("user"), error=None)


@blue.post("/login")
def login() -> Any:
    user = request.form.get("user", "").strip()
    if not user or len(user) > 64:
        page = render_template_string(LOGIN_PAGE, user=None, error="Give a name of 1 to 64 characters.")
        return page, 400
    # Any name signs in here: an app of your own checks a password or asks its identity
    # provider at this point.
    session.clear()
    session["user"] = user
    return redirect("/", 303)


@blue.post("/logout")
def logout() -> Any:
    session.clear()
    return redirect("/", 303)


blue.wsgi_app = WSGICanaryMiddleware(  # type: ignore[method-assign]
    blue.wsgi_app, new=green.wsgi_app, rollout=rollout, sink=sink
)
app = blue
