from __future__ import annotations

import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from canarymw._cookie import (
    CookieCodec,
    decode_record,
    encode_record,
    find_values,
    new_ids,
    normalise_keys,
    render_set_cookie,
    validate_cookie_settings,
)


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
        pytest.param("Xcanarymw=evil; canarymw=abc", ["abc"], id="any letter before the name"),
        pytest.param("a=1;\tcanarymw=abc", ["abc"], id="tab before the name"),
        pytest.param("canarymw=abc; b=2; c=3", ["abc"], id="first semicolon ends the value"),
        pytest.param("canarymw=abc; b=2, c=3", ["abc"], id="a comma after the semicolon is not ours"),
        pytest.param("canarymw=a,b,c; d=1", ["a"], id="first comma ends the value"),
        pytest.param('canarymw=""', [""], id="empty quoted"),
        pytest.param('canarymw="', ['"'], id="one quote is kept"),
        pytest.param('canarymw=" a "', [" a "], id="quotes keep what they hold"),
        pytest.param("canarymw=  abc  ; x=1", ["abc"], id="blanks stripped"),
        pytest.param("canarymw=a; canarymw=b; canarymw=c", ["a", "b", "c"], id="three, in order"),
        pytest.param("canarymw=a;canarymw=b", ["a", "b"], id="back to back"),
        pytest.param("xcanarymw=1; canarymw=a; canarymw=b", ["a", "b"], id="lookalike first, then two"),
    ],
)
def test_find_values(header: str, expected: list[str]) -> None:
    assert find_values(header, "canarymw") == expected


def test_find_values_stops_at_the_limit() -> None:
    header = "canarymw=a; x=1; canarymw=b; canarymw=c"
    assert find_values(header, "canarymw", 1) == ["a"]
    assert find_values(header, "canarymw", 2) == ["a", "b"]
    assert find_values(header, "canarymw", 5) == ["a", "b", "c"]
    assert find_values(header, "canarymw", None) == ["a", "b", "c"]
    assert find_values(header, "x") == ["1"]


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
    assert c.verify(value) == (cid, 1_700_000_000, True, "")


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
    assert rotated.verify(old_value) == (cid, 1, False, "")
    # A cookie issued after rotation is signed with the newest key.
    new_value = rotated.issue(cid, 2)
    assert rotated.verify(new_value) == (cid, 2, True, "")
    assert codec("k-new").verify(new_value) == (cid, 2, True, "")
    # Once the old key is retired, its cookies no longer verify.
    assert codec("k-new").verify(old_value) is None


def test_flask_session_value_with_same_key_never_verifies() -> None:
    from itsdangerous import URLSafeTimedSerializer

    session = URLSafeTimedSerializer("k1", salt="cookie-session").dumps({"id": "x"})
    assert codec("k1").verify(session) is None


@pytest.mark.parametrize(
    ("keys", "error", "match"),
    [
        pytest.param(
            "", ValueError, r"got an empty secret key; .* keep it out of source control\.$", id="empty"
        ),
        pytest.param([], ValueError, r"^Rollout 'x' needs a secret_key; an empty key list", id="empty list"),
        pytest.param(["ok", ""], ValueError, r"empty secret key", id="one empty"),
        pytest.param(None, TypeError, r"secret_key as a str, .* not NoneType\.$", id="None"),
        pytest.param(5, TypeError, r"not int\.$", id="int"),
        pytest.param([1], TypeError, r"got a secret key of type int; use str or bytes\.$", id="not str"),
    ],
)
def test_bad_keys(keys: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        normalise_keys(keys, "Rollout 'x'")


def test_keys_become_bytes_oldest_first() -> None:
    assert normalise_keys("k", "x") == [b"k"]
    assert normalise_keys(b"k", "x") == [b"k"]
    assert normalise_keys(["a", b"b", "c"], "x") == [b"a", b"b", b"c"]
    assert normalise_keys(("a",), "x") == [b"a"]


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
    assert all(c.verify(v) == (i, 1_700_000_123, True, "") for i, v in zip(ids, values, strict=True))


def _signed(payload: str, key: str = "k1") -> str:
    import hashlib

    from itsdangerous import Signer

    signer = Signer(key, salt="canarymw.cohort", key_derivation="hmac", digest_method=hashlib.sha256)
    return signer.sign(payload).decode()


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param("2.AAAAAAAAAAAAAAAAAAAAAA.1", id="another format version"),
        pytest.param("1.AAAAAAAAAAAAAAAAAAAAA.1", id="id of 21 characters"),
        pytest.param("1.AAAAAAAAAAAAAAAAAAAAAAA.1", id="id of 23 characters"),
        pytest.param("1.AAAAAAAAAAAAAAAAAAAAAA.1.x", id="four parts"),
        pytest.param("1.AAAAAAAAAAAAAAAAAAAAAA", id="two parts"),
        pytest.param("1.AAAAAAAAAAAAAAAAAAAAAA.zz", id="issue time not hexadecimal"),
        pytest.param("1.AAAAAAAAAAAAAAAAAAAAAA.", id="no issue time"),
        pytest.param("3.AAAAAAAAAAAAAAAAAAAAAA.1.n0", id="format 3"),
        pytest.param("2.AAAAAAAAAAAAAAAAAAAAAA.1.", id="empty record"),
        pytest.param("2.AAAAAAAAAAAAAAAAAAAAAA.1.n", id="record without epoch"),
        pytest.param("2.AAAAAAAAAAAAAAAAAAAAAA.1.q0", id="record of an unknown variant"),
        pytest.param("2.AAAAAAAAAAAAAAAAAAAAAA.1.n00", id="epoch with a leading zero"),
        pytest.param("2.AAAAAAAAAAAAAAAAAAAAAA.1.nG", id="epoch not hexadecimal"),
        pytest.param("2.AAAAAAAAAAAAAAAAAAAAAA.1.n123456789", id="epoch of nine digits"),
        pytest.param("2.AAAAAAAAAAAAAAAAAAAAAA.1.n0-2710", id="anchor bucket 10000"),
        pytest.param("2.AAAAAAAAAAAAAAAAAAAAAA.1.n0-", id="empty anchor bucket"),
        pytest.param("2.AAAAAAAAAAAAAAAAAAAAAA.1.n0-0f", id="anchor with a leading zero"),
        pytest.param("2.AAAAAAAAAAAAAAAAAAAAAA.1.n0-1-2", id="two anchors"),
        pytest.param("1.AAAAAAAAAAAAAAAAAAAAAA.1.n0", id="a record in format 1"),
    ],
)
def test_signed_but_malformed_values_are_no_cookie(payload: str) -> None:
    # Correctly signed with our key and salt, so only the format checks can reject them.
    assert codec("k1").verify(_signed(payload)) is None


def test_signed_value_fields() -> None:
    assert codec("k1").verify(_signed("1.AAAAAAAAAAAAAAAAAAAAAA.ff")) == ("A" * 22, 255, True, "")
    assert codec("k0", "k1").verify(_signed("1.BBBBBBBBBBBBBBBBBBBBBB.10", "k0")) == ("B" * 22, 16, False, "")
    assert codec("k1").verify(_signed("2.AAAAAAAAAAAAAAAAAAAAAA.ff.n3")) == ("A" * 22, 255, True, "n3")
    assert codec("k1").verify(_signed("2.AAAAAAAAAAAAAAAAAAAAAA.ff.x0-270f")) == (
        "A" * 22,
        255,
        True,
        "x0-270f",
    )


@pytest.mark.parametrize("count", [2, 4, 64])
def test_new_ids(count: int) -> None:
    ids = new_ids(count)
    assert len(ids) == count == len(set(ids))
    assert all(
        len(i) == 22 and set(i) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        for i in ids
    )


@pytest.mark.parametrize(
    ("name", "samesite", "secure", "max_age", "match"),
    [
        pytest.param("", "Lax", None, 1, "cookie_name ''", id="empty name"),
        pytest.param("kéy", "Lax", None, 1, "cookie_name", id="non-ascii name"),
        *(
            pytest.param(f"a{c}b", "Lax", None, 1, "cookie_name", id=f"name with {c!r}")
            for c in ' \t;,="()<>@:\\/[]?{}'
        ),
        pytest.param("c", "lax", None, 1, "cookie_samesite 'lax'", id="samesite case"),
        pytest.param("c", "", None, 1, "cookie_samesite ''", id="samesite empty"),
        pytest.param("c", "None", False, 1, "SameSite=None without Secure", id="none without secure"),
        pytest.param("c", "Lax", None, 0, "cookie_max_age 0", id="zero max age"),
        pytest.param("c", "Lax", None, -5, "cookie_max_age -5", id="negative max age"),
        pytest.param("c", "Lax", None, True, "cookie_max_age True", id="bool max age"),
        pytest.param("c", "Lax", None, 1.5, "cookie_max_age 1.5", id="float max age"),
    ],
)
def test_bad_cookie_settings(
    name: str, samesite: str, secure: bool | None, max_age: object, match: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(match)):
        validate_cookie_settings("Rollout 'r'", name, samesite, secure, max_age)  # type: ignore[arg-type]


def test_samesite_none_error_says_what_to_do() -> None:
    with pytest.raises(
        ValueError, match=r"^Rollout 'r' sets SameSite=None without Secure; .* at None or True\.$"
    ):
        validate_cookie_settings("Rollout 'r'", "c", "None", False, None)


@pytest.mark.parametrize(
    ("name", "samesite", "secure", "max_age"),
    [
        pytest.param("canarymw", "Lax", None, 1, id="defaults, one second"),
        pytest.param("a-b_c.d!#$%&'*+^`|~", "Strict", False, None, id="token characters, session cookie"),
        pytest.param("X-Canary", "Lax", None, 1, id="capitals"),
        pytest.param("c", "None", True, 60, id="SameSite=None with Secure"),
        pytest.param("c", "None", None, 60, id="SameSite=None with Secure on https"),
        pytest.param("c", None, False, 60, id="no SameSite"),
    ],
)
def test_good_cookie_settings(
    name: str, samesite: str | None, secure: bool | None, max_age: int | None
) -> None:
    validate_cookie_settings("Rollout 'r'", name, samesite, secure, max_age)


@given(st.text(alphabet="nox0123456789abcdefABCDEF-+_ .", max_size=20))
def test_a_signed_record_is_read_exactly_as_written_or_refused(record: str) -> None:
    # Signed with our key, so only the record's own checks stand between it and a decision.
    value = _signed(f"2.AAAAAAAAAAAAAAAAAAAAAA.ff.{record}")
    decoded = decode_record(record)
    verified = codec("k1").verify(value)
    if decoded is None:
        assert verified is None
        return
    variant, epoch, bucket = decoded
    assert verified == ("A" * 22, 255, True, record)
    assert encode_record(variant, epoch, bucket) == record  # one spelling per record
    assert variant in (None, "old", "new") and 0 <= epoch < 16**8 and (bucket is None or 0 <= bucket < 10_000)


@given(
    st.sampled_from([None, "old", "new"]),
    st.integers(0, 16**8 - 1),
    st.one_of(st.none(), st.integers(0, 9_999)),
)
def test_every_record_round_trips(variant: str | None, epoch: int, bucket: int | None) -> None:
    record = encode_record(variant, epoch, bucket)
    assert decode_record(record) == (variant, epoch, bucket)
    assert len(record) <= 15
