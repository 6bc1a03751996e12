"""The cohort cookie: signing, verification, lenient lookup and ``Set-Cookie`` rendering.

The value is ``1.<id>.<issued>.<signature>``: format version ``1``, a random id of 22
base64url characters (128 to 132 random bits from the operating system), the issue
time in hexadecimal Unix seconds, and an itsdangerous HMAC-SHA256 signature under a
salt of its own, so no other value signed with the same secret key (a Flask session,
say) ever verifies as a cohort cookie. With the default ``monotone`` policy the variant
follows from the id and the live percent, and the cookie stores nothing else.

Format ``2`` adds a record: ``2.<id>.<issued>.<record>.<signature>``, the record being
``<v><epoch>`` or ``<v><epoch>-<bucket>``: ``v`` is ``n`` (new), ``o`` (old) or ``x``
(no variant recorded), ``epoch`` the assignment epoch in hexadecimal, and ``bucket``
(hexadecimal) the anchor bucket when it is not the id's own (a user's assignment
adopted on another device). The ``drain`` and ``pin`` policies record the variant;
format ``1`` values stay valid and mean "nothing recorded". A value is at most about
100 characters.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from base64 import urlsafe_b64encode
from binascii import b2a_base64
from collections.abc import Sequence
from typing import Any

from itsdangerous import Signer

from ._bucketing import sha256

VERSION = "1"
RECORD_VERSION = "2"
SIGNER_SALT = "canarymw.cohort"
MAX_VALUE_LENGTH = 200
"""Longer values are never ours and are rejected before any HMAC is computed."""

_SAMESITE = ("Lax", "Strict", "None")
_VARIANT_CODES = {"n": "new", "o": "old", "x": None}
_HEX = frozenset("0123456789abcdef")


def encode_record(variant: str | None, epoch: int, bucket: int | None) -> str:
    """The record field of a format ``2`` value (see the module docstring)."""
    code = "n" if variant == "new" else "o" if variant == "old" else "x"
    return f"{code}{epoch:x}" if bucket is None else f"{code}{epoch:x}-{bucket:x}"


def decode_record(record: str) -> tuple[str | None, int, int | None] | None:
    """``(variant, epoch, bucket)`` of a record field, or None if it is not one we write."""
    if not 2 <= len(record) <= 15 or record[0] not in _VARIANT_CODES:
        return None
    epoch, dash, bucket = record[1:].partition("-")
    if not epoch or len(epoch) > 8 or not _HEX.issuperset(epoch) or (epoch[0] == "0" and len(epoch) > 1):
        return None
    anchor = None
    if dash:
        if (
            not bucket
            or len(bucket) > 4
            or not _HEX.issuperset(bucket)
            or (bucket[0] == "0" and len(bucket) > 1)
        ):
            return None
        anchor = int(bucket, 16)
        if anchor >= 10_000:
            return None
    return _VARIANT_CODES[record[0]], int(epoch, 16), anchor


_URLSAFE = bytes.maketrans(b"+/", b"-_")


def normalise_keys(secret_key: object, owner: str) -> list[bytes]:
    """Return the key list oldest to newest, or raise a full-sentence ``ValueError``."""
    if isinstance(secret_key, (str, bytes)):
        keys: list[object] = [secret_key]
    elif isinstance(secret_key, Sequence):
        keys = list(secret_key)
    else:
        raise TypeError(
            f"{owner} needs secret_key as a str, bytes or a list of them (oldest to newest), "
            f"not {type(secret_key).__name__}."
        )
    if not keys:
        raise ValueError(f"{owner} needs a secret_key; an empty key list cannot sign cookies.")
    out: list[bytes] = []
    for k in keys:
        if not isinstance(k, (str, bytes)):
            raise TypeError(f"{owner} got a secret key of type {type(k).__name__}; use str or bytes.")
        if not k:
            raise ValueError(
                f"{owner} got an empty secret key; set a long random value "
                "(for example secrets.token_hex(32)) and keep it out of source control."
            )
        out.append(k.encode() if isinstance(k, str) else k)
    return out


def find_values(header: str, name: str, limit: int | None = None) -> list[str]:
    """Return the values of cookie ``name`` in a ``Cookie`` header, in header order.

    Lenient and linear: other cookies are never parsed, so one malformed neighbour
    (which makes ``http.cookies.SimpleCookie`` drop everything) cannot hide ours.
    Values are cut at ``;`` or ``,`` (two headers joined by a comma), stripped of
    blanks and optional double quotes. At most ``limit`` values are returned (all if
    None), and the search stops there. See: RFC 6265 §5.4 (order), §4.1.1 (syntax).
    """
    needle = name + "="
    out: list[str] = []
    start = header.find(needle)
    while start != -1 and len(out) != limit:
        if start == 0 or header[start - 1] in " ;,\t":
            begin = start + len(needle)
            end = len(header)
            semi = header.find(";", begin)
            if semi != -1:
                end = semi
            comma = header.find(",", begin, end)
            if comma != -1:
                end = comma
            value = header[begin:end].strip()
            if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
                value = value[1:-1]
            out.append(value)
            start = header.find(needle, end)
        else:
            start = header.find(needle, start + 1)
    return out


class CookieCodec:
    """Signs and verifies cohort cookie values with a rotating key list."""

    __slots__ = ("_states",)
    _states: list[tuple[Any, Any]]  # (inner, outer) keyed SHA-256 states, newest key first

    def __init__(self, keys: list[bytes]) -> None:
        # Signing and verifying are what new visitors pay for (and forged values too):
        # derive each key once (itsdangerous's HMAC derivation) and keep the two keyed
        # hash states of HMAC (RFC 2104) to copy. Byte-identical to Signer.sign(); newest
        # key first, so we know which key verified.
        self._states = []
        for k in reversed(keys):
            signer = Signer(k, salt=SIGNER_SALT, key_derivation="hmac", digest_method=hashlib.sha256)
            key = signer.derive_key().ljust(64, b"\0")  # derived key: 32 bytes
            self._states.append((sha256(bytes(b ^ 0x36 for b in key)), sha256(bytes(b ^ 0x5C for b in key))))

    def issue(self, cohort_id: str, issued: int, record: str = "") -> str:
        """Sign a new value for ``cohort_id`` with the newest key (format ``2`` with a
        ``record`` from :func:`encode_record`, else format ``1``)."""
        return self.issue_many([cohort_id], issued, record)[0]

    def issue_many(self, cohort_ids: list[str], issued: int, record: str = "") -> list[str]:
        """Sign new values for many ids at once with the newest key (Signer.sign()'s bytes)."""
        if record:
            prefix, suffix = f"{RECORD_VERSION}.".encode("ascii"), f".{issued:x}.{record}".encode("ascii")
        else:
            prefix, suffix = f"{VERSION}.".encode("ascii"), f".{issued:x}".encode("ascii")
        newest = self._states[0]
        out = []
        for cid in cohort_ids:
            payload = prefix + cid.encode("ascii") + suffix
            out.append((payload + b"." + _signature(newest, payload)).decode("ascii"))
        return out

    def verify(self, value: str) -> tuple[str, int, bool, str] | None:
        """Return ``(id, issued, signed_with_newest_key, record)`` or None for any bad value.

        ``record`` is the format ``2`` record field (checked by :func:`decode_record`),
        or ``""`` for a format ``1`` value.

        Only the canonical signature we issue verifies (itsdangerous would also take the
        same bytes spelt with padding or stray characters): a forged value costs one
        HMAC per key and nothing else.
        """
        if not value or len(value) > MAX_VALUE_LENGTH or not value.isascii():
            return None
        payload, dot, signature = value.rpartition(".")
        if not dot:
            return None
        raw, given = payload.encode("ascii"), signature.encode("ascii")
        for index, states in enumerate(self._states):
            if hmac.compare_digest(_signature(states, raw), given):
                parts = payload.split(".")
                if len(parts) == 3 and parts[0] == VERSION:
                    record = ""
                elif len(parts) == 4 and parts[0] == RECORD_VERSION and decode_record(parts[3]) is not None:
                    record = parts[3]
                else:
                    return None
                if len(parts[1]) != 22:
                    return None
                try:
                    issued = int(parts[2], 16)
                except ValueError:
                    return None
                return parts[1], issued, index == 0, record
        return None


def _signature(states: tuple[Any, Any], payload: bytes) -> bytes:
    # HMAC-SHA256 from the keyed states, base64url without padding: itsdangerous's format.
    inner, outer = states[0].copy(), states[1].copy()
    inner.update(payload)
    outer.update(inner.digest())
    return b2a_base64(outer.digest(), newline=False).rstrip(b"=").translate(_URLSAFE)


def new_ids(count: int) -> list[str]:
    """``count`` (even) fresh random ids in one system call: 132 bits each, 22 characters."""
    # 33 bytes encode to 44 base64url characters without padding: two whole ids.
    raw = urlsafe_b64encode(os.urandom(33 * (count // 2))).decode("ascii")
    return [raw[i : i + 22] for i in range(0, len(raw), 22)]


def render_set_cookie(
    name: str,
    value: str,
    *,
    max_age: int | None,
    path: str,
    domain: str | None,
    secure: bool,
    httponly: bool,
    samesite: str | None,
) -> str:
    """Render one ``Set-Cookie`` header value. See: RFC 6265 §4.1."""
    parts = [f"{name}={value}"]
    if max_age is not None:
        parts.append(f"Max-Age={max_age}")
    if domain:
        parts.append(f"Domain={domain}")
    parts.append(f"Path={path}")
    if secure:
        parts.append("Secure")
    if httponly:
        parts.append("HttpOnly")
    if samesite:
        parts.append(f"SameSite={samesite}")
    return "; ".join(parts)


def validate_cookie_settings(
    owner: str, name: str, samesite: str | None, secure: bool | None, max_age: int | None
) -> None:
    """Reject cookie settings a browser would ignore or misread."""
    if not name or not name.isascii() or any(c in name for c in ' \t;,="()<>@:\\/[]?{}'):
        raise ValueError(f"{owner} got cookie_name {name!r}; use a plain token such as 'canarymw'.")
    if samesite is not None and samesite not in _SAMESITE:
        raise ValueError(f"{owner} got cookie_samesite {samesite!r}; use 'Lax', 'Strict', 'None' or None.")
    if samesite == "None" and secure is False:
        raise ValueError(
            f"{owner} sets SameSite=None without Secure; browsers reject such cookies, "
            "so leave cookie_secure at None or True."
        )
    if max_age is not None and (isinstance(max_age, bool) or not isinstance(max_age, int) or max_age <= 0):
        raise ValueError(f"{owner} got cookie_max_age {max_age!r}; use a positive number of seconds or None.")
