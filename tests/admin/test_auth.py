"""Who may look and who may act: BearerAuth, BasicAuth, CallableAuth, the CSRF tokens, and
what ``Admin`` refuses to be built with."""

from __future__ import annotations

import base64
import hmac
import math
import re
from typing import Any

import pytest

from canarymw.admin import Admin, BasicAuth, BearerAuth, CallableAuth, Principal, Request
from canarymw.admin._auth import Csrf
from canarymw.store import MemoryStore

TOKEN = "t" * 32
OTHER = "o" * 40
KEY = "admin-test-secret-key-0123456789abcdef"


def request(authorization: str | None = None, native: Any = None, **headers: str) -> Request:
    got = {k.lower().replace("_", "-"): v for k, v in headers.items()}
    if authorization is not None:
        got["authorization"] = authorization
    return Request("GET", "/api/rollouts", got, native)


def basic(user: str | bytes, password: str | bytes) -> str:
    u = user.encode() if isinstance(user, str) else user
    p = password.encode() if isinstance(password, str) else password
    return "Basic " + base64.b64encode(u + b":" + p).decode()


@pytest.fixture
def compared(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, Any]]:
    """Every call of hmac.compare_digest (the one the auth module uses), recorded."""
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    return calls


# -- BearerAuth --------------------------------------------------------------------------


def test_bearer_auth_knows_its_tokens() -> None:
    auth = BearerAuth({TOKEN: ("deploy-bot", "operate"), OTHER: ("dashboard", "read")})
    assert auth(request(f"Bearer {TOKEN}")) == Principal("deploy-bot", "operate")
    assert auth(request(f"Bearer {OTHER}")) == Principal("dashboard", "read")
    assert auth(request(f"bearer {TOKEN}")) == Principal("deploy-bot", "operate")  # the scheme's case
    assert auth(request(f"BEARER   {TOKEN}  ")) == Principal("deploy-bot", "operate")
    assert auth.ambient is False
    assert Principal("deploy-bot", "operate").may_operate
    assert not Principal("dashboard", "read").may_operate


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        f"Bearer {TOKEN[:-1]}",
        f"Bearer {TOKEN}t",
        f"Bearer {TOKEN.upper()}",
        f"Basic {TOKEN}",
        f"Token {TOKEN}",
        f"Bearer{TOKEN}",
        f"Bearer\t{TOKEN}",
        f"Bearer {TOKEN} {TOKEN}",
        "Bearer \x00" + TOKEN,
        "Bearer é" + TOKEN,
    ],
)
def test_bearer_auth_refuses_malformed_or_unknown_tokens(header: str | None) -> None:
    auth = BearerAuth({TOKEN: ("deploy-bot", "operate")})
    assert auth(request(header)) is None


def test_bearer_auth_compares_every_token_in_constant_time(compared: list[tuple[Any, Any]]) -> None:
    auth = BearerAuth({TOKEN: ("a", "operate"), OTHER: ("b", "read"), "x" * 64: ("c", "read")})
    assert auth(request(f"Bearer {TOKEN}")) == Principal("a", "operate")
    # compare_digest for each token, found first or not: no early exit, no timing of a prefix.
    assert len(compared) == 3
    # Digests are compared (equal length), never the raw texts.
    assert all(isinstance(a, bytes) and len(a) == len(b) == 32 for a, b in compared)
    compared.clear()
    assert auth(request("Bearer nope")) is None
    assert len(compared) == 3


@pytest.mark.parametrize(
    ("tokens", "says"),
    [
        ({}, "BearerAuth needs at least one token."),
        ({"short": ("bot", "operate")}, "at least 32 characters"),
        ({"t" * 31: ("bot", "operate")}, "at least 32 characters"),
        ({b"t" * 32: ("bot", "operate")}, "at least 32 characters"),
        ({TOKEN: ("bot", "admin")}, "BearerAuth got role 'admin'; use 'read' or 'operate'."),
        ({TOKEN: ("bot", "Operate")}, "use 'read' or 'operate'"),
        ({TOKEN: ("bot", None)}, "use 'read' or 'operate'"),
    ],
)
def test_bearer_auth_refuses_short_tokens_and_unknown_roles(tokens: Any, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)) as caught:
        BearerAuth(tokens)
    assert says in str(caught.value)


# -- BasicAuth ---------------------------------------------------------------------------

USERS: dict[str, tuple[str, Any]] = {
    "alice": ("alice-password-1234", "operate"),
    "bob": ("bob:password:with:colons", "read"),
    "zoë": ("pässwörd-ünicode", "read"),
}


def test_basic_auth_knows_its_users() -> None:
    auth = BasicAuth(USERS)
    assert auth(request(basic("alice", "alice-password-1234"))) == Principal("alice", "operate")
    assert auth(request(basic("bob", "bob:password:with:colons"))) == Principal("bob", "read")
    assert auth(request(basic("zoë", "pässwörd-ünicode"))) == Principal("zoë", "read")
    assert auth(request("basic " + basic("alice", "alice-password-1234")[6:])) is not None
    assert auth.ambient is True and auth.basic is True


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Basic",
        "Basic ",
        basic("alice", "wrong-password-12"),
        basic("alice", "alice-password-123"),  # one character short
        basic("alice", "alice-password-12345"),
        basic("Alice", "alice-password-1234"),  # user names are exact
        basic("mallory", "alice-password-1234"),
        basic("", ""),
        "Basic !!!not-base64!!!",
        "Basic " + base64.b64encode(b"alice-without-colon").decode(),
        "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),
        "Basic " + base64.b64encode(b"alice:alice-password-1234").decode()[:-2],
        "Basic " + base64.b64encode(b"alice:alice-password-1234").decode() + "==",
        "Basic Ä" + base64.b64encode(b"alice:alice-password-1234").decode(),
        "Bearer " + base64.b64encode(b"alice:alice-password-1234").decode(),
        "Digest username=alice",
    ],
)
def test_basic_auth_refuses_malformed_headers_and_wrong_passwords(header: str | None) -> None:
    assert BasicAuth(USERS)(request(header)) is None


def test_basic_auth_compares_in_constant_time_even_for_an_unknown_user(
    compared: list[tuple[Any, Any]],
) -> None:
    auth = BasicAuth(USERS)
    assert auth(request(basic("mallory", "alice-password-1234"))) is None
    assert len(compared) == 1  # compared against a stand-in all the same: no user enumeration by time
    assert auth(request(basic("alice", "alice-password-1234"))) is not None
    assert len(compared) == 2
    assert all(len(a) == len(b) == 32 for a, b in compared)


@pytest.mark.parametrize(
    ("users", "says"),
    [
        ({}, "BasicAuth needs at least one user."),
        (
            {"alice": ("short", "operate")},
            "BasicAuth needs a password of at least 12 characters for 'alice'.",
        ),
        ({"alice": ("x" * 11, "operate")}, "at least 12 characters"),
        ({"alice": (None, "operate")}, "at least 12 characters"),
        (
            {"": ("alice-password-1234", "operate")},
            "BasicAuth got user ''; use a non-empty name without ':'.",
        ),
        ({"a:b": ("alice-password-1234", "operate")}, "without ':'"),
        ({"alice": ("alice-password-1234", "root")}, "BasicAuth got role 'root'; use 'read' or 'operate'."),
    ],
)
def test_basic_auth_refuses_short_passwords_bad_names_and_unknown_roles(users: Any, says: str) -> None:
    with pytest.raises(ValueError, match=re.escape(says)) as caught:
        BasicAuth(users)
    assert says in str(caught.value)


# -- CallableAuth ------------------------------------------------------------------------


def test_callable_auth_asks_the_apps_own_login() -> None:
    seen: list[Request] = []

    def login(req: Request) -> Principal | None:
        seen.append(req)
        session = req.native.get("session", {})
        return Principal(session["user"], session["role"]) if session else None

    auth = CallableAuth(login)
    environ = {"session": {"user": "carol", "role": "operate"}}
    assert auth(request(native=environ)) == Principal("carol", "operate")
    assert seen[-1].native is environ
    assert auth(request(native={})) is None
    assert auth.ambient is True


@pytest.mark.parametrize(
    ("returned", "error", "says"),
    [
        (("carol", "operate"), TypeError, "return a Principal or None"),
        ("carol", TypeError, "return a Principal or None"),
        (Principal("carol", "admin"), ValueError, "the admin's auth callable got role 'admin'"),  # type: ignore[arg-type]
    ],
)
def test_callable_auth_refuses_what_is_not_a_principal(
    returned: Any, error: type[Exception], says: str
) -> None:
    with pytest.raises(error, match=re.escape(says)) as caught:
        CallableAuth(lambda req: returned)(request())
    assert says in str(caught.value)


def test_callable_auth_needs_a_callable() -> None:
    with pytest.raises(TypeError, match="CallableAuth needs a callable"):
        CallableAuth("not callable")  # type: ignore[arg-type]


# -- CSRF tokens -------------------------------------------------------------------------

ALICE = Principal("alice", "operate")
NOW = 1_800_000_000.0  # on the hour: 500000 * 3600


def test_csrf_tokens_hold_for_this_hour_and_the_last() -> None:
    csrf = Csrf(b"k" * 32)
    token = csrf.token(ALICE, NOW + 10)
    assert token == csrf.token(ALICE, NOW + 3599)  # the same all hour
    assert len(token) == 64 and token.isascii()
    assert csrf.check(ALICE, token, NOW + 10)
    assert csrf.check(ALICE, token, NOW + 3600)  # the next hour: still the previous hour's
    assert csrf.check(ALICE, token, NOW + 7199)
    assert not csrf.check(ALICE, token, NOW + 7200)  # two hours on: too old
    assert not csrf.check(ALICE, token, NOW - 1)  # from the future


def test_csrf_tokens_belong_to_one_person_and_one_key() -> None:
    csrf = Csrf(b"k" * 32)
    token = csrf.token(ALICE, NOW)
    assert not csrf.check(Principal("mallory", "operate"), token, NOW)
    assert not Csrf(b"j" * 32).check(ALICE, token, NOW)
    assert csrf.check(Principal("alice", "read"), token, NOW)  # the name, not the role
    assert not csrf.check(ALICE, "", NOW)
    assert not csrf.check(ALICE, token[:-1], NOW)
    assert not csrf.check(ALICE, token.upper(), NOW)


def test_csrf_check_is_constant_time(compared: list[tuple[Any, Any]]) -> None:
    csrf = Csrf(b"k" * 32)
    csrf.check(ALICE, "0" * 64, NOW)
    assert len(compared) == 2  # this hour's and the last: both compared, always


def test_two_admins_with_one_secret_key_accept_each_others_tokens() -> None:
    # Two workers of one app: a page served by one posts to the other.
    one = Admin(MemoryStore(), auth=BearerAuth({TOKEN: ("bot", "operate")}), secret_key=KEY)
    two = Admin(MemoryStore(), auth=BearerAuth({TOKEN: ("bot", "operate")}), secret_key=KEY.encode())
    other = Admin(MemoryStore(), auth=BearerAuth({TOKEN: ("bot", "operate")}), secret_key=KEY + "x")
    token = one._core.csrf.token(ALICE)
    assert two._core.csrf.check(ALICE, token)
    assert not other._core.csrf.check(ALICE, token)


# -- Admin construction ------------------------------------------------------------------


def bearer() -> BearerAuth:
    return BearerAuth({TOKEN: ("bot", "operate")})


def test_admin_needs_auth_and_says_so_in_a_sentence() -> None:
    with pytest.raises(ValueError, match=r"^Admin needs auth") as caught:
        Admin(MemoryStore(), secret_key=KEY)
    assert str(caught.value) == (
        "Admin needs auth: BearerAuth, BasicAuth or CallableAuth (or a list of them); "
        "the operator page is off until it is configured."
    )
    with pytest.raises(ValueError, match="Admin got an empty auth list"):
        Admin(MemoryStore(), auth=[], secret_key=KEY)
    with pytest.raises(TypeError, match="pass BearerAuth, BasicAuth or CallableAuth"):
        Admin(MemoryStore(), auth=["token"], secret_key=KEY)  # type: ignore[list-item]


def test_admin_takes_a_plain_function_as_the_apps_login() -> None:
    def login(req: Request) -> Principal | None:
        return Principal("carol", "read")

    admin = Admin(MemoryStore(), auth=login, secret_key=KEY)
    assert isinstance(admin.auth[0], CallableAuth)
    assert admin.handle("GET", "/api/rollouts").status == 200
    admin = Admin(MemoryStore(), auth=(bearer(), login), secret_key=KEY)
    assert [type(a) for a in admin.auth] == [BearerAuth, CallableAuth]


@pytest.mark.parametrize("secret_key", ["", "x" * 31, b"x" * 31, 12345678901234567890123456789012345, None])
def test_admin_needs_a_secret_key_of_32_characters(secret_key: Any) -> None:
    with pytest.raises(ValueError, match="Admin needs a secret_key of at least 32 characters"):
        Admin(MemoryStore(), auth=bearer(), secret_key=secret_key)


@pytest.mark.parametrize("window", [0, 9.99, 86400.5, -300, math.nan, math.inf, True, "300", None])
def test_admin_refuses_a_window_outside_10_s_to_a_day(window: Any) -> None:
    with pytest.raises(ValueError, match="Admin got window=") as caught:
        Admin(MemoryStore(), auth=bearer(), secret_key=KEY, window=window)
    assert str(caught.value).endswith("use a number of seconds from 10 to 86400.")


@pytest.mark.parametrize("window", [10, 86400, 300.5])
def test_admin_takes_a_window_from_10_s_to_a_day(window: float) -> None:
    assert Admin(MemoryStore(), auth=bearer(), secret_key=KEY, window=window).window == float(window)


@pytest.mark.parametrize(
    ("store", "error", "says"),
    [
        (object(), TypeError, "pass a store (SQLiteStore, RedisStore) or its URL."),
        (None, TypeError, "pass a store"),
        ("not a url", ValueError, "is not a URL"),
        ("ftp://x", ValueError, "unknown scheme 'ftp'"),
    ],
)
def test_admin_refuses_what_is_not_a_store(store: Any, error: type[Exception], says: str) -> None:
    with pytest.raises(error, match=re.escape(says)) as caught:
        Admin(store, auth=bearer(), secret_key=KEY)
    assert says in str(caught.value)


def test_admin_opens_a_store_from_its_url(tmp_path: Any) -> None:
    admin = Admin(f"sqlite:///{tmp_path / 'state.db'}", auth=bearer(), secret_key=KEY)
    assert admin.handle("GET", "/api/rollouts", headers=[("Authorization", f"Bearer {TOKEN}")]).status == 200
    assert "SQLiteStore" in repr(admin)
    admin.store.close()


def test_an_authenticator_that_fails_is_a_500_and_never_lets_anyone_in() -> None:
    def broken(req: Request) -> Principal | None:
        raise RuntimeError("the session backend is down")

    admin = Admin(MemoryStore(), auth=broken, secret_key=KEY)
    assert admin.handle("GET", "/api/rollouts").status == 500


def test_a_csrf_token_of_any_text_is_refused_not_raised() -> None:
    from canarymw.admin._auth import Csrf, Principal

    csrf = Csrf(b"k" * 32)
    who = Principal("alice", "operate")
    for token in ("é" * 64, "\ud800", "", "0" * 64, csrf.token(Principal("bob", "operate"))):
        assert csrf.check(who, token) is False
    assert csrf.check(who, csrf.token(who)) is True


def test_uvicorn_takes_the_asgi_app_for_asgi3_by_itself() -> None:
    from uvicorn.config import Config

    from canarymw.admin import Admin, BearerAuth
    from canarymw.store import MemoryStore

    admin = Admin(MemoryStore(), auth=BearerAuth({"t" * 40: ("x", "read")}), secret_key="s" * 32)
    config = Config(admin.asgi)
    config.load()
    assert config.interface == "asgi3"
