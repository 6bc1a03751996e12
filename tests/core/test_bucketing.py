from __future__ import annotations

import hashlib
import json
import math
import re
import secrets
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from canarymw import BUCKETS, Rollout, bucket

VECTORS = json.loads((Path(__file__).parents[1] / "vectors" / "buckets.json").read_text("utf-8"))


def vector_id(case: dict[str, str]) -> str:
    # Plain ASCII: pytest escapes other characters with backslashes, and such ids cannot be
    # selected again by a runner that reuses its process (mutmut does).
    return re.sub(r"[^A-Za-z0-9@./-]", "_", f"{case['salt']}/{case['key'][:12]}")


@pytest.mark.parametrize("case", VECTORS["vectors"], ids=vector_id)
def test_frozen_vectors(case: dict[str, object]) -> None:
    assert bucket(str(case["salt"]), str(case["key"])) == case["bucket"]


def test_vectors_follow_the_written_spec() -> None:
    # The spec in the data file, applied by hand, must give the same numbers.
    for case in VECTORS["vectors"]:
        digest = bytes.fromhex(case["sha256_hex"])
        assert int.from_bytes(digest[:8], "big") % VECTORS["buckets"] == case["bucket"]
    assert VECTORS["buckets"] == BUCKETS == 10_000


@given(st.text(), st.text())
def test_bucket_in_range_and_deterministic(salt: str, key: str) -> None:
    b = bucket(salt, key)
    assert 0 <= b < BUCKETS
    assert bucket(salt, key) == b


def test_split_within_four_sigma_of_binomial() -> None:
    rollout = Rollout("split", percent=10, secret_key="k" * 32)
    n = 20_000
    hits = sum(rollout.variant_for(secrets.token_urlsafe(16)) == "new" for _ in range(n))
    p = 0.10
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(hits - n * p) <= 4 * sigma


@pytest.mark.parametrize(("salt", "key"), [("s", "\ud800"), ("\udcff", "k"), ("s", "a\udfffb")])
def test_lone_surrogates_hash_without_raising(salt: str, key: str) -> None:
    # A key callable may hand over any str (say, a path decoded with surrogateescape); the
    # hash never raises on the request path, and encodes such a character as its UTF-8 form.
    raw = salt.encode("utf-8", "surrogatepass") + b"\x00" + key.encode("utf-8", "surrogatepass")
    expected = int.from_bytes(hashlib.sha256(raw).digest()[:8], "big") % BUCKETS
    assert bucket(salt, key) == expected
    assert Rollout("s", salt=salt, percent=50, secret_key="k" * 32).bucket_of(key) == expected


@settings(max_examples=200)
@given(st.lists(st.text(min_size=1, max_size=30), min_size=1, max_size=50, unique=True))
def test_ramp_is_monotone(keys: list[str]) -> None:
    rollout = Rollout("ramp", percent=10, secret_key="k" * 32)
    seen: set[str] = set()
    for pct in (10, 25, 50, 100):
        rollout.percent = pct
        now = {k for k in keys if rollout.variant_for(k) == "new"}
        assert seen <= now  # raising the percent never moves anyone back to old
        seen = now
    assert seen == set(keys)
    rollout.percent = 0
    assert all(rollout.variant_for(k) == "old" for k in keys)


def test_salts_are_independent() -> None:
    a = Rollout("a", percent=10, secret_key="k" * 32)
    b = Rollout("b", percent=10, secret_key="k" * 32)
    ids = [secrets.token_urlsafe(16) for _ in range(5000)]
    in_a = {i for i in ids if a.variant_for(i) == "new"}
    in_b = {i for i in ids if b.variant_for(i) == "new"}
    # Independent 10% splits overlap on about 1% of ids, not 10%.
    assert len(in_a & in_b) < 0.03 * len(ids)


def test_rollout_bucket_of_matches_the_reference() -> None:
    for case in VECTORS["vectors"]:
        r = Rollout("any", salt=case["salt"], percent=0, secret_key="k" * 32)
        assert r.bucket_of(case["key"]) == case["bucket"]


def test_javascript_in_the_docs_agrees_with_the_vectors(tmp_path: Path) -> None:
    import shutil
    import subprocess

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed; the JavaScript snippet cannot be run here")
    docs = (Path(__file__).parents[2] / "docs" / "cohorts.md").read_text("utf-8")
    snippet = re.search(r"```js\n(.*?)```", docs, re.S)
    assert snippet is not None
    script = tmp_path / "check.mjs"
    script.write_text(
        snippet.group(1)
        + "\nconst cases = JSON.parse(process.argv[2]);\n"
        + "const got = [];\nfor (const c of cases) got.push(await canaryBucket(c.salt, c.key));\n"
        + "console.log(JSON.stringify(got));\n",
        "utf-8",
    )
    out = subprocess.run(
        [node, str(script), json.dumps(VECTORS["vectors"])], capture_output=True, text=True, check=True
    )
    assert json.loads(out.stdout) == [c["bucket"] for c in VECTORS["vectors"]]


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_the_hash_used_is_sha256_and_copies_keep_their_state(head: bytes, tail: bytes) -> None:
    """Buckets and cookie signatures hash with CPython's own SHA-256 where it has one
    (cheaper than OpenSSL's for one-block messages): it must be SHA-256, bit for bit,
    and a copy must go on from the state it was taken in."""
    from canarymw._bucketing import sha256

    state = sha256(head)
    copy = state.copy()
    copy.update(tail)
    assert copy.digest() == hashlib.sha256(head + tail).digest()
    assert state.digest() == hashlib.sha256(head).digest()
