from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from canarymw._cookie import CookieCodec, find_values, new_ids, normalise_keys, render_set_cookie


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        pytest.param("canarymw=abc", ["abc"], id="alone"),
        pytest.param("a=1; canarymw=abc; b=2", ["abc"], id="middle"),
        pytest.param("a=1;canarymw=abc", ["abc"], id="no space"),
        pytest.param("xcanarymw=evil; canarymw=abc", ["abc"], id="suffix name is not ours"),
        pytest.param("canarymw_x=1", [], id="prefix name is not ours"),
        pytest.param('canarymw="abc"', ["abc"], id="quoted"),
        pytest.param("canarymw=abc; canarymw=def", ["abc", "def"], id="duplicated, in order"),
        pytest.param("a=1, canarymw=abc", ["abc"], id="two headers joined by a comma"),
        pytest.param("canarymw=abc, b=2", ["abc"], id="comma ends the value"),
        pytest.param('bad"cookie=\\x; canarymw=abc', ["abc"], id="malformed neighbour"),
        pytest.param("canarymw=", [""], id="empty"),
        pytest.param("", [], id="empty header"),
    ],
)
def test_find_values(header: str, expected: list[str]) -> None:
    assert find_values(header, "canarymw") == expected


@given(st.text(max_size=300))
def test_find_values_never_raises(header: str) -> None:
    for value in find_values(header, "canarymw"):
        assert ";" not in value


def codec(*keys: str) -> CookieCodec:
    return CookieCodec(normalise_keys(list(keys), "test"))


def test_round_trip_and_size() -> None:
    c = codec("k1")
    cid = new_ids(2)[0]
    value = c.issue(cid, 1_700_000_000)
    assert len(value) < 100
    assert c.verify(value) == (cid, 1_700_000_000, True)


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda v: v[:-1], id="truncated signature"),
        pytest.param(lambda v: v[:20], id="truncated payload"),
        pytest.param(lambda v: v.replace("1.", "2.", 1), id="other version"),
        pytest.param(lambda v: "A" + v[1:], id="payload edited"),
        pytest.param(lambda v: v + "x" * 8192, id="oversized"),
        pytest.param(lambda v: v[:-2] + "é" + v[-1], id="non-ascii"),
        pytest.param(lambda v: "", id="empty"),
        pytest.param(lambda v: v.split(".")[0], id="no signature"),
    ],
)
def test_bad_values_are_no_cookie(mangle: object) -> None:
    c = codec("k1")
    value = c.issue(new_ids(2)[0], 1)
    assert c.verify(mangle(value)) is None  # type: ignore[operator]


@given(st.text(max_size=200))
def test_random_values_never_verify(value: str) -> None:
    assert codec("k1").verify(value) is None


def test_foreign_key_does_not_verify() -> None:
    value = codec("other").issue(new_ids(2)[0], 1)
    assert codec("k1").verify(value) is None


def test_rotation_oldest_to_newest() -> None:
    cid = new_ids(2)[0]
    old_value = codec("k-old").issue(cid, 1)
    rotated = codec("k-old", "k-new")
    # A cookie signed with the retiring key still verifies, flagged for re-issue.
    assert rotated.verify(old_value) == (cid, 1, False)
    # A cookie issued after rotation is signed with the newest key.
    new_value = rotated.issue(cid, 2)
    assert rotated.verify(new_value) == (cid, 2, True)
    assert codec("k-new").verify(new_value) == (cid, 2, True)
    # Once the old key is retired, its cookies no longer verify.
    assert codec("k-new").verify(old_value) is None


def test_flask_session_value_with_same_key_never_verifies() -> None:
    from itsdangerous import URLSafeTimedSerializer

    session = URLSafeTimedSerializer("k1", salt="cookie-session").dumps({"id": "x"})
    assert codec("k1").verify(session) is None


@pytest.mark.parametrize(
    ("keys", "error"),
    [
        pytest.param("", ValueError, id="empty"),
        pytest.param([], ValueError, id="empty list"),
        pytest.param(["ok", ""], ValueError, id="one empty"),
        pytest.param(None, TypeError, id="None"),
        pytest.param([1], TypeError, id="not str"),
    ],
)
def test_bad_keys(keys: object, error: type[Exception]) -> None:
    with pytest.raises(error, match=r"secret"):
        normalise_keys(keys, "Rollout 'x'")


def test_render_set_cookie() -> None:
    assert render_set_cookie(
        "canarymw", "v", max_age=60, path="/", domain=None, secure=True, httponly=True, samesite="Lax"
    ) == ("canarymw=v; Max-Age=60; Path=/; Secure; HttpOnly; SameSite=Lax")
    assert render_set_cookie(
        "c", "v", max_age=None, path="/a", domain="example.com", secure=False, httponly=False, samesite=None
    ) == ("c=v; Domain=example.com; Path=/a")


def test_issue_is_byte_identical_to_itsdangerous_signer() -> None:
    import hashlib

    from itsdangerous import Signer

    signer = Signer(
        ["k-old", "k-new"], salt="canarymw.cohort", key_derivation="hmac", digest_method=hashlib.sha256
    )
    cid = new_ids(2)[0]
    c = codec("k-old", "k-new")
    assert c.issue(cid, 123456) == signer.sign(f"1.{cid}.1e240").decode()
    # A batch (what first visits use) signs each id alike: no state leaks between them.
    ids = new_ids(50)
    values = c.issue_many(ids, 1_700_000_123)
    assert values == [signer.sign(f"1.{i}.{1_700_000_123:x}").decode() for i in ids]
    assert all(c.verify(v) == (i, 1_700_000_123, True) for i, v in zip(ids, values, strict=True))
