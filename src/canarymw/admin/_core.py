"""The admin app, sans-IO: a request in, a response out, for the WSGI and ASGI adapters.

Every route, every check and every response header is here once; the adapters only
translate. Reads come from ``canarymw.store._report.report`` (what ``canarymw status``
shows) and changes go through ``canarymw.store.change`` (what ``canarymw set`` and
the others do): the page, the JSON API and the CLI are one API.

The order of the checks is fixed: who is asking (401), whether the body is too large
(413), whether the path exists (404) and takes the method (405), then for a change
whether the caller may operate (403), the body's media type and syntax (415, 400), the
CSRF token of ambient credentials (403), the fields (400), and last the store's answer
(404 unknown rollout, 409 stale version, 503 store unreachable).
"""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, urlencode

from ..store._model import (
    OPERATOR_ACTIONS,
    RETENTION,
    WINDOW,
    Store,
    StoreError,
    StoreUnavailable,
    UnknownRollout,
    VersionConflict,
)
from ._auth import Csrf, Principal, Request

log = logging.getLogger("canarymw")

MAX_BODY = 16 * 1024
"""Bytes of a request body the admin reads at most; a larger one gets 413."""

MAX_VERSION = 2**63 - 1
"""The largest ``expected_version`` the API takes (a store's versions are 64-bit)."""

HISTORY_LIMIT = (1, 1000, 50)
"""``limit`` of ``/api/history``: lowest, highest, default."""
SERIES_MINUTES = (1, 1440, 60)
"""``minutes`` of ``/api/series``: lowest, highest, default."""
WINDOW_SECONDS = (1.0, float(RETENTION))
"""``window`` of ``/api/rollouts`` and ``/api/rollout``: lowest and highest (the default
is the admin's ``window``)."""

CSRF_HEADER = "X-CSRF-Token"

SECURITY_HEADERS: tuple[tuple[str, str], ...] = (
    (
        "Content-Security-Policy",
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'",
    ),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("Cross-Origin-Opener-Policy", "same-origin"),
    ("Cross-Origin-Resource-Policy", "same-origin"),
)

ROUTES: dict[str, str] = {
    "/api/openapi.json": "GET",
    "/api/rollouts": "GET",
    "/api/rollout": "GET",
    "/api/history": "GET",
    "/api/series": "GET",
    "/api/action": "POST",
    "/static/admin.css": "GET",
    "/static/icon.svg": "GET",
    "/": "GET",
    "/rollout": "GET",
    "/action": "POST",
}
"""Every path of the admin app (inside its root) and the method it takes (GET also takes HEAD)."""


class Response(NamedTuple):
    status: int
    headers: list[tuple[str, str]]
    body: bytes


class Problem(Exception):
    """A request the admin refuses: the status and one sentence saying why."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.extra = extra


_REASONS = {
    200: "OK",
    303: "See Other",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    415: "Unsupported Media Type",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def reason(status: int) -> str:
    return _REASONS.get(status, "Error")


def allow(method: str) -> str:
    """The ``Allow`` header of a path that takes ``method``."""
    return "GET, HEAD" if method == "GET" else method


def _show(value: object) -> str:
    # As the client wrote it: JSON's true, null and NaN rather than Python's True, None, nan.
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def parse_percent(value: object, *, form: bool = False) -> float:
    """A percent: a JSON number (``form``: the field's text), finite, 0 to 100; else Problem 400."""
    if form and isinstance(value, str):
        text = value.strip()
        if text.lower().lstrip("+-") in ("nan", "inf", "infinity"):
            raise Problem(400, f"percent {_show(value)} is not a finite number; use a number from 0 to 100.")
        try:
            number = float(text)
        except ValueError:
            raise Problem(
                400, f"percent {_show(value)} is not a number; use a number from 0 to 100."
            ) from None
    elif value is None:
        raise Problem(400, "set needs a percent; use a number from 0 to 100.")
    elif isinstance(value, bool) or not isinstance(value, int | float):
        raise Problem(400, f"percent {_show(value)} is not a number; use a number from 0 to 100.")
    else:
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            raise Problem(
                400, f"percent {_show(value)} is out of range; use a number from 0 to 100."
            ) from None
    if not math.isfinite(number):
        raise Problem(400, f"percent {_show(value)} is not a finite number; use a number from 0 to 100.")
    if not 0.0 <= number <= 100.0:
        raise Problem(400, f"percent {_show(value)} is out of range; use a number from 0 to 100.")
    return number


def parse_version(value: object, *, form: bool = False) -> int:
    """``expected_version``: a whole number from 1 (JSON: a number, ``form``: its digits); else 400."""
    number: int | None = None
    if form and isinstance(value, str):
        text = value.strip()
        if text.isascii() and text.isdigit() and len(text) <= 19:
            number = int(text)
    elif isinstance(value, int) and not isinstance(value, bool):
        number = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        number = int(value)  # 3.0 is the integer 3 in JSON Schema as in JSON
    if value is None:
        raise Problem(
            400, "expected_version is missing; send the version of the rollout the change was made against."
        )
    if number is None or not 1 <= number <= MAX_VERSION:
        raise Problem(
            400,
            f"expected_version {_show(value)} is not a version; send the version of the rollout "
            "the change was made against (a whole number from 1).",
        )
    return number


def parse_reason(value: object) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > 500 or not value.replace("\n", " ").isprintable():
        raise Problem(400, "reason must be printable text of at most 500 characters.")
    return value.strip()


def parse_name(value: object) -> str:
    if value is None:
        raise Problem(400, "the rollout's name is missing; give name, printable text of 1 to 200 characters.")
    if not isinstance(value, str) or not value.strip() or len(value) > 200 or not value.isprintable():
        raise Problem(
            400, f"rollout name {_show(value)} is not valid; use printable text of 1 to 200 characters."
        )
    return value


def parse_action(value: object) -> str:
    if value is None:
        raise Problem(400, f"action is missing; use one of {', '.join(OPERATOR_ACTIONS)}.")
    if not isinstance(value, str) or value not in OPERATOR_ACTIONS:
        raise Problem(400, f"action {_show(value)} is unknown; use one of {', '.join(OPERATOR_ACTIONS)}.")
    return value


def series(store: Store, name: str, minutes: int, now: float) -> dict[str, Any]:
    """Per-window requests, errors and p95 of each variant over the last ``minutes``."""
    from ..store._stats import summarize

    since = now - minutes * 60
    by_window: dict[int, list[Any]] = {}
    for c in store.read_counts([name], since):
        by_window.setdefault(c.window, []).append(c)
    points = []
    for window in sorted(by_window):
        per = summarize(by_window[window], [name])[name]
        points.append(
            {
                "window": window,
                "variants": {
                    v: {"requests": s.requests, "errors": s.errors, "p95": s.p95}
                    for v, s in per.items()
                    if v in ("old", "new")
                },
            }
        )
    return {"rollout": name, "window_seconds": WINDOW, "since": since, "points": points}


class Core:
    """Routes and rules of the admin app (internal; see :class:`canarymw.admin.Admin`)."""

    def __init__(self, admin: Any) -> None:
        self.admin = admin
        self.csrf = Csrf(admin._secret)
        # The guards' assessors are kept between reports; requests run in many threads.
        self._report_lock = threading.Lock()

    # -- entry ---------------------------------------------------------------------
    def handle(
        self,
        method: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        body: bytes,
        native: Any,
        root: str,
        *,
        too_big: bool = False,
    ) -> Response:
        """One request: ``path`` inside the admin app, ``root`` where the app is mounted.

        ``too_big``: the adapter saw a body over :data:`MAX_BODY` and did not read it.
        """
        path = path or "/"
        try:
            principal, ambient = self._authenticate(Request(method, path, headers, native))
            if too_big or len(body) > MAX_BODY:
                raise Problem(413, f"the request body is over {MAX_BODY} bytes; send at most that.")
            response = self._route(method, path, _query(query), headers, body, principal, ambient, root)
            if ambient and principal.may_operate and path.startswith("/api/") and response.status == 200:
                # How a script with ambient credentials (basic auth) gets the token for its POSTs.
                response.headers.append((CSRF_HEADER, self.csrf.token(principal)))
            return response
        except Problem as problem:
            return self._problem(problem, path, root)
        except StoreUnavailable as exc:
            return self._problem(Problem(503, _one_line(exc) or "the store cannot be reached."), path, root)
        except Exception as exc:  # a bug, or a store failing in a way it does not name: never a bare 500
            log.exception("canarymw admin: %s %s failed", method, path)
            failed = Problem(
                500,
                f"the admin failed on this request ({type(exc).__name__}); the server's log has the details.",
            )
            try:
                return self._problem(failed, path, root)
            except Exception:
                return self._json(500, {"error": failed.message, "status": 500})

    def _authenticate(self, request: Request) -> tuple[Principal, bool]:
        # The first authenticator that knows the request wins; whether it is ambient
        # (a browser sends it by itself: basic auth, the app's cookie) decides CSRF.
        for auth in self.admin.auth:
            principal = auth(request)
            if principal is not None:
                return principal, bool(getattr(auth, "ambient", True))
        raise Problem(401, "authentication required.")

    # -- routing -------------------------------------------------------------------
    def _route(
        self,
        method: str,
        path: str,
        query: dict[str, list[str]],
        headers: Mapping[str, str],
        body: bytes,
        who: Principal,
        ambient: bool,
        root: str,
    ) -> Response:
        from . import _pages

        def arg(key: str) -> str | None:
            values = query.get(key)
            return values[-1] if values else None

        takes = ROUTES.get(path)
        if takes is None:
            raise Problem(404, f"there is no page at {path!r}.")
        if method != takes and not (takes == "GET" and method == "HEAD"):
            raise Problem(405, f"use {takes} here, not {method}.", allow=allow(takes))

        if path == "/api/openapi.json":
            return self._json(200, self.admin.openapi(root))
        if path == "/api/rollouts":
            return self._json(200, self._report(None, _window_arg(arg("window"), self.admin.window)))
        if path == "/api/rollout":
            name = parse_name(arg("name"))
            return self._json(200, self._report(name, _window_arg(arg("window"), self.admin.window)))
        if path == "/api/history":
            name = parse_name(arg("name"))
            limit = _int_arg(arg("limit"), *HISTORY_LIMIT, "limit")
            self._known(name)
            return self._json(
                200, {"rollout": name, "changes": [asdict(c) for c in self.admin.store.history(name, limit)]}
            )
        if path == "/api/series":
            name = parse_name(arg("name"))
            minutes = _int_arg(arg("minutes"), *SERIES_MINUTES, "minutes")
            self._known(name)
            return self._json(200, series(self.admin.store, name, minutes, time.time()))
        if path == "/api/action":
            self._may_operate(who)
            data = _json_body(headers, body)
            if "csrf" in data and not isinstance(data["csrf"], str):
                raise Problem(
                    400, f"csrf {_show(data['csrf'])} is not a token; send the page's token as text."
                )
            self._check_csrf(who, ambient, headers.get("x-csrf-token", data.get("csrf")))
            name, action, state = self._act(who, data)
            return self._json(200, {"rollout": name, "action": action, "state": asdict(state)})
        if path == "/static/admin.css":
            return Response(200, [("Content-Type", "text/css; charset=utf-8"), *SECURITY_HEADERS], _pages.CSS)
        if path == "/static/icon.svg":  # linked by every page, so browsers ask for no /favicon.ico
            return Response(200, [("Content-Type", "image/svg+xml"), *SECURITY_HEADERS], _pages.ICON)
        if path == "/":
            report = self._report(None, self.admin.window)
            return self._html(200, _pages.index(report, who, root))
        if path == "/rollout":
            name = parse_name(arg("name"))
            report = self._report(name, self.admin.window)
            store = self.admin.store
            page = _pages.detail(
                report,
                name,
                store.history(name, 50),
                series(store, name, 60, time.time()),
                who,
                self.csrf.token(who),
                root,
                arg("done"),
            )
            return self._html(200, page)
        # path == "/action": the page's form
        self._may_operate(who)
        form = _form_body(headers, body)
        self._check_csrf(who, ambient, form.get("csrf"))
        name = parse_name(form.get("name"))
        try:
            _, action, _ = self._act(who, form, form=True)
        except Problem as problem:
            problem.extra.setdefault("rollout", name)
            raise
        location = f"{quote(root)}/rollout?" + urlencode({"name": name, "done": action})
        return Response(303, [("Location", location), ("Content-Length", "0"), *SECURITY_HEADERS], b"")

    def _known(self, name: str) -> None:
        if name not in self.admin.store.read([name]):
            raise Problem(404, _unknown(name), rollout=name)

    def _report(self, name: str | None, window: float) -> dict[str, Any]:
        from ..store._report import report

        try:
            with self._report_lock:
                return report(self.admin.store, name, window, time.time(), self.admin._assessors)
        except UnknownRollout as exc:
            raise Problem(404, _one_line(exc), rollout=name) from None

    # -- changes -------------------------------------------------------------------
    def _may_operate(self, who: Principal) -> None:
        if not who.may_operate:
            raise Problem(403, f"{who.name} may look but not change rollouts (role 'read').")

    def _check_csrf(self, who: Principal, ambient: bool, token: object) -> None:
        if not ambient:
            return  # a bearer token is never sent by a browser on its own: no CSRF to fear
        # Csrf.check compares text; only ASCII text of a sane length can be a token at all.
        if (
            not isinstance(token, str)
            or not token.isascii()
            or len(token) > 128
            or not self.csrf.check(who, token)
        ):
            raise Problem(403, "the form's CSRF token is missing or stale; reload the page and try again.")

    def _act(self, who: Principal, data: Mapping[str, Any], *, form: bool = False) -> tuple[str, str, Any]:
        from ..store import change

        name = parse_name(data.get("name"))
        action = parse_action(data.get("action"))
        version = parse_version(data.get("expected_version"), form=form)
        percent = parse_percent(data.get("percent"), form=form) if action == "set" else None
        if action != "set" and data.get("percent") not in (None, ""):
            raise Problem(400, f"{action} takes no percent; only set does.")
        why = parse_reason(data.get("reason"))
        if form and not why:
            why = f"{action} from the operator page"
        try:
            state = change(
                self.admin.store,
                name,
                action,
                by=who.name,
                reason=why,
                percent=percent,
                expected_version=version,
            )
        except VersionConflict as exc:
            current = self.admin.store.read([name]).get(name)
            raise Problem(
                409,
                _one_line(exc),
                current_version=None if current is None else current.version,
                rollout=name,
            ) from None
        except UnknownRollout:
            raise Problem(404, _unknown(name), rollout=name) from None
        except StoreUnavailable:
            raise
        except (StoreError, ValueError) as exc:
            raise Problem(400, _one_line(exc), rollout=name) from None
        return name, action, state

    # -- responses -------------------------------------------------------------------
    def _json(self, status: int, data: Any) -> Response:
        body = json.dumps(data, allow_nan=False, separators=(",", ":")).encode()
        return Response(status, [("Content-Type", "application/json"), *SECURITY_HEADERS], body)

    def _html(self, status: int, page: str) -> Response:
        return Response(
            status, [("Content-Type", "text/html; charset=utf-8"), *SECURITY_HEADERS], page.encode()
        )

    def _problem(self, problem: Problem, path: str, root: str) -> Response:
        extra: list[tuple[str, str]] = []
        if problem.status == 401:
            extra += self._challenges()
        if problem.status == 405:
            extra.append(("Allow", problem.extra.get("allow", "GET, HEAD")))
        details = {k: v for k, v in problem.extra.items() if k != "allow"}
        if path.startswith("/api/"):
            response = self._json(
                problem.status, {"error": problem.message, "status": problem.status, **details}
            )
        else:
            from . import _pages

            response = self._html(
                problem.status, _pages.problem(problem.status, problem.message, details, root)
            )
        return Response(response.status, [*response.headers, *extra], response.body)

    def _challenges(self) -> list[tuple[str, str]]:
        # One challenge per scheme the admin takes: a browser offers its login box for
        # Basic, a script knows to send its Bearer token.
        realm = 'realm="canarymw admin"'
        found: list[tuple[str, str]] = []
        if any(getattr(a, "basic", False) for a in self.admin.auth):
            found.append(("WWW-Authenticate", f'Basic {realm}, charset="UTF-8"'))
        if any(not getattr(a, "ambient", True) for a in self.admin.auth) or not found:
            found.append(("WWW-Authenticate", f"Bearer {realm}"))
        return found


def _unknown(name: str) -> str:
    # The sentence of canarymw status and the others, so the CLI through the API says the same.
    return f"the store has no rollout {name!r}; it appears once a process running it has started."


def _query(query: str) -> dict[str, list[str]]:
    # Unknown parameters are ignored; a repeated one counts with its last value.
    try:
        return parse_qs(query, keep_blank_values=True, max_num_fields=100) if query else {}
    except ValueError:  # more than max_num_fields
        raise Problem(400, "the query string has too many parameters.") from None


def _int_arg(text: str | None, low: int, high: int, default: int, what: str) -> int:
    if text is None:
        return default
    if not (text.isascii() and text.isdigit() and len(text) <= 10 and low <= int(text) <= high):
        raise Problem(400, f"{what} {_show(text)} is not a whole number from {low} to {high}.")
    return int(text)


_DECIMAL = re.compile(r"[0-9]{1,9}(?:\.[0-9]{1,30})?")


def _window_arg(text: str | None, default: float) -> float:
    if text is None:
        return default
    low, high = WINDOW_SECONDS
    if not _DECIMAL.fullmatch(text) or not low <= float(text) <= high:
        raise Problem(400, f"window {_show(text)} is not a number of seconds from {low:g} to {high:g}.")
    return float(text)


def _json_body(headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json":
        raise Problem(415, "send the action as JSON (Content-Type: application/json).")
    try:
        data = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise Problem(400, "the body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise Problem(400, "the body must be a JSON object with name, action and expected_version.")
    return data


def _no_constant(name: str) -> Any:
    # NaN and Infinity are not JSON; read them so that the field's check says what is wrong.
    return float(name.replace("Infinity", "inf"))


def _form_body(headers: Mapping[str, str], body: bytes) -> dict[str, str]:
    kind = headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/x-www-form-urlencoded":
        raise Problem(415, "send the form as application/x-www-form-urlencoded.")
    try:
        text = body.decode("utf-8")
        fields = parse_qs(text, keep_blank_values=True, max_num_fields=100, errors="strict")
    except UnicodeDecodeError:
        raise Problem(400, "the form is not valid UTF-8.") from None
    except ValueError:
        raise Problem(400, "the form has too many fields.") from None
    return {k: v[-1] for k, v in fields.items()}
