"""The frozen, portable bucketing hash.

Specification (stable across releases; any change is a breaking change caught by
``tests/vectors/buckets.json``)::

    digest = SHA-256( UTF-8(salt) || 0x00 || UTF-8(key) )
    h      = first 8 bytes of digest, read as an unsigned big-endian 64-bit integer
    bucket = h mod 10000

A visitor is in the ``new`` variant iff ``bucket < percent * 100``, the product rounded
to 6 decimal places (1.1% is buckets 0-109, not 0-110). SHA-256 is chosen
because every platform has it (Python ``hashlib``, browsers' ``crypto.subtle``, Node,
OpenSSL, nginx via njs/lua), so a front end or an edge rule can compute the same split.
The modulo bias of a 64-bit hash over 10,000 buckets is below 1e-15 and is ignored.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
from collections.abc import Callable
from typing import Any

BUCKETS = 10_000
"""Number of buckets; ``percent`` therefore has a resolution of 0.01."""


def _small_message_sha256() -> Callable[..., Any]:
    # The same SHA-256, from CPython's own C module when there is one: for the one-block
    # messages hashed per request (a bucket, an HMAC) OpenSSL's EVP layer costs more
    # than the hash (a context allocated, copied, cleansed and freed per copy() and per
    # digest()); a copy of CPython's state is a memcpy. Same bytes either way.
    if sys.implementation.name != "cpython":  # elsewhere these modules may be pure Python
        return hashlib.sha256
    for module in ("_sha2", "_sha256"):  # 3.12+, 3.10 and 3.11
        try:
            return importlib.import_module(module).sha256  # type: ignore[no-any-return]
        except (ImportError, AttributeError):  # a build without them: OpenSSL's
            continue
    return hashlib.sha256


sha256 = _small_message_sha256()


def bucketer(salt: str) -> Callable[[str], int]:
    """Return ``key -> bucket(salt, key)`` with the salt's hash state computed once."""
    salted = sha256(salt.encode("utf-8", "surrogatepass") + b"\x00")

    def bucket_of(key: str) -> int:
        h = salted.copy()
        h.update(key.encode("utf-8", "surrogatepass"))
        return int.from_bytes(h.digest()[:8], "big") % BUCKETS

    return bucket_of


def bucket(salt: str, key: str) -> int:
    """Return the bucket in ``[0, BUCKETS)`` of ``key`` under ``salt``."""
    return bucketer(salt)(key)
