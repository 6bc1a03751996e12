"""Who may look and who may act: bearer tokens, basic auth, or the app's own login."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import time
from collections.abc import Callable, Mapping
from typing import Any, Literal, NamedTuple

Role = Literal["read", "operate"]
ROLES: tuple[Role, ...] = ("read", "operate")


class Principal(NamedTuple):
    """Someone the admin app let in: a name (recorded in the audit log) and a role.

    ``read`` sees every page and every GET of the API; ``operate`` may also change
    rollouts (set, promote, rollback, pause, resume, reset).
    """

    name: str
    role: Role

    @property
    def may_operate(self) -> bool:
        return self.role == "operate"


class Request(NamedTuple):
    """What an authenticator sees of a request: the method, the path inside the admin
    app, headers with lower-case names, and the server's own request object (the WSGI
    ``environ`` or the ASGI ``scope``), so that an app can reuse its own login."""

    method: str
    path: str
    headers: Mapping[str, str]
    native: Any


Authenticator = Callable[[Request], "Principal | None"]


def _check_role(role: object, owner: str) -> Role:
    if role not in ROLES:
        raise ValueError(f"{owner} got role {role!r}; use 'read' or 'operate'.")
    return role


def _equal(a: str, b: str) -> bool:
    # Constant time over the digests, so neither the length nor a prefix leaks.
    return hmac.compare_digest(hashlib.sha256(a.encode()).digest(), hashlib.sha256(b.encode()).digest())


class BearerAuth:
    """``Authorization: Bearer <token>``: for scripts, the CLI and monitoring.

    ``tokens`` maps each token to ``(name, role)``; tokens must be at least 32
    characters (make them with ``secrets.token_urlsafe(32)``). A bearer token is never
    sent by a browser on its own, so requests carrying one need no CSRF token.
    """

    ambient = False

    def __init__(self, tokens: Mapping[str, tuple[str, Role]]) -> None:
        if not tokens:
            raise ValueError("BearerAuth needs at least one token.")
        self._tokens: list[tuple[str, Principal]] = []
        for token, (name, role) in tokens.items():
            if not isinstance(token, str) or len(token) < 32:
                raise ValueError("BearerAuth tokens must be strings of at least 32 characters.")
            self._tokens.append((token, Principal(str(name), _check_role(role, "BearerAuth"))))

    def __call__(self, request: Request) -> Principal | None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not value:
            return None
        found = None
        for token, principal in self._tokens:  # every token compared: no early exit
            if _equal(value.strip(), token):
                found = principal
        return found


class BasicAuth:
    """HTTP basic auth: for people with a browser, over HTTPS only.

    ``users`` maps each user name to ``(password, role)``. Passwords are compared in
    constant time. A browser sends these credentials with every request on its own,
    so every change also needs the page's CSRF token.
    """

    ambient = True
    basic = True

    def __init__(self, users: Mapping[str, tuple[str, Role]]) -> None:
        if not users:
            raise ValueError("BasicAuth needs at least one user.")
        self._users: dict[str, tuple[str, Principal]] = {}
        for user, (password, role) in users.items():
            if not isinstance(user, str) or not user or ":" in user:
                raise ValueError(f"BasicAuth got user {user!r}; use a non-empty name without ':'.")
            if not isinstance(password, str) or len(password) < 12:
                raise ValueError(f"BasicAuth needs a password of at least 12 characters for {user!r}.")
            self._users[user] = (password, Principal(user, _check_role(role, "BasicAuth")))

    def __call__(self, request: Request) -> Principal | None:
        scheme, _, value = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "basic" or not value:
            return None
        try:
            user, sep, password = (
                base64.b64decode(value.strip(), validate=True).decode("utf-8").partition(":")
            )
        except (binascii.Error, UnicodeDecodeError, ValueError):
            return None
        if not sep:
            return None
        held = self._users.get(user)
        # Compare against something even for an unknown user: the same time either way.
        ok = _equal(password, held[0] if held is not None else "\x00" * 16)
        return held[1] if held is not None and ok else None


class CallableAuth:
    """Your app's own login: ``check(request)`` returns a :class:`Principal` or None.

    ``request.native`` is the WSGI environ or the ASGI scope (with your session
    middleware's data in it). Treated as ambient (cookie-based): changes need the
    page's CSRF token.
    """

    ambient = True

    def __init__(self, check: Authenticator) -> None:
        if not callable(check):
            raise TypeError(f"CallableAuth needs a callable, not {check!r}.")
        self._check = check

    def __call__(self, request: Request) -> Principal | None:
        got = self._check(request)
        if got is None:
            return None
        if not isinstance(got, Principal):
            raise TypeError(f"the admin's auth callable returned {got!r}; return a Principal or None.")
        _check_role(got.role, "the admin's auth callable")
        return got


class Csrf:
    """Tokens that tie a form to the person it was shown to (HMAC of their name and
    the hour; the current and the previous hour's are accepted)."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret

    def _at(self, name: str, hour: int) -> str:
        return hmac.new(self._secret, f"{hour}:{name}".encode(), hashlib.sha256).hexdigest()

    def token(self, principal: Principal, now: float | None = None) -> str:
        return self._at(principal.name, int((time.time() if now is None else now) // 3600))

    def check(self, principal: Principal, token: str, now: float | None = None) -> bool:
        hour = int((time.time() if now is None else now) // 3600)
        given = token.encode("utf-8", "surrogatepass")  # bytes: any text compares, none raises
        good = False
        for h in (hour, hour - 1):
            good |= hmac.compare_digest(self._at(principal.name, h).encode(), given)
        return good
