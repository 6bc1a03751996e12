"""The operator page's JSON API under real servers, on a SQLite store in a temporary directory.

``tests/apps/admin_api_app.py`` mounts the admin at ``/canary`` in a WSGI app served by
gunicorn (two workers, ``admin.mount_wsgi``) and in a Starlette app served by uvicorn
(``Mount("/canary", app=admin.asgi)``), beside a rollout that follows the same store.
What is checked: the API answers (auth, roles, CSRF across workers, HEAD, 413), a
change POSTed to one worker reaches the other's rollout (fresh visitors follow it), and
schemathesis, run from the document the server serves, finds every documented operation
conforming with valid and invalid input alike.
"""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from ..servers import free_port, serve

pytestmark = pytest.mark.server

NAME = "checkout-v2"  # the document's example name, so schemathesis's examples reach a real rollout
TOKEN = "admin-servers-operate-token-0123456789abcdef"
READ_TOKEN = "admin-servers-read-token-0123456789abcdefgh"
PASSWORD = "alice-password-1234"
ADMIN_KEY = "admin-servers-csrf-key-0123456789abcdef"
BEARER = {"Authorization": f"Bearer {TOKEN}"}
ALICE = {"Authorization": "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()}
APP = "tests.apps.admin_api_app"

CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "ignored_auth",
    "unsupported_method",
    "allow_header_conformance",
]
SEED = os.environ.get("CANARYMW_SCHEMATHESIS_SEED", "20261207")


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        "CANARYMW_TEST_STORE": f"sqlite:///{tmp_path / 'state.db'}",
        "CANARYMW_TEST_NAME": NAME,
        "CANARYMW_TEST_TOKEN": TOKEN,
        "CANARYMW_TEST_READ_TOKEN": READ_TOKEN,
        "CANARYMW_TEST_BASIC_PASSWORD": PASSWORD,
        "CANARYMW_TEST_ADMIN_KEY": ADMIN_KEY,
    }


@pytest.fixture
def gunicorn(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    argv = ["gunicorn", "-w", "2", "-b", f"127.0.0.1:{port}", "--log-level", "warning"]
    # No limit on the request line: a long name gets the admin's 400, not gunicorn's 414.
    argv += ["--limit-request-line", "0", f"{APP}:app"]
    with serve(argv, port, env=_env(tmp_path), ready_path="/canary/api/rollouts") as base:
        yield base


@pytest.fixture
def uvicorn(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    argv = ["uvicorn", "--host", "127.0.0.1", "--port", str(port), "--log-level", "warning"]
    with serve(
        [*argv, f"{APP}:asgi_app"], port, env=_env(tmp_path), ready_path="/canary/api/rollouts"
    ) as base:
        yield base


def _fresh(client: httpx.Client, base: str) -> httpx.Response:
    """A first visit: no cookie, a connection of its own (so either worker may take it)."""
    client.cookies.clear()
    r = client.get(base + "/", headers={"Connection": "close"})
    assert r.status_code == 200, r.text
    return r


def _follow(client: httpx.Client, base: str, version: int, variant: str, workers: int) -> set[str]:
    """Fresh visitors until ``workers`` processes have answered from ``version`` of the
    state; each answer from that version on says ``variant``. Returns the pids seen."""
    seen: set[str] = set()
    deadline = time.monotonic() + 20
    while len(seen) < workers:
        assert time.monotonic() < deadline, f"only workers {seen} applied version {version}"
        r = _fresh(client, base)
        if int(r.headers["X-Version"] or 0) >= version:
            assert r.headers["X-Variant"] == variant, r.headers
            seen.add(r.headers["X-Pid"])
        else:
            time.sleep(0.02)
    return seen


def _api_basics(client: httpx.Client, api: str) -> dict[str, Any]:
    r = client.get(api + "/rollouts", headers=BEARER)
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    assert r.headers["cache-control"] == "no-store"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    data: dict[str, Any] = r.json()
    assert NAME in data["rollouts"]
    # Nothing without credentials; a challenge says which.
    r = client.get(api + "/rollouts")
    assert r.status_code == 401
    assert r.json() == {"error": "authentication required.", "status": 401}
    assert "Bearer" in ", ".join(r.headers.get_list("www-authenticate"))
    # HEAD answers like GET, without the body.
    r = client.head(api + "/rollouts", headers=BEARER)
    assert r.status_code == 200 and r.content == b"" and int(r.headers["content-length"]) > 100
    # 405 with Allow, 404, 413: JSON under /api/.
    r = client.put(api + "/rollouts", headers=BEARER)
    assert (r.status_code, r.headers["allow"]) == (405, "GET, HEAD")
    assert client.get(api + "/rollout", params={"name": "nope"}, headers=BEARER).status_code == 404
    big = client.post(
        api + "/action",
        headers={**BEARER, "Content-Type": "application/json"},
        content=b"{" + b" " * 20_000 + b"}",
    )
    assert big.status_code == 413 and big.json()["status"] == 413
    # The read role looks but does not change.
    reader = {"Authorization": f"Bearer {READ_TOKEN}"}
    version = data["rollouts"][NAME]["state"]["version"]
    r = client.post(
        api + "/action", headers=reader, json={"name": NAME, "action": "promote", "expected_version": version}
    )
    assert r.status_code == 403
    return data


def _change(
    client: httpx.Client, api: str, action: str, headers: dict[str, str], **fields: Any
) -> dict[str, Any]:
    version = client.get(api + "/rollout", params={"name": NAME}, headers=BEARER).json()["rollouts"][NAME]
    body = {"name": NAME, "action": action, "expected_version": version["state"]["version"], **fields}
    r = client.post(api + "/action", headers=headers, json=body)
    assert r.status_code == 200, r.text
    result: dict[str, Any] = r.json()
    return result


def test_under_gunicorn_a_change_posted_to_one_worker_reaches_the_other(gunicorn: str) -> None:
    api = gunicorn + "/canary/api"
    with httpx.Client(timeout=10) as client:
        _api_basics(client, api)
        # Before: the code's 0%, every fresh visitor on old, in both workers.
        assert len(_follow(client, gunicorn, 1, "old", workers=2)) == 2
        done = _change(client, api, "set", BEARER, percent=100, reason="all in")
        assert done["state"]["updated_by"] == "deploy-bot"
        assert len(_follow(client, gunicorn, done["state"]["version"], "new", workers=2)) == 2

        # Basic auth needs the CSRF token; one worker's token works on the other (one key).
        stale = client.post(
            api + "/action",
            headers={**ALICE, "Connection": "close"},
            json={"name": NAME, "action": "rollback", "expected_version": done["state"]["version"]},
        )
        assert stale.status_code == 403
        tokens = set()
        for _ in range(6):  # new connections: the GETs land on both workers, sooner or later
            r = client.get(api + "/rollout", params={"name": NAME}, headers={**ALICE, "Connection": "close"})
            tokens.add(r.headers["x-csrf-token"])
        assert len(tokens) == 1
        csrf = {**ALICE, "X-CSRF-Token": tokens.pop(), "Connection": "close"}
        back = _change(client, api, "rollback", csrf, reason="p95 doubled")
        assert back["state"]["updated_by"] == "alice" and back["state"]["percent"] == 0.0
        assert len(_follow(client, gunicorn, back["state"]["version"], "old", workers=2)) == 2

        # A stale version is refused, whichever worker takes it.
        r = client.post(
            api + "/action",
            headers=BEARER,
            json={"name": NAME, "action": "promote", "expected_version": done["state"]["version"]},
        )
        assert r.status_code == 409 and r.json()["current_version"] == back["state"]["version"]

        changes = client.get(api + "/history", params={"name": NAME}, headers=BEARER).json()["changes"]
        assert [(c["action"], c["by"], c["reason"]) for c in changes[-2:]] == [
            ("set", "deploy-bot", "all in"),
            ("rollback", "alice", "p95 doubled"),
        ]


def test_under_uvicorn_the_starlette_mount_serves_the_api(uvicorn: str) -> None:
    api = uvicorn + "/canary/api"
    with httpx.Client(timeout=10) as client:
        _api_basics(client, api)
        doc = client.get(api + "/openapi.json", headers=BEARER).json()
        assert doc["servers"][0]["url"] == "/canary"
        done = _change(client, api, "set", BEARER, percent=100, reason="all in")
        _follow(client, uvicorn, done["state"]["version"], "new", workers=1)
        token = client.get(api + "/rollouts", headers=ALICE).headers["x-csrf-token"]
        paused = _change(client, api, "pause", {**ALICE, "X-CSRF-Token": token}, reason="incident 4711")
        assert paused["state"]["paused"] is True
        series = client.get(api + "/series", params={"name": NAME, "minutes": "5"}, headers=BEARER).json()
        assert series["rollout"] == NAME


def _schemathesis(base: str, tmp_path: Path) -> None:
    st = shutil.which("st", path=str(Path(sys.executable).parent))
    if st is None:  # pragma: no cover - dev extra not installed
        pytest.fail("schemathesis is not installed; install the dev extra: pip install -e '.[dev]'")
    # The document the server serves, as served (schemathesis leaves out the operation it
    # loads a document from, so it reads this copy and tests that operation too).
    served = httpx.get(base + "/canary/api/openapi.json", headers=BEARER, timeout=10)
    assert served.status_code == 200
    (tmp_path / "openapi.json").write_bytes(served.content)
    paths = served.json()["paths"]
    assert sorted((path, *ops) for path, ops in paths.items()) == [
        ("/api/action", "post"),
        ("/api/history", "get"),
        ("/api/openapi.json", "get"),
        ("/api/rollout", "get"),
        ("/api/rollouts", "get"),
        ("/api/series", "get"),
    ]
    operations = sum(len(ops) for ops in paths.values())
    argv = [
        st,
        "run",
        str(tmp_path / "openapi.json"),
        "--url",
        base + "/canary",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--checks",
        ",".join(CHECKS),
        "--max-examples",
        "30",
        "--seed",
        SEED,
        "--workers",
        "1",
        "--request-timeout",
        "10",
        "--generation-database",
        "none",
        "--report",
        "junit",
        "--report-junit-path",
        str(tmp_path / "junit.xml"),
        "--no-color",
    ]
    started = time.monotonic()
    result = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    took = time.monotonic() - started
    output = result.stdout + result.stderr
    (tmp_path / "schemathesis.txt").write_text(output)
    assert result.returncode == 0, _failures(output)
    assert f"Tested: {operations}" in output, output[-3000:]
    junit = (tmp_path / "junit.xml").read_text()
    assert junit.count("<testcase ") == operations, junit[:2000]
    assert "<failure" not in junit and "<error" not in junit
    print(f"schemathesis: {operations} operations, seed {SEED}, {took:.1f} s")


def test_schemathesis_finds_the_api_under_gunicorn_conforming(gunicorn: str, tmp_path: Path) -> None:
    _schemathesis(gunicorn, tmp_path)


def test_schemathesis_finds_the_api_under_uvicorn_conforming(uvicorn: str, tmp_path: Path) -> None:
    _schemathesis(uvicorn, tmp_path)


def _failures(output: str) -> str:
    """What schemathesis found, without the (long) reproduction commands."""
    lines = [line for line in output.splitlines() if "curl " not in line]
    text = "\n".join(lines)
    start = text.find("FAILURES")
    return text[start - 80 if start > 0 else 0 :][:8000]
