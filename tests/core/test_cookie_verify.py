"""The cohort cookie's own HMAC verification agrees with itsdangerous on what we issue."""

from __future__ import annotations

import hashlib

from hypothesis import given
from hypothesis import strategies as st
from itsdangerous import BadSignature, Signer

from canarymw._cookie import SIGNER_SALT, VERSION, CookieCodec, new_ids, normalise_keys

KEYS = st.lists(st.text(min_size=1, max_size=40), min_size=1, max_size=3)


def signer(key: str) -> Signer:
    return Signer(key, salt=SIGNER_SALT, key_derivation="hmac", digest_method=hashlib.sha256)


@given(KEYS, st.integers(min_value=0, max_value=2**40), st.integers(min_value=0, max_value=2))
def test_values_signed_by_itsdangerous_verify_with_their_key(
    keys: list[str], issued: int, which: int
) -> None:
    which = min(which, len(keys) - 1)
    codec = CookieCodec(normalise_keys(keys, "test"))
    cid = new_ids(2)[0]
    value = signer(keys[which]).sign(f"{VERSION}.{cid}.{issued:x}").decode()
    newest = which == len(keys) - 1 or keys[which] == keys[-1]
    assert codec.verify(value) == (cid, issued, newest, "")


@given(KEYS, st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=120))
def test_anything_else_is_refused_as_itsdangerous_refuses_it(keys: list[str], junk: str) -> None:
    codec = CookieCodec(normalise_keys(keys, "test"))
    accepted = codec.verify(junk)
    if accepted is not None:  # only possible for a value itsdangerous also takes
        signer(keys[-1] if accepted[2] else keys[0]).unsign(junk)


def test_only_the_canonical_signature_verifies() -> None:
    codec = CookieCodec(normalise_keys(["k1"], "test"))
    value = codec.issue(new_ids(2)[0], 5)
    assert codec.verify(value) is not None
    padded = value + "="  # the same signature bytes, padded: itsdangerous takes it
    assert signer("k1").unsign(padded)
    assert codec.verify(padded) is None
    try:
        signer("k2").unsign(value)
    except BadSignature:
        pass
    else:  # pragma: no cover
        raise AssertionError("a foreign key verified")


def test_issued_values_are_what_itsdangerous_signs() -> None:
    codec = CookieCodec(normalise_keys(["old", "new"], "test"))
    cid = new_ids(2)[0]
    assert codec.issue(cid, 7) == signer("new").sign(f"{VERSION}.{cid}.7").decode()
