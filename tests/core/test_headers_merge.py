"""The header rules both adapters share (``canarymw._headers``), edge cases first.

A response whose body depends on the cohort must tell caches so: ``Cookie`` joins the app's
``Vary`` and ``private`` joins its ``Cache-Control`` unless the app already decided
(``private``, ``no-store`` or ``public``). The WSGI adapter merges ``str`` headers, the
ASGI adapter lowercase ``bytes``; both go through one function, tested here in both types.
See: RFC 9110 §12.5.5 (Vary), RFC 9111 §5.2.2 (Cache-Control).
"""

from __future__ import annotations

import pytest

from canarymw._headers import caching_headers, finish_headers, joined_cookie, with_ours

SET_COOKIE = "canarymw=v; Path=/"


@pytest.mark.parametrize(
    ("vary", "expected"),
    [
        pytest.param(None, "Cookie", id="absent"),
        pytest.param("", "Cookie", id="empty"),
        pytest.param("  ", "Cookie", id="blank is replaced, not appended to"),
        pytest.param("Accept-Encoding", "Accept-Encoding, Cookie", id="appended"),
        pytest.param("Accept, Accept-Language", "Accept, Accept-Language, Cookie", id="list appended"),
        pytest.param("Cookie", None, id="already"),
        pytest.param("accept ,  COOKIE ", None, id="already, any case and spacing"),
        pytest.param("Accept,Cookie", None, id="already, no space"),
        pytest.param("*", None, id="star varies on everything"),
        pytest.param("Accept, *", None, id="star in a list"),
        pytest.param("Cookies", "Cookies, Cookie", id="a longer token is another header"),
        pytest.param("X-Cookie", "X-Cookie, Cookie", id="a token ending in cookie is another header"),
    ],
)
def test_vary_merge(vary: str | None, expected: str | None) -> None:
    assert caching_headers(vary, None, None)[0] == expected
    assert caching_headers(vary, None, "private")[0] == expected  # independent of Cache-Control


@pytest.mark.parametrize(
    ("cache_control", "policy", "expected"),
    [
        pytest.param(None, "private", "private", id="absent"),
        pytest.param("", "private", "private", id="empty"),
        pytest.param(" ", "private", "private", id="blank"),
        pytest.param("max-age=60", "private", "private, max-age=60", id="policy goes first"),
        pytest.param("no-cache", "private", "private, no-cache", id="no-cache is not a decision"),
        pytest.param("private", "private", None, id="private kept"),
        pytest.param("PRIVATE", "private", None, id="directives are case-insensitive"),
        pytest.param('private="Set-Cookie"', "private", None, id="private with a field list"),
        pytest.param(" private = 1 ", "private", None, id="private with blanks"),
        pytest.param("no-store", "private", None, id="no-store kept"),
        pytest.param("max-age=0, no-store", "private", None, id="no-store later in the list"),
        pytest.param("public, max-age=5", "private", None, id="explicit public is the app's choice"),
        pytest.param("s-maxage=5, Public", "private", None, id="public later in the list"),
        pytest.param("max-age=5", "no-cache", "no-cache, max-age=5", id="another policy"),
        pytest.param("max-age=5", None, None, id="policy off: app's value untouched"),
        pytest.param(None, None, None, id="policy off: nothing added"),
        pytest.param(None, "", None, id="empty policy is off"),
        pytest.param("privates", "private", "private, privates", id="a longer token is another directive"),
        pytest.param("x-public=1", "private", "private, x-public=1", id="a token ending in public"),
    ],
)
def test_cache_control_merge(cache_control: str | None, policy: str | None, expected: str | None) -> None:
    assert caching_headers(None, cache_control, policy)[1] == expected
    assert caching_headers("Cookie", cache_control, policy)[1] == expected  # independent of Vary


def _same(value: str) -> str:
    return value


def _dec(value: bytes) -> str:
    return value.decode("latin-1")


def _enc(value: str) -> bytes:
    return value.encode("latin-1")


def merge_str(
    headers: list[tuple[str, str]], set_cookie: str | None = SET_COOKIE, policy: str | None = "private"
) -> list[tuple[str, str]]:
    """As the WSGI adapter calls it: str headers, names written in title case."""
    return finish_headers(headers, set_cookie, policy, ("Vary", "Cache-Control", "Set-Cookie"), _same, _same)


def merge_bytes(
    headers: list[tuple[bytes, bytes]], set_cookie: bytes | None = None, policy: str | None = "private"
) -> list[tuple[bytes, bytes]]:
    """As the ASGI adapter calls it: bytes headers, names written in lower case."""
    return finish_headers(headers, set_cookie, policy, (b"vary", b"cache-control", b"set-cookie"), _dec, _enc)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param(
            [("Content-Type", "text/plain")],
            [
                ("Content-Type", "text/plain"),
                ("Vary", "Cookie"),
                ("Cache-Control", "private"),
            ],
            id="appended in order",
        ),
        pytest.param(
            [("vary", "Accept"), ("X-A", "1"), ("CACHE-CONTROL", "max-age=5")],
            [("vary", "Accept, Cookie"), ("X-A", "1"), ("CACHE-CONTROL", "private, max-age=5")],
            id="replaced in place, the app's name spelling kept",
        ),
        pytest.param(
            [("Vary", "Accept"), ("X-A", "1"), ("Vary", "Origin"), ("X-B", "2")],
            [
                ("Vary", "Accept, Origin, Cookie"),
                ("X-A", "1"),
                ("X-B", "2"),
                ("Cache-Control", "private"),
            ],
            id="repeated Vary joined into the first line",
        ),
        pytest.param(
            [("Vary", "Accept"), ("Vary", "Origin"), ("Vary", "Cookie")],
            [
                ("Vary", "Accept"),
                ("Vary", "Origin"),
                ("Vary", "Cookie"),
                ("Cache-Control", "private"),
            ],
            id="repeated Vary already naming Cookie left alone",
        ),
        pytest.param(
            [("Vary", "a"), ("Vary", "b"), ("Cache-Control", "max-age=1"), ("Cache-Control", "no-cache")],
            [("Vary", "a, b, Cookie"), ("Cache-Control", "private, max-age=1, no-cache")],
            id="Cache-Control found again after the Vary lines moved",
        ),
        pytest.param(
            [
                ("Cache-Control", "max-age=1"),
                ("Vary", "a"),
                ("X", "1"),
                ("Vary", "b"),
                ("Cache-Control", "x"),
            ],
            [("Cache-Control", "private, max-age=1, x"), ("Vary", "a, b, Cookie"), ("X", "1")],
            id="Cache-Control before Vary",
        ),
        pytest.param(
            [("Cache-Control", "max-age=1"), ("X", "1"), ("Cache-Control", "no-cache")],
            [("Cache-Control", "private, max-age=1, no-cache"), ("X", "1"), ("Vary", "Cookie")],
            id="repeated Cache-Control joined into the first line",
        ),
        pytest.param(
            [("Cache-Control", "no-store"), ("Cache-Control", "max-age=1"), ("Vary", "Cookie")],
            [("Cache-Control", "no-store"), ("Cache-Control", "max-age=1"), ("Vary", "Cookie")],
            id="both already right: nothing but the cookie added",
        ),
        pytest.param(
            [("Cache-Control", "max-age=1"), ("Cache-Control", "public")],
            [("Cache-Control", "max-age=1"), ("Cache-Control", "public"), ("Vary", "Cookie")],
            id="public on a second line counts",
        ),
    ],
)
def test_finish_headers_str(headers: list[tuple[str, str]], expected: list[tuple[str, str]]) -> None:
    given = list(headers)
    assert merge_str(headers) == [*expected, ("Set-Cookie", SET_COOKIE)]  # our cookie always last
    assert headers == given  # the app's list is never mutated


def test_finish_headers_bytes_as_the_asgi_adapter_sends_them() -> None:
    headers = [(b"content-type", b"text/html"), (b"vary", b"accept"), (b"vary", b"origin")]
    out = merge_bytes(headers, b"canarymw=v")
    assert out == [
        (b"content-type", b"text/html"),
        (b"vary", b"accept, origin, Cookie"),
        (b"cache-control", b"private"),
        (b"set-cookie", b"canarymw=v"),
    ]
    assert headers[1:] == [(b"vary", b"accept"), (b"vary", b"origin")]


def test_finish_headers_without_cookie_or_policy() -> None:
    assert merge_str([("X", "1")], None, None) == [("X", "1"), ("Vary", "Cookie")]
    assert merge_str([("Vary", "Cookie")], None, None) == [("Vary", "Cookie")]
    assert merge_bytes([], None, "no-cache") == [(b"vary", b"Cookie"), (b"cache-control", b"no-cache")]


def test_finish_headers_accepts_any_iterable_once() -> None:
    out = merge_str(iter([("Vary", "a"), ("Cache-Control", "max-age=1")]))  # type: ignore[arg-type]
    assert out == [("Vary", "a, Cookie"), ("Cache-Control", "private, max-age=1"), ("Set-Cookie", SET_COOKIE)]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        pytest.param([], None, id="none"),
        pytest.param([(b"host", b"x")], None, id="other headers only"),
        pytest.param([(b"cookie", b"a=1")], b"a=1", id="one"),
        pytest.param([(b"cookie", b"")], b"", id="one empty is still a header"),
        pytest.param(
            [(b"cookie", b"a=1"), (b"host", b"x"), (b"cookie", b"b=2"), (b"cookie", b"c=3")],
            b"a=1; b=2; c=3",
            id="HTTP/2 split cookies rejoined in order",
        ),
        pytest.param([(b"Cookie", b"a=1")], None, id="ASGI names are lowercase: others are not ours"),
    ],
)
def test_joined_cookie(headers: list[tuple[bytes, bytes]], expected: bytes | None) -> None:
    assert joined_cookie(headers) == expected
    assert joined_cookie(iter(headers)) == expected


OURS = [("Vary", "Cookie"), ("Cache-Control", "private"), ("Set-Cookie", SET_COOKIE)]


@pytest.mark.parametrize(
    ("headers", "fold", "expected"),
    [
        pytest.param([], True, OURS, id="no headers: ours appended"),
        pytest.param([("X", "1")], True, [("X", "1"), *OURS], id="neither set: ours appended as they are"),
        pytest.param(
            [("VARY", "Accept")],
            True,
            [("VARY", "Accept, Cookie"), ("Cache-Control", "private"), ("Set-Cookie", SET_COOKIE)],
            id="WSGI: Vary in any case is merged",
        ),
        pytest.param(
            [("cache-control", "max-age=1"), ("X", "1")],
            True,
            [
                ("cache-control", "private, max-age=1"),
                ("X", "1"),
                ("Vary", "Cookie"),
                ("Set-Cookie", SET_COOKIE),
            ],
            id="WSGI: Cache-Control alone is merged",
        ),
    ],
)
def test_with_ours_str(headers: list[tuple[str, str]], fold: bool, expected: list[tuple[str, str]]) -> None:
    given = list(headers)
    out = with_ours(
        headers, OURS, SET_COOKIE, "private", ("Vary", "Cache-Control", "Set-Cookie"), _same, _same, fold
    )
    assert out == expected
    assert headers == given and out is not headers


def test_with_ours_bytes_as_the_asgi_adapter_sends_them() -> None:
    ours = [(b"vary", b"Cookie"), (b"cache-control", b"private")]
    names = (b"vary", b"cache-control", b"set-cookie")

    def merge(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
        return with_ours(headers, ours, None, "private", names, _dec, _enc, False)

    assert merge([(b"x", b"1")]) == [(b"x", b"1"), *ours]
    assert merge([(b"vary", b"accept")]) == [(b"vary", b"accept, Cookie"), (b"cache-control", b"private")]
    assert merge([(b"cache-control", b"public")]) == [(b"cache-control", b"public"), (b"vary", b"Cookie")]
